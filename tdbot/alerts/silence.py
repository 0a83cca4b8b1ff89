"""Silence firing alerts from chat buttons and commands.

A silence is stored on the alert row as `silenced_until`, so it survives restarts.
While it lasts, the alert's first message, reminders and escalations are not sent.
A silence with an expiry ends at that time, and the next reminder that is due goes
out. A silence "until resolved" is stored as the far-future time `UNTIL_RESOLVED`: it
holds back every reminder, but the resolution is still announced.

Buttons under an alert message carry the callback data `s:<alert id>:<choice>`, where
the choice is `1h`, `1d` or `res` (until resolved). Commands name an alert by its id
(`12` or `#12`) or by `rule/subject`.
"""

from __future__ import annotations

import logging
import re
from datetime import UTC, datetime, timedelta

from tdbot.notify.base import Button
from tdbot.rules.schema import format_duration, parse_duration
from tdbot.store.db import Store
from tdbot.store.tables import AlertRecord, AlertState

logger = logging.getLogger("tdbot.alerts.silence")

# Stored as `silenced_until` for a silence that lasts until the alert resolves.
UNTIL_RESOLVED = datetime(9999, 12, 31, tzinfo=UTC)

CALLBACK_PREFIX = "s"

# Button choices: callback code, button text and silence length (None: until resolved).
BUTTON_CHOICES: tuple[tuple[str, str, timedelta | None], ...] = (
    ("1h", "Silence 1 h", timedelta(hours=1)),
    ("1d", "Silence 1 day", timedelta(days=1)),
    ("res", "Until resolved", None),
)
_DURATIONS = {code: duration for code, _, duration in BUTTON_CHOICES}
_TEXTS = {code: text for code, text, _ in BUTTON_CHOICES}

# Words a /silence command accepts in place of a duration for "until resolved".
UNTIL_RESOLVED_WORDS = ("resolved", "until-resolved", "res")

SILENCE_USAGE = (
    "Usage: /silence ALERT DURATION, where ALERT is an alert id such as 12 or "
    "rule/subject such as spot-guard/vm-1, and DURATION is such as 30m, 4h or 1d, "
    "or 'resolved' to silence it until it resolves."
)
UNSILENCE_USAGE = (
    "Usage: /unsilence ALERT, where ALERT is an alert id such as 12 or "
    "rule/subject such as spot-guard/vm-1."
)

_ALERT_ID = re.compile(r"#?([0-9]{1,18})")


def alert_buttons(alert_id: int, *, prefix: str = "") -> tuple[tuple[Button, ...], ...]:
    """Return one row of silence buttons for a firing alert; `prefix` starts each text."""
    return (
        tuple(
            Button(f"{prefix}{text}", f"{CALLBACK_PREFIX}:{alert_id}:{code}")
            for code, text, _ in BUTTON_CHOICES
        ),
    )


def numbered_buttons(
    rows: tuple[tuple[Button, ...], ...],
) -> tuple[tuple[Button, ...], ...]:
    """Prefix each silence button with its alert id ("#12 Silence 1 h").

    A message that groups several alerts carries one row per alert, and the prefix
    distinguishes the rows. Numbering twice gives the same text. Other buttons are kept.
    """
    numbered: list[tuple[Button, ...]] = []
    for row in rows:
        parsed = [_split_button_data(button.callback_data) for button in row]
        if all(parsed):
            row = tuple(
                Button(f"#{part[0]} {_TEXTS[part[1]]}", button.callback_data)
                for button, part in zip(row, parsed, strict=True)
                if part is not None
            )
        numbered.append(row)
    return tuple(numbered)


def parse_button_data(data: str) -> tuple[int, timedelta | None] | None:
    """Parse `s:<alert id>:<choice>` into (alert id, silence length); None when malformed.

    The silence length is None for the choice "until resolved".
    """
    parts = _split_button_data(data)
    if parts is None:
        return None
    alert_id, code = parts
    return alert_id, _DURATIONS[code]


def _split_button_data(data: str) -> tuple[int, str] | None:
    parts = data.split(":")
    if len(parts) != 3 or parts[0] != CALLBACK_PREFIX:
        return None
    _, raw_id, code = parts
    if not (raw_id.isascii() and raw_id.isdigit()) or len(raw_id) > 18 or code not in _DURATIONS:
        return None
    return int(raw_id), code


def parse_silence_duration(text: str) -> timedelta | None:
    """Parse the DURATION of /silence: "30m", "4h", "1d", or "resolved" for None.

    Raises ValueError with the usage text when `text` is neither.
    """
    if text.strip().lower() in UNTIL_RESOLVED_WORDS:
        return None
    try:
        return parse_duration(text)
    except ValueError as error:
        raise ValueError(f"{error}. {SILENCE_USAGE}") from None


def is_silenced(alert: AlertRecord, now: datetime) -> bool:
    """Return whether the alert's silence lasts beyond `now`."""
    return alert.silenced_until is not None and alert.silenced_until > now


def silenced_until_resolved(alert: AlertRecord) -> bool:
    """Return whether the alert is silenced until it resolves."""
    return alert.silenced_until is not None and alert.silenced_until >= UNTIL_RESOLVED


