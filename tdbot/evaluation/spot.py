"""Spot re-bid: raise the bid of outbid spot VMs in steps, up to the rule's cap.

Each outbid VM climbs a ladder: every tick it is still `Outbid`, the next bid is the
last one plus a step, never above `bid.max_usd_per_hour`. Once the bid is at the cap or
`bid.max_steps` steps were taken, the ladder is exhausted. A critical alert with the
VM's id as subject then reports that the VM stays outbid while its storage is still
billed. The alert resolves when the VM runs again or leaves the outbid state.

A Running VM whose bid is below what its host now takes looks like any other Running
VM in the v0 data, so this module does not guess about it.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from tdbot.evaluation.burn import storage_cost
from tdbot.evaluation.common import unknown_data_report
from tdbot.evaluation.model import (
    Decision,
    FireAlert,
    LadderState,
    MarketSnapshot,
    Rebid,
    Report,
    ResolveAlert,
    RuleState,
    Severity,
)
from tdbot.rules.schema import SpotRebidRule
from tdbot.tensordock.models import Hostnode, VirtualMachine, VmStatus

SUBJECT_VMS = "vms"

# Bids are sent with this many decimals.
BID_DECIMALS = 4


def evaluate_spot(
    rule: SpotRebidRule, snapshot: MarketSnapshot, state: RuleState, now: datetime
) -> list[Decision]:
    """Decide re-bids and exhausted-ladder alerts for one spot re-bid rule."""
    if snapshot.vms is None:
        return [unknown_data_report(rule.name, "vms", snapshot, SUBJECT_VMS, "no bid was changed")]

    decisions: list[Decision] = []
    for vm_id in sorted(snapshot.vms):
        vm = snapshot.vms[vm_id]
        watched = vm.is_spot and rule.select.matches(vm.id, vm.name)
        if watched and vm.status is VmStatus.OUTBID:
            decisions.extend(_climb_ladder(rule, vm, state, snapshot.hostnodes))
        elif watched and _has_open_ladder(vm.id, state):
            decisions.append(_resolve(rule, vm.id, _left_outbid_summary(vm), vm.status.value))
        elif _has_open_ladder(vm.id, state):
            summary = f"Spot VM {vm.name} ({vm.id}) is no longer watched by this rule."
            decisions.append(_resolve(rule, vm.id, summary, vm.status.value))

    decisions.extend(_resolve_gone_vms(rule, snapshot.vms, state))
    return decisions


def next_bid(current_bid: float, rule: SpotRebidRule) -> float:
    """Return the bid one step above `current_bid`, clamped to the rule's cap."""
    ladder = rule.bid
    if ladder.step_usd is not None:
        step = ladder.step_usd
    else:
        assert ladder.step_percent is not None
        step = current_bid * ladder.step_percent / 100
    return round(min(current_bid + step, ladder.max_usd_per_hour), BID_DECIMALS)


def _climb_ladder(
    rule: SpotRebidRule,
    vm: VirtualMachine,
    state: RuleState,
    hostnodes: Mapping[str, Hostnode] | None,
) -> list[Decision]:
    ladder = state.ladders.get(vm.id, LadderState())
    current = _current_bid(ladder, vm)
    if current is None:
        return [
            Report(
                rule=rule.name,
                subject=vm.id,
                summary=(
                    f"Spot VM {vm.name} ({vm.id}) is outbid but its current bid is not "
                    "reported, so no new bid was placed."
                ),
                evidence={"reason": "bid_unknown", "vm_id": vm.id},
            )
        ]

    storage = storage_cost(vm, hostnodes)
    evidence = _ladder_evidence(rule, vm, ladder, current, storage)
    cap = rule.bid.max_usd_per_hour
    if ladder.exhausted or ladder.steps_taken >= rule.bid.max_steps or current >= cap:
        return [_exhausted_alert(rule, vm, current, storage, evidence)]

    bid = next_bid(current, rule)
    # A zero step, or one too small to show at four decimals, would repeat the same bid
    # forever; the ladder counts as exhausted instead.
    if bid <= current:
        return [
            _exhausted_alert(rule, vm, current, storage, evidence | {"reason": "step_too_small"})
        ]

    step = ladder.steps_taken + 1
    # The ladder climbs from its last try, which may be above the VM's bid when the
    # API refused that try, so the message names both.
    placed = vm.spot_bid
    start = f"${current:.4f}/h"
    if placed is not None and round(placed, 4) != round(current, 4):
        start = f"${placed:.4f}/h (last try ${current:.4f}/h)"
    return [
        Rebid(
            rule=rule.name,
            subject=vm.id,
            summary=(
                f"Spot VM {vm.name} is outbid: raise its bid from {start} to "
                f"${bid:.4f}/h (step {step} of at most {rule.bid.max_steps}, cap ${cap:.4f}/h)."
            ),
            evidence=evidence | {"new_bid_usd_per_hour": bid, "step": step},
            bid_usd_per_hour=bid,
            previous_bid_usd_per_hour=current,
            step=step,
            max_usd_per_hour=cap,
        )
    ]


