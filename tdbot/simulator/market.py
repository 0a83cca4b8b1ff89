"""The state of the simulated TensorDock marketplace and account.

`SimulatedMarket` contains the hostnodes and their free stock, the account's VMs, its
balance and credentials, the spot clearing prices and the injected faults. Its
methods carry out what each v0 endpoint does and raise `SimApiError` where the real
API rejects a request. Every public method first settles the account up to the
clock's current time, so billing and outbids follow simulated time lazily.
"""

from __future__ import annotations

import logging
import random
import secrets
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import datetime, timedelta
from typing import Any

from tdbot.simulator import stock
from tdbot.simulator.billing import Account, host_revenue, next_month_start, period_of
from tdbot.simulator.clock import SimClock
from tdbot.simulator.containers import (
    ContainerSpec,
    SimContainer,
    place_replicas,
)
from tdbot.simulator.errors import SimApiError, bad_request, not_found, server_error
from tdbot.simulator.faults import FaultMode, FaultPlan, FaultRule
from tdbot.simulator.forms import DeployOrder, ModifyOrder, Shape
from tdbot.simulator.hostnodes import SimHostnode, load_packaged_marketplace, parse_marketplace
from tdbot.simulator.vms import SimVm, VmActivity, price
from tdbot.tensordock.models import VmStatus

logger = logging.getLogger("tdbot.simulator.market")

# Statuses in which a VM's GPUs, vCPUs and RAM stay taken from its hostnode. An outbid
# VM keeps its place in the stock because the winning bid now uses those resources.
HOLDING_STATUSES = frozenset({VmStatus.RUNNING, VmStatus.STOPPED, VmStatus.OUTBID})

INVALID_AUTHORIZATION = "Invalid authorization"
BID_TOO_LOW = "Your bid is too low to be scheduled on this hostnode"


@dataclass(frozen=True)
class SimEvent:
    """Something the market did on its own or on request, kept for tests and the demo."""

    at: datetime
    kind: str
    vm_id: str | None
    detail: str

    def to_json(self) -> dict[str, Any]:
        return {
            "at": self.at.isoformat(),
            "detail": self.detail,
            "kind": self.kind,
            "vm_id": self.vm_id,
        }


