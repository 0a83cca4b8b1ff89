"""A one-line language for hostnode searches, shared by rule files, `tdbot hostnodes` and /cheapest.

A spec is a list of space-separated terms, each a field, an operator and a value:

    gpu=4090 count>=2 vram>=24 vcpus>=8 ram>=32 storage>=200 price<0.8
    country in [Canada,"United States"] city=Chicago uptime>=0.99 spot

Operators are =, !=, <, <=, >, >= and `in [A,B]`. Values are numbers, bare words or
quoted strings. Which operators a field takes is listed in FIELDS. Errors are
`SpecError`, with the 1-based column of the offending text and, for a misspelt field or
GPU name, the nearest valid one.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache, lru_cache
from importlib import resources
from typing import Any

# Lowest difflib similarity ratio at which a field or GPU name is suggested.
SUGGESTION_CUTOFF = 0.5
# Prices are compared at 6 decimals (tdbot.evaluation.pricing.PRICE_DECIMALS), so
# "price<X" is exactly "price<=X-0.000001".
PRICE_STEP = 0.000001

_OPERATORS = ("!=", "<=", ">=", "=", "<", ">")
# \w takes letters of every script, so city=Montréal needs no quotes.
_WORD = re.compile(r"[\w.\-+/]+")
_NUMBER = re.compile(r"-?\d+(\.\d+)?")
_VRAM_SUFFIX = re.compile(r"^(.*?)-?(\d+)gb$")


class SpecError(ValueError):
    """A spec cannot be parsed; `column` is the 1-based position of the offending text."""

    def __init__(self, message: str, column: int) -> None:
        super().__init__(f"column {column}: {message}")
        self.message = message
        self.column = column

    def pointer(self, text: str) -> str:
        """Return the spec and a caret under the offending column, for terminal output."""
        return f"  {text}\n  {' ' * (self.column - 1)}^"


@dataclass(frozen=True)
class Token:
    kind: str  # "word", "string", "op", "[", "]", ","
    text: str
    column: int


@dataclass(frozen=True)
class Term:
    """One parsed term, such as `price<0.8`; a flag such as `spot` has no operator."""

    field: str
    operator: str | None
    values: tuple[str, ...]
    column: int
    value_columns: tuple[int, ...] = ()


# Each field and the operators it takes. "in" takes a list; a flag takes none.
FIELDS: dict[str, tuple[str, ...]] = {
    "gpu": ("=", "!=", "in"),
    "count": ("=", ">=", ">"),
    "vram": ("=", ">=", ">", "<=", "<"),
    "vcpus": ("=", ">=", ">"),
    "ram": ("=", ">=", ">"),
    "storage": ("=", ">=", ">"),
    "price": ("<", "<="),
    "country": ("=", "!=", "in"),
    "city": ("=", "!=", "in"),
    "uptime": (">=",),
    "spot": (),
}


# --- tokens ----------------------------------------------------------------------


def tokenize(text: str) -> list[Token]:
    """Split a spec into tokens, or raise SpecError at the first character that fits none."""
    tokens: list[Token] = []
    index = 0
    while index < len(text):
        char = text[index]
        if char.isspace():
            index += 1
        elif char in "[],":
            tokens.append(Token(char, char, index + 1))
            index += 1
        elif char in "\"'":
            index = _read_string(text, index, tokens)
        elif (operator := _operator_at(text, index)) is not None:
            tokens.append(Token("op", operator, index + 1))
            index += len(operator)
        elif (match := _WORD.match(text, index)) is not None:
            tokens.append(Token("word", match.group(), index + 1))
            index = match.end()
        else:
            raise SpecError(f"unexpected character {char!r}", index + 1)
    return tokens


def _read_string(text: str, start: int, tokens: list[Token]) -> int:
    end = text.find(text[start], start + 1)
    if end < 0:
        raise SpecError(f"the string starting with {text[start]} is not closed", start + 1)
    tokens.append(Token("string", text[start + 1 : end], start + 1))
    return end + 1


def _operator_at(text: str, index: int) -> str | None:
    for operator in _OPERATORS:
        if text.startswith(operator, index):
            return operator
    return None


# --- terms -----------------------------------------------------------------------


def parse_terms(text: str, fields: Iterable[str] = FIELDS) -> list[Term]:
    """Parse a spec into terms, checking field names and each field's operators."""
    valid = list(fields)
    tokens = tokenize(text)
    terms: list[Term] = []
    position = 0
    while position < len(tokens):
        term, position = _parse_term(tokens, position, valid, len(text) + 1)
        terms.append(term)
    return terms


