"""Errors found in rule files, and their translation from pydantic into plain advice.

A `RuleError` is a record, not an exception: loading collects every error of every
file, so one bad rule never hides the others. Each message states what is wrong
and how to fix it.
"""

from __future__ import annotations

import difflib
import json
import types
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails, PydanticUndefined

from tdbot.rules.positions import Anchor, Location
from tdbot.rules.schema import format_duration


@dataclass(frozen=True)
class RuleError:
    """One problem in a rule file, at a 1-based line and column."""

    file: Path
    line: int
    column: int
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}: {self.field}: {self.message}"


@dataclass(frozen=True)
class Problem:
    """One problem in a rule, before it is tied to a position in its file.

    `loc` is the path of the field the message is about. `anchor` selects whether the
    message points at that field's value, its key, or the mapping that contains it.
    """

    loc: Location
    message: str
    anchor: Anchor = "value"


def dotted(loc: Location) -> str:
    """Format a path as `bid.max_usd_per_hour` or `match.gpu[0]`; the rule itself is `rule`."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text.lstrip(".") or "rule"


def suggest(word: str, choices: list[str]) -> str:
    """Return " did you mean 'x'?" for the closest choice, or "" when none is close."""
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" did you mean '{close[0]}'?" if close else ""


# --- pydantic errors ---------------------------------------------------------------


def problems_from_validation(exc: ValidationError, model: type[BaseModel]) -> list[Problem]:
    """Translate each pydantic error of `model.model_validate` into a Problem."""
    return [_problem_from_detail(detail, model) for detail in exc.errors(include_url=False)]


def _problem_from_detail(detail: ErrorDetails, model: type[BaseModel]) -> Problem:
    loc = tuple(detail["loc"])
    kind = detail["type"]
    if kind == "extra_forbidden":
        return Problem(loc, _unknown_field(loc, model), anchor="key")
    if kind == "missing":
        return Problem(loc, _missing_field(loc, model), anchor="parent")
    if detail["input"] is None and field_at(model, loc) is not None:
        # An empty YAML value ("window:") has its position on the next line, so point at the key.
        return Problem(loc, _no_value(loc, model), anchor="key")
    if kind in ("value_error", "assertion_error"):
        return _custom_problem(loc, detail, model)
    return Problem(loc, _bad_value(loc, detail, model))


def _unknown_field(loc: Location, model: type[BaseModel]) -> str:
    name = str(loc[-1])
    parent = model_at(model, loc[:-1])
    valid = list(parent.model_fields) if parent else []
    hint = suggest(name, valid)
    if not valid:
        return f"unknown field '{name}'; remove it"
    if hint:
        return f"unknown field '{name}';{hint} Valid fields: {', '.join(valid)}"
    return f"unknown field '{name}'; remove it or use a valid field: {', '.join(valid)}"


def _missing_field(loc: Location, model: type[BaseModel]) -> str:
    name = str(loc[-1])
    info = field_at(model, loc)
    message = f"missing required field '{name}'"
    if info is not None and info.description:
        message += f" ({info.description})"
    where = f" under '{dotted(loc[:-1])}'" if loc[:-1] else ""
    if info is None:
        return f"{message}; add it{where}"
    return f"{message}; add it{where} as {describe_type(info)}"


def _custom_problem(loc: Location, detail: ErrorDetails, model: type[BaseModel]) -> Problem:
    """Keep the text of the schema's own validators and point at the field they name."""
    error = detail.get("ctx", {}).get("error")
    message = str(error) if error is not None else _strip_prefix(detail["msg"])
    target = model_at(model, loc)
    if target is None:
        return Problem(loc, message)

    # A model-level check (such as "set exactly one of 'every' or 'cron'") has the
    # mapping as its path; point at the first field it names, preferring one that is set.
    present = detail["input"] if isinstance(detail["input"], dict) else {}
    named = [name for name in target.model_fields if _mentions(message, name)]
    named.sort(key=lambda name: _first_mention(message, name))
    for name in named:
        if name in present:
            return Problem((*loc, name), message)
    if named:
        return Problem((*loc, named[0]), message, anchor="parent")
    return Problem(loc, message)


def _mentions(message: str, name: str) -> bool:
    return _first_mention(message, name) >= 0


def _first_mention(message: str, name: str) -> int:
    """Index of `name` as a whole word in `message`, or -1."""
    start = 0
    while (index := message.find(name, start)) >= 0:
        before = message[index - 1] if index else " "
        end = index + len(name)
        after = message[end] if end < len(message) else " "
        if not (before.isalnum() or before == "_") and not (after.isalnum() or after == "_"):
            return index
        start = index + 1
    return -1