class SimulatedMarket:
    """A stateful fake of the TensorDock v0 marketplace for one organisation."""

    def __init__(
        self,
        hostnodes: Mapping[str, SimHostnode],
        *,
        clock: SimClock | None = None,
        api_key: str | None = None,
        api_token: str | None = None,
        balance_usd: float = 100.0,
        min_deploy_balance_usd: float = 1.0,
        deployment_seconds: float = 30.0,
        seed: int | None = None,
    ) -> None:
        self.clock = clock or SimClock()
        self.api_key = api_key or secrets.token_hex(16)
        self.api_token = api_token or secrets.token_hex(16)
        self.hostnodes: dict[str, SimHostnode] = dict(hostnodes)
        self.vms: dict[str, SimVm] = {}
        self.terminated: set[str] = set()
        self.containers: dict[str, SimContainer] = {}
        self.events: list[SimEvent] = []
        self.faults = FaultPlan()
        self.min_deploy_balance_usd = min_deploy_balance_usd
        self.deployment_time = timedelta(seconds=deployment_seconds)
        self.created_at = self.clock.now()
        self.account = Account(balance_usd=balance_usd, settled_at=self.created_at)
        self._random = random.Random(seed)
        self._execution_id = 1000

    @classmethod
    def from_marketplace(cls, payload: Mapping[str, Any], **options: Any) -> SimulatedMarket:
        """Build a market from a `client/deploy/hostnodes` response; options go to __init__."""
        return cls(parse_marketplace(payload), **options)

    @classmethod
    def from_packaged(cls, **options: Any) -> SimulatedMarket:
        """Build a market from the marketplace file shipped in `tdbot.simulator.data`."""
        return cls.from_marketplace(load_packaged_marketplace(), **options)

    # --- time and credentials ------------------------------------------------------

    def now(self) -> datetime:
        return self.clock.now()

    def advance(self, delta: timedelta) -> datetime:
        """Move the clock forward and settle the account up to the new time."""
        moment = self.clock.advance(delta)
        self.settle()
        return moment

    def credentials_valid(self, api_key: str | None, api_token: str | None) -> bool:
        key_ok = secrets.compare_digest((api_key or "").encode(), self.api_key.encode())
        token_ok = secrets.compare_digest((api_token or "").encode(), self.api_token.encode())
        return key_ok and token_ok

    def check_credentials(self, api_key: str | None, api_token: str | None) -> None:
        if not self.credentials_valid(api_key, api_token):
            raise SimApiError(401, INVALID_AUTHORIZATION)

    def authorizations(self) -> dict[str, Any]:
        """Return the `auth/list` entries: the one pair this market accepts."""
        created = self.created_at.strftime("%Y-%m-%d %H:%M:%S.%f")
        entry = {"note": "", "permissions": "All", "timestamp_creation": created}
        return {"simulator": entry}

    # --- hostnodes -----------------------------------------------------------------

    def hostnode(self, hostnode_id: str) -> SimHostnode:
        host = self.hostnodes.get(hostnode_id)
        if host is None:
            raise not_found("Hostnode not found")
        return host

    def list_hostnodes(self, filters: Mapping[str, str] | None = None) -> dict[str, Any]:
        self.settle()
        try:
            return {
                host_id: host.to_api()
                for host_id, host in self.hostnodes.items()
                if host.matches(filters or {})
            }
        except ValueError as error:
            raise bad_request(str(error)) from None

    def hostnode_to_api(self, hostnode_id: str) -> dict[str, Any]:
        self.settle()
        return self.hostnode(hostnode_id).to_api()

    # --- virtual machines: reads -----------------------------------------------------

    def vm(self, vm_id: str) -> SimVm:
        """Return a VM of the account, raising a 404 for an unknown or deleted id."""
        self.settle()
        found = self.vms.get(vm_id)
        if found is None:
            raise not_found(f"Virtual machine not found: {vm_id}")
        return found

    def list_vms(self) -> dict[str, Any]:
        self.settle()
        now = self.now()
        return {vm_id: vm.to_api(now) for vm_id, vm in self.vms.items()}

    def vm_to_api(self, vm_id: str) -> dict[str, Any]:
        return self.vm(vm_id).to_api(self.now())

    def vm_spot_minimum(self, vm_id: str) -> float:
        """Lowest bid in USD per hour the VM's hostnode accepts for the VM's shape now."""
        found = self.vm(vm_id)
        return stock.spot_minimum(self.hostnodes[found.hostnode_id], found.shape)

    # --- virtual machines: deploy ----------------------------------------------------

    def deploy(self, order: DeployOrder) -> dict[str, Any]:
        """Create a VM as `client/deploy/single` does and return that endpoint's response."""
        self.settle()
        self._check_can_spend("deploy")
        stock.check_sizes(order.shape)
        host = self._deploy_target(order.shape.hostnode_id)
        stock.check_operating_system(order.operating_system, order.shape.storage)
        stock.check_shape(host, order.shape)
        stock.check_ports(host, order.external_ports, order.internal_ports)
        if not order.has_credentials:
            raise bad_request("Either password or ssh_key is required")
        stock.check_stock(host, order.shape, storage_gb=order.shape.storage)
        if order.spot_bid is not None:
            self._check_spot_bid(host, order.shape, order.spot_bid)

        vm = self._create_vm(
            host,
            order.shape,
            name=order.name,
            operating_system=order.operating_system,
            external_ports=order.external_ports,
            internal_ports=order.internal_ports,
            spot_bid=order.spot_bid,
            status=VmStatus.RUNNING,
            created_at=self.now(),
        )
        vm.cloudinit_script = order.cloudinit_script
        vm.deployment_completes_at = vm.created_at + self.deployment_time
        return self._deploy_response(vm)

    def _deploy_target(self, hostnode_id: str) -> SimHostnode:
        host = self.hostnodes.get(hostnode_id)
        if host is None:
            raise bad_request(f"Hostnode not found: {hostnode_id}")
        if not host.deployable:
            raise bad_request(f"Hostnode {hostnode_id} is offline or not listed")
        return host

    def _check_spot_bid(self, host: SimHostnode, shape: Shape, bid: float) -> None:
        if shape.gpu_count < 1:
            raise bad_request("Spot instances need at least one GPU")
        if bid < stock.spot_minimum(host, shape):
            raise bad_request(BID_TOO_LOW)

    def _check_can_spend(self, action: str) -> None:
        if self.account.balance_usd < self.min_deploy_balance_usd:
            raise bad_request(
                f"Your balance is too low to {action}: at least "
                f"${self.min_deploy_balance_usd:.2f} is required"
            )

    def _create_vm(
        self,
        host: SimHostnode,
        shape: Shape,
        *,
        name: str,
        operating_system: str,
        external_ports: Sequence[int],
        internal_ports: Sequence[int],
        spot_bid: float | None,
        status: VmStatus,
        created_at: datetime,
    ) -> SimVm:
        holds_compute = status in HOLDING_STATUSES
        if holds_compute:
            stock.take_compute(host, shape)
        host.storage_amount -= shape.storage
        for port in external_ports:
            host.ports.remove(port)
        vm = SimVm(
            id=self._new_id(),
            name=name,
            hostnode_id=host.id,
            location=dict(host.location),
            ip_address=host.ip_address,
            gpu_model=shape.gpu_model if shape.gpu_count else None,
            gpu_count=shape.gpu_count,
            vcpus=shape.vcpus,
            ram=shape.ram,
            storage=shape.storage,
            operating_system=operating_system,
            port_forwards=dict(zip(external_ports, internal_ports, strict=True)),
            status=status,
            is_spot=spot_bid is not None,
            compute_price=spot_bid if spot_bid is not None else stock.compute_price(host, shape),
            storage_price=host.storage_price * shape.storage,
            created_at=created_at,
            deployment_completes_at=created_at,
            holds_compute=holds_compute,
        )
        self.vms[vm.id] = vm
        self._record("deployed", vm.id, f"{vm.name} on hostnode {host.id}, {vm.status.value}")
        return vm

    def _deploy_response(self, vm: SimVm) -> dict[str, Any]:
        self._execution_id += 1
        return {
            "cost": {
                "compute_price": price(vm.compute_price),
                "storage_price": price(vm.storage_price),
                "total_price": price(vm.total_price),
            },
            "execution_id": self._execution_id,
            "ip": vm.ip_address,
            "port_forwards": {str(ext): internal for ext, internal in vm.port_forwards.items()},
            "server": vm.id,
            "success": True,
        }

    def _new_id(self) -> str:
        return str(uuid.UUID(int=self._random.getrandbits(128), version=4))

    # --- virtual machines: lifecycle -------------------------------------------------

    def start(self, vm_id: str) -> None:
        """Start a stopped VM. A released VM needs its GPUs, vCPUs and RAM free again."""
        vm = self.vm(vm_id)
        if vm.status in (VmStatus.RUNNING, VmStatus.OUTBID):
            raise server_error(_wrong_state(vm, "started"))
        if self.account.balance_usd <= 0:
            raise bad_request(f"Your balance is empty: add funds before starting {vm_id}")
        host = self.hostnodes[vm.hostnode_id]
        if not vm.holds_compute:
            missing = stock.missing_compute(host, vm.shape)
            if missing is not None:
                raise bad_request(f"Not enough {missing} on hostnode {host.id} to start {vm_id}")
            stock.take_compute(host, vm.shape)
            vm.holds_compute = True
        vm.status = VmStatus.RUNNING
        self._record("started", vm.id, "started")
        self._apply_auction(vm, host)

    def stop(self, vm_id: str, *, release: bool = False) -> None:
        """Stop a VM, keeping its resources (Stopped) or releasing them (StoppedDisassociated).

        A Stopped VM may still be stopped with `release=True`, which releases its
        resources; every other repeated stop is a wrong-state error.
        """
        vm = self.vm(vm_id)
        stoppable = vm.status in (VmStatus.RUNNING, VmStatus.OUTBID)
        if not stoppable and not (vm.status is VmStatus.STOPPED and release):
            raise server_error(_wrong_state(vm, "stopped"))
        if release:
            self._release_compute(vm)
            vm.status = VmStatus.STOPPED_DISASSOCIATED
        else:
            vm.status = VmStatus.STOPPED
        self._record("stopped", vm.id, vm.status.value)

    def modify(self, order: ModifyOrder) -> dict[str, Any]:
        """Resize a stopped VM as `client/modify/single` does."""
        vm = self.vm(order.server_id)
        if vm.status not in (VmStatus.STOPPED, VmStatus.STOPPED_DISASSOCIATED):
            raise server_error(_wrong_state(vm, "modified"))
        host = self.hostnodes[vm.hostnode_id]
        new_shape = _merge_shape(vm, order)
        stock.check_shape(host, new_shape)
        stock.check_operating_system(vm.operating_system, new_shape.storage)
        if new_shape.storage < vm.storage:
            raise bad_request(
                f"Storage cannot shrink from {vm.storage} GB to {new_shape.storage} GB"
            )
        self._swap_stock(vm, host, new_shape)
        self._apply_shape(vm, host, new_shape)
        self._record("modified", vm.id, f"{vm.gpu_count} GPU, {vm.vcpus} vCPU, {vm.ram} GB RAM")
        return {"server": vm.id, "success": True}

    def _swap_stock(self, vm: SimVm, host: SimHostnode, new_shape: Shape) -> None:
        # Return the old holdings first so that the check counts what the host would have
        # free, and take them back if the new shape does not fit.
        extra_storage = new_shape.storage - vm.storage
        if vm.holds_compute:
            stock.return_compute(host, vm.shape)
        try:
            compute = new_shape if vm.holds_compute else Shape(host.id, None, 0, 0, 0, 0)
            stock.check_stock(host, compute, storage_gb=extra_storage)
        except SimApiError:
            if vm.holds_compute:
                stock.take_compute(host, vm.shape)
            raise
        if vm.holds_compute:
            stock.take_compute(host, new_shape)
        host.storage_amount -= extra_storage

    def _apply_shape(self, vm: SimVm, host: SimHostnode, shape: Shape) -> None:
        vm.gpu_model = shape.gpu_model if shape.gpu_count else None
        vm.gpu_count, vm.vcpus, vm.ram, vm.storage = (
            shape.gpu_count,
            shape.vcpus,
            shape.ram,
            shape.storage,
        )
        if not vm.is_spot:
            vm.compute_price = stock.compute_price(host, shape)
        vm.storage_price = host.storage_price * shape.storage

    def delete(self, vm_id: str) -> None:
        """Delete a VM and return all its stock and ports to the hostnode."""
        self.settle()
        if vm_id in self.terminated:
            raise server_error("Machine is already terminated")
        vm = self.vm(vm_id)
        host = self.hostnodes[vm.hostnode_id]
        self._release_compute(vm)
        host.storage_amount += vm.storage
        host.ports.extend(vm.port_forwards)
        del self.vms[vm_id]
        self.terminated.add(vm_id)
        self._record("deleted", vm_id, vm.name)

    def _release_compute(self, vm: SimVm) -> None:
        if vm.holds_compute:
            stock.return_compute(self.hostnodes[vm.hostnode_id], vm.shape)
            vm.holds_compute = False

    # --- spot auction ----------------------------------------------------------------

    def validate_spot_new(self, shape: Shape, bid: float) -> bool:
        """Tell whether a spot deploy of `shape` at `bid` would succeed now."""
        self.settle()
        host = self.hostnodes.get(shape.hostnode_id)
        if host is None or not host.deployable or not host.ports:
            return False
        try:
            stock.check_shape(host, shape)
            stock.check_stock(host, shape, storage_gb=shape.storage)
            self._check_spot_bid(host, shape, bid)
        except SimApiError:
            return False
        return True

    def validate_spot_existing(self, vm_id: str, bid: float) -> None:
        """Re-bid a spot VM. A bid at or above the minimum becomes its price.

        An outbid VM with an accepted bid runs again. A bid below the minimum leaves
        the VM as it was and raises an error sent with HTTP 200, as the API does.
        """
        vm = self.vm(vm_id)
        if not vm.is_spot:
            raise bad_request(f"Virtual machine {vm_id} is not a spot instance")
        host = self.hostnodes[vm.hostnode_id]
        if bid < stock.spot_minimum(host, vm.shape):
            raise SimApiError(200, BID_TOO_LOW)
        vm.compute_price = bid
        self._record("bid_changed", vm.id, f"bid {bid:.4f} USD/h")
        self._apply_auction(vm, host)

    def set_spot_price(self, hostnode_id: str, gpu_model: str, usd_per_gpu_hour: float) -> None:
        """Set a GPU model's spot clearing price on a hostnode and re-run its auction."""
        self.settle()
        host = self.hostnode(hostnode_id)
        gpu = host.gpus.get(gpu_model)
        if gpu is None:
            raise not_found(f"GPU model {gpu_model!r} is not offered on hostnode {hostnode_id}")
        if usd_per_gpu_hour < 0:
            raise bad_request(f"Invalid spot price: {usd_per_gpu_hour}, expected 0 or more")
        gpu.spot_price = usd_per_gpu_hour
        self._record("spot_price_set", None, f"{hostnode_id} {gpu_model} {usd_per_gpu_hour}")
        for vm in list(self.vms.values()):
            if vm.hostnode_id == hostnode_id and vm.is_spot and vm.gpu_model == gpu_model:
                self._apply_auction(vm, host)

    def _apply_auction(self, vm: SimVm, host: SimHostnode) -> None:
        """Outbid a running spot VM whose bid is below the minimum; resume one above it."""
        if not vm.is_spot:
            return
        outbid = vm.compute_price < stock.spot_minimum(host, vm.shape)
        if vm.status is VmStatus.RUNNING and outbid:
            vm.status = VmStatus.OUTBID
            self._record("outbid", vm.id, f"bid {vm.compute_price:.4f} USD/h below minimum")
        elif vm.status is VmStatus.OUTBID and not outbid:
            vm.status = VmStatus.RUNNING
            self._record("resumed", vm.id, f"bid {vm.compute_price:.4f} USD/h accepted")

    # --- billing ---------------------------------------------------------------------

    def hourly_cost(self) -> float:
        """Sum the account's spend in USD per hour at the VMs' current statuses."""
        return sum(vm.hourly_cost for vm in self.vms.values())

    def balance(self) -> dict[str, Any]:
        """Return the `billing/balance` response."""
        self.settle()
        return {
            "balance": price(self.account.balance_usd),
            "hourly_cost": price(self.hourly_cost()),
            "success": True,
        }

    def set_balance(self, usd: float) -> None:
        """Set the balance, recorded as a deposit or withdrawal of the difference."""
        self.settle()
        difference = usd - self.account.balance_usd
        if difference >= 0:
            self.account.deposit(self.now(), difference, "simulator")
        else:
            self.account.withdraw(self.now(), -difference, "simulator")
        self._record("balance_set", None, f"{usd:.4f} USD")
        self._stop_if_empty()

    def add_balance(self, usd: float) -> None:
        self.settle()
        if usd < 0:
            self.account.withdraw(self.now(), -usd, "simulator")
        else:
            self.account.deposit(self.now(), usd, "card")
        self._record("balance_added", None, f"{usd:.4f} USD")
        self._stop_if_empty()

    def _stop_if_empty(self) -> None:
        if self.account.balance_usd <= 0:
            self._stop_for_empty_balance(self.now())

    def settle(self) -> None:
        """Charge the account for the simulated time since the last settlement.

        Time is cut at month boundaries, so the statement per month adds up. It is also
        cut at the moment the balance reaches zero. There every running or stopped VM is
        stopped and released, as TensorDock stops the servers of an empty account.
        """
        now = self.clock.now()
        while self.account.settled_at < now:
            start = self.account.settled_at
            end = min(now, next_month_start(start))
            exhausted_at = self._exhaustion_time(start)
            if exhausted_at is not None and exhausted_at <= end:
                end = exhausted_at
            if self.account.balance_usd > 0:
                self.account.charge(self.vms.values(), start, end)
            self.account.settled_at = end
            if end == next_month_start(start):
                self.account.closing_balances[period_of(start)] = self.account.balance_usd
            if exhausted_at is not None and exhausted_at <= end:
                self._stop_for_empty_balance(end)

    def _exhaustion_time(self, start: datetime) -> datetime | None:
        rate = self.hourly_cost()
        if self.account.balance_usd <= 0 or rate <= 0:
            return None
        return start + timedelta(hours=self.account.balance_usd / rate)

    def _stop_for_empty_balance(self, at: datetime) -> None:
        # NOTE: TensorDock later deletes the servers of an empty account; the simulator
        # only stops them, so no test can yet watch VMs disappear for lack of funds.
        self.account.balance_usd = 0.0
        self._record("balance_exhausted", None, "balance reached zero", at)
        for vm in self.vms.values():
            if vm.status in (VmStatus.RUNNING, VmStatus.STOPPED):
                self._release_compute(vm)
                vm.status = VmStatus.STOPPED_DISASSOCIATED
                self._record("stopped", vm.id, "stopped and released: balance reached zero", at)

    def revenue(self, hostnode_id: str | None = None) -> dict[str, Any]:
        """Return `billing/revenue`: per hostnode with account VMs, usage and spend so far.

        NOTE: the simulated organisation hosts nothing, so this reports what its own VMs
        paid to each hostnode; start_timestamp and end_timestamp are not applied.
        """
        self.settle()
        data = []
        for host_id, vms in self._vms_by_host().items():
            if hostnode_id is None or host_id == hostnode_id:
                data.append(host_revenue(self.hostnodes[host_id], vms))
        return {"data": data}

    def _vms_by_host(self) -> dict[str, list[SimVm]]:
        grouped: dict[str, list[SimVm]] = {}
        for vm in self.vms.values():
            grouped.setdefault(vm.hostnode_id, []).append(vm)
        return grouped

    def summary(self, period: str) -> dict[str, Any]:
        self.settle()
        return self.account.summary(period, self.now())

    # --- seeding -----------------------------------------------------------------------

    def add_vm(
        self,
        *,
        hostnode_id: str,
        gpu_model: str | None,
        gpu_count: int = 1,
        vcpus: int = 4,
        ram: int = 16,
        storage: int = 100,
        name: str = "seeded-vm",
        status: VmStatus | str = VmStatus.RUNNING,
        spot_bid: float | None = None,
        operating_system: str = "Ubuntu 22.04 LTS",
        internal_ports: Sequence[int] = (22,),
        created_at: datetime | None = None,
        dedicated_ip_address: str | None = None,
    ) -> SimVm:
        """Add a VM to the account without a request, taking stock and ports as a deploy does.

        The first free ports of the hostnode are forwarded to `internal_ports`. A running
        spot VM whose bid is below the hostnode's minimum starts out Outbid. Raises
        `SimApiError` when the hostnode cannot hold the VM.
        """
        self.settle()
        requested_status = VmStatus(status)
        shape = Shape(hostnode_id, gpu_model, gpu_count, vcpus, ram, storage)
        host = self.hostnode(hostnode_id)
        stock.check_shape(host, shape)
        external = host.ports[: len(internal_ports)]
        stock.check_ports(host, external, internal_ports)
        compute = (
            shape if requested_status in HOLDING_STATUSES else Shape(host.id, None, 0, 0, 0, 0)
        )
        stock.check_stock(host, compute, storage_gb=storage)
        vm = self._create_vm(
            host,
            shape,
            name=name,
            operating_system=operating_system,
            external_ports=external,
            internal_ports=internal_ports,
            spot_bid=spot_bid,
            status=requested_status,
            created_at=created_at or self.now(),
        )
        vm.dedicated_ip_address = dedicated_ip_address
        if requested_status is VmStatus.OUTBID:
            vm.status = VmStatus.RUNNING
        self._apply_auction(vm, host)
        return vm

    def seed_example_vms(self) -> list[SimVm]:
        """Add a running on-demand VM, a running spot VM and a stopped VM to the account.

        They sit on hostnodes of the packaged marketplace; call this only on a market
        built from that file.
        """
        return [
            self.add_vm(
                hostnode_id="0b60f80c-e16a-4cda-a8cd-dbc01cc0512c",
                gpu_model="geforcertx4090-pcie-24gb",
                vcpus=8,
                ram=32,
                storage=200,
                name="api-server-4090",
                internal_ports=(22, 8000),
            ),
            self.add_vm(
                hostnode_id="3eed78e7-25ea-41a4-b111-186a9f980de9",
                gpu_model="geforcertx3090-pcie-24gb",
                gpu_count=2,
                vcpus=8,
                ram=32,
                storage=150,
                name="whisper-2x3090",
                spot_bid=0.30,
                internal_ports=(22, 9000),
            ),
            self.add_vm(
                hostnode_id="ba48764f-e010-4e89-9172-ddc4b7202787",
                gpu_model="rtxa4000-pcie-16gb",
                name="dev-box-a4000",
                status=VmStatus.STOPPED,
            ),
        ]

    # --- activity, faults, containers ------------------------------------------------

    def set_activity(self, vm_id: str, **readings: float) -> VmActivity:
        """Set some of a VM's activity readings (gpu_util_percent, gpu_memory_mb, ...)."""
        vm = self.vm(vm_id)
        known = {item.name for item in fields(VmActivity)}
        for name, value in readings.items():
            if name not in known:
                raise bad_request(f"Unknown activity reading {name!r}; valid: {sorted(known)}")
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise bad_request(f"Invalid {name}: {value!r}, expected a number of 0 or more")
            setattr(vm.activity, name, float(value))
        return vm.activity

    def activity(self, vm_id: str) -> VmActivity:
        return self.vm(vm_id).activity

    def inject_fault(
        self,
        endpoint: str,
        mode: FaultMode | str,
        count: int = 1,
        *,
        delay_seconds: float = 30.0,
    ) -> FaultRule:
        """Make the next `count` requests to `endpoint` ("client/list", "*") fail."""
        return self.faults.add(endpoint, mode, count, delay_seconds=delay_seconds)

    def deploy_container(self, spec: ContainerSpec, replicas: int) -> SimContainer:
        container = SimContainer(self._new_id(), spec)
        container.replicas = place_replicas(spec, replicas, self.hostnodes.values())
        self.containers[container.id] = container
        return container

    def container(self, container_id: str) -> SimContainer:
        found = self.containers.get(container_id)
        if found is None:
            raise not_found(f"Container not found: {container_id}")
        return found

    def scale_container(self, container_id: str, delta: int) -> None:
        """Add replicas (positive `delta`) or remove them (negative)."""
        container = self.container(container_id)
        if delta > 0:
            extra = place_replicas(container.spec, delta, self.hostnodes.values())
            container.replicas.extend(extra)
        elif delta < 0:
            del container.replicas[max(len(container.replicas) + delta, 0) :]

    def stop_container(self, container_id: str) -> None:
        container = self.container(container_id)
        container.replicas.clear()
        container.stopped = True

    # --- inspection ----------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """Return everything the admin endpoint `GET /_sim/state` shows."""
        self.settle()
        now = self.now()
        return {
            "balance_usd": price(self.account.balance_usd),
            "containers": {cid: c.to_state() for cid, c in self.containers.items()},
            "events": [event.to_json() for event in self.events],
            "faults": [rule.to_json() for rule in self.faults.pending()],
            "hourly_cost_usd": price(self.hourly_cost()),
            "now": now.isoformat(),
            "spot_prices": self._spot_prices(),
            "terminated": sorted(self.terminated),
            "time_scale": self.clock.time_scale,
            "vms": {vm_id: self._vm_state(vm, now) for vm_id, vm in self.vms.items()},
        }

    def _vm_state(self, vm: SimVm, now: datetime) -> dict[str, Any]:
        host = self.hostnodes[vm.hostnode_id]
        minimum = stock.spot_minimum(host, vm.shape) if vm.is_spot else None
        return {
            **vm.to_api(now),
            "activity": vm.activity.to_json(),
            "bid": None if vm.bid is None else price(vm.bid),
            "compute_spent_usd": price(vm.compute_spent_usd),
            "holds_compute": vm.holds_compute,
            "hourly_cost": price(vm.hourly_cost),
            "spot_minimum": None if minimum is None else price(minimum),
            "storage_spent_usd": price(vm.storage_spent_usd),
        }

    def _spot_prices(self) -> dict[str, dict[str, float]]:
        return {
            host_id: {model: gpu.spot_price for model, gpu in host.gpus.items()}
            for host_id, host in self.hostnodes.items()
            if host.gpus
        }

    def events_of(self, kind: str) -> Iterator[SimEvent]:
        return (event for event in self.events if event.kind == kind)

    def _record(
        self, kind: str, vm_id: str | None, detail: str, at: datetime | None = None
    ) -> None:
        event = SimEvent(at or self.now(), kind, vm_id, detail)
        self.events.append(event)
        logger.info("simulator %s vm=%s: %s", kind, vm_id or "-", detail)


def _wrong_state(vm: SimVm, verb: str) -> str:
    # The API words these errors with the lowercased status, as in
    # "Machine is stoppeddisassociated, therefore it cannot be stopped".
    return f"Machine is {vm.status.value.lower()}, therefore it cannot be {verb}"


def _merge_shape(vm: SimVm, order: ModifyOrder) -> Shape:
    gpu_count = vm.gpu_count if order.gpu_count is None else order.gpu_count
    return Shape(
        hostnode_id=vm.hostnode_id,
        gpu_model=order.gpu_model or vm.gpu_model,
        gpu_count=gpu_count,
        vcpus=vm.vcpus if order.vcpus is None else order.vcpus,
        ram=vm.ram if order.ram is None else order.ram,
        storage=vm.storage if order.storage is None else order.storage,
    )