def describe_silence(alert: AlertRecord, now: datetime) -> str | None:
    """Say how long the alert stays silenced, or None when it is not silenced now."""
    if not is_silenced(alert, now):
        return None
    if silenced_until_resolved(alert):
        return "silenced until it resolves"
    assert alert.silenced_until is not None
    return f"silenced until {_format_time(alert.silenced_until)}"


async def handle_alert_button(store: Store, data: str, user_id: int, now: datetime) -> str:
    """Apply the silence a button under an alert requests; return the reply for the user.

    Malformed data, an unknown alert and a resolved alert change nothing, and the
    reply explains why. Every silence applied is logged with the user's id.
    """
    parsed = parse_button_data(data)
    if parsed is None:
        logger.warning("malformed silence button data %r from user %d", data[:64], user_id)
        return "This button is not valid, so nothing was silenced."
    alert_id, duration = parsed

    alert = await store.get_alert(alert_id)
    if alert is None:
        return f"Alert #{alert_id} was not found, so nothing was silenced."
    if alert.state != AlertState.FIRING.value:
        return f"Alert #{alert_id} ({_ref(alert)}) is already resolved, so nothing was silenced."
    return await _apply_silence(store, alert, duration, now, by=f"user {user_id}")


async def silence_alert_by_ref(
    store: Store, ref: str, duration: timedelta | None, now: datetime
) -> str:
    """Silence the alert named by `ref` for `duration` (None: until it resolves).

    `ref` is an alert id ("12" or "#12") or "rule/subject". Returns the reply text,
    which also reports an unknown or already resolved alert. Raises ValueError
    with the usage text for a malformed `ref` or a duration that is not positive.
    """
    if duration is not None and duration <= timedelta(0):
        raise ValueError(f"The duration must be longer than zero. {SILENCE_USAGE}")
    alert = await _find_alert(store, ref, SILENCE_USAGE)
    if isinstance(alert, str):
        return alert + " Nothing was silenced."
    return await _apply_silence(store, alert, duration, now, by="command")


async def unsilence_alert_by_ref(store: Store, ref: str, now: datetime) -> str:
    """Lift the silence of the alert named by `ref`; return the reply text.

    `ref` is an alert id ("12" or "#12") or "rule/subject". Raises ValueError with
    the usage text for a malformed `ref`.
    """
    alert = await _find_alert(store, ref, UNSILENCE_USAGE)
    if isinstance(alert, str):
        return alert
    if not is_silenced(alert, now):
        return f"Alert #{alert.id} ({_ref(alert)}) is not silenced."

    updated = await store.set_alert_silence(_id(alert), None)
    if updated is None:
        return f"Alert #{alert.id} ({_ref(alert)}) is already resolved."
    logger.info("alert %d (%s) unsilenced by command", _id(alert), _ref(alert))
    return (
        f"Alert #{alert.id} ({_ref(alert)}) is no longer silenced; "
        "its next reminder is sent when due."
    )


async def _find_alert(store: Store, ref: str, usage: str) -> AlertRecord | str:
    """Return the alert `ref` names, or the reply when it is unknown or resolved."""
    text = ref.strip()
    id_match = _ALERT_ID.fullmatch(text)
    if id_match is not None:
        alert_id = int(id_match.group(1))
        alert = await store.get_alert(alert_id)
        if alert is None:
            return f"Alert #{alert_id} was not found."
        if alert.state != AlertState.FIRING.value:
            return f"Alert #{alert_id} ({_ref(alert)}) is already resolved."
        return alert

    rule, _, subject = text.partition("/")
    if not rule or not subject:
        raise ValueError(f"{ref!r} is not an alert id or rule/subject. {usage}")
    alert = await store.get_open_alert(rule, subject)
    if alert is None:
        return f"No alert {rule}/{subject} is firing."
    return alert


async def _apply_silence(
    store: Store, alert: AlertRecord, duration: timedelta | None, now: datetime, *, by: str
) -> str:
    until = UNTIL_RESOLVED if duration is None else now + duration
    updated = await store.set_alert_silence(_id(alert), until)
    if updated is None:
        return f"Alert #{alert.id} ({_ref(alert)}) is already resolved, so nothing was silenced."

    logger.info(
        "alert %d (%s) silenced until %s by %s",
        _id(alert),
        _ref(alert),
        "resolved" if duration is None else until.isoformat(),
        by,
    )
    if duration is None:
        return (
            f"Alert #{alert.id} ({_ref(alert)}) is silenced until it resolves. "
            "Its resolution is still announced."
        )
    return (
        f"Alert #{alert.id} ({_ref(alert)}) is silenced for {format_duration(duration)}, "
        f"until {_format_time(until)}."
    )


def _ref(alert: AlertRecord) -> str:
    return f"{alert.rule}/{alert.subject}"


def _id(alert: AlertRecord) -> int:
    if alert.id is None:
        raise RuntimeError(f"alert {_ref(alert)} has no id after it was stored")
    return alert.id


def _format_time(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")
