"""Carry out decisions through the TensorDock client, under guards and an intent journal.

For every deploy, stop and re-bid the executor:

1. checks the guards (complete and fresh data, price caps, VM count, fleet ceiling)
   and records a blocked action when one fails;
2. in a dry run, records what would have been done and sends nothing;
3. commits a journal row in state `intent`, marks it `sent` just before the call,
   and appends every API call made for it;
4. reads the VM back and marks the action `verified`, `failed` or `unknown`.

Idle warnings are stored without an API call. Alerts and reports are left to the
alert manager and skipped here.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from tdbot.actions import guards
from tdbot.actions.deploying import DeployRunner
from tdbot.actions.journal import JournalEntry
from tdbot.actions.outcome import ActionOutcome, OutcomeStatus
from tdbot.actions.readback import ReadBack, read_back
from tdbot.actions.reconcile import reconcile
from tdbot.evaluation.cheapest import spot_fallback_clause
from tdbot.evaluation.model import (
    CancelIdleWarning,
    Decision,
    Deploy,
    FireAlert,
    IdleWarningState,
    LadderState,
    MarketSnapshot,
    Rebid,
    Report,
    ResolveAlert,
    Stop,
    WarnIdle,
)
from tdbot.rules.schema import RuleBase
from tdbot.store.db import Store
from tdbot.store.tables import ActionKind, ActionState
from tdbot.tensordock.client import TensorDockClient
from tdbot.tensordock.errors import (
    MalformedResponseError,
    TensorDockError,
    TransportError,
    WrongStateError,
)
from tdbot.tensordock.models import VirtualMachine, VmStatus

__all__ = ["ActionExecutor", "ActionOutcome", "OutcomeStatus", "reconcile"]

logger = logging.getLogger("tdbot.actions.executor")

DEFAULT_MAX_SNAPSHOT_AGE = timedelta(minutes=10)
# A plain stop may also end in StoppedDisassociated, for example when the VM had already
# been stopped that way. Either status means that the VM no longer runs.
STOPPED = (VmStatus.STOPPED, VmStatus.STOPPED_DISASSOCIATED)
RELEASED = (VmStatus.STOPPED_DISASSOCIATED,)
RUNNING = (VmStatus.RUNNING,)


@dataclass
class _Budget:
    """Spending already let through in one `execute` call, so later guards count it."""

    added_usd_per_hour: float = 0.0
    deploys: int = 0


class ActionExecutor:
    """Carry out a rule's decisions safely; see the module docstring for the steps."""

    def __init__(
        self,
        client: TensorDockClient,
        store: Store,
        *,
        dry_run: bool,
        fleet_max_usd_per_hour: float,
        verify_attempts: int = 5,
        verify_interval_seconds: float = 2.0,
        max_snapshot_age: timedelta = DEFAULT_MAX_SNAPSHOT_AGE,
    ) -> None:
        if verify_attempts < 1:
            raise ValueError(f"verify_attempts is {verify_attempts}, but it must be at least 1")
        self.client = client
        self.store = store
        self.dry_run = dry_run
        self.fleet_max_usd_per_hour = fleet_max_usd_per_hour
        self.verify_attempts = verify_attempts
        self.verify_interval_seconds = verify_interval_seconds
        self.max_snapshot_age = max_snapshot_age

    async def execute(
        self,
        rule: RuleBase,
        decisions: Sequence[Decision],
        snapshot: MarketSnapshot,
        now: datetime,
        *,
        confirmed: bool = False,
    ) -> list[ActionOutcome]:
        """Carry out the decisions of one rule run, in order, and return one outcome each.

        Alerts and reports get no outcome. A Deploy with `confirm` set is only sent when
        `confirmed` is True, which the caller passes after the user confirmed it. Without
        it, the outcome is `awaiting_confirmation` and nothing is recorded.
        """
        budget = _Budget()
        outcomes: list[ActionOutcome] = []
        for decision in decisions:
            outcome = await self._execute_one(rule, decision, snapshot, now, budget, confirmed)
            if outcome is not None:
                outcomes.append(outcome)
        return outcomes

    async def _execute_one(
        self,
        rule: RuleBase,
        decision: Decision,
        snapshot: MarketSnapshot,
        now: datetime,
        budget: _Budget,
        confirmed: bool,
    ) -> ActionOutcome | None:
        if isinstance(decision, FireAlert | ResolveAlert | Report):
            return None
        if isinstance(decision, WarnIdle | CancelIdleWarning):
            return await self._save_idle_warning(rule, decision, now)
        if isinstance(decision, Stop | Rebid | Deploy):
            return await self._spend(rule, decision, snapshot, now, budget, confirmed)
        logger.warning("rule %s: no executor for %s, skipped", rule.name, type(decision).__name__)
        return None

    # --- idle warnings -----------------------------------------------------------

    async def _save_idle_warning(
        self, rule: RuleBase, decision: WarnIdle | CancelIdleWarning, now: datetime
    ) -> ActionOutcome:
        # Warnings are stored in dry runs too, so a dry run shows the whole warn-then-stop
        # sequence; the stop itself is then only recorded.
        if isinstance(decision, CancelIdleWarning):
            await self.store.save_idle_warning(rule.name, decision.subject, None)
            return ActionOutcome(decision, None, OutcomeStatus.DONE, "idle warning cancelled")

        if decision.due_at is None:
            message = "the idle warning has no due time, so it was not stored"
            return ActionOutcome(decision, None, OutcomeStatus.FAILED, message)
        warning = IdleWarningState(warned_at=now, due_at=decision.due_at)
        await self.store.save_idle_warning(rule.name, decision.subject, warning)
        message = f"idle warning stored, stop due at {decision.due_at.isoformat()}"
        return ActionOutcome(decision, None, OutcomeStatus.DONE, message)

    # --- spending and destructive decisions ------------------------------------------

    async def _spend(
        self,
        rule: RuleBase,
        decision: Stop | Rebid | Deploy,
        snapshot: MarketSnapshot,
        now: datetime,
        budget: _Budget,
        confirmed: bool,
    ) -> ActionOutcome:
        kind, subject, params = describe_action(decision)

        reason = await self._blocking_reason(rule, decision, snapshot, now, budget)
        if reason is not None:
            action_id = await self.store.record_intent(
                rule.name, kind, subject, params, state=ActionState.BLOCKED, error=reason
            )
            logger.warning("rule %s: %s %s blocked: %s", rule.name, kind, subject, reason)
            return ActionOutcome(decision, action_id, OutcomeStatus.BLOCKED, f"blocked: {reason}")

        if self.dry_run or rule.dry_run:
            action_id = await self.store.record_intent(
                rule.name, kind, subject, params, state=ActionState.DRY_RUN
            )
            message = f"dry run, nothing sent: would {plan_text(decision)}"
            return ActionOutcome(decision, action_id, OutcomeStatus.DRY_RUN, message)

        if isinstance(decision, Deploy) and decision.confirm and not confirmed:
            # The bot asks in Telegram and calls execute(..., confirmed=True) on Confirm.
            message = f"waiting for confirmation to {plan_text(decision)}"
            return ActionOutcome(decision, None, OutcomeStatus.AWAITING_CONFIRMATION, message)

        if isinstance(decision, Deploy | Rebid):
            budget.added_usd_per_hour += guards.added_cost_usd_per_hour(decision, snapshot)
        if isinstance(decision, Deploy):
            budget.deploys += 1

        # The intent row is committed before any call is sent.
        action_id = await self.store.record_intent(rule.name, kind, subject, params)
        entry = JournalEntry(self.store, action_id)
        logger.info("rule %s: action %d: %s", rule.name, action_id, plan_text(decision))
        if isinstance(decision, Deploy):
            await self._save_redeploy(rule, decision, now)
        try:
            return await self._carry_out(rule, decision, entry, now)
        except Exception as error:
            # A bug or an unexpected error after the intent was written: the change may or
            # may not have happened, so the action stays open for reconciliation.
            logger.exception("rule %s: action %d raised", rule.name, action_id)
            await entry.mark(ActionState.UNKNOWN, error=f"{type(error).__name__}: {error}")
            return ActionOutcome(decision, action_id, OutcomeStatus.UNKNOWN, str(error))

    async def _blocking_reason(
        self,
        rule: RuleBase,
        decision: Stop | Rebid | Deploy,
        snapshot: MarketSnapshot,
        now: datetime,
        budget: _Budget,
    ) -> str | None:
        reason = guards.check_snapshot_complete(decision, snapshot, now, self.max_snapshot_age)
        if reason is not None:
            return reason
        if isinstance(decision, Stop):
            return guards.check_vm_listed(decision, snapshot)
        if isinstance(decision, Rebid):
            reason = guards.check_vm_listed(decision, snapshot) or guards.check_rebid_cap(decision)
        else:
            reason = await self._check_deploy(rule, decision, snapshot, budget)
        if reason is not None:
            return reason

        current = guards.current_burn_usd_per_hour(snapshot) + budget.added_usd_per_hour
        added = guards.added_cost_usd_per_hour(decision, snapshot)
        return guards.check_fleet_ceiling(current, added, self.fleet_max_usd_per_hour)

    async def _check_deploy(
        self, rule: RuleBase, decision: Deploy, snapshot: MarketSnapshot, budget: _Budget
    ) -> str | None:
        pending = [
            action
            for action in await self.store.unfinished_actions()
            if action.kind == ActionKind.DEPLOY and action.rule == rule.name
        ]
        # A deploy whose outcome is open may have created a VM, so it counts as live.
        pending_unlisted = [action for action in pending if action.vm_id is None]
        deployed = await self.store.deployed_vm_ids(rule.name)
        live = guards.count_live_vms(deployed, snapshot) + len(pending_unlisted) + budget.deploys

        pending_names = [action.subject for action in pending]
        return guards.check_deploy_caps(decision, live) or guards.check_deploy_name_free(
            decision, snapshot, pending_names
        )

    async def _carry_out(
        self,
        rule: RuleBase,
        decision: Stop | Rebid | Deploy,
        entry: JournalEntry,
        now: datetime,
    ) -> ActionOutcome:
        if isinstance(decision, Stop):
            return await self._stop(rule, decision, entry)
        if isinstance(decision, Rebid):
            return await self._rebid(rule, decision, entry, now)
        runner = DeployRunner(
            self.client,
            self.store,
            verify_attempts=self.verify_attempts,
            verify_interval_seconds=self.verify_interval_seconds,
        )
        return await runner.run(rule.name, decision, entry)

    # --- stop ----------------------------------------------------------------------

    async def _stop(self, rule: RuleBase, decision: Stop, entry: JournalEntry) -> ActionOutcome:
        vm_id = decision.subject
        expected = RELEASED if decision.release else STOPPED
        await entry.mark(ActionState.SENT)
        sent_note = ""
        try:
            await self.client.stop_vm(vm_id, release=decision.release)
            entry.note("client/stop/single", vm_id, "ok")
        except WrongStateError as error:
            # Already stopped, so the read-back below decides whether that is the expected state.
            entry.note("client/stop/single", vm_id, f"already in that state: {error}")
            sent_note = " (it was already stopped)"
        except (TransportError, MalformedResponseError) as error:
            # The response was lost or garbled, not necessarily the stop, so the read-back
            # decides.
            entry.note("client/stop/single", vm_id, f"{type(error).__name__}: {error}")
            sent_note = f" (the stop call's response was lost: {error})"
        except TensorDockError as error:
            entry.note("client/stop/single", vm_id, f"{type(error).__name__}: {error}")
            return await self._fail(decision, entry, f"stop of VM {vm_id} failed: {error}")

        checked = await self._read_back(entry, vm_id, expected)
        if checked.reached:
            await entry.mark(ActionState.VERIFIED, result={"status": _status(checked.vm)})
            # The VM is stopped, so its pending idle warning is settled, not cancelled.
            await self.store.save_idle_warning(rule.name, vm_id, None)
            message = f"VM {vm_id} is {_status(checked.vm)}{sent_note}"
            return ActionOutcome(decision, entry.action_id, OutcomeStatus.DONE, message)
        message = f"stop of VM {vm_id} is not confirmed: {checked.describe(vm_id, expected)}"
        return await self._unconfirmed(decision, entry, message, checked.vm)

    # --- re-bid --------------------------------------------------------------------

    async def _rebid(
        self,
        rule: RuleBase,
        decision: Rebid,
        entry: JournalEntry,
        now: datetime,
    ) -> ActionOutcome:
        vm_id = decision.subject
        bid = decision.bid_usd_per_hour
        await self._save_ladder_step(rule, decision, now)
        await entry.mark(ActionState.SENT)
        try:
            validation = await self.client.validate_spot_existing(vm_id, bid)
        except (TransportError, MalformedResponseError) as error:
            entry.note("client/spot/validate/existing", vm_id, f"{type(error).__name__}: {error}")
            checked = await self._read_back(entry, vm_id, RUNNING)
            if checked.reached:
                return await self._rebid_verified(rule, decision, entry, checked.vm, lost=True)
            message = f"the re-bid response was lost ({error}); {checked.describe(vm_id, RUNNING)}"
            return await self._unknown(decision, entry, message)
        except TensorDockError as error:
            entry.note("client/spot/validate/existing", vm_id, f"{type(error).__name__}: {error}")
            return await self._fail(decision, entry, f"re-bid of VM {vm_id} failed: {error}")

        if not validation.accepted:
            entry.note("client/spot/validate/existing", vm_id, f"rejected: {validation.message}")
            message = f"bid ${bid:.4f}/h for VM {vm_id} was rejected: {validation.message}"
            return await self._fail(decision, entry, message)
        entry.note("client/spot/validate/existing", vm_id, "accepted")

        checked = await self._read_back(entry, vm_id, RUNNING)
        if checked.reached:
            return await self._rebid_verified(rule, decision, entry, checked.vm, lost=False)
        message = f"bid ${bid:.4f}/h was accepted, but {checked.describe(vm_id, RUNNING)}"
        return await self._unconfirmed(decision, entry, message, checked.vm)

    async def _rebid_verified(
        self,
        rule: RuleBase,
        decision: Rebid,
        entry: JournalEntry,
        vm: VirtualMachine | None,
        *,
        lost: bool,
    ) -> ActionOutcome:
        await entry.mark(ActionState.VERIFIED, result={"status": _status(vm)})
        # The ladder is done; a later outbid starts a new one from the new bid.
        await self.store.save_ladder(rule.name, decision.subject, None)
        message = f"VM {decision.subject} is Running at a bid of ${decision.bid_usd_per_hour:.4f}/h"
        reported = vm.spot_bid if vm is not None else None
        if reported is not None and round(reported, 4) != round(decision.bid_usd_per_hour, 4):
            # The status is what proves the re-bid; a different bid is shown, not hidden.
            message += f", though the API reports a bid of ${reported:.4f}/h"
        if lost:
            message += " (response was lost)"
        return ActionOutcome(decision, entry.action_id, OutcomeStatus.DONE, message)

    async def _save_ladder_step(self, rule: RuleBase, decision: Rebid, now: datetime) -> None:
        # Stored before the call, so a failed or lost step is not taken again next tick.
        state = await self.store.load_rule_state(rule.name)
        earlier = state.ladders.get(decision.subject)
        started_at = earlier.started_at if earlier is not None and earlier.started_at else now
        # Step times older than an hour no longer count toward the per-hour limit.
        recent = tuple(
            moment
            for moment in (earlier.step_times if earlier is not None else ())
            if now - moment < timedelta(hours=1)
        )
        ladder = LadderState(
            steps_taken=decision.step,
            last_bid_usd=decision.bid_usd_per_hour,
            started_at=started_at,
            step_times=(*recent, now),
            redeployed=earlier.redeployed if earlier is not None else False,
        )
        await self.store.save_ladder(rule.name, decision.subject, ladder)

    async def _save_redeploy(self, rule: RuleBase, decision: Deploy, now: datetime) -> None:
        # Stored before the deploy is sent, so the outbid episode gets one replacement
        # even when the response is lost.
        replaced = decision.replaces_vm_id
        if replaced is None:
            return
        state = await self.store.load_rule_state(rule.name)
        earlier = state.ladders.get(replaced) or LadderState(started_at=now)
        ladder = replace(earlier, redeployed=True, exhausted=True)
        await self.store.save_ladder(rule.name, replaced, ladder)

    # --- shared --------------------------------------------------------------------

    async def _read_back(
        self, entry: JournalEntry, vm_id: str, expected: Sequence[VmStatus]
    ) -> ReadBack:
        return await read_back(
            self.client,
            entry,
            vm_id,
            expected,
            attempts=self.verify_attempts,
            interval_seconds=self.verify_interval_seconds,
        )

    async def _unconfirmed(
        self, decision: Decision, entry: JournalEntry, message: str, vm: VirtualMachine | None
    ) -> ActionOutcome:
        """Fail when the VM was read and shows the change did not happen, else stay unknown."""
        if vm is None:
            return await self._unknown(decision, entry, message)
        return await self._fail(decision, entry, message)

    async def _fail(self, decision: Decision, entry: JournalEntry, message: str) -> ActionOutcome:
        await entry.mark(ActionState.FAILED, error=message)
        logger.warning("action %d failed: %s", entry.action_id, message)
        return ActionOutcome(decision, entry.action_id, OutcomeStatus.FAILED, message)

    async def _unknown(
        self, decision: Decision, entry: JournalEntry, message: str
    ) -> ActionOutcome:
        await entry.mark(ActionState.UNKNOWN, error=message)
        logger.warning("action %d has an unknown outcome: %s", entry.action_id, message)
        return ActionOutcome(decision, entry.action_id, OutcomeStatus.UNKNOWN, message)


