"""Hostnodes of the simulated market: their free stock, unit prices and spot prices.

The marketplace file has numbers as numbers or numeric strings and leaves out keys
that older hosts never had. Parsing coerces every number once. `to_api()` writes
numbers as JSON numbers and leaves the same optional keys out, so the output has the
shape that `client/deploy/hostnodes` documents.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

# The minimum spot bid per GPU is "typically around 50% of the on-demand price"
# (TensorDock's spot instance documentation), so each GPU model starts there.
DEFAULT_SPOT_FRACTION = 0.5


@dataclass
class Bounds:
    minimum: int | None = None
    maximum: int | None = None

    def contains(self, value: int) -> bool:
        above = self.minimum is None or value >= self.minimum
        below = self.maximum is None or value <= self.maximum
        return above and below

    def to_api(self) -> dict[str, int | None]:
        return {"max": self.maximum, "min": self.minimum}


@dataclass
class Restriction:
    """Allowed vCPU, RAM (GB) and storage (GB) sizes for one GPU count."""

    cpu: Bounds | None = None
    ram: Bounds | None = None
    storage: Bounds | None = None

    def to_api(self) -> dict[str, Any]:
        parts = {"cpu": self.cpu, "ram": self.ram, "storage": self.storage}
        return {name: bounds.to_api() for name, bounds in parts.items() if bounds is not None}


@dataclass
class GpuStock:
    """One GPU model on a hostnode: free units, prices in USD per GPU-hour, flags."""

    amount: int
    price: float
    spot_price: float
    vram: int | None = None
    pcie: bool | None = None
    rtx: bool | None = None
    gtx: bool | None = None

    def to_api(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"amount": self.amount, "price": self.price}
        optional = {"vram": self.vram, "pcie": self.pcie, "rtx": self.rtx, "gtx": self.gtx}
        entry.update({key: value for key, value in optional.items() if value is not None})
        return entry


@dataclass
class SimHostnode:
    """A hostnode and its currently free resources; amounts shrink as VMs take them."""

    id: str
    location: dict[str, Any]
    ports: list[int]
    receive: float | int | None
    send: float | int | None
    cpu_amount: int
    cpu_price: float
    cpu_type: str | None
    ram_amount: int
    ram_price: float
    storage_amount: int
    storage_price: float
    gpus: dict[str, GpuStock] = field(default_factory=dict)
    restrictions: dict[int, Restriction] | None = None
    online: bool = True
    listed: bool = True
    reserved: bool | None = None
    uptime: float | None = None
    report: str | None = None

    @property
    def deployable(self) -> bool:
        return self.online and self.listed

    @property
    def ip_address(self) -> str:
        """Shared public IP of the host, stable per id and inside the documentation ranges."""
        digest = hashlib.sha256(self.id.encode()).digest()
        prefix = "198.51.100" if digest[0] % 2 else "203.0.113"
        return f"{prefix}.{digest[1] % 253 + 1}"

    def location_text(self) -> str:
        parts = (self.location.get("city"), self.location.get("region"))
        names = [*parts, self.location.get("country")]
        return ", ".join(str(name) for name in names if name)

    def to_api(self) -> dict[str, Any]:
        """Return the hostnode object of `client/deploy/hostnodes`."""
        specs: dict[str, Any] = {
            "cpu": {"amount": self.cpu_amount, "price": self.cpu_price, "type": self.cpu_type},
            "gpu": {model: stock.to_api() for model, stock in self.gpus.items()},
            "ram": {"amount": self.ram_amount, "price": self.ram_price},
            "storage": {"amount": self.storage_amount, "price": self.storage_price},
        }
        if self.restrictions is not None:
            specs["restrictions"] = {
                str(count): limits.to_api() for count, limits in self.restrictions.items()
            }
        return {
            "location": copy.deepcopy(self.location),
            "networking": {"ports": list(self.ports), "receive": self.receive, "send": self.send},
            "specs": specs,
            "status": self._status_to_api(),
        }

    def _status_to_api(self) -> dict[str, Any]:
        status: dict[str, Any] = {"listed": self.listed, "online": self.online}
        if self.reserved is not None:
            status["reserved"] = self.reserved
        status["report"] = self.report
        status["uptime"] = self.uptime
        return status

    def matches(self, filters: Mapping[str, str]) -> bool:
        """Apply the list endpoint's query filters, which test the hostnode as a whole."""
        minimums = {
            "minvCPUs": self.cpu_amount,
            "minRAM": self.ram_amount,
            "minStorage": self.storage_amount,
            "minGPUCount": max((gpu.amount for gpu in self.gpus.values()), default=0),
            "minVRAM": max((gpu.vram or 0 for gpu in self.gpus.values()), default=0),
        }
        for name, available in minimums.items():
            requested = filters.get(name)
            if requested is not None and available < parse_number(requested, name):
                return False
        if _truthy(filters.get("requiresRTX")) and not any(g.rtx for g in self.gpus.values()):
            return False
        return not (
            _truthy(filters.get("requiresGTX")) and not any(g.gtx for g in self.gpus.values())
        )


