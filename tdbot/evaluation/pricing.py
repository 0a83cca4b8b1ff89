"""Whether a hostnode can host a deployment, what it costs per hour, and which is cheapest.

The full hourly price of a deployment is the sum of its parts at the hostnode's unit
prices: gpu.price × GPUs + cpu.price × vCPUs + ram.price × GB + storage.price × GB.

Sizing follows the marketplace's constraints:

- vCPUs are rounded up to an even number, because `client/deploy/single` rejects an
  odd count with HTTP 400.
- When a hostnode publishes `restrictions` for the GPU count, a request below a minimum
  is raised to that minimum, so the user gets at least the requested size and the price
  includes the extra. A request above a maximum cannot be hosted there.
- The hostnode must be online, listed, not reserved, and have enough free units of every
  resource and enough free external ports.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tdbot.rules.schema import HostnodeSpec
from tdbot.spec import gpu_matches, gpu_vram_gb
from tdbot.tensordock.models import Bounds, Hostnode, Restriction

# Prices are compared and sorted at this many decimals, so that sums of float unit
# prices that differ only in the last bits count as ties.
PRICE_DECIMALS = 6


@dataclass(frozen=True)
class Sizing:
    """The deployment a hostnode would get for a spec, after rounding and restrictions."""

    gpu_model: str
    gpu_count: int
    vcpus: int
    ram_gb: int
    storage_gb: int
    # One note per value changed from the request, such as "vcpus raised from 7 to 8".
    adjustments: tuple[str, ...] = ()


@dataclass(frozen=True)
class PriceBreakdown:
    """Hourly price of a deployment in USD, by part."""

    gpu_usd: float
    cpu_usd: float
    ram_usd: float
    storage_usd: float

    @property
    def total_usd(self) -> float:
        return round(self.gpu_usd + self.cpu_usd + self.ram_usd + self.storage_usd, PRICE_DECIMALS)

    def to_evidence(self) -> dict[str, float]:
        return {
            "gpu_usd_per_hour": round(self.gpu_usd, PRICE_DECIMALS),
            "cpu_usd_per_hour": round(self.cpu_usd, PRICE_DECIMALS),
            "ram_usd_per_hour": round(self.ram_usd, PRICE_DECIMALS),
            "storage_usd_per_hour": round(self.storage_usd, PRICE_DECIMALS),
            "total_usd_per_hour": self.total_usd,
        }


@dataclass(frozen=True)
class Offer:
    """One (hostnode, GPU model) pair that can host a spec, with its full hourly price."""

    hostnode_id: str
    sizing: Sizing
    price: PriceBreakdown
    location: str
    country: str | None = None
    city: str | None = None
    uptime_percent: float | None = None
    free_ports: tuple[int, ...] = field(default=(), repr=False)

    def deploy_fields(self) -> dict[str, Any]:
        """Return the `Deploy` fields this offer sets: hostnode, size and full price."""
        return {
            "hostnode_id": self.hostnode_id,
            "gpu_model": self.sizing.gpu_model,
            "gpu_count": self.sizing.gpu_count,
            "vcpus": self.sizing.vcpus,
            "ram_gb": self.sizing.ram_gb,
            "storage_gb": self.sizing.storage_gb,
            "price_usd_per_hour": self.price_usd_per_hour,
        }

    @property
    def gpu_model(self) -> str:
        return self.sizing.gpu_model

    @property
    def price_usd_per_hour(self) -> float:
        return self.price.total_usd

    def to_evidence(self) -> dict[str, Any]:
        """Describe the offer in plain JSON types, for alert evidence and price history."""
        return {
            "hostnode_id": self.hostnode_id,
            "location": self.location,
            "gpu_model": self.sizing.gpu_model,
            "gpu_count": self.sizing.gpu_count,
            "vcpus": self.sizing.vcpus,
            "ram_gb": self.sizing.ram_gb,
            "storage_gb": self.sizing.storage_gb,
            "adjustments": list(self.sizing.adjustments),
            "uptime_percent": self.uptime_percent,
            "price": self.price.to_evidence(),
        }


def uptime_percent(hostnode: Hostnode) -> float | None:
    """Return the hostnode's uptime in percent, or None when the API omits it.

    The v0 API sends a fraction (0.9999). A value above 1 cannot be a fraction, so it
    is taken as a percentage already.
    """
    uptime = hostnode.status.uptime
    if uptime is None:
        return None
    return uptime * 100 if uptime <= 1 else uptime


def round_up_to_even(value: int) -> int:
    return value + value % 2


def size_deployment(
    hostnode: Hostnode, gpu_model: str, spec: HostnodeSpec, ports_needed: int = 1
) -> Sizing | None:
    """Return the deployment the hostnode would get for the spec, or None if it cannot host it."""
    result = check_fit(hostnode, gpu_model, spec, ports_needed)
    return result if isinstance(result, Sizing) else None


def check_fit(
    hostnode: Hostnode, gpu_model: str, spec: HostnodeSpec, ports_needed: int = 1
) -> Sizing | str:
    """Size the deployment like `size_deployment`, or return why the hostnode cannot host it.

    The reason is a stable key such as "offline", "no_gpu_model" or "too_few_ports".
    """
    gpu = hostnode.specs.gpu.get(gpu_model)
    if gpu is None:
        return "no_gpu_model"
    availability = _check_availability(hostnode, ports_needed)
    if availability is not None:
        return availability
    if gpu.amount < spec.gpu_count:
        return "too_few_gpus"

    sizing = _apply_restrictions(hostnode, gpu_model, spec)
    if isinstance(sizing, str):
        return sizing

    specs = hostnode.specs
    if specs.cpu.amount < sizing.vcpus:
        return "too_few_vcpus"
    if specs.ram.amount < sizing.ram_gb:
        return "too_little_ram"
    if specs.storage.amount < sizing.storage_gb:
        return "too_little_storage"
    return sizing


def _check_availability(hostnode: Hostnode, ports_needed: int) -> str | None:
    if not hostnode.status.online:
        return "offline"
    if not hostnode.status.listed:
        return "unlisted"
    # The list shows reserved hostnodes only to the organisation that reserved them, but
    # no field shows whether the reservation is ours, so a reserved host is skipped.
    if hostnode.status.reserved is True:
        return "reserved"
    if len(set(hostnode.networking.ports)) < ports_needed:
        return "too_few_ports"
    return None


def _apply_restrictions(hostnode: Hostnode, gpu_model: str, spec: HostnodeSpec) -> Sizing | str:
    restriction = _restriction_for(hostnode, spec.gpu_count)
    adjustments: list[str] = []

    vcpus = _fit_bounds("vcpus", spec.vcpus, restriction.cpu, adjustments)
    if vcpus is None:
        return "vcpus_above_max"
    even_vcpus = round_up_to_even(vcpus)
    if even_vcpus != vcpus:
        adjustments.append(f"vcpus rounded up from {vcpus} to {even_vcpus}")
    if restriction.cpu is not None and not restriction.cpu.contains(even_vcpus):
        return "vcpus_above_max"

    ram_gb = _fit_bounds("ram_gb", spec.ram_gb, restriction.ram, adjustments)
    if ram_gb is None:
        return "ram_above_max"
    storage_gb = _fit_bounds("storage_gb", spec.storage_gb, restriction.storage, adjustments)
    if storage_gb is None:
        return "storage_above_max"

    return Sizing(
        gpu_model=gpu_model,
        gpu_count=spec.gpu_count,
        vcpus=even_vcpus,
        ram_gb=ram_gb,
        storage_gb=storage_gb,
        adjustments=tuple(adjustments),
    )


def _restriction_for(hostnode: Hostnode, gpu_count: int) -> Restriction:
    """Return the restriction for a GPU count; an empty one when none is published."""
    restrictions = hostnode.specs.restrictions or {}
    return restrictions.get(gpu_count) or Restriction()


def _fit_bounds(name: str, requested: int, bounds: Bounds | None, notes: list[str]) -> int | None:
    """Raise a request to the minimum, or return None when it exceeds the maximum."""
    if bounds is None:
        return requested
    if bounds.max is not None and requested > bounds.max:
        return None
    if bounds.min is not None and requested < bounds.min:
        notes.append(f"{name} raised from {requested} to the hostnode minimum {bounds.min}")
        return bounds.min
    return requested


def full_price(hostnode: Hostnode, sizing: Sizing) -> PriceBreakdown:
    """Price a sized deployment at the hostnode's unit prices (USD per unit-hour)."""
    specs = hostnode.specs
    gpu = specs.gpu.get(sizing.gpu_model)
    return price_at(
        sizing,
        gpu=gpu.price if gpu is not None else 0.0,
        vcpu=specs.cpu.price,
        ram_gb=specs.ram.price,
        storage_gb=specs.storage.price,
    )


