"""Turn the alert decisions of a rule run into stored alert changes and notifications.

All state lives in the store, so a restarted daemon (a new AlertManager over the same
database) neither re-sends an open alert before its repeat interval nor forgets one.

- FireAlert opens the alert (rule, subject) and sends it once; while it stays open it
  is sent again only after `repeat_interval`, or at once when its severity goes up.
  A silenced alert is not sent.
- ResolveAlert closes the open alert and sends how long it lasted; it is ignored when
  no alert with that key is open. No resolution is sent for an alert whose firing
  message was never sent (for example because it was silenced all along).
- Report is stored as an info alert of the rule "<rule>:report" with the subject
  "<subject>:<evidence reason>" (or just the subject without a reason). It is sent once,
  when first reported, and resolved without a message at the first run of the rule that
  no longer reports it. The separate rule name keeps reports out of the rule's
  `RuleState.open_alerts`, which evaluation reads as its own firing alerts.

The messages of one run are sent as one grouped message when there is more than one.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime, timedelta

from tdbot.alerts import messages
from tdbot.evaluation.model import Decision, FireAlert, Report, ResolveAlert
from tdbot.notify.base import Message, Notifier, NotifyError
from tdbot.store.db import Store
from tdbot.store.tables import AlertRecord, AlertState

logger = logging.getLogger("tdbot.alerts")

REPORT_RULE_SUFFIX = ":report"

# Open reports of one rule read back per run; far more than a rule reports at once.
_MAX_OPEN_REPORTS = 1000


def report_rule(rule: str) -> str:
    """Return the rule name under which the reports of `rule` are stored."""
    return rule + REPORT_RULE_SUFFIX


def report_subject(report: Report) -> str:
    """Return the stored subject of a report: its subject and its evidence reason."""
    reason = report.evidence.get("reason")
    return f"{report.subject}:{reason}" if reason else report.subject


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
    ) -> Message | None:
        """Store the alert changes of one finished run of `rule`; send and return the message.

        Call it once per run that finished evaluating, even with no decisions, because
        reports missing from a run are resolved. Other decision kinds are ignored.
        `repeat_interval` replaces the manager's default for this rule, for rules that set
        their own. Returns None when nothing was due to be sent. Raises ValueError, before storing
        anything, when a decision belongs to another rule.
        """
        foreign = sorted({d.rule for d in decisions if d.rule != rule})
        if foreign:
            raise ValueError(f"decisions of rules {foreign} passed in the run of rule {rule!r}")

        outgoing: list[Message] = []
        reported: set[str] = set()
        for decision in decisions:
            if isinstance(decision, FireAlert):
                outgoing.extend(
                    await self._fire(decision, now, repeat_interval or self._repeat_interval)
                )
            elif isinstance(decision, ResolveAlert):
                outgoing.extend(await self._resolve(decision, now))
            elif isinstance(decision, Report):
                reported.add(report_subject(decision))
                outgoing.extend(await self._report(decision, now))
        await self._resolve_missing_reports(rule, reported, now)

        if not outgoing:
            return None
        message = messages.group(rule, outgoing)
        await self._send(message)
        return message

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

        if before is None or alert.last_sent_at is None:
            logger.info("alert %s/%s opened (%s)", rule, subject, alert.severity)
            return [messages.fired(rule, subject, decision.summary, alert.severity, now)]
        if escalated:
            logger.info("alert %s/%s escalated to %s", rule, subject, alert.severity)
            return [
                messages.escalated(
                    rule, subject, decision.summary, alert.severity, alert.first_fired_at, now
                )
            ]
        logger.info("alert %s/%s still firing, sending a reminder", rule, subject)
        return [
            messages.still_firing(
                rule, subject, decision.summary, alert.severity, alert.first_fired_at, now
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

    async def _report(self, decision: Report, now: datetime) -> list[Message]:
        rule, subject = report_rule(decision.rule), report_subject(decision)
        alert = await self._store.upsert_alert(
            rule, subject, severity="info", message=decision.summary, now=now
        )
        # repeat_every=None: a report is sent once per episode, never repeated.
        if not await self._store.claim_alert_send(_id(alert), repeat_every=None, now=now):
            return []
        logger.info("report %s/%s sent", decision.rule, subject)
        return [messages.reported(decision.rule, decision.subject, decision.summary)]

    async def _resolve_missing_reports(self, rule: str, reported: set[str], now: datetime) -> None:
        stored_rule = report_rule(rule)
        open_reports = await self._store.list_alerts(
            state=AlertState.FIRING, rule=stored_rule, limit=_MAX_OPEN_REPORTS
        )
        for alert in open_reports:
            if alert.subject not in reported:
                await self._store.resolve_alert(stored_rule, alert.subject, now=now)
                logger.info("report %s/%s no longer reported, resolved", rule, alert.subject)

    async def _send(self, message: Message) -> None:
        # NOTE: the send was claimed in the store before this call, so a message that
        # fails here is not retried at the next run: a firing alert is sent again after
        # its repeat interval, but a report or a resolution is lost. Retrying needs a
        # store method that releases a claim.
        try:
            await self._notifier.send(message)
        except NotifyError as exc:
            logger.error("sending %r failed: %s", message.title, exc)


def _was_announced(alert: AlertRecord, now: datetime) -> bool:
    """Whether the user was told the alert fired and is not silencing it now."""
    silenced = alert.silenced_until is not None and alert.silenced_until > now
    return alert.last_sent_at is not None and not silenced


def _id(alert: AlertRecord) -> int:
    if alert.id is None:
        raise RuntimeError(f"alert {alert.rule}/{alert.subject} has no id after it was stored")
    return alert.id
