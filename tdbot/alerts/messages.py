"""Build the notification for each alert change, and group one rule run's notifications."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

from tdbot.notify.base import Message, SeverityName

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


def fired(rule: str, subject: str, summary: str, severity: str, now: datetime) -> Message:
    """Return the message of an alert that has just opened."""
    return Message(
        title=f"Alert from {rule}",
        lines=(summary, f"Since {_since(now)}."),
        severity=_severity_name(severity),
        key=(rule, subject),
    )


def still_firing(
    rule: str, subject: str, summary: str, severity: str, first_fired_at: datetime, now: datetime
) -> Message:
    """Return the reminder of an alert that is still open after the repeat interval."""
    title = f"Still firing: alert from {rule}"
    return _open_alert(title, rule, subject, summary, severity, first_fired_at, now)


def escalated(
    rule: str, subject: str, summary: str, severity: str, first_fired_at: datetime, now: datetime
) -> Message:
    """Return the message of an open alert whose severity went up."""
    title = f"Now {severity}: alert from {rule}"
    return _open_alert(title, rule, subject, summary, severity, first_fired_at, now)


def _open_alert(
    title: str,
    rule: str,
    subject: str,
    summary: str,
    severity: str,
    first_fired_at: datetime,
    now: datetime,
) -> Message:
    lasted = format_duration(now - first_fired_at)
    return Message(
        title=title,
        lines=(summary, f"Firing for {lasted}, since {_since(first_fired_at)}."),
        severity=_severity_name(severity),
        key=(rule, subject),
    )


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


def reported(rule: str, subject: str, summary: str) -> Message:
    """Return the message of a report: something the rule could not decide."""
    return Message(
        title=f"Report from {rule}", lines=(summary,), severity="info", key=(rule, subject)
    )


def group(rule: str, messages: Sequence[Message]) -> Message:
    """Merge the messages of one rule run into one, with the highest severity among them.

    The merged message lists each title followed by its lines, indented.
    """
    if len(messages) == 1:
        return messages[0]

    lines: list[str] = []
    for message in messages:
        lines.append(f"• {message.title}")
        lines.extend(f"  {line}" for line in message.lines)
    severity = max((m.severity for m in messages), key=severity_rank)
    keys = {m.key for m in messages}
    return Message(
        title=f"{len(messages)} updates from {rule}",
        lines=tuple(lines),
        severity=severity,
        key=keys.pop() if len(keys) == 1 else None,
        buttons=tuple(row for m in messages for row in m.buttons),
    )


def _severity_name(severity: str) -> SeverityName:
    if severity == "info":
        return "info"
    if severity == "critical":
        return "critical"
    return "warning"
