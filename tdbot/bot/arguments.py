"""Parse command arguments: durations, VM names or ids, and hostnode specs.

Every parser raises `UsageError` with a sentence that states what is wrong with which
argument; the command then replies with its usage line and that sentence.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Any

from pydantic import ValidationError

from tdbot.rules.schema import HostnodeSpec, parse_duration
from tdbot.tensordock.models import VirtualMachine

# A VM id prefix shorter than this is too likely to match a name by accident.
MIN_ID_PREFIX = 6

# Keys of the /cheapest spec and the HostnodeSpec field each sets.
SPEC_KEYS: dict[str, str] = {
    "gpu": "gpu",
    "count": "gpu_count",
    "vcpus": "vcpus",
    "ram": "ram_gb",
    "storage": "storage_gb",
    "country": "countries",
}
LIST_KEYS = {"gpu", "country"}
DEFAULT_TOP = 5
MAX_TOP = 20


class UsageError(Exception):
    """A command's arguments are missing or invalid; the message names which and why."""


def parse_duration_argument(text: str, name: str = "DURATION") -> timedelta:
    """Parse a duration such as "30m" or "2h", or raise UsageError."""
    try:
        return parse_duration(text)
    except ValueError as error:
        raise UsageError(f"{name}: {error}") from None


def find_vm(vms: Mapping[str, VirtualMachine], reference: str) -> VirtualMachine:
    """Find a VM by its id, its exact name, or a unique id prefix; raise UsageError if none.

    A name shared by several VMs is ambiguous, and the error lists their ids.
    """
    if reference in vms:
        return vms[reference]
    named = [vm for vm in vms.values() if vm.name == reference]
    if len(named) == 1:
        return named[0]
    if len(named) > 1:
        ids = ", ".join(sorted(vm.id for vm in named))
        raise UsageError(f"{len(named)} VMs are named {reference!r}; give one of their ids: {ids}")
    if len(reference) >= MIN_ID_PREFIX:
        prefixed = [vm for vm in vms.values() if vm.id.startswith(reference)]
        if len(prefixed) == 1:
            return prefixed[0]
    raise UsageError(f"no VM has the name or id {reference!r}; /vms lists them")


def split_arguments(text: str) -> list[str]:
    """Split a command's text after the command like a shell, so quotes group words."""
    try:
        return shlex.split(text)
    except ValueError as error:
        raise UsageError(f"the arguments cannot be split: {error}") from None


def parse_hostnode_spec(arguments: Sequence[str]) -> tuple[HostnodeSpec, int]:
    """Parse key=value arguments into a hostnode spec and the number of offers to show.

    Keys: gpu=MODEL[,MODEL] (required), count, vcpus, ram (GB), storage (GB),
    country=NAME[,NAME] and top. Unset fields take HostnodeSpec's defaults.
    """
    fields: dict[str, Any] = {}
    top = DEFAULT_TOP
    for argument in arguments:
        key, separator, value = argument.partition("=")
        key = key.strip().lower()
        if not separator or not value.strip():
            raise UsageError(f"{argument!r} is not key=value, such as gpu=geforcertx4090-pcie-24gb")
        if key == "top":
            top = _parse_top(value)
            continue
        if key not in SPEC_KEYS:
            valid = ", ".join([*SPEC_KEYS, "top"])
            raise UsageError(f"unknown key {key!r}; valid keys: {valid}")
        fields[SPEC_KEYS[key]] = _split_list(value) if key in LIST_KEYS else value.strip()

    if "gpu" not in fields:
        raise UsageError("gpu= is required, such as gpu=geforcertx4090-pcie-24gb")
    try:
        return HostnodeSpec.model_validate(fields), top
    except ValidationError as error:
        raise UsageError(_describe_spec_error(error)) from None


def _parse_top(value: str) -> int:
    if not value.strip().isdigit() or not 1 <= int(value) <= MAX_TOP:
        raise UsageError(f"top={value} is invalid; use a whole number from 1 to {MAX_TOP}")
    return int(value)


def _split_list(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def _describe_spec_error(error: ValidationError) -> str:
    keys = {field_name: key for key, field_name in SPEC_KEYS.items()}
    problems = []
    for problem in error.errors():
        field_name = str(problem["loc"][0]) if problem["loc"] else "spec"
        problems.append(f"{keys.get(field_name, field_name)}: {problem['msg']}")
    return "; ".join(problems)
