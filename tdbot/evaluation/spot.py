"""Spot re-bid: raise the bid of outbid spot VMs in steps, up to the rule's cap.

Each outbid VM climbs a ladder: every tick it is still `Outbid`, the next bid is the
last one plus a step, never above `bid.max_usd_per_hour`. The first step may start at
`bid.start_usd_per_hour` instead, and `bid.max_steps_per_hour` spaces the steps out.
Once the bid is at the cap or `bid.max_steps` steps were taken, the ladder is
exhausted. A critical alert with the VM's id as subject then reports that the VM stays
outbid while its storage is still billed. The alert resolves when the VM runs again or
leaves the outbid state.

With `on_exhausted: redeploy`, an exhausted ladder also deploys one on-demand VM of the
same size, named "<vm name>-redeploy", on the cheapest matching hostnode within
`redeploy_max_usd_per_hour`. The outbid VM is left as it is.

A Running VM whose bid is below what its host now takes looks like any other Running
VM in the v0 data, so this module does not guess about it.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from tdbot.evaluation.burn import storage_cost
from tdbot.evaluation.common import unknown_data_report
from tdbot.evaluation.model import (
    Decision,
    Deploy,
    FireAlert,
    LadderState,
    MarketSnapshot,
    Rebid,
    Report,
    ResolveAlert,
    RuleState,
    Severity,
)
from tdbot.evaluation.pricing import Offer, rank_hostnodes
from tdbot.rules.schema import HostnodeSpec, SpotRebidRule
from tdbot.tensordock.models import VirtualMachine, VmStatus

SUBJECT_VMS = "vms"

# Bids are sent with this many decimals.
BID_DECIMALS = 4

# The window of `bid.max_steps_per_hour`.
STEP_WINDOW = timedelta(hours=1)

REDEPLOY_SUFFIX = "-redeploy"


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
            decisions.extend(_climb_ladder(rule, vm, state, snapshot, now))
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


def first_bid(current_bid: float, rule: SpotRebidRule) -> float:
    """Return the first bid of a ladder, clamped to the rule's cap.

    It is the rule's start bid when that is above the VM's bid, else one step above it.
    """
    start = rule.bid.start_usd_per_hour
    if start is not None and start > current_bid:
        return round(min(start, rule.bid.max_usd_per_hour), BID_DECIMALS)
    return next_bid(current_bid, rule)


def steps_in_last_hour(ladder: LadderState, now: datetime) -> int:
    """Count the ladder's steps sent within the hour before `now`."""
    return sum(1 for moment in ladder.step_times if now - moment < STEP_WINDOW)


def _climb_ladder(
    rule: SpotRebidRule,
    vm: VirtualMachine,
    state: RuleState,
    snapshot: MarketSnapshot,
    now: datetime,
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

    storage = storage_cost(vm, snapshot.hostnodes)
    evidence = _ladder_evidence(rule, vm, ladder, current, storage)
    cap = rule.bid.max_usd_per_hour
    if ladder.exhausted or ladder.steps_taken >= rule.bid.max_steps or current >= cap:
        return _on_exhausted(rule, vm, ladder, current, storage, evidence, snapshot, state)

    # The step limit only delays the next step: the ladder goes on once the oldest
    # step of the window is an hour old.
    limit = rule.bid.max_steps_per_hour
    if limit is not None and steps_in_last_hour(ladder, now) >= limit:
        return []

    starting = ladder.steps_taken == 0 and ladder.last_bid_usd is None
    bid = first_bid(current, rule) if starting else next_bid(current, rule)
    # A zero step, or one too small to show at four decimals, would repeat the same bid
    # forever; the ladder counts as exhausted instead.
    if bid <= current:
        evidence = evidence | {"reason": "step_too_small"}
        return _on_exhausted(rule, vm, ladder, current, storage, evidence, snapshot, state)

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
                f"${bid:.4f}/h (step {step} of at most {rule.bid.max_steps}, cap ${cap:.4f}/h); "
                f"meanwhile {_storage_text(storage)}."
            ),
            evidence=evidence | {"new_bid_usd_per_hour": bid, "step": step},
            bid_usd_per_hour=bid,
            previous_bid_usd_per_hour=current,
            step=step,
            max_usd_per_hour=cap,
        )
    ]