def price_at(
    sizing: Sizing, *, gpu: float, vcpu: float, ram_gb: float, storage_gb: float
) -> PriceBreakdown:
    """Price a sized deployment at the given unit prices, each in USD per unit-hour."""
    return PriceBreakdown(
        gpu_usd=gpu * sizing.gpu_count,
        cpu_usd=vcpu * sizing.vcpus,
        ram_usd=ram_gb * sizing.ram_gb,
        storage_usd=storage_gb * sizing.storage_gb,
    )


def price_total(
    sizing: Sizing, *, gpu: float, vcpu: float, ram_gb: float, storage_gb: float
) -> float:
    """Return `price_at(...).total_usd` without building the breakdown.

    Price history prices every stored row, and the breakdown object costs more than the
    sum, so this adds the same products in the same order and rounds the same way.
    """
    total = (
        gpu * sizing.gpu_count
        + vcpu * sizing.vcpus
        + ram_gb * sizing.ram_gb
        + storage_gb * sizing.storage_gb
    )
    return round(total, PRICE_DECIMALS)


def location_matches(hostnode: Hostnode, spec: HostnodeSpec) -> bool:
    """Return True when the hostnode's country and city pass the spec's filters, ignoring case."""
    country, city = hostnode.location.country, hostnode.location.city
    if _listed(country, spec.exclude_countries) or _listed(city, spec.exclude_cities):
        return False
    return _in_filter(country, spec.countries) and _in_filter(city, spec.cities)


