"""Load rule files from a folder or a single file, and report every error with its position.

Layout of a rule file:

- YAML (`.yaml`, `.yml`): one rule as a mapping, several rules as a list of mappings,
  or several `---` documents, each a mapping or a list of mappings.
- TOML (`.toml`): one rule at the top level, or several rules as `[[rule]]` tables; a
  file with `[[rule]]` tables has no other top-level keys.

A folder is read non-recursively: every `*.yaml`, `*.yml` and `*.toml` file in name
order, hidden files skipped. Validation runs in passes: file syntax, shape (each rule
is a mapping whose `kind` exists), schema (pydantic), meaning (checks of one rule that
the schema cannot express), and finally unique names across all files. A rule that
fails a pass is left out; every other rule still loads.

Before parsing, `tdbot.rules.limits` rejects files larger than 1 MiB and YAML with tags,
deep nesting or aliases that expand to too many nodes. A file without any rule, and a
symbolic link whose target is missing, are errors too.
"""

from __future__ import annotations

import logging
import re
import tomllib
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, TextIO, cast
from zoneinfo import ZoneInfo

from pydantic import ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedSeq, TaggedScalar
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.scalarbool import ScalarBoolean

from tdbot.rules.errors import Problem, RuleError, dotted, problems_from_validation, suggest
from tdbot.rules.limits import (
    MAX_DEPTH,
    MAX_FILE_BYTES,
    LimitExceeded,
    check_yaml_events,
    too_deep_message,
)
from tdbot.rules.positions import (
    NestingTooDeep,
    Position,
    PositionMap,
    toml_positions,
    yaml_item_start,
    yaml_node_start,
    yaml_positions,
)
from tdbot.rules.schema import (
    RULE_KINDS,
    CheapestHostnodeRule,
    IdleStopRule,
    LowBalanceRule,
    Rule,
    RuleBase,
    SpotRebidRule,
    format_duration,
)

logger = logging.getLogger("tdbot.rules.loader")

RULE_SUFFIXES = (".yaml", ".yml", ".toml")


@dataclass(frozen=True)
class LoadedRule:
    """A valid rule and where it starts in its file."""

    rule: Rule
    file: Path
    line: int
    column: int

    @property
    def name(self) -> str:
        return self.rule.name

    @property
    def location(self) -> str:
        """The start of the rule as `file:line:column`."""
        return f"{self.file}:{self.line}:{self.column}"


@dataclass
class RuleSet:
    """The rules that loaded, the errors of those that did not, and the files read."""

    rules: list[LoadedRule] = field(default_factory=list)
    errors: list[RuleError] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


@dataclass(frozen=True)
class _RawRule:
    """One rule as parsed from its file, before validation."""

    data: Any
    positions: PositionMap


class _FileProblem(Exception):
    """A problem that stops one file from loading at all, such as a syntax error."""

    def __init__(self, position: Position, field: str, message: str) -> None:
        super().__init__(message)
        self.position = position
        self.field = field
        self.message = message

    def to_error(self, file: Path) -> RuleError:
        return RuleError(file, self.position.line, self.position.column, self.field, self.message)


def load_rules(path: Path) -> RuleSet:
    """Load every rule in a folder or a single file, returning file problems as errors."""
    ruleset = RuleSet()
    ruleset.files, ruleset.errors = _find_rule_files(path)

    candidates: list[tuple[LoadedRule, PositionMap]] = []
    for file in ruleset.files:
        loaded, errors = _load_file(file)
        candidates.extend(loaded)
        ruleset.errors.extend(errors)

    ruleset.rules, duplicates = _drop_duplicate_names(candidates)
    ruleset.errors.extend(duplicates)
    ruleset.errors.sort(key=lambda error: (str(error.file), error.line, error.column))
    logger.debug(
        "loaded %d rules with %d errors from %d files under %s",
        len(ruleset.rules),
        len(ruleset.errors),
        len(ruleset.files),
        path,
    )
    return ruleset


def validate_command(path: Path, out: TextIO) -> int:
    """Print every error in the rules at `path` and a summary; return the exit code."""
    ruleset = load_rules(path)
    for error in ruleset.errors:
        print(error, file=out)
    print(_summary(ruleset), file=out)
    return 1 if ruleset.errors else 0