def _strip_prefix(message: str) -> str:
    for prefix in ("Value error, ", "Assertion failed, "):
        message = message.removeprefix(prefix)
    return message


def _no_value(loc: Location, model: type[BaseModel]) -> str:
    info = field_at(model, loc)
    if info is None:
        return "no value given; write a value"
    if info.is_required():
        return f"no value given; write {describe_type(info)}"
    return f"no value given; write {describe_type(info)}, or remove the line to use the default"


def _bad_value(loc: Location, detail: ErrorDetails, model: type[BaseModel]) -> str:
    kind = detail["type"]
    value = detail["input"]
    ctx = detail.get("ctx", {})
    info = field_at(model, loc) if loc and isinstance(loc[-1], str) else None
    if kind == "literal_error":
        return f"{_show(value)} is not allowed; use one of: {ctx.get('expected', '')}"
    if kind == "finite_number":
        return f"{_show(value)} is not a finite number; write a number such as 0.5"
    limits = {
        "greater_than_equal": ("must be at least", "ge"),
        "greater_than": ("must be greater than", "gt"),
        "less_than_equal": ("must be at most", "le"),
        "less_than": ("must be less than", "lt"),
    }
    if kind in limits:
        words, key = limits[kind]
        return f"{_show(value)} is out of range: the value {words} {_number(ctx.get(key))}"
    if kind == "too_short":
        count = ctx.get("min_length", 1)
        return f"the list needs at least {count} item{'s' if count != 1 else ''}"
    if kind == "too_long":
        return f"the list may have at most {ctx.get('max_length')} items"
    if kind == "list_type" and isinstance(value, str | int | float):
        example = json.dumps([value])
        return f"expected a list, got {_show(value)}; write it as {example}"
    expected = describe_type(info) if info is not None else _expected_from_message(detail)
    return f"expected {expected}, got {_show(value)}"


def _expected_from_message(detail: ErrorDetails) -> str:
    text = _strip_prefix(detail["msg"])
    return text.removeprefix("Input should be ").split(",")[0]


def _show(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def _number(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


# --- schema introspection --------------------------------------------------------


def model_at(model: type[BaseModel], loc: Location) -> type[BaseModel] | None:
    """Return the model class that validates the mapping at `loc`, if there is one."""
    current: Any = model
    for part in loc:
        current = _unwrap(current)
        if isinstance(part, int):
            if get_origin(current) is not list:
                return None
            current = get_args(current)[0]
            continue
        if not _is_model(current) or part not in current.model_fields:
            return None
        current = current.model_fields[part].annotation
    current = _unwrap(current)
    return current if _is_model(current) else None


def field_at(model: type[BaseModel], loc: Location) -> FieldInfo | None:
    """Return the pydantic field at `loc`, or None when `loc` names no field."""
    if not loc or not isinstance(loc[-1], str):
        return None
    parent = model_at(model, loc[:-1])
    if parent is None:
        return None
    return parent.model_fields.get(loc[-1])


def describe_type(info: FieldInfo) -> str:
    """Describe what a field accepts, with an example, such as "a duration such as '30m'"."""
    annotation = _unwrap(info.annotation)
    default = info.default if info.default is not PydanticUndefined else None
    if annotation is timedelta:
        example = f"'{format_duration(default)}'" if isinstance(default, timedelta) else "'30m'"
        return f"a duration with a unit (ms, s, m, h, d, w) such as {example}"
    if annotation is bool:
        return "true or false"
    if annotation is int:
        return f"a whole number such as {default if isinstance(default, int) else 1}"
    if annotation is float:
        return f"a number such as {default if isinstance(default, float) and default else 0.5}"
    if annotation is str:
        return f'text in quotes such as "{default if isinstance(default, str) else "text"}"'
    if get_origin(annotation) is list:
        return 'a list such as ["first", "second"]'
    if get_origin(annotation) is Literal:
        return "one of: " + ", ".join(repr(choice) for choice in get_args(annotation))
    if _is_model(annotation):
        return "a mapping with the fields: " + ", ".join(annotation.model_fields)
    return "a valid value"


def _unwrap(annotation: Any) -> Any:
    """Strip Annotated and Optional wrappers down to the type that validates a value."""
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            annotation = get_args(annotation)[0]
        elif origin in (Union, types.UnionType):
            members = [arg for arg in get_args(annotation) if arg is not type(None)]
            if len(members) != 1:
                return annotation
            annotation = members[0]
        else:
            return annotation


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)
