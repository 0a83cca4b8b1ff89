"""The simulated account's balance, its monthly ledger and the billing responses.

The market settles the account lazily: before each request or inspection it charges
every VM for the simulated time since the last settlement, in pieces that end at
month boundaries and at the moment the balance runs out, so rates stay constant
within a piece and the monthly statement adds up.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from tdbot.simulator.hostnodes import SimHostnode
from tdbot.simulator.vms import SimVm, price


def period_of(moment: datetime) -> str:
    """Return the billing period ("YYYY-MM") that contains `moment`."""
    return f"{moment.year:04d}-{moment.month:02d}"


def period_start(period: str) -> datetime:
    year, month = (int(part) for part in period.split("-"))
    return datetime(year, month, 1, tzinfo=UTC)


def next_month_start(moment: datetime) -> datetime:
    if moment.month == 12:
        return datetime(moment.year + 1, 1, 1, tzinfo=UTC)
    return datetime(moment.year, moment.month + 1, 1, tzinfo=UTC)


def parse_period(text: str) -> str | None:
    """Validate a "YYYY-MM" period and return it normalised, or None when invalid."""
    try:
        moment = datetime.strptime(text.strip(), "%Y-%m").replace(tzinfo=UTC)
    except ValueError:
        return None
    return period_of(moment)


@dataclass
class Charge:
    """One VM's cost in one billing period, split into compute and storage."""

    vm_id: str
    hostnode_id: str
    gpu_details: str
    storage_amount: int
    compute_rate: float
    storage_rate: float
    compute_usd: float = 0.0
    storage_usd: float = 0.0


@dataclass
class Transfer:
    """A deposit or a withdrawal of funds, in USD."""

    at: datetime
    amount_usd: float
    method: str

    def to_api(self) -> dict[str, Any]:
        return {
            "amount": price(self.amount_usd),
            "method": self.method,
            "timestamp": self.at.strftime("%Y-%m-%d %H:%M:%S"),
        }


@dataclass
class Account:
    """Balance in USD, when it was last settled, and the ledger behind the statements."""

    balance_usd: float
    settled_at: datetime
    opening_balance_usd: float = 0.0
    charges: dict[tuple[str, str], Charge] = field(default_factory=dict)
    deposits: list[Transfer] = field(default_factory=list)
    withdrawals: list[Transfer] = field(default_factory=list)
    closing_balances: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.opening_balance_usd = self.balance_usd

    def charge(self, vms: Iterable[SimVm], start: datetime, end: datetime) -> None:
        """Charge each VM for [start, end), a span with constant rates in one period."""
        hours = (end - start).total_seconds() / 3600
        for vm in vms:
            compute = vm.billed_compute_per_hour * hours
            storage = vm.storage_price * hours
            vm.compute_spent_usd += compute
            vm.storage_spent_usd += storage
            entry = self._charge_entry(vm, period_of(start))
            entry.compute_usd += compute
            entry.storage_usd += storage
            self.balance_usd -= compute + storage

    def _charge_entry(self, vm: SimVm, period: str) -> Charge:
        key = (period, vm.id)
        entry = self.charges.get(key)
        if entry is None:
            gpu_details = f"{vm.gpu_count}x {vm.gpu_model}" if vm.gpu_model else "CPU only"
            entry = Charge(vm.id, vm.hostnode_id, gpu_details, vm.storage, 0.0, 0.0)
            self.charges[key] = entry
        # The latest rates are reported, as a statement lists one rate per line.
        entry.compute_rate = vm.compute_price
        entry.storage_rate = vm.storage_price
        entry.storage_amount = vm.storage
        return entry

    def deposit(self, at: datetime, amount_usd: float, method: str) -> None:
        self.balance_usd += amount_usd
        self.deposits.append(Transfer(at, amount_usd, method))

    def withdraw(self, at: datetime, amount_usd: float, method: str) -> None:
        self.balance_usd -= amount_usd
        self.withdrawals.append(Transfer(at, amount_usd, method))

    def summary(self, period: str, now: datetime) -> dict[str, Any]:
        """Build the `billing/summary` response for one "YYYY-MM" period."""
        start = period_start(period)
        end = next_month_start(start)
        charges = [entry for (key, _), entry in self.charges.items() if key == period]
        deposits = [t for t in self.deposits if start <= t.at < end]
        withdrawals = [t for t in self.withdrawals if start <= t.at < end]
        expenses = sum(entry.compute_usd + entry.storage_usd for entry in charges)
        final = self._closing_balance(period, start, now)
        previous = (
            final
            + expenses
            + sum(t.amount_usd for t in withdrawals)
            - sum(t.amount_usd for t in deposits)
        )
        window = {
            "billing_period_end": end.strftime("%m/%d"),
            "billing_period_start": start.strftime("%m/%d"),
        }
        return {
            "bill_period": {
                "endM": f"{end.month:02d}",
                "endY": str(end.year),
                "startM": f"{start.month:02d}",
                "startY": str(start.year),
            },
            "changes": {"expenses": f"{expenses:.2f}", "payouts": "0.00"},
            "final_balance": f"{final:.2f}",
            "organization_billing_address": None,
            "organization_tax_id": None,
            "previous_balance": f"{previous:.2f}",
            "transactions": {
                "deposits": [t.to_api() for t in deposits],
                "storage_expenses": [_storage_line(entry, window) for entry in charges],
                "storage_payouts": [],
                "vm_expenses": [_compute_line(entry, window) for entry in charges],
                "vm_payouts": [],
                "withdrawals": [t.to_api() for t in withdrawals],
            },
        }

    def _closing_balance(self, period: str, start: datetime, now: datetime) -> float:
        if period in self.closing_balances:
            return self.closing_balances[period]
        if start > now:
            return self.balance_usd
        if period_of(now) == period:
            return self.balance_usd
        # A period before the simulation began: nothing moved, so it closed at the opening.
        return self.opening_balance_usd