def _listed(value: str | None, entries: list[str]) -> bool:
    return bool(entries) and value is not None and _in_filter(value, entries)


def matching_gpu_models(hostnode: Hostnode, name: str, spec: HostnodeSpec) -> list[str]:
    """Return the hostnode's GPU model ids that match a GPU name of the spec and its VRAM range.

    A name is a model id or a fragment such as "4090" (see `tdbot.spec.gpu_matches`).
    """
    return [
        model
        for model in sorted(hostnode.specs.gpu)
        if gpu_matches(name, model)
        and not any(gpu_matches(excluded, model) for excluded in spec.exclude_gpu)
        and _vram_passes(model, spec)
    ]


def _vram_passes(model: str, spec: HostnodeSpec) -> bool:
    if spec.min_vram_gb is None and spec.max_vram_gb is None:
        return True
    # A model id without a "-NNgb" suffix has unknown VRAM, which cannot meet a bound.
    vram = gpu_vram_gb(model)
    if vram is None:
        return False
    if spec.min_vram_gb is not None and vram < spec.min_vram_gb:
        return False
    return spec.max_vram_gb is None or vram <= spec.max_vram_gb


def price_passes(price: PriceBreakdown, spec: HostnodeSpec) -> bool:
    """Return True when the full hourly price is within the spec's cap, if it has one."""
    return spec.max_usd_per_hour is None or price.total_usd <= spec.max_usd_per_hour


def _in_filter(value: str | None, allowed: list[str]) -> bool:
    if not allowed:
        return True
    if value is None:
        return False
    folded = value.strip().casefold()
    return any(folded == entry.strip().casefold() for entry in allowed)


def uptime_passes(hostnode: Hostnode, spec: HostnodeSpec) -> bool:
    """Return True when the hostnode meets the spec's minimum uptime.

    A hostnode that reports no uptime is excluded whenever a minimum is set, because an
    unknown uptime cannot be shown to meet it.
    """
    if spec.min_uptime_percent <= 0:
        return True
    uptime = uptime_percent(hostnode)
    return uptime is not None and uptime >= spec.min_uptime_percent


def rank_hostnodes(
    hostnodes: Mapping[str, Hostnode] | Iterable[Hostnode],
    spec: HostnodeSpec,
    ports_needed: int = 1,
) -> list[Offer]:
    """Return every (hostnode, GPU model) pair that can host the spec, cheapest first.

    Ties in price are broken by uptime (highest first, unknown last), then hostnode id,
    then GPU model, so the order is stable from tick to tick.
    """
    # Location and uptime are checked once per hostnode, before its GPU models are
    # matched and priced, because most hostnodes of a large market fail them.
    offers = [
        offer
        for hostnode in _hostnode_values(hostnodes)
        if location_matches(hostnode, spec) and uptime_passes(hostnode, spec)
        for gpu_model in _offered_models(hostnode, spec)
        if (offer := _priced_offer(hostnode, gpu_model, spec, ports_needed)) is not None
    ]
    offers.sort(key=_rank_key)
    return offers


