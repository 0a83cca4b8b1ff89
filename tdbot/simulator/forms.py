"""Parse the form fields of simulated API requests into typed orders.

Every value arrives as a string. A field that is missing or not a number is rejected
with HTTP 400, as the real API rejects malformed deploys.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from tdbot.simulator.errors import SimApiError, bad_request

Form = Mapping[str, str]


def required_text(form: Form, name: str) -> str:
    value = form.get(name, "").strip()
    if not value:
        raise bad_request(f"Missing required field: {name}")
    return value


def optional_text(form: Form, name: str) -> str | None:
    value = form.get(name, "").strip()
    return value or None


def optional_int(form: Form, name: str) -> int | None:
    text = optional_text(form, name)
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        try:
            number = float(text)
        except ValueError:
            raise bad_request(f"Invalid {name}: {text!r} is not a whole number") from None
        if not number.is_integer():
            raise bad_request(f"Invalid {name}: {text!r} is not a whole number") from None
        return int(number)


def required_int(form: Form, name: str) -> int:
    value = optional_int(form, name)
    if value is None:
        raise bad_request(f"Missing required field: {name}")
    return value


def optional_float(form: Form, name: str) -> float | None:
    text = optional_text(form, name)
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        raise bad_request(f"Invalid {name}: {text!r} is not a number") from None


def required_float(form: Form, name: str) -> float:
    value = optional_float(form, name)
    if value is None:
        raise bad_request(f"Missing required field: {name}")
    return value


def parse_bool(form: Form, name: str, *, default: bool) -> bool:
    text = optional_text(form, name)
    if text is None:
        return default
    folded = text.lower()
    if folded in {"true", "1", "yes"}:
        return True
    if folded in {"false", "0", "no"}:
        return False
    raise bad_request(f"Invalid {name}: {text!r}, expected true or false")


def parse_port_list(form: Form, name: str) -> list[int]:
    """Parse a port list sent as "{a, b}", "[a, b]" or "a,b"; a missing field is empty."""
    text = optional_text(form, name)
    if text is None:
        return []
    inner = text.strip().lstrip("{[(").rstrip("}])")
    ports: list[int] = []
    for part in inner.split(","):
        item = part.strip().strip("'\"")
        if not item:
            continue
        if not item.isdigit() or not 0 < int(item) < 65536:
            raise bad_request(f"Invalid {name}: {item!r} is not a port number")
        ports.append(int(item))
    return ports


def parse_text_list(form: Form, name: str) -> list[str]:
    """Parse a list field sent as repeated keys' last value, "[a, b]", "{a, b}" or "a,b"."""
    text = optional_text(form, name)
    if text is None:
        return []
    inner = text.strip().lstrip("{[(").rstrip("}])")
    return [part.strip().strip("'\"") for part in inner.split(",") if part.strip()]


@dataclass(frozen=True)
class Shape:
    """The resources a VM asks for; RAM and storage in GB."""

    hostnode_id: str
    gpu_model: str | None
    gpu_count: int
    vcpus: int
    ram: int
    storage: int


@dataclass(frozen=True)
class DeployOrder:
    """A parsed `client/deploy/single` request."""

    name: str
    shape: Shape
    operating_system: str
    external_ports: list[int]
    internal_ports: list[int]
    has_credentials: bool
    cloudinit_script: str | None
    spot_bid: float | None


@dataclass(frozen=True)
class ModifyOrder:
    """A parsed `client/modify/single` request; None keeps the current value."""

    server_id: str
    gpu_model: str | None
    gpu_count: int | None
    vcpus: int | None
    ram: int | None
    storage: int | None


def parse_shape(form: Form) -> Shape:
    gpu_count = optional_int(form, "gpu_count") or 0
    return Shape(
        hostnode_id=required_text(form, "hostnode"),
        gpu_model=optional_text(form, "gpu_model"),
        gpu_count=gpu_count,
        vcpus=required_int(form, "vcpus"),
        ram=required_int(form, "ram"),
        storage=required_int(form, "storage"),
    )


def parse_deploy_form(form: Form) -> DeployOrder:
    """Parse a deploy request; semantic checks against the hostnode come later."""
    price_type = (optional_text(form, "price_type") or "").lower()
    if price_type not in {"", "spot", "ondemand", "on-demand"}:
        raise bad_request(f"Invalid price_type: {price_type!r}, expected spot")
    spot_bid = required_float(form, "price") if price_type == "spot" else None
    has_credentials = bool(optional_text(form, "password") or optional_text(form, "ssh_key"))
    return DeployOrder(
        name=required_text(form, "name"),
        shape=parse_shape(form),
        operating_system=required_text(form, "operating_system"),
        external_ports=parse_port_list(form, "external_ports"),
        internal_ports=parse_port_list(form, "internal_ports"),
        has_credentials=has_credentials,
        cloudinit_script=optional_text(form, "cloudinit_script"),
        spot_bid=spot_bid,
    )


def parse_modify_form(form: Form) -> ModifyOrder:
    return ModifyOrder(
        server_id=required_text(form, "server_id"),
        gpu_model=optional_text(form, "gpu_model"),
        gpu_count=optional_int(form, "gpu_count"),
        vcpus=optional_int(form, "vcpus"),
        ram=optional_int(form, "ram"),
        storage=optional_int(form, "storage"),
    )


def check_positive(value: int, name: str) -> None:
    if value <= 0:
        raise SimApiError(400, f"Invalid {name}: {value}, expected a positive number")
