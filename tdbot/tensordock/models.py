"""Typed models of the TensorDock v0 marketplace API.

The API sends numbers as numbers or as numeric strings, port maps with string or
integer keys and values, and drops keys that older accounts never had. Pydantic's
lax mode coerces the numeric strings; the validators below handle the rest, so
code past the client only ever sees these normalised shapes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator


class ApiModel(BaseModel):
    """Base of every API model: unknown keys are ignored, since the API adds fields freely."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class VmStatus(StrEnum):
    """Status of a virtual machine, matched case-insensitively on input."""

    RUNNING = "Running"
    STOPPED = "Stopped"
    STOPPED_DISASSOCIATED = "StoppedDisassociated"
    OUTBID = "Outbid"
    TERMINATED = "Terminated"
    UNKNOWN = "Unknown"

    @classmethod
    def _missing_(cls, value: object) -> VmStatus:
        folded = _fold(str(value))
        for member in cls:
            if _fold(member.value) == folded:
                return member
        return cls.UNKNOWN


def _fold(text: str) -> str:
    return text.replace("_", "").replace("-", "").replace(" ", "").lower()


def parse_port_map(raw: Any) -> dict[int, int]:
    """Normalise a port map (external port to internal port) to int keys and values."""
    if not raw:
        return {}
    if not isinstance(raw, dict):
        raise ValueError(f"port map must be an object, got {type(raw).__name__}")
    return {int(external): int(internal) for external, internal in raw.items()}


# --- hostnodes -------------------------------------------------------------------


# The parts of a hostnode are slotted dataclasses rather than models: a snapshot holds
# thousands of hostnodes, and model instances took most of its memory and parse time.
# Pydantic still validates and coerces them as fields of `Hostnode`, ignoring extra keys.
@dataclass(frozen=True, slots=True)
class Datacenter:
    name: str | None = None
    tier: str | None = None


@dataclass(frozen=True, slots=True)
class Location:
    id: str | None = None
    city: str | None = None
    region: str | None = None
    country: str | None = None
    dc: Datacenter | None = None

    def describe(self) -> str:
        """Return "City, Region, Country" with the unknown parts left out."""
        return ", ".join(part for part in (self.city, self.region, self.country) if part)


@dataclass(frozen=True, slots=True)
class Networking:
    ports: list[int] = field(default_factory=list)
    receive: float | None = None
    send: float | None = None


@dataclass(frozen=True, slots=True)
class ResourceOffer:
    """Available units of one resource on a hostnode and its price in USD per unit-hour."""

    amount: int = 0
    price: float = 0.0


@dataclass(frozen=True, slots=True)
class CpuOffer(ResourceOffer):
    type: str | None = None


@dataclass(frozen=True, slots=True)
class GpuOffer(ResourceOffer):
    """One GPU model on a hostnode; vram and the flags are None where the API omits them."""

    vram: int | None = None
    pcie: bool | None = None
    rtx: bool | None = None
    gtx: bool | None = None


@dataclass(frozen=True, slots=True)
class Bounds:
    min: int | None = None
    max: int | None = None

    def contains(self, value: int) -> bool:
        return (self.min is None or value >= self.min) and (self.max is None or value <= self.max)


@dataclass(frozen=True, slots=True)
class Restriction:
    """Allowed vCPU, RAM and storage sizes for a deployment with a given GPU count."""

    cpu: Bounds | None = None
    ram: Bounds | None = None
    storage: Bounds | None = None


class HostnodeSpecs(ApiModel):
    cpu: CpuOffer = Field(default_factory=CpuOffer)
    ram: ResourceOffer = Field(default_factory=ResourceOffer)
    storage: ResourceOffer = Field(default_factory=ResourceOffer)
    gpu: dict[str, GpuOffer] = Field(default_factory=dict)
    # Keyed by GPU count; None when the hostnode publishes no restrictions.
    restrictions: dict[int, Restriction] | None = None

    @field_validator("gpu", mode="before")
    @classmethod
    def _gpu_none_is_empty(cls, value: Any) -> Any:
        return value or {}


@dataclass(frozen=True, slots=True)
class HostnodeStatus:
    online: bool = False
    listed: bool = False
    reserved: bool | None = None
    uptime: float | None = None
    report: str | None = None


class Hostnode(ApiModel):
    """A physical host on the marketplace with its free resources and unit prices."""

    id: str
    location: Location = Field(default_factory=Location)
    networking: Networking = Field(default_factory=Networking)
    specs: HostnodeSpecs = Field(default_factory=HostnodeSpecs)
    status: HostnodeStatus = Field(default_factory=HostnodeStatus)

    @property
    def available(self) -> bool:
        """Whether the hostnode is online and listed, so that it can take deployments."""
        return self.status.online and self.status.listed


# --- virtual machines ------------------------------------------------------------


class VmGpu(ApiModel):
    amount: int = 0
    type: str | None = None


class VmSpecs(ApiModel):
    gpu: VmGpu = Field(default_factory=VmGpu)
    vcpus: int | None = None
    ram: int | None = None
    storage: int | None = None


class Deployment(ApiModel):
    status: str | None = None
    timestamp_completion: datetime | None = None
    timestamp_failure: datetime | None = None

    @field_validator("timestamp_completion", "timestamp_failure", mode="before")
    @classmethod
    def _parse_times(cls, value: Any) -> Any:
        return parse_api_time(value)


def parse_api_time(value: Any) -> Any:
    """Parse the API's RFC 1123 times ("Sun, 03 Nov 2024 07:16:59 GMT") to aware UTC."""
    if value is None or value == "" or isinstance(value, datetime):
        return value or None
    if isinstance(value, str) and "," in value:
        return parsedate_to_datetime(value).astimezone(UTC)
    return value