def _offered_models(hostnode: Hostnode, spec: HostnodeSpec) -> list[str]:
    """Return the hostnode's GPU models that any GPU name of the spec asks for."""
    return [
        model
        for model in hostnode.specs.gpu
        if any(gpu_matches(name, model) for name in spec.gpu)
        and not any(gpu_matches(excluded, model) for excluded in spec.exclude_gpu)
        and _vram_passes(model, spec)
    ]


def _hostnode_models(hostnode: Hostnode, spec: HostnodeSpec) -> list[str]:
    # Several names can match one model, as "4090" and "geforcertx4090-pcie-24gb" do,
    # and the model is priced once.
    models: list[str] = []
    for name in spec.gpu:
        # An unmatched name is kept, so the rejection count reports "no_gpu_model".
        unmatched = [] if name in hostnode.specs.gpu else [name]
        for model in matching_gpu_models(hostnode, name, spec) or unmatched:
            if model not in models:
                models.append(model)
    return models


def make_offer(
    hostnode: Hostnode, gpu_model: str, spec: HostnodeSpec, ports_needed: int = 1
) -> Offer | None:
    """Build the offer of one (hostnode, GPU model) pair, or None when it is filtered out."""
    if not location_matches(hostnode, spec) or not uptime_passes(hostnode, spec):
        return None
    return _priced_offer(hostnode, gpu_model, spec, ports_needed)


def _priced_offer(
    hostnode: Hostnode, gpu_model: str, spec: HostnodeSpec, ports_needed: int
) -> Offer | None:
    sizing = size_deployment(hostnode, gpu_model, spec, ports_needed)
    if sizing is None:
        return None
    price = full_price(hostnode, sizing)
    if not price_passes(price, spec):
        return None
    return Offer(
        hostnode_id=hostnode.id,
        sizing=sizing,
        price=price,
        location=hostnode.location.describe() or "unknown location",
        country=hostnode.location.country,
        city=hostnode.location.city,
        uptime_percent=uptime_percent(hostnode),
        free_ports=tuple(hostnode.networking.ports),
    )


def count_rejections(
    hostnodes: Mapping[str, Hostnode] | Iterable[Hostnode],
    spec: HostnodeSpec,
    ports_needed: int = 1,
) -> dict[str, int]:
    """Count, by reason, the (hostnode, GPU model) pairs that cannot host the spec.

    Used to explain an empty ranking, such as {"no_gpu_model": 30, "offline": 1}.
    """
    reasons: Counter[str] = Counter()
    for hostnode in _hostnode_values(hostnodes):
        for gpu_model in _hostnode_models(hostnode, spec):
            reason = _rejection(hostnode, gpu_model, spec, ports_needed)
            if reason is not None:
                reasons[reason] += 1
    return dict(sorted(reasons.items()))


def _rejection(
    hostnode: Hostnode, gpu_model: str, spec: HostnodeSpec, ports_needed: int
) -> str | None:
    if not location_matches(hostnode, spec):
        return "location"
    if not uptime_passes(hostnode, spec):
        return "uptime_unknown" if uptime_percent(hostnode) is None else "uptime_below_min"
    result = check_fit(hostnode, gpu_model, spec, ports_needed)
    if isinstance(result, str):
        return result
    return None if price_passes(full_price(hostnode, result), spec) else "price_above_max"


def _hostnode_values(
    hostnodes: Mapping[str, Hostnode] | Iterable[Hostnode],
) -> Iterable[Hostnode]:
    if isinstance(hostnodes, Mapping):
        return hostnodes.values()
    return hostnodes


def _rank_key(offer: Offer) -> tuple[float, float, str, str]:
    # Unknown uptime sorts after every known one; negating puts the highest first.
    uptime = offer.uptime_percent if offer.uptime_percent is not None else -1.0
    return (
        round(offer.price.total_usd, PRICE_DECIMALS),
        -uptime,
        offer.hostnode_id,
        offer.gpu_model,
    )
