"""Line and column positions of the keys and values in a rule file.

ruamel.yaml records positions on the mappings and sequences it builds, so YAML positions
are read from there. tomllib records none, so TOML positions come from a small scanner
that walks the text of a document tomllib has already accepted. Positions are 1-based.
"""

from __future__ import annotations

import bisect
import contextlib
import tomllib
from dataclasses import dataclass, field
from typing import Any, Literal

from ruamel.yaml.comments import CommentedMap, CommentedSeq

Location = tuple[str | int, ...]
Anchor = Literal["value", "key", "parent"]


@dataclass(frozen=True, order=True)
class Position:
    """A 1-based line and column in a rule file."""

    line: int
    column: int


@dataclass
class PositionMap:
    """Positions of the keys and values of one rule, by their path inside the rule.

    A lookup that finds nothing for a path falls back to the nearest enclosing path,
    and finally to `start`, the position where the rule begins.
    """

    start: Position
    keys: dict[Location, Position] = field(default_factory=dict)
    values: dict[Location, Position] = field(default_factory=dict)

    def find(self, loc: Location, anchor: Anchor = "value") -> Position:
        """Find the position of the value or key at `loc`, or of its parent mapping."""
        if anchor == "parent":
            return self._nearest(loc[:-1], prefer_key=True)
        return self._nearest(loc, prefer_key=anchor == "key")

    def sub(self, prefix: Location) -> PositionMap:
        """Return the positions under `prefix`, with paths relative to it."""
        start = self.values.get(prefix) or self.keys.get(prefix) or self.start
        size = len(prefix)
        keys = {loc[size:]: pos for loc, pos in self.keys.items() if loc[:size] == prefix}
        values = {loc[size:]: pos for loc, pos in self.values.items() if loc[:size] == prefix}
        keys.pop((), None)
        values.pop((), None)
        return PositionMap(start=start, keys=keys, values=values)

    def _nearest(self, loc: Location, prefer_key: bool) -> Position:
        while loc:
            first, second = (self.keys, self.values) if prefer_key else (self.values, self.keys)
            found = first.get(loc) or second.get(loc)
            if found is not None:
                return found
            loc = loc[:-1]
        return self.start


# --- YAML -----------------------------------------------------------------------


def yaml_positions(node: Any, start: Position) -> PositionMap:
    """Collect the positions ruamel.yaml stored on a round-trip mapping or sequence."""
    positions = PositionMap(start=start)
    _walk_yaml(node, (), positions)
    return positions


def yaml_item_start(sequence: Any, index: int) -> Position | None:
    """Return the position of one item of a round-trip sequence, if ruamel stored it."""
    try:
        line, column = sequence.lc.item(index)
    except (KeyError, IndexError, AttributeError, TypeError):
        return None
    return Position(line + 1, column + 1)


def yaml_node_start(node: Any) -> Position:
    """Return where a round-trip mapping or sequence begins, or 1:1 when unknown."""
    line = getattr(getattr(node, "lc", None), "line", None)
    column = getattr(getattr(node, "lc", None), "col", None)
    if line is None or column is None:
        return Position(1, 1)
    return Position(line + 1, column + 1)


def _walk_yaml(node: Any, loc: Location, positions: PositionMap) -> None:
    if isinstance(node, CommentedMap):
        for key in node:
            child = (*loc, str(key))
            # Keys merged in with `<<:` have no position of their own.
            try:
                key_line, key_column = node.lc.key(key)
                value_line, value_column = node.lc.value(key)
            except KeyError:
                continue
            positions.keys[child] = Position(key_line + 1, key_column + 1)
            positions.values[child] = Position(value_line + 1, value_column + 1)
            _walk_yaml(node[key], child, positions)
    elif isinstance(node, CommentedSeq):
        for index, item in enumerate(node):
            start = yaml_item_start(node, index)
            if start is not None:
                positions.values[(*loc, index)] = start
            _walk_yaml(item, (*loc, index), positions)