def _parse_term(
    tokens: list[Token], position: int, valid: list[str], end_column: int
) -> tuple[Term, int]:
    name = tokens[position]
    if name.kind != "word":
        raise SpecError(f"expected a field name, such as gpu, got {name.text!r}", name.column)
    field = name.text.lower()
    if field not in valid:
        raise SpecError(_unknown_field(field, valid), name.column)

    following = tokens[position + 1] if position + 1 < len(tokens) else None
    is_operator = following is not None and (
        following.kind == "op" or (following.kind == "word" and following.text.lower() == "in")
    )
    if not is_operator or following is None:
        if FIELDS.get(field, ("=",)) != ():
            column = following.column if following is not None else end_column
            raise SpecError(f"{field} needs an operator and a value, such as {field}=…", column)
        return Term(field, None, (), name.column), position + 1

    operator = following.text.lower()
    _check_operator(field, operator, following.column)
    if operator == "in":
        values, columns, position = _parse_list(tokens, position + 2, end_column)
    else:
        values, columns, position = _parse_values(tokens, position + 2, end_column)
        if len(values) > 1:
            operator = "in"
    return Term(field, operator, tuple(values), name.column, tuple(columns)), position


def _unknown_field(field: str, valid: list[str]) -> str:
    message = f"unknown key {field!r}"
    close = difflib.get_close_matches(field, valid, n=1, cutoff=SUGGESTION_CUTOFF)
    if close:
        return f"{message}; did you mean {close[0]!r}?"
    return f"{message}; valid keys: {', '.join(valid)}"


def _check_operator(field: str, operator: str, column: int) -> None:
    allowed = FIELDS.get(field, ("=",))
    if operator in allowed:
        return
    if not allowed:
        raise SpecError(f"{field} is a flag and takes no operator or value", column)
    listed = ", ".join("in [..]" if item == "in" else item for item in allowed)
    if field in _SIZE_FIELDS:
        # A size is what gets deployed, and a search prices exactly that size, so an
        # upper bound such as count<=4 would change nothing.
        raise SpecError(
            f"{field} sets the size to deploy and has no upper bound; use {listed}", column
        )
    raise SpecError(f"{field} does not take {operator}; use {listed}", column)


def _parse_values(
    tokens: list[Token], position: int, end_column: int
) -> tuple[list[str], list[int], int]:
    # "gpu=a,b" is the same as "gpu in [a,b]", so the older /cheapest form still works.
    values, columns = [], []
    while True:
        value = _value_token(tokens, position, end_column)
        values.append(value.text)
        columns.append(value.column)
        position += 1
        if position < len(tokens) and tokens[position].kind == ",":
            position += 1
            continue
        return values, columns, position


def _parse_list(
    tokens: list[Token], position: int, end_column: int
) -> tuple[list[str], list[int], int]:
    opening = tokens[position] if position < len(tokens) else None
    if opening is None or opening.kind != "[":
        column = opening.column if opening is not None else end_column
        raise SpecError("expected '[' after in, such as in [a,b]", column)
    values, columns = [], []
    position += 1
    while True:
        value = _value_token(tokens, position, end_column)
        values.append(value.text)
        columns.append(value.column)
        after = tokens[position + 1] if position + 1 < len(tokens) else None
        if after is None:
            raise SpecError("the list is not closed; add ']'", end_column)
        if after.kind == "]":
            return values, columns, position + 2
        if after.kind != ",":
            raise SpecError(f"expected ',' or ']' in the list, got {after.text!r}", after.column)
        position += 2


def _value_token(tokens: list[Token], position: int, end_column: int) -> Token:
    if position >= len(tokens):
        raise SpecError("a value is missing at the end", end_column)
    token = tokens[position]
    if token.kind not in ("word", "string") or not token.text.strip():
        raise SpecError(f"expected a value, got {token.text!r}", token.column)
    return token


# --- spec fields -----------------------------------------------------------------


