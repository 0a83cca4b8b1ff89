"""Checks of a requested VM shape against a hostnode, and taking or returning its stock."""

from __future__ import annotations

from collections.abc import Sequence

from tdbot.simulator.errors import SimApiError, bad_request
from tdbot.simulator.forms import Shape
from tdbot.simulator.hostnodes import SimHostnode

# The simulator checks deploys against the same table of operating systems and their
# minimum storage that the client validates requests with.
from tdbot.tensordock.requests import OS_MIN_STORAGE_GB


def check_operating_system(name: str, storage: int) -> None:
    minimum = OS_MIN_STORAGE_GB.get(name)
    if minimum is None:
        known = ", ".join(OS_MIN_STORAGE_GB)
        raise bad_request(f"Unknown operating_system {name!r}; valid values: {known}")
    if storage < minimum:
        raise bad_request(f"{name} needs at least {minimum} GB of storage, got {storage} GB")


def check_sizes(shape: Shape) -> None:
    """Reject sizes no hostnode accepts: odd or non-positive vCPUs, empty RAM or disk."""
    if shape.vcpus <= 0 or shape.vcpus % 2:
        raise bad_request("The number of vCPUs must be an even number")
    if shape.ram <= 0:
        raise bad_request(f"Invalid ram: {shape.ram} GB, expected a positive number")
    if shape.storage <= 0:
        raise bad_request(f"Invalid storage: {shape.storage} GB, expected a positive number")
    if shape.gpu_count < 0:
        raise bad_request(f"Invalid gpu_count: {shape.gpu_count}, expected 0 or more")


def check_gpu_model(host: SimHostnode, shape: Shape) -> None:
    if shape.gpu_count == 0:
        return
    if shape.gpu_model is None:
        raise bad_request("Missing required field: gpu_model")
    if shape.gpu_model not in host.gpus:
        offered = ", ".join(host.gpus) or "none"
        raise bad_request(
            f"GPU model {shape.gpu_model!r} is not offered on hostnode {host.id}; "
            f"offered: {offered}"
        )


def check_restrictions(host: SimHostnode, shape: Shape) -> None:
    """Apply the hostnode's vCPU, RAM and storage limits for the requested GPU count."""
    if host.restrictions is None or shape.gpu_count == 0:
        return
    limits = host.restrictions.get(shape.gpu_count)
    if limits is None:
        allowed = ", ".join(str(count) for count in sorted(host.restrictions)) or "none"
        raise bad_request(
            f"gpu_count {shape.gpu_count} is not offered on hostnode {host.id}; "
            f"allowed counts: {allowed}"
        )
    sizes = (("vcpus", limits.cpu, shape.vcpus), ("ram", limits.ram, shape.ram))
    for name, bounds, value in (*sizes, ("storage", limits.storage, shape.storage)):
        if bounds is not None and not bounds.contains(value):
            raise bad_request(
                f"{name} {value} is outside the allowed range {bounds.minimum}-{bounds.maximum} "
                f"for {shape.gpu_count} GPU(s) on hostnode {host.id}"
            )


def check_shape(host: SimHostnode, shape: Shape) -> None:
    check_sizes(shape)
    check_gpu_model(host, shape)
    check_restrictions(host, shape)


def missing_compute(host: SimHostnode, shape: Shape) -> str | None:
    """Name the first of GPUs, vCPUs and RAM the hostnode lacks, or None when all fit."""
    if shape.gpu_count and shape.gpu_model is not None:
        free = host.gpus[shape.gpu_model].amount
        if free < shape.gpu_count:
            return f"GPUs ({shape.gpu_count} x {shape.gpu_model} requested, {free} free)"
    if host.cpu_amount < shape.vcpus:
        return f"vCPUs ({shape.vcpus} requested, {host.cpu_amount} free)"
    if host.ram_amount < shape.ram:
        return f"RAM ({shape.ram} GB requested, {host.ram_amount} GB free)"
    return None


def check_stock(host: SimHostnode, shape: Shape, *, storage_gb: int) -> None:
    """Raise a 400 unless the hostnode has the compute of `shape` and `storage_gb` free."""
    missing = missing_compute(host, shape)
    if missing is None and host.storage_amount < storage_gb:
        missing = f"storage ({storage_gb} GB requested, {host.storage_amount} GB free)"
    if missing is not None:
        raise bad_request(f"Not enough {missing} on hostnode {host.id}")


def take_compute(host: SimHostnode, shape: Shape) -> None:
    if shape.gpu_count and shape.gpu_model is not None:
        host.gpus[shape.gpu_model].amount -= shape.gpu_count
    host.cpu_amount -= shape.vcpus
    host.ram_amount -= shape.ram


def return_compute(host: SimHostnode, shape: Shape) -> None:
    if shape.gpu_count and shape.gpu_model is not None:
        host.gpus[shape.gpu_model].amount += shape.gpu_count
    host.cpu_amount += shape.vcpus
    host.ram_amount += shape.ram


def check_ports(host: SimHostnode, external: Sequence[int], internal: Sequence[int]) -> None:
    """Check a port map: external ports from the host's free pool, paired by position."""
    if not host.ports:
        raise SimApiError(400, "No external ports are available on this hostnode")
    if not external:
        raise bad_request("Missing required field: external_ports")
    if len(external) != len(internal):
        raise bad_request(
            f"external_ports has {len(external)} ports but internal_ports has {len(internal)}; "
            "they are paired by position"
        )
    if len(set(external)) != len(external) or len(set(internal)) != len(internal):
        raise bad_request("external_ports and internal_ports must not repeat a port")
    for port in external:
        if port not in host.ports:
            raise bad_request(f"External port {port} is not available on this hostnode")


def compute_price(host: SimHostnode, shape: Shape) -> float:
    """On-demand price of the GPUs, vCPUs and RAM in USD per hour."""
    gpu = (
        host.gpus[shape.gpu_model].price * shape.gpu_count
        if shape.gpu_model and shape.gpu_count
        else 0.0
    )
    return gpu + host.cpu_price * shape.vcpus + host.ram_price * shape.ram


def spot_minimum(host: SimHostnode, shape: Shape) -> float:
    """Lowest bid the host accepts: the GPU clearing price plus vCPU and RAM prices."""
    gpu = (
        host.gpus[shape.gpu_model].spot_price * shape.gpu_count
        if shape.gpu_model and shape.gpu_count
        else 0.0
    )
    return gpu + host.cpu_price * shape.vcpus + host.ram_price * shape.ram
