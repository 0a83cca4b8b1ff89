"""Inputs and outputs of rule evaluation.

Evaluation is a pure function from (rule, market snapshot, stored state, now) to a
list of decisions. The snapshot says what the API returned this tick and what it
failed to return; the stored state is what earlier ticks left in the database. A
decision is carried out (or only shown, in a dry run) by `tdbot.actions`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from tdbot.tensordock.models import Balance, Hostnode, VirtualMachine

# --- inputs ----------------------------------------------------------------------


@dataclass(frozen=True)
class MarketSnapshot:
    """What the API returned in one tick, shared by every rule of that tick.

    A part that failed to load is None and its error is in `errors`; rules must then
    decide nothing that spends money or destroys work on that part.
    """

    taken_at: datetime
    hostnodes: dict[str, Hostnode] | None
    vms: dict[str, VirtualMachine] | None
    balance: Balance | None
    errors: dict[str, str] = field(default_factory=dict)
    # Results computed from this snapshot, such as a ranking that several rules (and
    # the state update after a tick) would otherwise compute again. Derived data only.
    derived: dict[Any, Any] = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True)
class IdleSample:
    """One reading of a VM's activity, pushed by an agent or read by a probe."""

    vm_id: str
    at: datetime
    gpu_util_percent: float | None = None
    gpu_memory_mb: float | None = None
    cpu_load: float | None = None
    network_kbps: float | None = None
    # Command lines of the running processes, or None when the source did not list them.
    processes: tuple[str, ...] | None = None
    source: str = "heartbeat"
    error: str | None = None


@dataclass(frozen=True)
class LadderState:
    """Progress of the bid ladder for one outbid spot VM."""

    steps_taken: int = 0
    last_bid_usd: float | None = None
    started_at: datetime | None = None
    exhausted: bool = False
    # When each step was sent, oldest first, for the per-hour step limit.
    step_times: tuple[datetime, ...] = ()
    # Whether a replacement VM was deployed in this outbid episode; at most one is.
    redeployed: bool = False


@dataclass(frozen=True)
class IdleWarningState:
    """A warning sent for an idle VM and the time its stop is due."""

    warned_at: datetime
    due_at: datetime


@dataclass(frozen=True)
class RuleState:
    """What earlier ticks stored for one rule.

    `open_alerts` holds the subject of every alert of this rule that is firing, except
    alerts about failed actions (subjects starting with "action:"), which are not the
    evaluation's own.
    The other fields are used by one rule kind each.
    """

    open_alerts: frozenset[str] = frozenset()
    best_price_usd: float | None = None
    ladders: dict[str, LadderState] = field(default_factory=dict)
    idle_samples: dict[str, list[IdleSample]] = field(default_factory=dict)
    idle_warnings: dict[str, IdleWarningState] = field(default_factory=dict)
    # Last time each VM was seen entering Running, to apply the grace period.
    running_since: dict[str, datetime] = field(default_factory=dict)
    # Live VMs that this rule deployed, for the per-rule VM count cap.
    deployed_vm_ids: frozenset[str] = frozenset()
    # GPU model -> full USD per hour of the rule's size at its `alert.deal_below_percentile`
    # of the stored price history; filled only for cheapest-hostnode rules with a deal alert.
    price_percentiles: dict[str, float] = field(default_factory=dict)


# --- outputs ---------------------------------------------------------------------


class Severity(StrEnum):
    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"


@dataclass(frozen=True)
class Decision:
    """Base of every decision. `subject` is a VM id, a hostnode id or "account"."""

    rule: str
    subject: str
    summary: str
    evidence: dict[str, Any] = field(default_factory=dict)

    @property
    def spends_or_destroys(self) -> bool:
        """Whether carrying the decision out spends money or stops work."""
        return False


@dataclass(frozen=True)
class FireAlert(Decision):
    """Open (or keep open) the alert with key (rule, subject)."""

    severity: Severity = Severity.WARNING


@dataclass(frozen=True)
class ResolveAlert(Decision):
    """Close the alert with key (rule, subject)."""


@dataclass(frozen=True)
class Report(Decision):
    """Tell the user something the rule could not decide, such as unknown data."""


@dataclass(frozen=True)
class Deploy(Decision):
    """Deploy a VM on a hostnode at a full hourly price.

    With `spot` set, the VM is a spot VM, and the deploy step bids the lowest price the
    hostnode accepts just before sending. `price_usd_per_hour` is then the on-demand
    full price, and the caps count the VM at the lower of it and `max_usd_per_hour`,
    the most the bid plus storage may come to (tdbot.actions.guards). When
    `hostnode_id` rejects every bid within that limit, the deploy step tries
    `fallback_hostnode_ids` in order, with the same size and the same limit.
    """

    hostnode_id: str = ""
    gpu_model: str = ""
    gpu_count: int = 1
    vcpus: int = 2
    ram_gb: int = 4
    storage_gb: int = 20
    price_usd_per_hour: float = 0.0
    vm_name: str = ""
    operating_system: str = "Ubuntu 22.04 LTS"
    internal_ports: tuple[int, ...] = (22,)
    ssh_public_key: str | None = None
    max_usd_per_hour: float = 0.0
    max_vms: int = 1
    confirm: bool = True
    cloudinit_script: str | None = field(default=None, repr=False)
    # The outbid spot VM this deploy replaces, if any; its ladder records the redeploy.
    replaces_vm_id: str | None = None
    spot: bool = False
    # Hostnodes a spot deploy tries after `hostnode_id`, in order. Empty when on demand.
    fallback_hostnode_ids: tuple[str, ...] = ()

    @property
    def spends_or_destroys(self) -> bool:
        return True


@dataclass(frozen=True)
class Rebid(Decision):
    """Raise the bid of an outbid spot VM to `bid_usd_per_hour` (compute only)."""

    bid_usd_per_hour: float = 0.0
    previous_bid_usd_per_hour: float | None = None
    step: int = 1
    max_usd_per_hour: float = 0.0

    @property
    def spends_or_destroys(self) -> bool:
        return True


@dataclass(frozen=True)
class WarnIdle(Decision):
    """Warn that an idle VM will be stopped at `due_at` unless it becomes busy."""

    due_at: datetime | None = None


@dataclass(frozen=True)
class CancelIdleWarning(Decision):
    """Cancel a pending idle stop because the VM became busy or left Running."""


@dataclass(frozen=True)
class Stop(Decision):
    """Stop a VM; with `release` its GPU, vCPUs and RAM are given back (StoppedDisassociated)."""

    release: bool = False
    saves_usd_per_hour: float | None = None

    @property
    def spends_or_destroys(self) -> bool:
        return True