def spec_fields(terms: Sequence[Term]) -> dict[str, Any]:
    """Turn terms into HostnodeSpec fields; a field set twice or out of range is an error."""
    fields: dict[str, Any] = {}
    for term in terms:
        for name, value in _term_fields(term).items():
            if name in fields:
                raise SpecError(f"{term.field} is set twice; keep one term", term.column)
            _check_range(term, name, value)
            fields[name] = value

    low, high = fields.get("min_vram_gb"), fields.get("max_vram_gb")
    if low is not None and high is not None and low > high:
        vram_terms = [term for term in terms if term.field == "vram"]
        raise SpecError(
            f"vram from {low} GB and up to {high} GB leaves no GPU; drop one of the vram terms",
            vram_terms[-1].column,
        )
    return fields


def _check_range(term: Term, name: str, value: Any) -> None:
    """Raise SpecError at the value when HostnodeSpec would reject it as out of range.

    The bounds are read from HostnodeSpec itself, so this message and a rule file's
    validation cannot disagree. The message names the spec term, not the field.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        return
    column = term.value_columns[0] if term.value_columns else term.column
    written = f"{term.field}{term.operator}{term.values[0]}"
    if name == "max_usd_per_hour" and value <= 0:
        raise SpecError(f"{written} leaves no price; give a cap above 0, such as price<0.8", column)
    low, high = _field_bounds(name)
    if low is not None and value < low:
        raise SpecError(f"{written} is out of range: {term.field} must be at least {low}", column)
    if high is not None and value > high:
        raise SpecError(f"{written} is out of range: {term.field} must be at most {high}", column)


@cache
def _field_bounds(name: str) -> tuple[float | None, float | None]:
    """Return the lowest and highest value HostnodeSpec accepts for a numeric field."""
    from tdbot.rules.schema import HostnodeSpec

    low = high = None
    for constraint in HostnodeSpec.model_fields[name].metadata:
        low = getattr(constraint, "ge", low)
        high = getattr(constraint, "le", high)
    return low, high


def _term_fields(term: Term) -> dict[str, Any]:
    if term.field == "spot":
        return {"spot": True}
    if term.field in ("gpu", "country", "city"):
        return _list_fields(term)
    if term.field == "price":
        cap = _number(term, float)
        return {"max_usd_per_hour": round(cap - PRICE_STEP if term.operator == "<" else cap, 6)}
    if term.field == "uptime":
        return {"min_uptime_percent": _uptime_percent(term)}
    if term.field == "vram":
        return _vram_fields(term)
    return {_SIZE_FIELDS[term.field]: _at_least(term)}


_SIZE_FIELDS = {"count": "gpu_count", "vcpus": "vcpus", "ram": "ram_gb", "storage": "storage_gb"}
_LIST_FIELDS = {
    "gpu": ("gpu", "exclude_gpu"),
    "country": ("countries", "exclude_countries"),
    "city": ("cities", "exclude_cities"),
}


def _list_fields(term: Term) -> dict[str, Any]:
    include, exclude = _LIST_FIELDS[term.field]
    values = [value.strip() for value in term.values]
    if term.field == "gpu":
        values = [value.lower() for value in values]
    return {exclude if term.operator == "!=" else include: values}


def _number(term: Term, kind: type[int] | type[float]) -> Any:
    text = term.values[0]
    column = term.value_columns[0] if term.value_columns else term.column
    if len(term.values) != 1 or not _NUMBER.fullmatch(text):
        raise SpecError(f"{term.field} needs a number, got {text!r}", column)
    if kind is int and "." in text:
        raise SpecError(f"{term.field} needs a whole number, got {text!r}", column)
    return kind(text)


def _at_least(term: Term) -> int:
    # A size is a request: "vcpus>=8" and "vcpus=8" both ask for 8, and ">" for one more.
    value: int = _number(term, int)
    return value + 1 if term.operator == ">" else value


def _vram_fields(term: Term) -> dict[str, Any]:
    value: int = _number(term, int)
    bounds = {
        "=": {"min_vram_gb": value, "max_vram_gb": value},
        ">=": {"min_vram_gb": value},
        ">": {"min_vram_gb": value + 1},
        "<=": {"max_vram_gb": value},
        "<": {"max_vram_gb": value - 1},
    }
    return bounds[term.operator or "="]


def _uptime_percent(term: Term) -> float:
    value: float = _number(term, float)
    if not 0 <= value <= 1:
        column = term.value_columns[0] if term.value_columns else term.column
        raise SpecError(f"uptime is a fraction from 0 to 1, such as 0.99, got {value}", column)
    return round(value * 100, 6)


# --- GPU names -------------------------------------------------------------------


def _compact(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def gpu_vram_gb(model: str) -> int | None:
    """Return the VRAM in GB written at the end of a model id, such as 24 for "…-24gb"."""
    match = _VRAM_SUFFIX.match(model.lower())
    return int(match.group(2)) if match else None


# Ranking asks this for every GPU of every hostnode and each name of a spec, while
# there are only a few dozen distinct model ids, so the answers are cached.
@lru_cache(maxsize=4096)
def gpu_matches(name: str, model: str) -> bool:
    """Whether a GPU name such as "4090" or "a100-80gb" matches a model id.

    An exact id matches itself. Otherwise the name's trailing "-NNgb", if any, must equal
    the model's VRAM and the rest must be a fragment of the model id, ignoring case and
    punctuation.
    """
    name, model = name.strip().lower(), model.lower()
    if name == model:
        return True
    match = _VRAM_SUFFIX.match(name)
    fragment = _compact(match.group(1) if match else name)
    if match and gpu_vram_gb(model) != int(match.group(2)):
        return False
    model_name = _VRAM_SUFFIX.match(model)
    searched = _compact(model_name.group(1) if model_name else model)
    return bool(fragment) and fragment in searched


@cache
def known_gpu_models() -> tuple[str, ...]:
    """Return the GPU model ids of the marketplace snapshot shipped with the simulator."""
    data = resources.files("tdbot.simulator").joinpath("data/marketplace.json").read_text()
    hostnodes = json.loads(data)["hostnodes"].values()
    return tuple(sorted({model for hostnode in hostnodes for model in hostnode["specs"]["gpu"]}))


def suggest_gpu_models(name: str, models: Iterable[str]) -> list[str]:
    """Return up to three model ids close to a name no model matches."""
    offered = sorted(set(models))
    compact = _compact(name)
    containing = [model for model in offered if compact and compact in _compact(model)]
    if containing:
        return containing[:3]
    scored = [(_similarity(compact, model), model) for model in offered]
    close = sorted((item for item in scored if item[0] >= SUGGESTION_CUTOFF), reverse=True)
    return [model for _, model in close[:3]]


def _similarity(compact_name: str, model: str) -> float:
    # Compare with the model's name without its VRAM suffix and brand prefix, because
    # "rtx4900" is far from "geforcertx4090-pcie-24gb" but close to "rtx4090".
    match = _VRAM_SUFFIX.match(model.lower())
    base = _compact(match.group(1) if match else model).removesuffix("pcie")
    short = re.sub(r"^(geforce|quadro)", "", base)
    matcher = difflib.SequenceMatcher(None, compact_name)
    ratios = []
    for candidate in (base, short):
        matcher.set_seq2(candidate)
        ratios.append(matcher.ratio())
    return max(ratios)


def check_gpu_names(terms: Sequence[Term], models: Iterable[str]) -> None:
    """Raise SpecError at the first GPU name that matches none of `models`."""
    offered = list(models)
    for term in terms:
        if term.field != "gpu":
            continue
        for value, column in zip(term.values, term.value_columns, strict=True):
            if any(gpu_matches(value, model) for model in offered):
                continue
            message = f"no GPU model matches {value!r}"
            suggestions = suggest_gpu_models(value, offered)
            if suggestions:
                message += f"; did you mean {' or '.join(suggestions)}?"
            raise SpecError(message, column)


# --- entry points ----------------------------------------------------------------


def parse_spec_fields(text: str, gpu_models: Iterable[str] | None = None) -> dict[str, Any]:
    """Parse a spec into HostnodeSpec fields; GPU names are checked against `gpu_models`.

    Without `gpu_models` the model ids of the shipped marketplace snapshot are used.
    An empty iterable skips the check, for callers that check against a live list later.

    NOTE: rule files use the snapshot, so a GPU model newer than the snapshot is rejected
    in the string form; the list form (`gpu: [model-id]`) accepts it.
    """
    terms = parse_terms(text)
    models = known_gpu_models() if gpu_models is None else tuple(gpu_models)
    if models:
        check_gpu_names(terms, models)
    return spec_fields(terms)
