"""Build the notification for each alert change, and group one rule run's notifications.

A message about a firing alert names the alert ("Alert #12: rule/subject") and carries
the silence buttons, when the caller passes the alert's id. The report of an idle
warning carries the buttons "Keep 1 h", "Keep 4 h" and "Stop now" (`idle_warning_buttons`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from tdbot.alerts.silence import alert_buttons, numbered_buttons
from tdbot.notify.base import Button, Message, SeverityName

_SEVERITY_RANK: dict[SeverityName, int] = {"info": 0, "warning": 1, "critical": 2}


def severity_rank(severity: str) -> int:
    """Order severities: info < warning < critical; an unknown name ranks as warning."""
    return _SEVERITY_RANK.get(_severity_name(severity), 1)


def format_duration(duration: timedelta) -> str:
    """Format a duration for people: "45s", "14m", "2h 14m" or "3d 4h"."""
    seconds = max(int(duration.total_seconds()), 0)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m"
    return f"{seconds}s"


def _since(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M UTC")


def fired(
    rule: str,
    subject: str,
    summary: str,
    severity: str,
    now: datetime,
    *,
    alert_id: int | None = None,
) -> Message:
    """Return the message of an alert that has just opened."""
    lines, buttons = _alert_reference(rule, subject, alert_id)
    return Message(
        title=f"Alert from {rule}",
        lines=(summary, f"Since {_since(now)}.", *lines),
        severity=_severity_name(severity),
        key=(rule, subject),
        buttons=buttons,
    )


def still_firing(
    rule: str,
    subject: str,
    summary: str,
    severity: str,
    first_fired_at: datetime,
    now: datetime,
    *,
    alert_id: int | None = None,
) -> Message:
    """Return the reminder of an alert that is still open after the repeat interval."""
    title = f"Still firing: alert from {rule}"
    return _open_alert(title, rule, subject, summary, severity, first_fired_at, now, alert_id)


def escalated(
    rule: str,
    subject: str,
    summary: str,
    severity: str,
    first_fired_at: datetime,
    now: datetime,
    *,
    alert_id: int | None = None,
) -> Message:
    """Return the message of an open alert whose severity went up."""
    title = f"Now {severity}: alert from {rule}"
    return _open_alert(title, rule, subject, summary, severity, first_fired_at, now, alert_id)


def _open_alert(
    title: str,
    rule: str,
    subject: str,
    summary: str,
    severity: str,
    first_fired_at: datetime,
    now: datetime,
    alert_id: int | None,
) -> Message:
    lasted = format_duration(now - first_fired_at)
    lines, buttons = _alert_reference(rule, subject, alert_id)
    return Message(
        title=title,
        lines=(summary, f"Firing for {lasted}, since {_since(first_fired_at)}.", *lines),
        severity=_severity_name(severity),
        key=(rule, subject),
        buttons=buttons,
    )


def _alert_reference(
    rule: str, subject: str, alert_id: int | None
) -> tuple[tuple[str, ...], tuple[tuple[Button, ...], ...]]:
    """Return the line naming a firing alert and its silence buttons; nothing without an id."""
    if alert_id is None:
        return (), ()
    return (f"Alert #{alert_id}: {rule}/{subject}",), alert_buttons(alert_id)


def resolved(
    rule: str, subject: str, summary: str, first_fired_at: datetime, now: datetime
) -> Message:
    """Return the message of a closed alert, saying how long it lasted."""
    lasted = format_duration(now - first_fired_at)
    return Message(
        title=f"Resolved: alert from {rule}",
        lines=(summary, f"Resolved after {lasted}."),
        severity="info",
        key=(rule, subject),
    )


def reported(
    rule: str, subject: str, summary: str, *, buttons: tuple[tuple[Button, ...], ...] = ()
) -> Message:
    """Return the message of a report: something the rule could not decide, or a warning."""
    return Message(
        title=f"Report from {rule}",
        lines=(summary,),
        severity="info",
        key=(rule, subject),
        buttons=buttons,
    )


# --- idle warning buttons --------------------------------------------------------------

# Evidence key of a Report that announces an idle warning and offers its buttons.
IDLE_WARNING_BUTTONS = "idle_warning_buttons"
KEEP_CALLBACK_PREFIX = "k"
STOP_NOW = "now"
# Button choices: callback code, button text and how much longer the VM is kept.
KEEP_CHOICES: tuple[tuple[str, str, timedelta | None], ...] = (
    ("1h", "Keep 1 h", timedelta(hours=1)),
    ("4h", "Keep 4 h", timedelta(hours=4)),
    (STOP_NOW, "Stop now", None),
)
_KEEP_DURATIONS = {code: duration for code, _, duration in KEEP_CHOICES}
# The warning id is "<row id>.<check>", as `StoredIdleWarning.button_id` makes it.
_KEEP_PATTERN = re.compile(r"k:([0-9]{1,18})\.([0-9a-f]{1,16}):(1h|4h|now)")


@dataclass(frozen=True)
class KeepChoice:
    """A pressed idle warning button: the warning's row and check, and what to do."""

    row_id: int
    check: str
    code: str

    @property
    def keep_for(self) -> timedelta | None:
        """How much longer to keep the VM; None for "Stop now"."""
        return _KEEP_DURATIONS[self.code]


