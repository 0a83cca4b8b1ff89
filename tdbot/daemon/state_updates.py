"""Rule state and action messages left behind by a finished tick.

Evaluation is pure, so the values it needs next time (the lowest price seen, when
each VM started running) are computed by the evaluation modules and stored here.
Ladder steps, idle warnings and deployed VMs are stored by the executor itself,
because they must be written even when a tick fails half-way.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from tdbot.actions.outcome import ActionOutcome, OutcomeStatus
from tdbot.alerts.messages import IDLE_WARNING_BUTTONS
from tdbot.evaluation.cheapest import updated_best_price
from tdbot.evaluation.idle import running_since_updates
from tdbot.evaluation.model import (
    CancelIdleWarning,
    Decision,
    FireAlert,
    MarketSnapshot,
    Report,
    ResolveAlert,
    RuleState,
    Severity,
    WarnIdle,
)
from tdbot.rules.schema import CheapestHostnodeRule, IdleStopRule, RuleBase
from tdbot.store.db import ACTION_SUBJECT_PREFIX, Store

logger = logging.getLogger("tdbot.daemon.state")

# How long after its deploy a VM may be missing from the VM list before it counts as gone.
LISTING_GRACE = timedelta(minutes=10)

if TYPE_CHECKING:
    from tdbot.daemon.engine import TickResult


async def apply_state_updates(
    store: Store,
    rule: RuleBase,
    state: RuleState,
    snapshot: MarketSnapshot,
    result: TickResult,
    now: datetime,
) -> None:
    """Store the rule state that the next tick of `rule` reads."""
    if isinstance(rule, CheapestHostnodeRule):
        best = updated_best_price(rule, snapshot, state)
        if best is not None:
            await store.save_best_price(rule.name, best)
        await forget_gone_vms(store, rule.name, snapshot)
    if isinstance(rule, IdleStopRule):
        for vm_id, since in running_since_updates(rule, snapshot, state, now).items():
            await store.set_running_since(rule.name, vm_id, since)


async def forget_gone_vms(store: Store, rule: str, snapshot: MarketSnapshot) -> None:
    """Stop counting a deployed VM against `max_vms` once it is gone from the VM list.

    Only VMs recorded LISTING_GRACE before the snapshot are forgotten, so a VM that was
    deployed a moment ago, and may not be listed yet, keeps its place.
    """
    if snapshot.vms is None:
        return
    for vm_id, deployed_at in (await store.deployed_vms(rule)).items():
        if vm_id not in snapshot.vms and deployed_at < snapshot.taken_at - LISTING_GRACE:
            logger.info("rule %s: deployed VM %s is gone, no longer counted", rule, vm_id)
            await store.remove_deployed_vm(rule, vm_id)


def outcome_alerts(rule: RuleBase, outcomes: Sequence[ActionOutcome]) -> list[Decision]:
    """Turn action outcomes into messages for the user.

    Every action that was carried out, only planned (dry run) or blocked (by a guard,
    or a spot deploy no hostnode took a bid for) is reported once. An action that
    failed, or whose result is unknown, opens a critical alert keyed by VM and action
    kind, which the next successful action of that kind on that VM resolves.
    """
    decisions: list[Decision] = []
    for outcome in outcomes:
        decision = outcome.decision
        kind = type(decision).__name__.lower()
        failure_subject = f"{ACTION_SUBJECT_PREFIX}{kind}:{decision.subject}"
        evidence = {"action_id": outcome.action_id, "status": outcome.status.value}

        if isinstance(decision, WarnIdle | CancelIdleWarning):
            decisions.append(
                Report(
                    rule=rule.name,
                    subject=decision.subject,
                    summary=decision.summary,
                    evidence=evidence | {"reason": kind} | _keep_buttons_evidence(outcome),
                )
            )
        elif outcome.status in (OutcomeStatus.FAILED, OutcomeStatus.UNKNOWN):
            decisions.append(
                FireAlert(
                    rule=rule.name,
                    subject=failure_subject,
                    summary=describe_outcome(outcome),
                    evidence=evidence,
                    severity=Severity.CRITICAL,
                )
            )
        else:
            # A dry run, a block or a wait for confirmation repeats every tick while
            # nothing changes, so its reason leaves out the action id and the user
            # hears of it once.
            reason = f"{outcome.status.value}-{kind}"
            if outcome.status is OutcomeStatus.DONE:
                reason += f"-{outcome.action_id}"
            decisions.append(
                Report(
                    rule=rule.name,
                    subject=decision.subject,
                    summary=describe_outcome(outcome),
                    evidence=evidence | {"reason": reason},
                )
            )
        if outcome.status is OutcomeStatus.DONE:
            decisions.append(
                ResolveAlert(
                    rule=rule.name,
                    subject=failure_subject,
                    summary=f"{kind} on {decision.subject} succeeded",
                )
            )
    return decisions


def _keep_buttons_evidence(outcome: ActionOutcome) -> dict[str, Any]:
    """Ask for the "Keep" and "Stop now" buttons under a stored idle warning's report."""
    decision = outcome.decision
    if not isinstance(decision, WarnIdle) or outcome.status is not OutcomeStatus.DONE:
        return {}
    return {IDLE_WARNING_BUTTONS: True, "vm_name": decision.evidence.get("vm_name")}


OUTCOME_LABELS = {
    OutcomeStatus.DONE: "Done",
    OutcomeStatus.DRY_RUN: "Dry run, nothing sent",
    OutcomeStatus.BLOCKED: "Not done",
    OutcomeStatus.FAILED: "FAILED",
    OutcomeStatus.UNKNOWN: "Result unknown",
    OutcomeStatus.AWAITING_CONFIRMATION: "Waiting",
}


def describe_outcome(outcome: ActionOutcome) -> str:
    """Return the decision's summary, which names the VM, followed by what became of it."""
    label = OUTCOME_LABELS.get(outcome.status, outcome.status.value)
    return f"{outcome.decision.summary} {label}: {outcome.message}"
