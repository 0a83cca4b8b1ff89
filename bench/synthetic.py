"""A large synthetic marketplace and account, built from the packaged marketplace file.

Every hostnode copies the restrictions, CPU type and flags of a randomly chosen real
hostnode from `tdbot/simulator/data/marketplace.json`, then gets its own UUID, GPU
models, unit prices, free stock, location, ports and uptime. The same seed always
gives the same market, so runs on different machines price the same hostnodes.
"""

from __future__ import annotations

import copy
import random
import statistics
import uuid
from dataclasses import dataclass
from typing import Any

from tdbot.simulator import stock
from tdbot.simulator.clock import SimClock
from tdbot.simulator.errors import SimApiError
from tdbot.simulator.forms import Shape
from tdbot.simulator.hostnodes import SimHostnode, load_packaged_marketplace
from tdbot.simulator.market import SimulatedMarket
from tdbot.tensordock.models import VmStatus

# Name of the spot VM the reaction-time measure outbids. It sits alone on its hostnode,
# so raising that hostnode's spot price outbids no other VM.
WATCHED_SPOT_VM = "bench-spot-watch"

# A balance that 500 VMs cannot drain within a benchmark run, so no VM is stopped
# for lack of funds while it is measured.
BENCH_BALANCE_USD = 1_000_000.0

# Shape of every seeded VM: one GPU, 4 vCPUs, 16 GB RAM, 100 GB storage.
VM_VCPUS = 4
VM_RAM_GB = 16
VM_STORAGE_GB = 100


@dataclass(frozen=True)
class GpuModelInfo:
    """A GPU model of the packaged marketplace: its median price and one sample entry."""

    model: str
    median_price: float
    entry: dict[str, Any]


@dataclass(frozen=True)
class MarketSummary:
    """Counts of what `build_market` created, for the report."""

    hostnodes: int
    gpu_models: int
    vms: int
    spot_vms: int
    outbid_vms: int
    watched_vm_id: str


def gpu_models(payload: dict[str, Any]) -> list[GpuModelInfo]:
    """List the GPU models of a marketplace payload with their median price per GPU-hour."""
    prices: dict[str, list[float]] = {}
    entries: dict[str, dict[str, Any]] = {}
    for host in payload["hostnodes"].values():
        for model, entry in host["specs"]["gpu"].items():
            prices.setdefault(model, []).append(float(entry["price"]))
            entries.setdefault(model, entry)
    return [
        GpuModelInfo(model, statistics.median(prices[model]), entries[model])
        for model in sorted(prices)
    ]


def synthetic_marketplace(hostnode_count: int, seed: int) -> dict[str, Any]:
    """Return a `client/deploy/hostnodes` payload with `hostnode_count` hostnodes."""
    rng = random.Random(seed)
    packaged = load_packaged_marketplace()
    templates = [host for host in packaged["hostnodes"].values() if host["specs"]["gpu"]]
    locations = [host["location"] for host in packaged["hostnodes"].values()]
    models = gpu_models(packaged)

    hostnodes: dict[str, Any] = {}
    for _ in range(hostnode_count):
        host_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        hostnodes[host_id] = _synthetic_hostnode(rng, rng.choice(templates), locations, models)
    return {"hostnodes": hostnodes, "success": True}


def _synthetic_hostnode(
    rng: random.Random,
    template: dict[str, Any],
    locations: list[dict[str, Any]],
    models: list[GpuModelInfo],
) -> dict[str, Any]:
    entry = copy.deepcopy(template)
    specs = entry["specs"]

    # One GPU model on most hosts, two on some, as in the real marketplace.
    chosen = rng.sample(models, 2 if rng.random() < 0.15 else 1)
    specs["gpu"] = {info.model: _gpu_entry(rng, info) for info in chosen}
    specs["cpu"]["amount"] = rng.randint(16, 128)
    specs["cpu"]["price"] = round(float(specs["cpu"]["price"]) * rng.uniform(0.8, 1.2), 5)
    specs["ram"]["amount"] = rng.randint(64, 1024)
    specs["ram"]["price"] = round(float(specs["ram"]["price"]) * rng.uniform(0.8, 1.2), 5)
    specs["storage"]["amount"] = rng.randint(1000, 10000)
    specs["storage"]["price"] = round(float(specs["storage"]["price"]) * rng.uniform(0.8, 1.2), 7)

    entry["location"] = copy.deepcopy(rng.choice(locations))
    entry["networking"]["ports"] = sorted(rng.sample(range(20000, 65000), rng.randint(5, 24)))
    entry["status"] = {
        "listed": rng.random() < 0.98,
        "online": rng.random() < 0.97,
        "report": None,
        "reserved": rng.random() < 0.03,
        "uptime": round(rng.uniform(0.95, 1.0), 5),
    }
    return entry


