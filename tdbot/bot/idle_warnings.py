"""Buttons under an idle warning: keep the VM 1 h or 4 h longer, or stop it now.

The buttons carry `k:<row id>.<check>:<choice>` (see `tdbot.alerts.messages`). "Keep"
moves the stored stop time to max(due time, now) plus 1 h or 4 h, so it survives a
restart, and activity before then still cancels the warning at the rule's next tick.
"Stop now" never stops the VM itself. It sends the user who pressed it the same
Confirm / Cancel question as /stop_vm, which shows the hourly cost.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta

from tdbot.alerts.messages import parse_keep_callback
from tdbot.bot.chat_actions import CHAT_RULE, NotAllowedNow, ask_stop, fresh_snapshot
from tdbot.bot.confirmations import Confirmations
from tdbot.bot.views import moment
from tdbot.clock import Clock
from tdbot.notify.base import Message
from tdbot.rules.schema import IdleStopRule, RuleBase
from tdbot.store.db import Store, StoredIdleWarning
from tdbot.tensordock.client import TensorDockClient

logger = logging.getLogger("tdbot.bot.idle_warnings")

NOT_PENDING = (
    "This idle warning is no longer pending (the VM became busy, was stopped, or the "
    "warning was cancelled), so nothing was changed."
)


@dataclass(frozen=True)
class ButtonReply:
    """The answer to a button press, and a confirmation question to send, if any."""

    answer: str
    question: Message | None = None


class IdleWarningButtons:
    """Handle presses of the buttons under idle warnings."""

    def __init__(
        self,
        *,
        client: TensorDockClient,
        store: Store,
        clock: Clock,
        confirmations: Confirmations,
        rules: Callable[[], Sequence[RuleBase]],
    ) -> None:
        self._client = client
        self._store = store
        self._clock = clock
        self._confirmations = confirmations
        # Read at each use, since a reload of the rule files replaces the daemon's list.
        self._rules = rules

    async def press(self, data: str, *, user_id: int, chat_id: int | None) -> ButtonReply:
        """Apply a pressed button and return the callback answer."""
        choice = parse_keep_callback(data)
        if choice is None:
            logger.warning("malformed idle warning button %r from user %d", data[:64], user_id)
            return ButtonReply("This button is not valid, so nothing was changed.")
        stored = await self._store.idle_warning_by_row(choice.row_id)
        if stored is None or stored.check != choice.check:
            return ButtonReply(NOT_PENDING)

        if choice.keep_for is None:
            return await self._ask_stop(stored, user_id, chat_id)
        return await self._keep(stored, choice.keep_for, user_id)

    async def _keep(
        self, stored: StoredIdleWarning, keep_for: timedelta, user_id: int
    ) -> ButtonReply:
        now = self._clock.now()
        due_at = max(stored.warning.due_at, now) + keep_for
        if not await self._store.move_idle_warning_due(stored, due_at):
            return ButtonReply(NOT_PENDING)

        logger.info(
            "rule %s: idle stop of VM %s moved to %s by user %d",
            stored.rule,
            stored.vm_id,
            due_at.isoformat(),
            user_id,
        )
        return ButtonReply(
            f"Kept: VM {stored.vm_id} is not stopped before {moment(due_at)}. "
            "Activity before then cancels the stop."
        )

    async def _ask_stop(
        self, stored: StoredIdleWarning, user_id: int, chat_id: int | None
    ) -> ButtonReply:
        snapshot = await fresh_snapshot(self._client, self._clock, frozenset({"vms"}))
        if snapshot.vms is None:
            error = snapshot.errors.get("vms", "no error recorded")
            return ButtonReply(f"The VM list failed to load ({error}), so nothing was done.")
        vm = snapshot.vms.get(stored.vm_id)
        if vm is None:
            return ButtonReply(f"VM {stored.vm_id} is no longer listed, so nothing was done.")
        try:
            question = ask_stop(vm, release=self._releases(stored.rule), snapshot=snapshot)
        except NotAllowedNow as reason:
            return ButtonReply(str(reason))

        record = await self._confirmations.create(
            question, origin=CHAT_RULE.name, now=self._clock.now(), chat_id=chat_id, user_id=user_id
        )
        logger.info(
            "user %d pressed Stop now on the idle warning of VM %s; confirmation %s sent",
            user_id,
            vm.id,
            record.id,
        )
        return ButtonReply(
            "Confirm or cancel the stop in the next message.",
            self._confirmations.question_message(record),
        )

    def _releases(self, rule_name: str) -> bool:
        """Return whether the warning's rule releases the VM's resources when it stops it."""
        rule = next((r for r in self._rules() if r.name == rule_name), None)
        return isinstance(rule, IdleStopRule) and rule.action == "stop_release"
