"""Virtual machines of the simulated account and their `client/list` shape."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

from tdbot.simulator.forms import Shape
from tdbot.tensordock.models import VmStatus

# Statuses that pay the full quoted price; every other status pays for storage only.
FULL_PRICE_STATUSES = frozenset({VmStatus.RUNNING, VmStatus.STOPPED})


def format_api_time(moment: datetime) -> str:
    """Format an aware datetime as the API does: RFC 1123 in GMT, without fractions."""
    return format_datetime(moment.astimezone(UTC).replace(microsecond=0), usegmt=True)


def price(value: float) -> float:
    """Round a USD amount for output, so sums like 0.1 + 0.2 print cleanly."""
    return round(value, 6)


@dataclass
class VmActivity:
    """Activity readings of a VM, as an agent inside it would report them."""

    gpu_util_percent: float = 0.0
    gpu_memory_mb: float = 0.0
    cpu_load: float = 0.0
    network_kbps: float = 0.0

    def to_json(self) -> dict[str, float]:
        return {
            "cpu_load": self.cpu_load,
            "gpu_memory_mb": self.gpu_memory_mb,
            "gpu_util_percent": self.gpu_util_percent,
            "network_kbps": self.network_kbps,
        }


@dataclass
class SimVm:
    """A VM of the simulated account.

    `compute_price` is the static quote of the GPUs, vCPUs and RAM in USD per hour; for
    a spot VM it is the bid. `holds_compute` is True while the VM's GPUs, vCPUs and
    RAM are taken from its hostnode's stock. Storage and ports stay taken until delete.
    """

    id: str
    name: str
    hostnode_id: str
    location: dict[str, Any]
    ip_address: str
    gpu_model: str | None
    gpu_count: int
    vcpus: int
    ram: int
    storage: int
    operating_system: str
    port_forwards: dict[int, int]
    status: VmStatus
    is_spot: bool
    compute_price: float
    storage_price: float
    created_at: datetime
    deployment_completes_at: datetime
    holds_compute: bool = True
    dedicated_ip_address: str | None = None
    cloudinit_script: str | None = None
    activity: VmActivity = field(default_factory=VmActivity)
    compute_spent_usd: float = 0.0
    storage_spent_usd: float = 0.0

    @property
    def shape(self) -> Shape:
        return Shape(
            self.hostnode_id, self.gpu_model, self.gpu_count, self.vcpus, self.ram, self.storage
        )

    @property
    def bid(self) -> float | None:
        return self.compute_price if self.is_spot else None

    @property
    def total_price(self) -> float:
        return self.compute_price + self.storage_price

    @property
    def hourly_cost(self) -> float:
        """USD per hour in the current status: full price, or storage only."""
        if self.status in FULL_PRICE_STATUSES:
            return self.total_price
        return self.storage_price

    @property
    def billed_compute_per_hour(self) -> float:
        return self.compute_price if self.status in FULL_PRICE_STATUSES else 0.0

    def deployment_to_api(self, now: datetime) -> dict[str, Any]:
        if now < self.deployment_completes_at:
            return {"status": "Pending", "timestamp_completion": None, "timestamp_failure": None}
        return {
            "status": "Completed",
            "timestamp_completion": format_api_time(self.deployment_completes_at),
            "timestamp_failure": None,
        }

    def to_api(self, now: datetime) -> dict[str, Any]:
        """Return the VM object of `client/list`, with string port maps as in 2024 data."""
        return {
            "city": self.location.get("city"),
            "compute_price": price(self.compute_price),
            "cost": price(self.compute_price),
            "country": self.location.get("country"),
            "cpu_threadscount": self.vcpus,
            "dedicated_ip_address": self.dedicated_ip_address,
            "default_user": "user",
            "deployment": self.deployment_to_api(now),
            "hostname": self.id,
            "hostnode": self.hostnode_id,
            "ip_address": self.ip_address,
            "location": self.location.get("id"),
            "name": self.name,
            "operating_system": self.operating_system,
            "port_forwards": {
                str(ext): str(internal) for ext, internal in self.port_forwards.items()
            },
            "specs": {
                "gpu": {"amount": self.gpu_count, "type": self.gpu_model},
                "ram": self.ram,
                "storage": self.storage,
                "vcpus": self.vcpus,
            },
            "state": self.location.get("region"),
            "status": self.status.value,
            "storage_price": price(self.storage_price),
            "timestamp_creation": format_api_time(self.created_at),
            "total_price": price(self.total_price),
            "type": "spot" if self.is_spot else "ondemand",
        }