# --- TOML -----------------------------------------------------------------------


class _ScanStopped(Exception):
    """The scanner met text it does not understand and keeps what it found so far."""


class NestingTooDeep(Exception):
    """A TOML value nests more arrays and inline tables than the scanner's `max_depth`."""

    def __init__(self, position: Position) -> None:
        super().__init__(f"nesting too deep at {position.line}:{position.column}")
        self.position = position


_BARE_KEY_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")


def toml_positions(text: str, *, max_depth: int) -> PositionMap:
    """Find the positions of the keys, tables and values in a valid TOML document.

    Paths use list indexes for arrays and for `[[table]]` arrays of tables, like the
    data tomllib returns. Positions the scanner could not reach are simply missing.
    Raises NestingTooDeep at the first array or inline table nested deeper than
    `max_depth`, which also bounds the scanner's recursion.
    """
    scanner = _TomlScanner(text, max_depth)
    # On syntax it does not follow, the scanner stops and keeps the positions found so far.
    # Lookups of the missing ones fall back to an enclosing key or the rule start.
    with contextlib.suppress(_ScanStopped):
        scanner.scan()
    positions = scanner.positions
    if positions.keys:
        positions.start = min(positions.keys.values())
    return positions


class _TomlScanner:
    """A position finder for TOML text that tomllib has already parsed without error."""

    def __init__(self, text: str, max_depth: int) -> None:
        self.text = text
        self.max_depth = max_depth
        self.depth = 0
        self.index = 0
        self.line_starts = [0] + [i + 1 for i, char in enumerate(text) if char == "\n"]
        self.positions = PositionMap(start=Position(1, 1))
        self.table: Location = ()
        self.array_lengths: dict[Location, int] = {}

    def scan(self) -> None:
        while True:
            self._skip_blank()
            if self._at_end():
                return
            if self.text[self.index] == "[":
                self._table_header()
            else:
                self._key_value(self.table)
            self._skip_to_line_end()

    # --- statements ---

    def _table_header(self) -> None:
        start = self._position()
        is_array = self.text.startswith("[[", self.index)
        self.index += 2 if is_array else 1
        names = [name for name, _ in self._key()]
        self._skip_spaces()
        self._expect("]]" if is_array else "]")
        table = (*self._resolve(names[:-1]), names[-1])
        if is_array:
            count = self.array_lengths.get(table, 0)
            self.array_lengths[table] = count + 1
            self.positions.keys.setdefault(table, start)
            self.positions.values.setdefault(table, start)
            table = (*table, count)
        self.positions.keys[table] = start
        self.positions.values[table] = start
        self.table = table

    def _key_value(self, table: Location) -> None:
        parts = self._key()
        self._skip_spaces()
        self._expect("=")
        self._skip_spaces()
        loc = table
        for name, position in parts:
            loc = (*loc, name)
            self.positions.keys.setdefault(loc, position)
        self.positions.values[loc] = self._position()
        self._value(loc)

    def _resolve(self, names: list[str]) -> Location:
        """Turn a dotted table name into a path, entering the last table of each array."""
        loc: Location = ()
        for name in names:
            loc = (*loc, name)
            if loc in self.array_lengths:
                loc = (*loc, self.array_lengths[loc] - 1)
        return loc

    # --- keys and values ---

    def _key(self) -> list[tuple[str, Position]]:
        parts = []
        while True:
            self._skip_spaces()
            start = self._position()
            parts.append((self._key_part(), start))
            self._skip_spaces()
            if not self.text.startswith(".", self.index):
                return parts
            self.index += 1

    def _key_part(self) -> str:
        start = self.index
        if self._at_end():
            raise _ScanStopped
        if self.text[start] in "\"'":
            self._string()
            # A quoted key may contain escapes, so tomllib decodes it.
            return str(tomllib.loads(f"k = {self.text[start : self.index]}")["k"])
        while not self._at_end() and self.text[self.index] in _BARE_KEY_CHARS:
            self.index += 1
        if self.index == start:
            raise _ScanStopped
        return self.text[start : self.index]

    def _value(self, loc: Location) -> None:
        if self._at_end():
            raise _ScanStopped
        char = self.text[self.index]
        if char in "\"'":
            self._string()
        elif char in "[{":
            self._nested_value(loc)
        else:
            self._bare_value()

    def _nested_value(self, loc: Location) -> None:
        if self.depth >= self.max_depth:
            raise NestingTooDeep(self._position())
        self.depth += 1
        if self.text[self.index] == "[":
            self._array(loc)
        else:
            self._inline_table(loc)
        self.depth -= 1

    def _array(self, loc: Location) -> None:
        self.index += 1
        count = 0
        while True:
            self._skip_blank()
            if self.text.startswith("]", self.index):
                self.index += 1
                return
            item = (*loc, count)
            self.positions.values[item] = self._position()
            self._value(item)
            count += 1
            self._skip_blank()
            if self.text.startswith(",", self.index):
                self.index += 1
            elif not self.text.startswith("]", self.index):
                raise _ScanStopped

    def _inline_table(self, loc: Location) -> None:
        self.index += 1
        while True:
            self._skip_spaces()
            if self.text.startswith("}", self.index):
                self.index += 1
                return
            self._key_value(loc)
            self._skip_spaces()
            if self.text.startswith(",", self.index):
                self.index += 1
            elif not self.text.startswith("}", self.index):
                raise _ScanStopped

    def _bare_value(self) -> None:
        # Numbers, booleans and dates; a date may contain one space ("1979-05-27 07:32:00").
        start = self.index
        while not self._at_end() and self.text[self.index] not in ",]}#\r\n":
            self.index += 1
        if self.index == start:
            raise _ScanStopped

    def _string(self) -> None:
        quote = self.text[self.index]
        if self.text.startswith(quote * 3, self.index):
            self._multiline_string(quote)
            return
        self.index += 1
        while not self._at_end() and self.text[self.index] != quote:
            self.index += 2 if quote == '"' and self.text[self.index] == "\\" else 1
        if self._at_end():
            raise _ScanStopped
        self.index += 1

    def _multiline_string(self, quote: str) -> None:
        self.index += 3
        while not self.text.startswith(quote * 3, self.index):
            if self._at_end():
                raise _ScanStopped
            self.index += 2 if quote == '"' and self.text[self.index] == "\\" else 1
        self.index += 3
        # Up to two quotes may directly precede the closing delimiter and belong to the string.
        extra = 0
        while extra < 2 and self.text.startswith(quote, self.index):
            self.index += 1
            extra += 1

    # --- whitespace, comments and positions ---

    def _skip_spaces(self) -> None:
        while not self._at_end() and self.text[self.index] in " \t":
            self.index += 1

    def _skip_blank(self) -> None:
        while not self._at_end():
            char = self.text[self.index]
            if char in " \t\r\n":
                self.index += 1
            elif char == "#":
                self._skip_comment()
            else:
                return

    def _skip_comment(self) -> None:
        end = self.text.find("\n", self.index)
        self.index = len(self.text) if end < 0 else end

    def _skip_to_line_end(self) -> None:
        self._skip_spaces()
        if self.text.startswith("#", self.index):
            self._skip_comment()

    def _expect(self, token: str) -> None:
        if not self.text.startswith(token, self.index):
            raise _ScanStopped
        self.index += len(token)

    def _at_end(self) -> bool:
        return self.index >= len(self.text)

    def _position(self) -> Position:
        return self._position_of(self.index)

    def _position_of(self, index: int) -> Position:
        line = bisect.bisect_right(self.line_starts, index)
        return Position(line, index - self.line_starts[line - 1] + 1)