def _on_exhausted(
    rule: SpotRebidRule,
    vm: VirtualMachine,
    ladder: LadderState,
    current: float,
    storage: tuple[float | None, bool],
    evidence: dict[str, Any],
    snapshot: MarketSnapshot,
    state: RuleState,
) -> list[Decision]:
    """Alert, and with `on_exhausted: redeploy` deploy a replacement once per episode."""
    if rule.on_exhausted != "redeploy":
        return [_exhausted_alert(rule, vm, current, storage, evidence, "")]
    if ladder.redeployed:
        note = f" A replacement {vm.name}{REDEPLOY_SUFFIX} was already deployed."
        return [_exhausted_alert(rule, vm, current, storage, evidence, note)]

    deploy_or_reason = _redeploy(rule, vm, snapshot, state)
    if isinstance(deploy_or_reason, str):
        note = f" No replacement was deployed: {deploy_or_reason}."
        return [_exhausted_alert(rule, vm, current, storage, evidence, note)]
    note = f" A replacement {deploy_or_reason.vm_name} is to be deployed."
    return [_exhausted_alert(rule, vm, current, storage, evidence, note), deploy_or_reason]


def redeploy_spec(vm: VirtualMachine) -> HostnodeSpec | None:
    """Return the spec of a VM the same size as `vm`, or None when its size is unknown."""
    specs = vm.specs
    if not specs.gpu.type or specs.gpu.amount < 1 or None in (specs.vcpus, specs.ram):
        return None
    assert specs.vcpus is not None and specs.ram is not None
    return HostnodeSpec(
        gpu=[specs.gpu.type],
        gpu_count=specs.gpu.amount,
        vcpus=max(2, specs.vcpus),
        ram_gb=specs.ram,
        storage_gb=max(20, specs.storage or 20),
    )


def _redeploy(
    rule: SpotRebidRule, vm: VirtualMachine, snapshot: MarketSnapshot, state: RuleState
) -> Deploy | str:
    """Return the replacement deploy, or the reason there is none."""
    cap = rule.redeploy_max_usd_per_hour
    assert cap is not None
    spec = redeploy_spec(vm)
    if spec is None:
        return "the VM's GPU, vCPU or RAM size is not reported"
    if snapshot.hostnodes is None:
        return "the hostnode list failed to load"

    ports = list(vm.port_forwards.values()) or [22]
    offers = [
        offer
        for offer in rank_hostnodes(snapshot.hostnodes, spec, len(ports))
        if offer.price_usd_per_hour <= cap
    ]
    if not offers:
        return f"no hostnode offers {spec.gpu_count}x {spec.gpu[0]} within ${cap:.4f}/h"
    return _deploy_decision(rule, vm, offers[0], ports, state)


def _deploy_decision(
    rule: SpotRebidRule, vm: VirtualMachine, best: Offer, ports: list[int], state: RuleState
) -> Deploy:
    cap = rule.redeploy_max_usd_per_hour
    assert cap is not None
    sizing = best.sizing
    vm_name = f"{vm.name or vm.id}{REDEPLOY_SUFFIX}"
    return Deploy(
        rule=rule.name,
        subject=best.hostnode_id,
        summary=(
            f"Deploy {vm_name} to replace outbid spot VM {vm.name} ({vm.id}): "
            f"{sizing.gpu_count}x {sizing.gpu_model}, {sizing.vcpus} vCPUs, {sizing.ram_gb} GB "
            f"RAM, {sizing.storage_gb} GB storage on {best.hostnode_id} ({best.location}) at "
            f"${best.price_usd_per_hour:.4f}/h on demand (cap ${cap:.4f}/h)."
        ),
        evidence={"offer": best.to_evidence(), "replaces_vm_id": vm.id, "max_usd_per_hour": cap},
        **best.deploy_fields(),
        vm_name=vm_name,
        operating_system=vm.operating_system or Deploy.operating_system,
        internal_ports=tuple(sorted(set(ports))),
        max_usd_per_hour=cap,
        # Each outbid VM may bring one replacement, on top of those already deployed.
        max_vms=len(state.deployed_vm_ids) + 1,
        confirm=rule.redeploy_confirm,
        replaces_vm_id=vm.id,
    )


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
    note: str,
) -> FireAlert:
    return FireAlert(
        rule=rule.name,
        subject=vm.id,
        severity=Severity.CRITICAL,
        summary=(
            f"Spot VM {vm.name} ({vm.id}) is still outbid at ${current:.4f}/h, the last bid "
            f"this rule may place (cap ${rule.bid.max_usd_per_hour:.4f}/h, at most "
            f"{rule.bid.max_steps} steps), and {_storage_text(storage)}.{note}"
        ),
        evidence=evidence | {"exhausted": True},
    )


def _storage_text(storage: tuple[float | None, bool]) -> str:
    cost, estimated = storage
    if cost is None:
        return "its storage is still billed at an unknown rate"
    approx = "about " if estimated else ""
    return f"its storage still costs {approx}${cost:.4f}/h"


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