def _summary(ruleset: RuleSet) -> str:
    file_count = len(set(ruleset.files) | {error.file for error in ruleset.errors})
    if not ruleset.errors:
        return f"{_plural(len(ruleset.rules), 'rule')} OK in {_plural(file_count, 'file')}"
    bad_files = len({error.file for error in ruleset.errors})
    errors = _plural(len(ruleset.errors), "error")
    return f"{errors} in {bad_files} of {_plural(file_count, 'file')}"


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


# --- files -----------------------------------------------------------------------


def _find_rule_files(path: Path) -> tuple[list[Path], list[RuleError]]:
    if path.is_dir():
        try:
            children = list(path.iterdir())
        except OSError as exc:
            message = f"cannot list the folder ({exc}); check its permissions"
            return [], [RuleError(path, 1, 1, "path", message)]
        named = sorted(
            child
            for child in children
            if child.suffix.lower() in RULE_SUFFIXES and not child.name.startswith(".")
        )
        files = [child for child in named if child.is_file()]
        dangling = [_dangling_link(child) for child in named if _is_dangling(child)]
        return files, dangling
    if _is_dangling(path):
        return [], [_dangling_link(path)]
    if not path.exists():
        message = "no such file or folder; pass a rule file or a folder of rule files"
        return [], [RuleError(path, 1, 1, "path", message)]
    if path.suffix.lower() not in RULE_SUFFIXES:
        message = f"unsupported file type '{path.suffix}'; rule files end in .yaml, .yml or .toml"
        return [], [RuleError(path, 1, 1, "path", message)]
    return [path], []


def _is_dangling(path: Path) -> bool:
    # exists() follows the link, so it is False when the target is missing or the links loop.
    return path.is_symlink() and not path.exists()


def _dangling_link(path: Path) -> RuleError:
    try:
        target = str(path.readlink())
    except OSError as exc:
        target = f"unknown ({exc})"
    message = (
        f"symbolic link to '{target}', which does not exist; "
        "point the link at a rule file or delete it"
    )
    return RuleError(path, 1, 1, "path", message)


def _load_file(file: Path) -> tuple[list[tuple[LoadedRule, PositionMap]], list[RuleError]]:
    try:
        size = file.stat().st_size
        # Check the size before reading, because ruamel.yaml needs minutes for a YAML file
        # of a few megabytes.
        if size > MAX_FILE_BYTES:
            return [], [_too_large(file, size)]
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        message = f"cannot read the file ({exc}); check that it exists and is UTF-8 text"
        return [], [RuleError(file, 1, 1, "file", message)]

    try:
        raw_rules = _parse_toml(text) if file.suffix.lower() == ".toml" else _parse_yaml(text)
    except _FileProblem as problem:
        return [], [problem.to_error(file)]
    if not raw_rules:
        message = "file contains no rule; add one or delete the file"
        return [], [RuleError(file, 1, 1, "file", message)]

    loaded: list[tuple[LoadedRule, PositionMap]] = []
    errors: list[RuleError] = []
    for raw in raw_rules:
        result = _validate_rule(raw.data)
        if isinstance(result, list):
            errors.extend(_at_position(file, raw.positions, problem) for problem in result)
            continue
        start = raw.positions.start
        loaded.append((LoadedRule(result, file, start.line, start.column), raw.positions))
    return loaded, errors


def _too_large(file: Path, size: int) -> RuleError:
    mebibytes = MAX_FILE_BYTES / 1024 / 1024
    message = (
        f"file is {size:,} bytes, larger than the limit of {mebibytes:g} MiB for a rule "
        "file; split the rules into several files"
    )
    return RuleError(file, 1, 1, "file", message)


def _at_position(file: Path, positions: PositionMap, problem: Problem) -> RuleError:
    position = positions.find(problem.loc, problem.anchor)
    return RuleError(file, position.line, position.column, dotted(problem.loc), problem.message)


# --- YAML ------------------------------------------------------------------------