def _status(vm: VirtualMachine | None) -> str:
    return vm.status.value if vm is not None else "unknown"


def describe_action(decision: Stop | Rebid | Deploy) -> tuple[ActionKind, str, dict[str, Any]]:
    """Return the journal kind, subject and parameters of a decision; no secrets."""
    if isinstance(decision, Stop):
        return (
            ActionKind.STOP,
            decision.subject,
            {
                "release": decision.release,
                "saves_usd_per_hour": decision.saves_usd_per_hour,
            },
        )
    if isinstance(decision, Rebid):
        return (
            ActionKind.REBID,
            decision.subject,
            {
                "bid_usd_per_hour": decision.bid_usd_per_hour,
                "previous_bid_usd_per_hour": decision.previous_bid_usd_per_hour,
                "step": decision.step,
                "max_usd_per_hour": decision.max_usd_per_hour,
            },
        )
    return (
        ActionKind.DEPLOY,
        decision.vm_name,
        {
            "vm_name": decision.vm_name,
            "hostnode_id": decision.hostnode_id,
            "gpu_model": decision.gpu_model,
            "gpu_count": decision.gpu_count,
            "vcpus": decision.vcpus,
            "ram_gb": decision.ram_gb,
            "storage_gb": decision.storage_gb,
            "operating_system": decision.operating_system,
            "internal_ports": list(decision.internal_ports),
            "price_usd_per_hour": decision.price_usd_per_hour,
            "max_usd_per_hour": decision.max_usd_per_hour,
            "max_vms": decision.max_vms,
            "spot": decision.spot,
            "fallback_hostnode_ids": list(decision.fallback_hostnode_ids),
            # The script may contain secrets, so the journal records only whether one was sent.
            "cloudinit_script": decision.cloudinit_script is not None,
            "replaces_vm_id": decision.replaces_vm_id,
        },
    )


def plan_text(decision: Stop | Rebid | Deploy) -> str:
    """Say in a few words what carrying out the decision does."""
    if isinstance(decision, Stop):
        if decision.release:
            return f"stop VM {decision.subject} and release its GPU, vCPUs and RAM"
        return f"stop VM {decision.subject} (resources stay reserved and billed)"
    if isinstance(decision, Rebid):
        return f"raise the bid of VM {decision.subject} to ${decision.bid_usd_per_hour:.4f}/h"
    vm = f"{decision.vm_name} ({decision.gpu_count}x {decision.gpu_model})"
    if decision.spot:
        # The bid is found just before the deploy, within this limit.
        limit = guards.max_deploy_cost_usd_per_hour(decision)
        fallback = spot_fallback_clause(len(decision.fallback_hostnode_ids))
        return (
            f"deploy {vm} as a spot VM at the lowest accepted bid, at most ${limit:.4f}/h "
            f"with storage, on hostnode {decision.hostnode_id}{fallback}"
        )
    return f"deploy {vm} on hostnode {decision.hostnode_id} at ${decision.price_usd_per_hour:.4f}/h"