def _gpu_entry(rng: random.Random, info: GpuModelInfo) -> dict[str, Any]:
    entry = dict(info.entry)
    entry["amount"] = rng.randint(1, 8)
    entry["price"] = round(info.median_price * rng.uniform(0.7, 1.3), 3)
    return entry


def build_market(
    hostnode_count: int,
    vm_count: int,
    *,
    seed: int,
    api_key: str,
    api_token: str,
) -> tuple[SimulatedMarket, MarketSummary]:
    """Build a market on a real-time clock and seed the account with `vm_count` VMs.

    About 80 % of the VMs run on demand, 10 % are stopped, 8 % are spot VMs whose bid
    the host accepts and 2 % are spot VMs that start out outbid. One more spot VM,
    `WATCHED_SPOT_VM`, sits alone on its hostnode for the reaction-time measure.
    """
    payload = synthetic_marketplace(hostnode_count, seed)
    market = SimulatedMarket.from_marketplace(
        payload,
        clock=SimClock(time_scale=1.0),
        api_key=api_key,
        api_token=api_token,
        balance_usd=BENCH_BALANCE_USD,
        seed=seed,
    )
    rng = random.Random(seed + 1)
    hosts = [host for host in market.hostnodes.values() if host.deployable and host.ports]
    rng.shuffle(hosts)

    watched = _add_watched_vm(market, hosts)
    spot = outbid = 0
    placed = 0
    for host in hosts:
        if placed == vm_count:
            break
        kind = _vm_kind(placed, vm_count)
        if _try_add_vm(market, host, f"bench-{placed:04d}", kind):
            placed += 1
            spot += kind in ("spot", "outbid")
            outbid += kind == "outbid"
    if placed < vm_count:
        raise RuntimeError(f"only {placed} of {vm_count} VMs fit on {hostnode_count} hostnodes")

    summary = MarketSummary(
        hostnodes=len(market.hostnodes),
        gpu_models=len({model for host in market.hostnodes.values() for model in host.gpus}),
        vms=placed + 1,
        spot_vms=spot + 1,
        outbid_vms=outbid,
        watched_vm_id=watched,
    )
    return market, summary


def _vm_kind(index: int, total: int) -> str:
    share = index / max(total, 1)
    if share < 0.80:
        return "running"
    if share < 0.90:
        return "stopped"
    if share < 0.98:
        return "spot"
    return "outbid"


def _shape(host: SimHostnode) -> Shape:
    model = next(iter(host.gpus))
    return Shape(host.id, model, 1, VM_VCPUS, VM_RAM_GB, VM_STORAGE_GB)


def _try_add_vm(market: SimulatedMarket, host: SimHostnode, name: str, kind: str) -> bool:
    shape = _shape(host)
    bid = None
    if kind == "spot":
        bid = round(stock.spot_minimum(host, shape) + 0.05, 4)
    elif kind == "outbid":
        bid = round(stock.spot_minimum(host, shape) - 0.01, 4)
    elif kind == "watched":
        bid = round(stock.spot_minimum(host, shape) + 0.01, 4)
    status = VmStatus.STOPPED if kind == "stopped" else VmStatus.RUNNING
    try:
        market.add_vm(
            hostnode_id=host.id,
            gpu_model=shape.gpu_model,
            vcpus=shape.vcpus,
            ram=shape.ram,
            storage=shape.storage,
            name=name,
            status=status,
            spot_bid=bid,
        )
    except SimApiError:
        # The host's restrictions or free stock do not fit this shape; try the next host.
        return False
    return True


def _add_watched_vm(market: SimulatedMarket, hosts: list[SimHostnode]) -> str:
    """Place the watched spot VM on the last host that fits and take that host off the list."""
    while hosts:
        host = hosts.pop()
        if _try_add_vm(market, host, WATCHED_SPOT_VM, "watched"):
            return next(vm.id for vm in market.vms.values() if vm.name == WATCHED_SPOT_VM)
    raise RuntimeError("no hostnode can hold the watched spot VM")


def outbid_vm(market: SimulatedMarket, vm_id: str, short_by_usd: float = 0.01) -> float:
    """Raise the spot price on a VM's hostnode until its bid is `short_by_usd` too low.

    Returns the new minimum bid in USD per hour. The minimum is linear in the clearing
    price per GPU, so the price that sets it follows from the current minimum.
    """
    vm = market.vm(vm_id)
    assert vm.gpu_model is not None
    host = market.hostnode(vm.hostnode_id)
    gpu = host.gpus[vm.gpu_model]
    rest = market.vm_spot_minimum(vm_id) - gpu.spot_price * vm.gpu_count
    target = vm.compute_price + short_by_usd
    market.set_spot_price(vm.hostnode_id, vm.gpu_model, (target - rest) / vm.gpu_count)
    return target