def idle_warning_buttons(warning_id: str, *, prefix: str = "") -> tuple[tuple[Button, ...], ...]:
    """Return the row of buttons under an idle warning; `prefix` starts each text."""
    return (
        tuple(
            Button(f"{prefix}{text}", f"{KEEP_CALLBACK_PREFIX}:{warning_id}:{code}")
            for code, text, _ in KEEP_CHOICES
        ),
    )


def is_keep_callback(data: str) -> bool:
    return data.startswith(f"{KEEP_CALLBACK_PREFIX}:")


def parse_keep_callback(data: str) -> KeepChoice | None:
    """Parse `k:<row id>.<check>:<choice>`; None when the data is malformed."""
    match = _KEEP_PATTERN.fullmatch(data)
    if match is None:
        return None
    return KeepChoice(int(match.group(1)), match.group(2), match.group(3))


# --- grouping ----------------------------------------------------------------------------


def group(rule: str, messages: Sequence[Message]) -> Message:
    """Merge the messages of one rule run into one, with the highest severity among them.

    The merged message lists each title followed by its lines, indented.
    """
    if len(messages) == 1:
        return messages[0]
    return _combine(f"{len(messages)} updates from {rule}", (), messages)


def group_under_critical_balance(
    messages: Sequence[Message], balance_key: tuple[str, str], balance_summary: str
) -> Message:
    """Merge the messages of several rule runs while the low-balance alert is critical.

    The low-balance message comes first when it is among them; otherwise the merged
    message starts with the open alert's last summary, `balance_summary`.
    """
    ordered = sorted(messages, key=lambda message: message.key != balance_key)
    lead: tuple[str, ...] = ()
    if ordered[0].key != balance_key:
        lead = (f"The balance is critically low: {balance_summary}",)
    title = f"Balance critical: {len(messages)} updates"
    return _combine(title, lead, ordered, severity="critical")


def _combine(
    title: str,
    lead: tuple[str, ...],
    messages: Sequence[Message],
    *,
    severity: SeverityName | None = None,
) -> Message:
    lines = list(lead)
    for message in messages:
        lines.append(f"• {message.title}")
        lines.extend(f"  {line}" for line in message.lines)
    highest = max((m.severity for m in messages), key=severity_rank)
    rows = tuple(row for m in messages for row in m.buttons)
    keys = {m.key for m in messages}
    return Message(
        title=title,
        lines=tuple(lines),
        severity=severity or highest,
        key=keys.pop() if len(keys) == 1 else None,
        # One row of silence buttons per alert, so each row names its alert.
        buttons=numbered_buttons(rows) if len(rows) > 1 else rows,
    )


def _severity_name(severity: str) -> SeverityName:
    if severity == "info":
        return "info"
    if severity == "critical":
        return "critical"
    return "warning"


def database_unavailable(error: Exception) -> Message:
    """Return the message that the store failed, sent without storing it."""
    return Message(
        title="Database unavailable",
        lines=(
            f"{type(error).__name__}: {error}",
            "Rules take no action while tdbot cannot record what it does. They run again "
            "at their next times; check the database in daemon.database.",
        ),
        severity="critical",
    )


def database_available() -> Message:
    """Return the message that the store works again after an outage."""
    return Message(
        title="Database available again",
        lines=("Rules record and act again from their next runs.",),
        severity="info",
    )
