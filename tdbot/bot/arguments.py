"""Parse command arguments: durations, VM names or ids, and hostnode specs.

Every parser raises `UsageError` with a sentence that states what is wrong with which
argument; the command then replies with its usage line and that sentence.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterable, Mapping
from datetime import timedelta

from pydantic import ValidationError

from tdbot.rules.schema import HostnodeSpec, parse_duration
from tdbot.spec import FIELDS, SpecError, check_gpu_names, parse_terms, spec_fields
from tdbot.tensordock.models import VirtualMachine

# A VM id prefix shorter than this is too likely to match a name by accident.
MIN_ID_PREFIX = 6

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


def parse_hostnode_spec(text: str) -> tuple[HostnodeSpec, int]:
    """Parse a spec such as "gpu=4090 count>=2 price<0.8 top=3" and the number of offers.

    The terms are those of `tdbot.spec` plus top=N. GPU names are not checked here; use
    `check_gpu_names_offered` once the hostnode list is loaded.
    """
    try:
        terms = parse_terms(text, [*FIELDS, "top"])
        top_terms = [term for term in terms if term.field == "top"]
        fields = spec_fields([term for term in terms if term.field != "top"])
    except SpecError as error:
        raise UsageError(str(error)) from None

    top = _parse_top(top_terms[-1].values[0]) if top_terms else DEFAULT_TOP
    if "gpu" not in fields:
        raise UsageError("gpu= is required, such as gpu=4090 or gpu=geforcertx4090-pcie-24gb")
    try:
        return HostnodeSpec.model_validate(fields), top
    except ValidationError as error:
        raise UsageError(_describe_spec_error(error)) from None


def check_gpu_names_offered(text: str, models: Iterable[str]) -> None:
    """Raise UsageError when a GPU name in the spec matches none of the offered model ids."""
    try:
        check_gpu_names(parse_terms(text, [*FIELDS, "top"]), models)
    except SpecError as error:
        raise UsageError(str(error)) from None


def _parse_top(value: str) -> int:
    if not value.strip().isdigit() or not 1 <= int(value) <= MAX_TOP:
        raise UsageError(f"top={value} is invalid; use a whole number from 1 to {MAX_TOP}")
    return int(value)


# The spec key that sets each HostnodeSpec field, so errors name what the user typed.
_SPEC_KEYS = {
    "gpu": "gpu",
    "gpu_count": "count",
    "vcpus": "vcpus",
    "ram_gb": "ram",
    "storage_gb": "storage",
    "countries": "country",
    "cities": "city",
    "max_usd_per_hour": "price",
    "min_uptime_percent": "uptime",
    "min_vram_gb": "vram",
    "max_vram_gb": "vram",
}


def _describe_spec_error(error: ValidationError) -> str:
    keys = _SPEC_KEYS
    problems = []
    for problem in error.errors():
        field_name = str(problem["loc"][0]) if problem["loc"] else "spec"
        problems.append(f"{keys.get(field_name, field_name)}: {problem['msg']}")
    return "; ".join(problems)
