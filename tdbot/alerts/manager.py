"""Turn the alert decisions of a rule run into stored alert changes and notifications.

All state lives in the store, so a restarted daemon (a new AlertManager over the same
database) neither re-sends an open alert before its repeat interval nor forgets one.

- FireAlert opens the alert (rule, subject) and sends it once; while it stays open it
  is sent again only after `repeat_interval`, or at once when its severity goes up.
  A silenced alert is not sent (see `tdbot.alerts.silence`). Its messages carry the
  silence buttons.
- ResolveAlert closes the open alert and sends how long it lasted; it is ignored when
  no alert with that key is open. No resolution is sent for an alert whose firing
  message was never sent (for example because it was silenced all along), nor for one
  silenced for a time that has not ended. An alert silenced until it resolves does get
  its resolution announced.
- Report is stored as an info alert of the rule "<rule>:report" with the subject
  "<subject>:<evidence reason>" (or just the subject without a reason). It is sent once,
  when first reported, and resolved without a message at the first run of the rule that
  no longer reports it. The separate rule name keeps reports out of the rule's
  `RuleState.open_alerts`, which evaluation reads as its own firing alerts.
  A report whose evidence sets `messages.IDLE_WARNING_BUTTONS` announces an idle
  warning and carries its "Keep 1 h" / "Keep 4 h" / "Stop now" buttons, while the
  warning is still stored.

The messages of one run are sent as one grouped message when there is more than one.
Alerts and reports about a VM that is not running are dropped first, for the rule
kinds `tdbot.alerts.inhibit` names, when the caller passes the rule's kind.

Several rules' runs of one tick can be collected in an `AlertBatch` and sent by
`flush_batch`: each run's message is sent on its own, except while the low-balance
alert is critical, when all of them go out as one message.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from tdbot.alerts import messages
from tdbot.alerts.inhibit import drop_inhibited
from tdbot.alerts.silence import is_silenced, silenced_until_resolved
from tdbot.evaluation.balance import SUBJECT_ACCOUNT
from tdbot.evaluation.model import Decision, FireAlert, Report, ResolveAlert, Severity
from tdbot.notify.base import Button, Message, Notifier, NotifyError
from tdbot.store.db import Store
from tdbot.store.tables import AlertRecord, AlertState

logger = logging.getLogger("tdbot.alerts")

REPORT_RULE_SUFFIX = ":report"

# Open reports of one rule read back per run; far more than a rule reports at once.
_MAX_OPEN_REPORTS = 1000

# Firing alerts read back to find the critical low-balance alert; far more than open at once.
_MAX_FIRING_ALERTS = 1000


def report_rule(rule: str) -> str:
    """Return the rule name under which the reports of `rule` are stored."""
    return rule + REPORT_RULE_SUFFIX


def report_subject(report: Report) -> str:
    """Return the stored subject of a report: its subject and its evidence reason."""
    reason = report.evidence.get("reason")
    return f"{report.subject}:{reason}" if reason else report.subject


@dataclass
class AlertBatch:
    """Messages of several rule runs of one tick, held until `AlertManager.flush_batch`."""

    messages: list[Message] = field(default_factory=list)


@dataclass(frozen=True)
class RuleAlerts:
    """The alert decisions of one rule run, for `AlertManager.handle_tick`."""

    rule: str
    decisions: Sequence[Decision]
    kind: str | None = None
    repeat_interval: timedelta | None = None


class AlertManager:
    """Apply one rule run's FireAlert, ResolveAlert and Report decisions, then notify."""

    def __init__(self, store: Store, notifier: Notifier, *, repeat_interval: timedelta) -> None:
        if repeat_interval <= timedelta(0):
            raise ValueError(f"repeat_interval must be positive, got {repeat_interval}")
        self._store = store
        self._notifier = notifier
        self._repeat_interval = repeat_interval

    async def handle_run(
        self,
        rule: str,
        decisions: Sequence[Decision],
        now: datetime,
        *,
        repeat_interval: timedelta | None = None,
        kind: str | None = None,
        batch: AlertBatch | None = None,
    ) -> Message | None:
        """Store the alert changes of one finished run of `rule`; send and return the message.

        Call it once per run that finished evaluating, even with no decisions, because
        reports missing from a run are resolved. Other decision kinds are ignored.
        `repeat_interval` replaces the manager's default for this rule, for rules that set
        their own. `kind` is the rule's kind, which inhibition needs; without it nothing
        is inhibited. With `batch`, the message is added to the batch instead of being
        sent. Returns None when nothing was due to be sent. Raises ValueError, before
        storing anything, when a decision belongs to another rule.
        """
        foreign = sorted({d.rule for d in decisions if d.rule != rule})
        if foreign:
            raise ValueError(f"decisions of rules {foreign} passed in the run of rule {rule!r}")
        decisions = await drop_inhibited(self._store, rule, kind, decisions)

        outgoing: list[Message] = []
        reported: set[str] = set()
        # With several idle warnings in one message, each button row names its VM.
        name_warnings = sum(1 for d in decisions if _offers_keep_buttons(d)) > 1
        for decision in decisions:
            if isinstance(decision, FireAlert):
                outgoing.extend(
                    await self._fire(decision, now, repeat_interval or self._repeat_interval)
                )
            elif isinstance(decision, ResolveAlert):
                outgoing.extend(await self._resolve(decision, now))
            elif isinstance(decision, Report):
                reported.add(report_subject(decision))
                outgoing.extend(await self._report(decision, now, name_warnings))
        await self._resolve_missing_reports(rule, reported, now)

        if not outgoing:
            return None
        message = messages.group(rule, outgoing)
        if batch is not None:
            batch.messages.append(message)
        else:
            await self._send(message)
        return message

    def begin_batch(self) -> AlertBatch:
        """Start collecting the messages of several rule runs; pass it to `handle_run`."""
        return AlertBatch()

    async def flush_batch(self, batch: AlertBatch) -> list[Message]:
        """Send the batch's messages and empty it; return what was sent.

        Each rule run's message is sent on its own, except while the low-balance alert
        is firing at critical severity (opened earlier or in this batch): then the
        messages are merged into one, led by the balance alert.
        """
        pending, batch.messages = batch.messages, []
        if len(pending) > 1:
            balance = await self._critical_balance_alert()
            if balance is not None:
                key = (balance.rule, balance.subject)
                pending = [messages.group_under_critical_balance(pending, key, balance.message)]
        for message in pending:
            await self._send(message)
        return pending

    async def handle_tick(self, runs: Sequence[RuleAlerts], now: datetime) -> list[Message]:
        """Handle several rule runs of one tick as one batch; return the messages sent.

        When one run raises, the messages of the runs before it are still sent.
        """
        batch = self.begin_batch()
        try:
            for run in runs:
                await self.handle_run(
                    run.rule,
                    run.decisions,
                    now,
                    repeat_interval=run.repeat_interval,
                    kind=run.kind,
                    batch=batch,
                )
        finally:
            sent = await self.flush_batch(batch)
        return sent

    async def _critical_balance_alert(self) -> AlertRecord | None:
        # Low-balance rules are the only ones whose alerts have the subject "account".
        firing = await self._store.list_alerts(state=AlertState.FIRING, limit=_MAX_FIRING_ALERTS)
        for alert in firing:
            is_report = alert.rule.endswith(REPORT_RULE_SUFFIX)
            critical = alert.severity == Severity.CRITICAL.value
            if alert.subject == SUBJECT_ACCOUNT and critical and not is_report:
                return alert
        return None

    async def _fire(
        self, decision: FireAlert, now: datetime, repeat_interval: timedelta
    ) -> list[Message]:
        rule, subject = decision.rule, decision.subject
        before = await self._store.get_open_alert(rule, subject)
        alert = await self._store.upsert_alert(
            rule, subject, severity=decision.severity.value, message=decision.summary, now=now
        )
        escalated = before is not None and messages.severity_rank(
            alert.severity
        ) > messages.severity_rank(before.severity)

        # An escalation is due at once; otherwise the repeat interval applies.
        repeat_every = timedelta(0) if escalated else repeat_interval
        if not await self._store.claim_alert_send(_id(alert), repeat_every=repeat_every, now=now):
            return []

        alert_id = _id(alert)
        if before is None or alert.last_sent_at is None:
            logger.info("alert %s/%s opened (%s)", rule, subject, alert.severity)
            return [
                messages.fired(
                    rule, subject, decision.summary, alert.severity, now, alert_id=alert_id
                )
            ]
        if escalated:
            logger.info("alert %s/%s escalated to %s", rule, subject, alert.severity)
            return [
                messages.escalated(
                    rule,
                    subject,
                    decision.summary,
                    alert.severity,
                    alert.first_fired_at,
                    now,
                    alert_id=alert_id,
                )
            ]
        logger.info("alert %s/%s still firing, sending a reminder", rule, subject)
        return [
            messages.still_firing(
                rule,
                subject,
                decision.summary,
                alert.severity,
                alert.first_fired_at,
                now,
                alert_id=alert_id,
            )
        ]

    async def _resolve(self, decision: ResolveAlert, now: datetime) -> list[Message]:
        rule, subject = decision.rule, decision.subject
        alert = await self._store.resolve_alert(rule, subject, now=now)
        if alert is None:
            logger.debug("no open alert %s/%s to resolve", rule, subject)
            return []

        lasted = messages.format_duration(now - alert.first_fired_at)
        logger.info("alert %s/%s resolved after %s", rule, subject, lasted)
        if not _was_announced(alert, now):
            return []
        return [messages.resolved(rule, subject, decision.summary, alert.first_fired_at, now)]

    async def _report(
        self, decision: Report, now: datetime, name_warnings: bool = False
    ) -> list[Message]:
        rule, subject = report_rule(decision.rule), report_subject(decision)
        alert = await self._store.upsert_alert(
            rule, subject, severity="info", message=decision.summary, now=now
        )
        # repeat_every=None: a report is sent once per episode, never repeated.
        if not await self._store.claim_alert_send(_id(alert), repeat_every=None, now=now):
            return []
        logger.info("report %s/%s sent", decision.rule, subject)
        buttons = await self._keep_buttons(decision, name_warnings)
        return [
            messages.reported(decision.rule, decision.subject, decision.summary, buttons=buttons)
        ]

    async def _keep_buttons(
        self, decision: Report, name_warnings: bool
    ) -> tuple[tuple[Button, ...], ...]:
        """Return the buttons of an idle warning's report; none for other reports."""
        if not _offers_keep_buttons(decision):
            return ()
        stored = await self._store.idle_warning(decision.rule, decision.subject)
        if stored is None:
            # Settled or cancelled before the report went out, so there is nothing to keep.
            return ()
        name = str(decision.evidence.get("vm_name") or decision.subject)
        prefix = f"{name}: " if name_warnings else ""
        return messages.idle_warning_buttons(stored.button_id, prefix=prefix)

    async def _resolve_missing_reports(self, rule: str, reported: set[str], now: datetime) -> None:
        stored_rule = report_rule(rule)
        open_reports = await self._store.list_alerts(
            state=AlertState.FIRING, rule=stored_rule, limit=_MAX_OPEN_REPORTS
        )
        for alert in open_reports:
            if alert.subject not in reported:
                await self._store.resolve_alert(stored_rule, alert.subject, now=now)
                logger.info("report %s/%s no longer reported, resolved", rule, alert.subject)

    async def notify(self, message: Message) -> None:
        """Send a message that no stored alert backs, such as one about the store itself."""
        await self._send(message)

    async def _send(self, message: Message) -> None:
        # NOTE: the send was claimed in the store before this call, so a message that
        # fails here is not retried at the next run: a firing alert is sent again after
        # its repeat interval, but a report or a resolution is lost. Retrying needs a
        # store method that releases a claim.
        try:
            await self._notifier.send(message)
        except NotifyError as exc:
            logger.error("sending %r failed: %s", message.title, exc)


def _offers_keep_buttons(decision: Decision) -> bool:
    return isinstance(decision, Report) and bool(
        decision.evidence.get(messages.IDLE_WARNING_BUTTONS)
    )


def _was_announced(alert: AlertRecord, now: datetime) -> bool:
    """Return whether to send the alert's resolution; its firing message must have gone out.

    A silence for a time that has not ended blocks the resolution too. A silence until
    resolved does not, because the resolution is what it waits for.
    """
    held_back = is_silenced(alert, now) and not silenced_until_resolved(alert)
    return alert.last_sent_at is not None and not held_back


def _id(alert: AlertRecord) -> int:
    if alert.id is None:
        raise RuntimeError(f"alert {alert.rule}/{alert.subject} has no id after it was stored")
    return alert.id
