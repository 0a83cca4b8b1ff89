"""Burn rate: what the account's VMs cost per hour in their current status.

TensorDock bills Running and Stopped VMs in full (a plain stop keeps the GPU reserved),
and StoppedDisassociated and Outbid VMs for their storage only. VMs from older accounts
report no storage price, and sometimes only `cost`, the compute price. The missing part
is then estimated from the hostnode's unit prices, and the result is marked estimated.
"""

from __future__ import annotations

from collections.abc import Mapping

from tdbot.tensordock.models import Hostnode, VirtualMachine, VmStatus

_FULL_PRICE = (VmStatus.RUNNING, VmStatus.STOPPED)
_STORAGE_ONLY = (VmStatus.STOPPED_DISASSOCIATED, VmStatus.OUTBID)


def burn_rate(
    vms: Mapping[str, VirtualMachine], hostnodes: Mapping[str, Hostnode] | None
) -> tuple[float, bool]:
    """Return the account's spend in USD per hour and whether any part of it is estimated.

    A part that can be neither read nor estimated counts as zero and marks the total
    estimated, so the total is then a lower bound.
    """
    total = 0.0
    estimated = False
    for vm in vms.values():
        cost, vm_estimated = vm_hourly_cost(vm, hostnodes)
        total += cost
        estimated = estimated or vm_estimated
    return round(total, 6), estimated


def vm_hourly_cost(
    vm: VirtualMachine, hostnodes: Mapping[str, Hostnode] | None
) -> tuple[float, bool]:
    """Return what one VM costs per hour in its current status and whether it is estimated."""
    if vm.status is VmStatus.TERMINATED:
        return 0.0, False
    if vm.status in _STORAGE_ONLY:
        storage, estimated = storage_cost(vm, hostnodes)
        return (storage or 0.0), estimated

    full, estimated = _full_cost(vm, hostnodes)
    # A status this client does not know may still be billed; counting it in full errs
    # toward a shorter runway, never a longer one.
    if vm.status not in _FULL_PRICE:
        estimated = True
    return full, estimated


def storage_cost(
    vm: VirtualMachine, hostnodes: Mapping[str, Hostnode] | None
) -> tuple[float | None, bool]:
    """Return the VM's storage price in USD per hour and whether it is estimated.

    The estimate is the hostnode's storage unit price times the VM's storage in GB;
    None when the VM reports no price and the hostnode or the size is unknown.
    """
    if vm.storage_price is not None:
        return vm.storage_price, False
    hostnode = (hostnodes or {}).get(vm.hostnode or "")
    if hostnode is None or vm.specs.storage is None:
        return None, True
    return hostnode.specs.storage.price * vm.specs.storage, True


def _full_cost(vm: VirtualMachine, hostnodes: Mapping[str, Hostnode] | None) -> tuple[float, bool]:
    if vm.total_price is not None:
        return vm.total_price, False

    compute = vm.compute_price if vm.compute_price is not None else vm.cost
    compute_estimated = False
    if compute is None:
        compute = _estimate_compute(vm, hostnodes)
        compute_estimated = True

    storage, storage_estimated = storage_cost(vm, hostnodes)
    total = (compute or 0.0) + (storage or 0.0)
    return total, compute_estimated or storage_estimated


def _estimate_compute(vm: VirtualMachine, hostnodes: Mapping[str, Hostnode] | None) -> float | None:
    """Price the VM's GPUs, vCPUs and RAM at its hostnode's current unit prices."""
    hostnode = (hostnodes or {}).get(vm.hostnode or "")
    if hostnode is None:
        return None
    specs = hostnode.specs
    gpu = specs.gpu.get(vm.specs.gpu.type or "")
    if vm.specs.gpu.amount and gpu is None:
        return None
    gpu_cost = gpu.price * vm.specs.gpu.amount if gpu is not None else 0.0
    return (
        gpu_cost + specs.cpu.price * (vm.specs.vcpus or 0) + specs.ram.price * (vm.specs.ram or 0)
    )
