"""Settle the actions a crash or a lost response left open: at start, then every minute.

Nothing is ever re-sent here: each open action is checked against the account as it
is now and marked verified (the change is there) or failed (it is not). An action
that cannot be checked, because the API did not respond, stays open for the next check.

A deploy is the exception to settling at once. The API may still carry out a deploy
whose response was lost (its calls can take minutes), so while its VM is not listed it
stays unknown for DEPLOY_SETTLE_WINDOW. An open deploy blocks another deploy under the
same name, so the VM is never created twice.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta

from tdbot.actions.deploying import LIST_ENDPOINT, find_by_name
from tdbot.actions.journal import JournalEntry
from tdbot.store.db import Store
from tdbot.store.tables import ActionKind, ActionRecord, ActionState
from tdbot.tensordock.client import TensorDockClient
from tdbot.tensordock.errors import NotFoundError, TensorDockError
from tdbot.tensordock.models import VirtualMachine, VmStatus

logger = logging.getLogger("tdbot.actions.reconcile")

GET_ENDPOINT = "client/get/single"

# How long a deploy with a lost response stays open while its VM is not listed.
DEPLOY_SETTLE_WINDOW = timedelta(minutes=30)


@dataclass(frozen=True)
class _Settlement:
    state: ActionState
    reason: str
    vm_id: str | None = None


class _VmList:
    """The VM list, loaded once on first use and shared by every open deploy."""

    def __init__(self, client: TensorDockClient) -> None:
        self.client = client
        self.vms: dict[str, VirtualMachine] | None = None

    async def load(self, entry: JournalEntry) -> dict[str, VirtualMachine]:
        if self.vms is None:
            try:
                self.vms = await self.client.list_vms()
            except TensorDockError as error:
                entry.note(LIST_ENDPOINT, None, f"{type(error).__name__}: {error}")
                raise
            entry.note(LIST_ENDPOINT, None, "ok")
        return self.vms


async def reconcile(
    client: TensorDockClient, store: Store, *, min_age: timedelta = timedelta(0)
) -> list[str]:
    """Check every action in state intent, sent or unknown; return one line per action.

    Actions updated less than `min_age` ago are left alone, because the executor may
    still be working on them.
    """
    vm_list = _VmList(client)
    lines: list[str] = []
    for action in await store.unfinished_actions():
        if store.now() - action.updated_at < min_age:
            continue
        entry = JournalEntry(store, _action_id(action))
        try:
            settled = await _settle(client, store, action, entry, vm_list)
        except TensorDockError as error:
            reason = f"could not be checked ({error}); it stays {action.state}"
        else:
            reason = settled.reason
            error_text = reason if settled.state is ActionState.FAILED else None
            await entry.mark(settled.state, error=error_text, vm_id=settled.vm_id)

        line = f"action {action.id} ({action.kind} {action.subject}, rule {action.rule}): {reason}"
        logger.info("reconcile: %s", line)
        lines.append(line)
    return lines


async def _settle(
    client: TensorDockClient,
    store: Store,
    action: ActionRecord,
    entry: JournalEntry,
    vm_list: _VmList,
) -> _Settlement:
    """Return the state the action is settled in and why."""
    never_sent = action.state == ActionState.INTENT
    if action.kind == ActionKind.DEPLOY:
        return await _settle_deploy(store, action, entry, vm_list, never_sent)

    vm_id = action.vm_id or action.subject
    try:
        vm = await client.get_vm(vm_id)
    except NotFoundError:
        entry.note(GET_ENDPOINT, vm_id, "not found")
        if action.kind == ActionKind.DELETE:
            return _Settlement(
                ActionState.VERIFIED, f"VM {vm_id} is gone, so the delete took effect"
            )
        return _Settlement(ActionState.FAILED, f"VM {vm_id} no longer exists; nothing was re-sent")
    except TensorDockError as error:
        entry.note(GET_ENDPOINT, vm_id, f"{type(error).__name__}: {error}")
        raise
    entry.note(GET_ENDPOINT, vm_id, f"ok: {vm.status.value}")

    expected = _expected_statuses(action)
    if vm.status in expected:
        reason = f"VM {vm_id} is {vm.status.value}, so the change took effect"
        return _Settlement(ActionState.VERIFIED, reason)
    sent = "was never sent" if never_sent else "did not take effect"
    reason = f"VM {vm_id} is {vm.status.value}, so the {action.kind} {sent}; it was not re-sent"
    return _Settlement(ActionState.FAILED, reason)


async def _settle_deploy(
    store: Store,
    action: ActionRecord,
    entry: JournalEntry,
    vm_list: _VmList,
    never_sent: bool,
) -> _Settlement:
    vms = await vm_list.load(entry)
    vm = vms.get(action.vm_id) if action.vm_id else None
    if vm is None:
        vm = find_by_name(vms, action.subject)
    if vm is not None:
        await store.add_deployed_vm(action.rule, vm.id)
        reason = f"VM {action.subject} exists as {vm.id} ({vm.status.value})"
        return _Settlement(ActionState.VERIFIED, reason, vm_id=vm.id)
    if never_sent:
        return _Settlement(ActionState.FAILED, f"the deploy of {action.subject} was never sent")
    waited = store.now() - action.created_at
    if waited < DEPLOY_SETTLE_WINDOW:
        window = _minutes(DEPLOY_SETTLE_WINDOW)
        reason = (
            f"response lost and no VM named {action.subject} is listed yet; the deploy stays "
            f"open, and blocks another deploy of that name, for up to {window}"
        )
        return _Settlement(ActionState.UNKNOWN, reason)
    reason = (
        f"response lost, not re-sent: no VM named {action.subject} is listed "
        f"{_minutes(waited)} after the deploy"
    )
    return _Settlement(ActionState.FAILED, reason)


def _minutes(delta: timedelta) -> str:
    return f"{int(delta.total_seconds() // 60)} min"


def _expected_statuses(action: ActionRecord) -> tuple[VmStatus, ...]:
    if action.kind == ActionKind.STOP:
        if action.params.get("release"):
            return (VmStatus.STOPPED_DISASSOCIATED,)
        return (VmStatus.STOPPED, VmStatus.STOPPED_DISASSOCIATED)
    if action.kind == ActionKind.DELETE:
        return (VmStatus.TERMINATED,)
    return (VmStatus.RUNNING,)


def _action_id(action: ActionRecord) -> int:
    if action.id is None:
        raise ValueError("a journal row without an id cannot be reconciled")
    return action.id
