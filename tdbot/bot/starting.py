"""Start a stopped VM under the same guards, journal and read-back as the executor's actions.

`ActionExecutor` carries out the decisions rules make, and no rule starts a VM, so
the start asked for in a chat goes through this path beside it:

1. checks that the snapshot is complete and fresh, that the VM is listed and stopped,
   and that running it keeps the fleet under its ceiling. A failed check is recorded
   as a blocked action;
2. in a dry run, records what would have been done and sends nothing;
3. commits a journal row in state `intent`, marks it `sent` just before the call;
4. reads the VM back until it is Running and marks the action `verified`, `failed`
   or `unknown`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime

from tdbot.actions import guards
from tdbot.actions.executor import ActionExecutor
from tdbot.actions.journal import JournalEntry
from tdbot.actions.outcome import OutcomeStatus
from tdbot.actions.readback import read_back
from tdbot.evaluation.burn import vm_hourly_cost
from tdbot.evaluation.model import Decision, MarketSnapshot
from tdbot.store.tables import ActionKind, ActionState
from tdbot.tensordock.errors import (
    MalformedResponseError,
    TensorDockError,
    TransportError,
    WrongStateError,
)
from tdbot.tensordock.models import VirtualMachine, VmStatus

logger = logging.getLogger("tdbot.bot.starting")

STARTABLE = (VmStatus.STOPPED, VmStatus.STOPPED_DISASSOCIATED)
START_ENDPOINT = "client/start/single"


@dataclass(frozen=True)
class StartVm(Decision):
    """Start a stopped VM. Only a chat command requests this, never a rule."""

    added_usd_per_hour: float = 0.0


@dataclass(frozen=True)
class StartOutcome:
    """The outcome of one start; `action_id` is its journal row, if one was written."""

    action_id: int | None
    status: OutcomeStatus
    message: str


def start_cost_usd_per_hour(vm: VirtualMachine, snapshot: MarketSnapshot) -> tuple[float, float]:
    """Return what the VM costs per hour now and what running it adds to that.

    A Stopped VM is already billed in full, so a start adds nothing. A released VM
    pays for storage only until its GPUs, vCPUs and RAM are billed again.
    """
    now_cost, _ = vm_hourly_cost(vm, snapshot.hostnodes)
    running = vm.model_copy(update={"status": VmStatus.RUNNING})
    running_cost, _ = vm_hourly_cost(running, snapshot.hostnodes)
    return now_cost, max(running_cost - now_cost, 0.0)


class VmStarter:
    """Start VMs with the executor's client, store, dry run, fleet ceiling and read-back."""

    def __init__(self, executor: ActionExecutor) -> None:
        self._executor = executor

    async def start(
        self, decision: StartVm, snapshot: MarketSnapshot, now: datetime
    ) -> StartOutcome:
        """Start the VM of `decision`, following the steps in the module docstring."""
        executor = self._executor
        vm_id = decision.subject
        params = {"added_usd_per_hour": decision.added_usd_per_hour, **decision.evidence}

        reason = self._blocking_reason(decision, snapshot, now)
        if reason is not None:
            action_id = await executor.store.record_intent(
                decision.rule,
                ActionKind.START,
                vm_id,
                params,
                state=ActionState.BLOCKED,
                error=reason,
                vm_id=vm_id,
            )
            logger.warning("start of VM %s blocked: %s", vm_id, reason)
            return StartOutcome(action_id, OutcomeStatus.BLOCKED, f"blocked: {reason}")

        if executor.dry_run:
            action_id = await executor.store.record_intent(
                decision.rule,
                ActionKind.START,
                vm_id,
                params,
                state=ActionState.DRY_RUN,
                vm_id=vm_id,
            )
            return StartOutcome(
                action_id, OutcomeStatus.DRY_RUN, f"dry run, nothing sent: would start VM {vm_id}"
            )

        # The intent row is committed before the call is sent.
        action_id = await executor.store.record_intent(
            decision.rule, ActionKind.START, vm_id, params, vm_id=vm_id
        )
        entry = JournalEntry(executor.store, action_id)
        logger.info("action %d: start VM %s", action_id, vm_id)
        try:
            return await self._carry_out(vm_id, entry)
        except Exception as error:
            # The start may or may not have happened, so the action stays open for
            # reconciliation at the next daemon start.
            logger.exception("action %d raised", action_id)
            await entry.mark(ActionState.UNKNOWN, error=f"{type(error).__name__}: {error}")
            return StartOutcome(action_id, OutcomeStatus.UNKNOWN, str(error))

    def _blocking_reason(
        self, decision: StartVm, snapshot: MarketSnapshot, now: datetime
    ) -> str | None:
        executor = self._executor
        reason = guards.check_snapshot_complete(decision, snapshot, now, executor.max_snapshot_age)
        if reason is not None:
            return reason
        if snapshot.balance is None:
            error = snapshot.errors.get("balance", "no error recorded")
            return f"the balance failed to load ({error}), so no money is spent"
        vm = (snapshot.vms or {}).get(decision.subject)
        if vm is None:
            return f"VM {decision.subject} is not in the VM list, so it is left alone"
        if vm.status not in STARTABLE:
            return (
                f"VM {decision.subject} is {vm.status.value}, and only a stopped VM can be started"
            )
        _, added = start_cost_usd_per_hour(vm, snapshot)
        current = guards.current_burn_usd_per_hour(snapshot)
        return guards.check_fleet_ceiling(current, added, executor.fleet_max_usd_per_hour)

    async def _carry_out(self, vm_id: str, entry: JournalEntry) -> StartOutcome:
        executor = self._executor
        await entry.mark(ActionState.SENT)
        note = ""
        try:
            await executor.client.start_vm(vm_id)
            entry.note(START_ENDPOINT, vm_id, "ok")
        except WrongStateError as error:
            # Already running, so the read-back below decides whether that is fine.
            entry.note(START_ENDPOINT, vm_id, f"already in that state: {error}")
            note = " (it was already running)"
        except (TransportError, MalformedResponseError) as error:
            # The response was lost or garbled, not necessarily the start.
            entry.note(START_ENDPOINT, vm_id, f"{type(error).__name__}: {error}")
            note = f" (the start call's response was lost: {error})"
        except TensorDockError as error:
            entry.note(START_ENDPOINT, vm_id, f"{type(error).__name__}: {error}")
            return await self._settle(
                entry, ActionState.FAILED, f"start of VM {vm_id} failed: {error}"
            )

        expected = (VmStatus.RUNNING,)
        checked = await read_back(
            executor.client,
            entry,
            vm_id,
            expected,
            attempts=executor.verify_attempts,
            interval_seconds=executor.verify_interval_seconds,
        )
        if checked.reached:
            await entry.mark(ActionState.VERIFIED, result={"status": VmStatus.RUNNING.value})
            return StartOutcome(entry.action_id, OutcomeStatus.DONE, f"VM {vm_id} is Running{note}")
        message = f"start of VM {vm_id} is not confirmed: {checked.describe(vm_id, expected)}"
        state = ActionState.FAILED if checked.vm is not None else ActionState.UNKNOWN
        return await self._settle(entry, state, message)

    async def _settle(self, entry: JournalEntry, state: ActionState, message: str) -> StartOutcome:
        await entry.mark(state, error=message)
        logger.warning("action %d %s: %s", entry.action_id, state.value, message)
        status = OutcomeStatus.FAILED if state is ActionState.FAILED else OutcomeStatus.UNKNOWN
        return StartOutcome(entry.action_id, status, message)