def _compute_line(entry: Charge, window: dict[str, str]) -> dict[str, Any]:
    return {
        **window,
        "gpu_details": entry.gpu_details,
        "hostnode_id": entry.hostnode_id,
        "rate_hourly": price(entry.compute_rate),
        "total_amount": price(entry.compute_usd),
        "virtual_machine_id": entry.vm_id,
    }


def _storage_line(entry: Charge, window: dict[str, str]) -> dict[str, Any]:
    return {
        **window,
        "hostnode_id": entry.hostnode_id,
        "rate_hourly": price(entry.storage_rate),
        "storage_amount": entry.storage_amount,
        "total_amount": price(entry.storage_usd),
        "virtual_machine_id": entry.vm_id,
    }


def host_revenue(host: SimHostnode, vms: list[SimVm]) -> dict[str, Any]:
    """Build one `billing/revenue` entry: a hostnode's usage and what its VMs paid."""
    lines = [_vm_revenue(vm) for vm in vms]
    totals = {
        key: sum(line[key] for line in lines)
        for key in ("used_cpus", "used_gpus", "used_ram", "used_storage")
    }
    return {
        "available_cpus": host.cpu_amount,
        "available_gpus": sum(gpu.amount for gpu in host.gpus.values()),
        "available_ram": host.ram_amount,
        "available_storage": host.storage_amount,
        "hostnode_id": host.id,
        "location": host.location_text(),
        "revenue_compute": price(sum(vm.compute_spent_usd for vm in vms)),
        "revenue_storage": price(sum(vm.storage_spent_usd for vm in vms)),
        **totals,
        "virtual_machines": lines,
    }


def _vm_revenue(vm: SimVm) -> dict[str, Any]:
    holds = vm.holds_compute
    return {
        "id": vm.id,
        "revenue_compute": price(vm.compute_spent_usd),
        "revenue_storage": price(vm.storage_spent_usd),
        "used_cpus": vm.vcpus if holds else 0,
        "used_gpus": vm.gpu_count if holds else 0,
        "used_ram": vm.ram if holds else 0,
        "used_storage": vm.storage,
    }
