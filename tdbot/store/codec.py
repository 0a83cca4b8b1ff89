"""Conversion of rule state and decision evidence to and from JSON values."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from datetime import UTC, date, datetime, timedelta
from enum import Enum
from typing import Any

from tdbot.evaluation.model import IdleWarningState, LadderState
from tdbot.tensordock.models import Bounds, Restriction


def json_default(value: Any) -> Any:
    """Turn values json.dumps cannot write (times, enums, sets, dataclasses) into JSON values."""
    if isinstance(value, datetime):
        return encode_time(value)
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, set | frozenset):
        return sorted(value, key=str)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    raise TypeError(f"cannot store a {type(value).__name__} as JSON")


def dumps(value: Any) -> str:
    """Serialise a JSON column value; the engine uses this for every JSON column."""
    return json.dumps(value, default=json_default, separators=(",", ":"))


def encode_time(value: datetime) -> str:
    if value.tzinfo is None:
        raise ValueError(f"naive datetime {value.isoformat()} rejected; pass an aware UTC time")
    return value.astimezone(UTC).isoformat()


def decode_time(value: str) -> datetime:
    parsed = datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def decode_optional_time(value: str | None) -> datetime | None:
    return None if value is None else decode_time(value)


def encode_ladder(ladder: LadderState) -> dict[str, Any]:
    return {
        "steps_taken": ladder.steps_taken,
        "last_bid_usd": ladder.last_bid_usd,
        "started_at": encode_time(ladder.started_at) if ladder.started_at else None,
        "exhausted": ladder.exhausted,
        "step_times": [encode_time(moment) for moment in ladder.step_times],
        "redeployed": ladder.redeployed,
    }


def decode_ladder(value: dict[str, Any]) -> LadderState:
    return LadderState(
        steps_taken=int(value.get("steps_taken", 0)),
        last_bid_usd=value.get("last_bid_usd"),
        started_at=decode_optional_time(value.get("started_at")),
        exhausted=bool(value.get("exhausted", False)),
        step_times=tuple(decode_time(moment) for moment in value.get("step_times", [])),
        redeployed=bool(value.get("redeployed", False)),
    )


def encode_idle_warning(warning: IdleWarningState) -> dict[str, Any]:
    return {"warned_at": encode_time(warning.warned_at), "due_at": encode_time(warning.due_at)}


def decode_idle_warning(value: dict[str, Any]) -> IdleWarningState:
    return IdleWarningState(
        warned_at=decode_time(value["warned_at"]), due_at=decode_time(value["due_at"])
    )


def encode_restrictions(restrictions: Mapping[int, Restriction] | None) -> str | None:
    """Write a hostnode's restrictions as compact JSON, such as {"1":{"cpu":[2,16]}}.

    Each resource maps to [min, max], with null for a missing bound; None stays None.
    The text is stable for equal restrictions, so it can be compared for changes.
    """
    if restrictions is None:
        return None
    encoded: dict[str, dict[str, list[int | None]]] = {}
    for gpu_count in sorted(restrictions):
        restriction = restrictions[gpu_count]
        parts = {"cpu": restriction.cpu, "ram": restriction.ram, "storage": restriction.storage}
        encoded[str(gpu_count)] = {
            name: [bounds.min, bounds.max] for name, bounds in parts.items() if bounds is not None
        }
    return json.dumps(encoded, separators=(",", ":"))


def decode_restrictions(text: str | None) -> dict[int, Restriction] | None:
    """Read restrictions written by `encode_restrictions`."""
    if text is None:
        return None
    decoded: dict[int, Restriction] = {}
    for gpu_count, parts in json.loads(text).items():
        bounds = {name: Bounds(*parts[name]) if name in parts else None for name in _RESOURCES}
        decoded[int(gpu_count)] = Restriction(**bounds)
    return decoded


_RESOURCES = ("cpu", "ram", "storage")