def _parse_yaml(text: str) -> list[_RawRule]:
    # The round-trip loader reads YAML 1.2 (so `NO` stays a string and `1:30` is not 90)
    # and keeps the line and column of every key and item.
    yaml = YAML(typ="rt")
    try:
        check_yaml_events(text)
        documents = list(yaml.load_all(text))
    except LimitExceeded as exc:
        raise _FileProblem(exc.position, exc.field, exc.message) from exc
    except MarkedYAMLError as exc:
        raise _yaml_syntax_problem(exc) from exc
    except YAMLError as exc:
        raise _FileProblem(Position(1, 1), "syntax", f"invalid YAML: {exc}") from exc

    raw_rules: list[_RawRule] = []
    for document in documents:
        if document is None:
            continue
        if isinstance(document, CommentedSeq):
            for index, item in enumerate(document):
                start = yaml_item_start(document, index) or yaml_node_start(document)
                raw_rules.append(_RawRule(_plain(item), yaml_positions(item, start)))
            continue
        start = yaml_node_start(document)
        raw_rules.append(_RawRule(_plain(document), yaml_positions(document, start)))
    return raw_rules


def _yaml_syntax_problem(exc: MarkedYAMLError) -> _FileProblem:
    mark = exc.problem_mark or exc.context_mark
    position = Position(mark.line + 1, mark.column + 1) if mark else Position(1, 1)
    problem = exc.problem or exc.context or "invalid syntax"
    message = f"invalid YAML: {problem}"
    start = exc.context_mark
    if exc.context and start is not None and mark is not None and start.line != mark.line:
        message += f" ({exc.context} that starts on line {start.line + 1})"
    return _FileProblem(position, "syntax", f"{message}; {_yaml_syntax_hint(problem)}")


def _yaml_syntax_hint(problem: str) -> str:
    if "'\\t'" in problem:
        return "indent with spaces, not tabs"
    if "mapping values are not allowed" in problem:
        return "check the indentation of this line, and quote values that contain ': '"
    if "duplicate key" in problem:
        return "remove or rename one of the two keys"
    if "undefined alias" in problem:
        return "define the anchor (&name) before its alias (*name)"
    if "expected ',' or ']'" in problem:
        return "close the list with ']', and separate its items with ','"
    if "expected ',' or '}'" in problem:
        return "close the mapping with '}', and separate its entries with ','"
    if "end of stream" in problem:
        return "close the quote or bracket that is still open"
    return "check the indentation, quotes and brackets near this position"


def _plain(node: Any) -> Any:
    """Convert ruamel's round-trip types into plain dicts, lists and scalars."""
    if isinstance(node, dict):
        return {str(key): _plain(value) for key, value in node.items()}
    if isinstance(node, list):
        return [_plain(item) for item in node]
    if isinstance(node, TaggedScalar):
        return node.value
    # ScalarBoolean subclasses int, so it must be converted before int.
    if isinstance(node, ScalarBoolean | bool):
        return bool(node)
    if isinstance(node, int):
        return int(node)
    if isinstance(node, float):
        return float(node)
    if isinstance(node, str):
        return str(node)
    return node


# --- TOML ------------------------------------------------------------------------

_TOML_ERROR_POSITION = re.compile(r"\s*\(at line (\d+), column (\d+)\)$")


def _parse_toml(text: str) -> list[_RawRule]:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise _toml_syntax_problem(exc, text) from exc
    except RecursionError:
        # tomllib recurses for each nested array or inline table. The position scanner
        # stops at MAX_DEPTH, so it finds where the nesting went too deep.
        raise _toml_too_deep(text) from None
    if not data:
        return []

    try:
        positions = toml_positions(text, max_depth=MAX_DEPTH)
    except NestingTooDeep as exc:
        raise _FileProblem(exc.position, "nesting", too_deep_message()) from exc
    if "rule" not in data:
        return [_RawRule(data, positions)]

    others = [key for key in data if key != "rule"]
    if others:
        message = (
            f"'{others[0]}' is outside the [[rule]] tables; a file with [[rule]] tables "
            "keeps every field inside them, so move it into a [[rule]] table"
        )
        raise _FileProblem(positions.find((others[0],), "key"), others[0], message)
    rules = data["rule"]
    if not isinstance(rules, list):
        message = "write each rule as a [[rule]] table, with two brackets, not [rule]"
        raise _FileProblem(positions.find(("rule",), "key"), "rule", message)
    return [_RawRule(item, positions.sub(("rule", index))) for index, item in enumerate(rules)]