class VirtualMachine(ApiModel):
    """A virtual machine of the account, as `client/list` and `client/get/single` return it."""

    id: str
    name: str = ""
    status: VmStatus = VmStatus.UNKNOWN
    type: str | None = None
    hostnode: str | None = None
    location: str | None = None
    hostname: str | None = None
    ip_address: str | None = None
    dedicated_ip_address: str | None = None
    default_user: str = "user"
    operating_system: str | None = None
    port_forwards: dict[int, int] = Field(default_factory=dict)
    specs: VmSpecs = Field(default_factory=VmSpecs)
    cost: float | None = None
    compute_price: float | None = None
    storage_price: float | None = None
    total_price: float | None = None
    city: str | None = None
    state: str | None = None
    country: str | None = None
    deployment: Deployment | None = None
    timestamp_creation: datetime | None = None

    @field_validator("port_forwards", mode="before")
    @classmethod
    def _parse_ports(cls, value: Any) -> dict[int, int]:
        return parse_port_map(value)

    @field_validator("timestamp_creation", mode="before")
    @classmethod
    def _parse_created(cls, value: Any) -> Any:
        return parse_api_time(value)

    @property
    def is_spot(self) -> bool:
        """Whether the VM is a spot (interruptible) VM; any other type counts as on-demand."""
        return (self.type or "").lower() == "spot"

    @property
    def spot_bid(self) -> float | None:
        """The VM's current bid in USD per hour for its compute, for spot VMs only."""
        if not self.is_spot:
            return None
        return self.compute_price if self.compute_price is not None else self.cost

    @property
    def full_price(self) -> float | None:
        """Compute plus storage in USD per hour as quoted at deploy; None when not reported."""
        if self.total_price is not None:
            return self.total_price
        compute = self.compute_price if self.compute_price is not None else self.cost
        if compute is None:
            return None
        return compute + (self.storage_price or 0.0)

    @property
    def hourly_cost(self) -> float | None:
        """What the VM costs per hour in its current status, or None when the API omits it.

        Running and Stopped VMs are billed in full, because a plain stop keeps the GPU
        reserved. StoppedDisassociated and Outbid VMs pay for their storage only. Older
        accounts report no storage price; callers estimate it from the hostnode instead.
        """
        if self.status in (VmStatus.RUNNING, VmStatus.STOPPED):
            return self.full_price
        if self.status in (VmStatus.STOPPED_DISASSOCIATED, VmStatus.OUTBID):
            return self.storage_price
        return 0.0

    @property
    def ssh_port(self) -> int | None:
        """External port forwarded to port 22, or 22 itself on a dedicated IP."""
        for external, internal in self.port_forwards.items():
            if internal == 22:
                return external
        return 22 if self.dedicated_ip_address else None

    @property
    def ssh_host(self) -> str | None:
        return self.dedicated_ip_address or self.ip_address or self.hostname


# --- other responses -------------------------------------------------------------


class DeployCost(ApiModel):
    compute_price: float | None = None
    storage_price: float | None = None
    total_price: float | None = None


class DeployResult(ApiModel):
    """Response of `client/deploy/single`: the new VM's id, address and port map."""

    server: str
    ip: str | None = None
    port_forwards: dict[int, int] = Field(default_factory=dict)
    cost: DeployCost | None = None
    execution_id: int | None = None

    @field_validator("port_forwards", mode="before")
    @classmethod
    def _parse_ports(cls, value: Any) -> dict[int, int]:
        return parse_port_map(value)

    @property
    def ssh_port(self) -> int | None:
        for external, internal in self.port_forwards.items():
            if internal == 22:
                return external
        return None


class Balance(ApiModel):
    """Account balance in USD and the organisation's current spend in USD per hour."""

    balance: float
    hourly_cost: float

    @property
    def runway_hours(self) -> float | None:
        """Hours until the balance runs out at the current rate; None when nothing is billed."""
        if self.hourly_cost <= 0:
            return None
        return self.balance / self.hourly_cost


class Authorization(ApiModel):
    name: str
    permissions: str | None = None
    timestamp_creation: str | None = None
    note: str | None = None


class RevenueVm(ApiModel):
    id: str
    used_storage: int | None = None
    used_gpus: int | None = None
    used_cpus: int | None = None
    used_ram: int | None = None
    revenue_storage: float | None = None
    revenue_compute: float | None = None


class HostnodeRevenue(ApiModel):
    hostnode_id: str
    location: str | None = None
    used_storage: int | None = None
    used_gpus: int | None = None
    used_cpus: int | None = None
    used_ram: int | None = None
    available_storage: int | None = None
    available_gpus: int | None = None
    available_cpus: int | None = None
    available_ram: int | None = None
    revenue_storage: float | None = None
    revenue_compute: float | None = None
    virtual_machines: list[RevenueVm] = Field(default_factory=list)


class BillingSummary(ApiModel):
    """Monthly statement; balances and changes arrive as strings and are parsed to floats."""

    bill_period: dict[str, str] = Field(default_factory=dict)
    changes: dict[str, float] = Field(default_factory=dict)
    previous_balance: float | None = None
    final_balance: float | None = None
    organization_billing_address: str | None = None
    organization_tax_id: str | None = None
    transactions: dict[str, list[dict[str, Any]]] = Field(default_factory=dict)


class ContainerReplica(ApiModel):
    vm_uuid: str
    ip_address: str | None = None
    external_ports: list[int] = Field(default_factory=list)
    internal_ports: list[int] = Field(default_factory=list)
    rate_hourly: float | None = None
    hostnode_uptime_url: str | None = None
