"""Guards that a spending or destructive decision must pass before anything is sent.

Each guard returns None when the action may go ahead, or the reason it is blocked,
as a sentence with the numbers involved. Guards read only their arguments, so the
executor can show the same verdict in a dry run as in a real run.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta

from tdbot.evaluation.burn import burn_rate
from tdbot.evaluation.model import Decision, Deploy, MarketSnapshot, Rebid, Stop
from tdbot.tensordock.models import VmStatus


def check_snapshot_complete(
    decision: Decision, snapshot: MarketSnapshot, now: datetime, max_age: timedelta
) -> str | None:
    """Block when the data the decision rests on is missing, failed to load or is too old."""
    age = now - snapshot.taken_at
    if age > max_age:
        return (
            f"the market snapshot is {age.total_seconds():.0f} s old, older than the "
            f"{max_age.total_seconds():.0f} s limit, so nothing is done on stale data"
        )
    if snapshot.vms is None:
        return f"the VM list failed to load ({_load_error(snapshot, 'vms')}), so nothing is done"
    if isinstance(decision, Deploy | Rebid) and snapshot.balance is None:
        return (
            f"the balance failed to load ({_load_error(snapshot, 'balance')}), so no money is spent"
        )
    return None


def check_vm_listed(decision: Stop | Rebid, snapshot: MarketSnapshot) -> str | None:
    """Block a stop or re-bid of a VM that is not in this snapshot's VM list."""
    vms = snapshot.vms or {}
    vm = vms.get(decision.subject)
    if vm is None:
        return f"VM {decision.subject} is not in the VM list, so it is left alone"
    if isinstance(decision, Rebid) and not vm.is_spot:
        return f"VM {decision.subject} is not a spot VM, so it has no bid to raise"
    return None


def max_deploy_cost_usd_per_hour(decision: Deploy) -> float:
    """Return the most the deployed VM can cost per hour, the figure every cap checks.

    An on-demand VM costs its full price. A spot VM costs its bid plus storage, which
    the deploy step keeps within both the rule's cap and the on-demand full price the
    decision was made at, so it counts at the lower of the two.
    """
    if decision.spot:
        return min(decision.price_usd_per_hour, decision.max_usd_per_hour)
    return decision.price_usd_per_hour


def check_deploy_caps(decision: Deploy, live_vm_count: int) -> str | None:
    """Block a deploy above the rule's price cap or past its VM count."""
    cost = max_deploy_cost_usd_per_hour(decision)
    if cost > decision.max_usd_per_hour:
        return f"the price ${cost:.4f}/h is above the rule's cap ${decision.max_usd_per_hour:.4f}/h"
    if live_vm_count >= decision.max_vms:
        return (
            f"this rule already has {live_vm_count} live or pending VMs, and its limit is "
            f"{decision.max_vms}"
        )
    return None


def check_deploy_name_free(
    decision: Deploy, snapshot: MarketSnapshot, pending_names: Iterable[str]
) -> str | None:
    """Block a deploy whose VM name is taken, since a lost response is found again by name."""
    if not decision.vm_name.strip():
        return "the deploy has no VM name, so a lost response could not be checked"
    if decision.vm_name in set(pending_names):
        return (
            f"an earlier deploy of {decision.vm_name} has no settled outcome, so it is not "
            "sent again; check the VM list and the action journal"
        )
    for vm in (snapshot.vms or {}).values():
        if vm.name == decision.vm_name and vm.status is not VmStatus.TERMINATED:
            return f"a VM named {decision.vm_name} already exists ({vm.id})"
    return None


def check_rebid_cap(decision: Rebid) -> str | None:
    """Block a bid above the rule's cap."""
    if decision.bid_usd_per_hour > decision.max_usd_per_hour:
        return (
            f"the bid ${decision.bid_usd_per_hour:.4f}/h is above the rule's cap "
            f"${decision.max_usd_per_hour:.4f}/h"
        )
    if decision.bid_usd_per_hour <= 0:
        return f"the bid ${decision.bid_usd_per_hour:.4f}/h is not positive"
    return None


def check_fleet_ceiling(
    current_usd_per_hour: float, added_usd_per_hour: float, ceiling_usd_per_hour: float
) -> str | None:
    """Block a change that would take the account's spend above the fleet-wide ceiling."""
    total = current_usd_per_hour + added_usd_per_hour
    if total > ceiling_usd_per_hour:
        return (
            f"the fleet would cost ${total:.4f}/h (now ${current_usd_per_hour:.4f}/h plus "
            f"${added_usd_per_hour:.4f}/h), above the fleet ceiling "
            f"${ceiling_usd_per_hour:.4f}/h"
        )
    return None


def current_burn_usd_per_hour(snapshot: MarketSnapshot) -> float:
    """Return the account's spend now: the larger of the VMs' summed cost and the billed rate.

    Taking the larger errs toward blocking, because either figure can miss a part:
    the VM list lacks some storage prices and the balance lags behind changes.
    """
    summed, _estimated = burn_rate(snapshot.vms or {}, snapshot.hostnodes)
    billed = snapshot.balance.hourly_cost if snapshot.balance is not None else 0.0
    return max(summed, billed)


def added_cost_usd_per_hour(decision: Deploy | Rebid, snapshot: MarketSnapshot) -> float:
    """Return what carrying out the decision adds to the hourly spend.

    A deploy adds the most it can cost (`max_deploy_cost_usd_per_hour`). A re-bid adds
    the new bid for an outbid VM, which pays for storage only, and the raise over the
    current bid for a running one.
    """
    if isinstance(decision, Deploy):
        return max_deploy_cost_usd_per_hour(decision)
    vm = (snapshot.vms or {}).get(decision.subject)
    if vm is not None and vm.status is VmStatus.RUNNING and vm.spot_bid is not None:
        return max(decision.bid_usd_per_hour - vm.spot_bid, 0.0)
    return decision.bid_usd_per_hour


def count_live_vms(vm_ids: Iterable[str], snapshot: MarketSnapshot) -> int:
    """Count the VMs among `vm_ids` that the snapshot lists and that are not terminated."""
    vms = snapshot.vms or {}
    return sum(
        1 for vm_id in set(vm_ids) if vm_id in vms and vms[vm_id].status is not VmStatus.TERMINATED
    )


def _load_error(snapshot: MarketSnapshot, part: str) -> str:
    return snapshot.errors.get(part, "no error recorded")