def _toml_too_deep(text: str) -> _FileProblem:
    try:
        toml_positions(text, max_depth=MAX_DEPTH)
    except NestingTooDeep as exc:
        return _FileProblem(exc.position, "nesting", too_deep_message())
    return _FileProblem(Position(1, 1), "nesting", too_deep_message())


def _toml_syntax_problem(exc: tomllib.TOMLDecodeError, text: str) -> _FileProblem:
    problem = str(exc)
    match = _TOML_ERROR_POSITION.search(problem)
    if match:
        position = Position(int(match.group(1)), int(match.group(2)))
        problem = problem[: match.start()]
    else:
        # tomllib reports "(at end of document)" when the text ends too early.
        problem = problem.replace(" (at end of document)", "")
        lines = text.split("\n")
        position = Position(len(lines), len(lines[-1]) + 1)
    message = f"invalid TOML: {problem}; {_toml_syntax_hint(problem)}"
    return _FileProblem(position, "syntax", message)


def _toml_syntax_hint(problem: str) -> str:
    if problem.startswith(("Invalid value", "Expected newline or end of document")):
        return 'put text in double quotes, such as every = "10m" or name = "my-rule"'
    if problem.startswith(("Cannot overwrite a value", "Cannot declare")):
        return "each key and [table] may appear once; remove or rename the second one"
    if problem.startswith("Illegal character '\\n'") or "string" in problem:
        return "close the string on the same line"
    return "check the quotes, brackets and '=' signs near this position"


# --- shape and schema ------------------------------------------------------------


def _validate_rule(data: Any) -> Rule | list[Problem]:
    """Run the shape, schema and meaning passes on one rule."""
    if not isinstance(data, dict):
        message = (
            f"expected a rule, a mapping with name, kind and every or cron, got {_kind_of(data)}"
        )
        return [Problem((), message)]
    kind_problem = _check_kind(data)
    if kind_problem is not None:
        return [kind_problem]

    model = RULE_KINDS[data["kind"]]
    try:
        rule = cast(Rule, model.model_validate(data))
    except ValidationError as exc:
        return problems_from_validation(exc, model)
    return _check_meaning(rule) or rule


def _check_kind(data: dict[str, Any]) -> Problem | None:
    kinds = ", ".join(sorted(RULE_KINDS))
    if "kind" not in data:
        message = f"missing required field 'kind'; set it to one of: {kinds}"
        return Problem(("kind",), message, anchor="parent")
    kind = data["kind"]
    if isinstance(kind, str) and kind in RULE_KINDS:
        return None
    hint = suggest(kind, list(RULE_KINDS)) if isinstance(kind, str) else ""
    return Problem(("kind",), f"unknown kind {kind!r};{hint} Valid kinds: {kinds}")


def _kind_of(value: Any) -> str:
    if isinstance(value, list):
        return "a list"
    return f"{type(value).__name__} {value!r}"


# --- meaning ---------------------------------------------------------------------


def _check_meaning(rule: Rule) -> list[Problem]:
    """Catch valid-looking values that would make a rule never act or act wrongly."""
    problems = _check_cron(rule)
    if isinstance(rule, CheapestHostnodeRule):
        problems += _check_cheapest_hostnode(rule)
    elif isinstance(rule, SpotRebidRule):
        problems += _check_spot_rebid(rule)
    elif isinstance(rule, IdleStopRule):
        problems += _check_idle_stop(rule)
    elif isinstance(rule, LowBalanceRule):
        problems += _check_low_balance(rule)
    return problems


def _check_cron(rule: RuleBase) -> list[Problem]:
    if rule.cron is None:
        return []
    weekday = rule.cron.split()[4]
    if any(char.isdigit() for char in weekday):
        message = (
            f"weekday field {weekday!r} uses numbers, which mean different days in "
            "different cron dialects (APScheduler 3 counts 0 as Monday, classic cron as "
            "Sunday); write names such as 'mon-fri' or 'sun'"
        )
        return [Problem(("cron",), message)]

    # Imported here because APScheduler is only needed when a rule uses cron.
    from apscheduler.triggers.cron import CronTrigger

    try:
        CronTrigger.from_crontab(rule.cron, timezone=ZoneInfo(rule.timezone))
    except ValueError as exc:
        message = f"invalid cron expression {rule.cron!r}: {exc}; fix that field"
        return [Problem(("cron",), message)]
    return []