def _current_bid(ladder: LadderState, vm: VirtualMachine) -> float | None:
    """Return the higher of the ladder's last bid and the VM's reported bid.

    The higher one is used so that a bid raised outside this rule is never undercut.
    """
    known = [bid for bid in (ladder.last_bid_usd, vm.spot_bid) if bid is not None]
    return max(known) if known else None


def _exhausted_alert(
    rule: SpotRebidRule,
    vm: VirtualMachine,
    current: float,
    storage: tuple[float | None, bool],
    evidence: dict[str, Any],
) -> FireAlert:
    cost, estimated = storage
    if cost is None:
        cost_text = "its storage is still billed at an unknown rate"
    else:
        approx = "about " if estimated else ""
        cost_text = f"its storage still costs {approx}${cost:.4f}/h"
    return FireAlert(
        rule=rule.name,
        subject=vm.id,
        severity=Severity.CRITICAL,
        summary=(
            f"Spot VM {vm.name} ({vm.id}) is still outbid at ${current:.4f}/h, the last bid "
            f"this rule may place (cap ${rule.bid.max_usd_per_hour:.4f}/h, at most "
            f"{rule.bid.max_steps} steps), and {cost_text}."
        ),
        evidence=evidence | {"exhausted": True},
    )


def _ladder_evidence(
    rule: SpotRebidRule,
    vm: VirtualMachine,
    ladder: LadderState,
    current: float,
    storage: tuple[float | None, bool],
) -> dict[str, Any]:
    cost, estimated = storage
    return {
        "vm_id": vm.id,
        "vm_name": vm.name,
        "hostnode_id": vm.hostnode,
        "old_bid_usd_per_hour": current,
        "max_usd_per_hour": rule.bid.max_usd_per_hour,
        "steps_taken": ladder.steps_taken,
        "max_steps": rule.bid.max_steps,
        "storage_usd_per_hour": cost,
        "storage_cost_estimated": estimated,
    }


def _has_open_ladder(vm_id: str, state: RuleState) -> bool:
    return vm_id in state.ladders or vm_id in state.open_alerts


def _left_outbid_summary(vm: VirtualMachine) -> str:
    if vm.status is VmStatus.RUNNING:
        bid = f" at ${vm.spot_bid:.4f}/h" if vm.spot_bid is not None else ""
        return f"Spot VM {vm.name} ({vm.id}) is running again{bid}."
    return f"Spot VM {vm.name} ({vm.id}) is no longer outbid (status {vm.status.value})."


def _resolve(rule: SpotRebidRule, vm_id: str, summary: str, status: str) -> ResolveAlert:
    return ResolveAlert(
        rule=rule.name, subject=vm_id, summary=summary, evidence={"vm_id": vm_id, "status": status}
    )


def _resolve_gone_vms(
    rule: SpotRebidRule, vms: Mapping[str, VirtualMachine], state: RuleState
) -> list[Decision]:
    """Close ladders and alerts of VMs that are no longer in the VM list."""
    open_ids = set(state.ladders) | set(state.open_alerts)
    return [
        _resolve(rule, vm_id, f"Spot VM {vm_id} is no longer in the VM list.", "gone")
        for vm_id in sorted(open_ids)
        if vm_id not in vms
    ]