def parse_number(value: Any, name: str) -> int | float:
    """Coerce a number or numeric string, keeping integers as int."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got a boolean")
    if isinstance(value, int | float):
        return value
    text = str(value).strip()
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {value!r}") from None


def _truthy(value: str | None) -> bool:
    return value is not None and value.strip().lower() in {"true", "1", "yes"}


def _optional_int(value: Any, name: str) -> int | None:
    return None if value is None else int(parse_number(value, name))


def _parse_bounds(raw: Any, name: str) -> Bounds | None:
    if raw is None:
        return None
    return Bounds(_optional_int(raw.get("min"), name), _optional_int(raw.get("max"), name))


def _parse_restrictions(raw: Any, host_id: str) -> dict[int, Restriction] | None:
    if raw is None:
        return None
    restrictions: dict[int, Restriction] = {}
    for count, limits in raw.items():
        where = f"hostnode {host_id} restriction {count}"
        restrictions[int(count)] = Restriction(
            cpu=_parse_bounds(limits.get("cpu"), where),
            ram=_parse_bounds(limits.get("ram"), where),
            storage=_parse_bounds(limits.get("storage"), where),
        )
    return restrictions


def _parse_gpu(raw: Mapping[str, Any], where: str) -> GpuStock:
    price = float(parse_number(raw["price"], f"{where} price"))
    return GpuStock(
        amount=int(parse_number(raw.get("amount", 0), f"{where} amount")),
        price=price,
        spot_price=round(price * DEFAULT_SPOT_FRACTION, 6),
        vram=_optional_int(raw.get("vram"), f"{where} vram"),
        pcie=raw.get("pcie"),
        rtx=raw.get("rtx"),
        gtx=raw.get("gtx"),
    )


def parse_hostnode(host_id: str, raw: Mapping[str, Any]) -> SimHostnode:
    """Build a hostnode from one entry of the marketplace file, coercing numeric strings."""
    networking = raw.get("networking") or {}
    specs = raw.get("specs") or {}
    status = raw.get("status") or {}
    cpu, ram, storage = specs.get("cpu") or {}, specs.get("ram") or {}, specs.get("storage") or {}
    where = f"hostnode {host_id}"

    def number(value: Any, name: str) -> int | float:
        return parse_number(value, f"{where} {name}")

    gpus = {
        model: _parse_gpu(entry, f"{where} gpu {model}")
        for model, entry in (specs.get("gpu") or {}).items()
    }
    uptime = status.get("uptime")
    return SimHostnode(
        id=host_id,
        location=copy.deepcopy(dict(raw.get("location") or {})),
        ports=[int(number(port, "port")) for port in networking.get("ports") or []],
        receive=None
        if networking.get("receive") is None
        else number(networking["receive"], "receive"),
        send=None if networking.get("send") is None else number(networking["send"], "send"),
        cpu_amount=int(number(cpu.get("amount", 0), "cpu amount")),
        cpu_price=float(number(cpu.get("price", 0), "cpu price")),
        cpu_type=cpu.get("type"),
        ram_amount=int(number(ram.get("amount", 0), "ram amount")),
        ram_price=float(number(ram.get("price", 0), "ram price")),
        storage_amount=int(number(storage.get("amount", 0), "storage amount")),
        storage_price=float(number(storage.get("price", 0), "storage price")),
        gpus=gpus,
        restrictions=_parse_restrictions(specs.get("restrictions"), host_id),
        online=bool(status.get("online", False)),
        listed=bool(status.get("listed", False)),
        reserved=status.get("reserved"),
        uptime=None if uptime is None else float(number(uptime, "uptime")),
        report=status.get("report"),
    )


def parse_marketplace(payload: Mapping[str, Any]) -> dict[str, SimHostnode]:
    """Parse a `client/deploy/hostnodes` response (`{"hostnodes": {uuid: ...}}`)."""
    hostnodes = payload.get("hostnodes")
    if not isinstance(hostnodes, Mapping):
        raise ValueError("marketplace data must contain a 'hostnodes' object keyed by UUID")
    return {host_id: parse_hostnode(host_id, raw) for host_id, raw in hostnodes.items()}


def load_packaged_marketplace() -> dict[str, Any]:
    """Load the starting market shipped as `tdbot/simulator/data/marketplace.json`."""
    text = resources.files("tdbot.simulator.data").joinpath("marketplace.json").read_text("utf-8")
    payload: dict[str, Any] = json.loads(text)
    return payload