def _check_cheapest_hostnode(rule: CheapestHostnodeRule) -> list[Problem]:
    problems = []
    uptime = rule.match.min_uptime_percent
    if 0 < uptime <= 1:
        message = (
            f"{uptime} is read as {uptime}%, which lets almost any host through; "
            f"min_uptime_percent is a percentage, so write {uptime * 100:g} for {uptime * 100:g}%"
        )
        problems.append(Problem(("match", "min_uptime_percent"), message))
    if rule.alert.below_usd_per_hour == 0:
        message = "no price is ever below 0, so this alert never fires; set a price such as 0.60"
        problems.append(Problem(("alert", "below_usd_per_hour"), message))

    deploying = rule.deploy is not None and rule.deploy.enabled
    if rule.deploy is not None and deploying and rule.deploy.max_usd_per_hour == 0:
        message = (
            "a cap of 0 never deploys; set the highest full price per hour you accept, "
            "such as 0.60, or set deploy.enabled: false"
        )
        problems.append(Problem(("deploy", "max_usd_per_hour"), message))
    if rule.alert.below_usd_per_hour is None and not rule.alert.on_new_best and not deploying:
        message = (
            "this rule never alerts and never deploys; set alert.below_usd_per_hour, "
            "alert.on_new_best: true or deploy.enabled: true"
        )
        problems.append(Problem(("alert",), message))
    return problems


def _check_spot_rebid(rule: SpotRebidRule) -> list[Problem]:
    bid = rule.bid
    if bid.max_usd_per_hour == 0:
        message = "a cap of 0 never allows a bid; set the highest bid per hour, such as 0.50"
        return [Problem(("bid", "max_usd_per_hour"), message)]
    if bid.step_usd == 0:
        message = "a step of 0 never raises the bid; use a step such as 0.02"
        return [Problem(("bid", "step_usd"), message)]
    if bid.step_usd is not None and bid.step_usd > bid.max_usd_per_hour:
        message = (
            f"the step ({bid.step_usd}) is larger than the cap max_usd_per_hour "
            f"({bid.max_usd_per_hour}), so the first raise already passes the cap; "
            "lower step_usd or raise max_usd_per_hour"
        )
        return [Problem(("bid", "step_usd"), message)]
    return []


def _check_idle_stop(rule: IdleStopRule) -> list[Problem]:
    problems = []
    for name, threshold in rule.signals.model_dump().items():
        if threshold == 0:
            message = (
                f"no reading is ever below 0, so the VM never counts as idle; "
                f"use a small threshold above 0, or remove {name}"
            )
            problems.append(Problem(("signals", name), message))
    return problems


def _check_low_balance(rule: LowBalanceRule) -> list[Problem]:
    problems = []
    if rule.fire_below_balance_usd == 0:
        message = (
            "TensorDock stops the servers before the balance reaches 0, so this alert "
            "comes too late; set a balance such as 20"
        )
        problems.append(Problem(("fire_below_balance_usd",), message))
    runway = rule.fire_below_runway_hours
    if runway is not None and rule.every is not None and rule.every > timedelta(hours=runway):
        message = (
            f"the rule runs every {format_duration(rule.every)}, longer than the runway "
            f"of {runway:g} h it alerts at, so the money can run out between two runs; "
            "raise fire_below_runway_hours or shorten every"
        )
        problems.append(Problem(("fire_below_runway_hours",), message))
    return problems


# --- names -----------------------------------------------------------------------


def _drop_duplicate_names(
    candidates: list[tuple[LoadedRule, PositionMap]],
) -> tuple[list[LoadedRule], list[RuleError]]:
    """Keep the first rule of each name, in file order, and report every later one."""
    first_by_name: dict[str, LoadedRule] = {}
    kept: list[LoadedRule] = []
    errors: list[RuleError] = []
    for loaded, positions in candidates:
        first = first_by_name.get(loaded.name)
        if first is None:
            first_by_name[loaded.name] = loaded
            kept.append(loaded)
            continue
        position = positions.find(("name",))
        message = (
            f"duplicate rule name '{loaded.name}', also used by the rule at {first.location}; "
            "rename one of them, because alerts and chat commands find rules by name"
        )
        errors.append(RuleError(loaded.file, position.line, position.column, "name", message))
    return kept, errors
