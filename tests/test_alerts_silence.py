"""Alert silences: buttons, /silence and /unsilence, over a real SQLite store.

Alerts are sent through the fake Bot API server, so the buttons are checked as
Telegram receives them.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from pathlib import Path

import pytest

from tdbot.alerts.manager import AlertManager
from tdbot.alerts.silence import (
    UNTIL_RESOLVED,
    alert_buttons,
    describe_silence,
    handle_alert_button,
    numbered_buttons,
    parse_button_data,
    parse_silence_duration,
    silence_alert_by_ref,
    unsilence_alert_by_ref,
)
from tdbot.evaluation.model import Report, Severity
from tdbot.notify.base import MAX_CALLBACK_DATA_BYTES
from tdbot.notify.telegram import TelegramNotifier
from tdbot.store.db import Store
from tdbot.store.tables import AlertRecord
from tests.alerting import REPEAT, RULE, T0, outbid, running_again
from tests.fakes.telegram_api import FakeTelegramApi

USER = 777


async def open_alert(manager: AlertManager, store: Store, subject: str = "vm-1") -> AlertRecord:
    await manager.handle_run(RULE, [outbid(subject)], T0)
    alert = await store.get_open_alert(RULE, subject)
    assert alert is not None
    assert alert.id is not None
    return alert


def button_rows(api: FakeTelegramApi, index: int) -> list[list[dict[str, str]]]:
    markup = api.messages[index].reply_markup
    assert markup is not None
    rows: list[list[dict[str, str]]] = markup["inline_keyboard"]
    return rows


# --- buttons -------------------------------------------------------------------------


def test_alert_buttons_one_row() -> None:
    (row,) = alert_buttons(12)

    assert [button.text for button in row] == ["Silence 1 h", "Silence 1 day", "Until resolved"]
    assert [button.callback_data for button in row] == ["s:12:1h", "s:12:1d", "s:12:res"]


def test_alert_buttons_fit_limit() -> None:
    (row,) = alert_buttons(10**18 - 1)

    for button in row:
        assert len(button.callback_data.encode()) <= MAX_CALLBACK_DATA_BYTES


def test_numbered_buttons_idempotent() -> None:
    rows = (*alert_buttons(3), *alert_buttons(4))

    once = numbered_buttons(rows)
    twice = numbered_buttons(once)

    assert [button.text for button in once[0]] == [
        "#3 Silence 1 h",
        "#3 Silence 1 day",
        "#3 Until resolved",
    ]
    assert once[1][0].text == "#4 Silence 1 h"
    assert twice == once


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ("s:12:1h", (12, timedelta(hours=1))),
        ("s:12:1d", (12, timedelta(days=1))),
        ("s:12:res", (12, None)),
        ("s:12", None),
        ("s:12:2h", None),
        ("x:12:1h", None),
        ("s:-1:1h", None),
        ("s:abc:1h", None),
        ("s::1h", None),
        ("s:١٢:1h", None),
        ("s:12:1h:extra", None),
        ("s:1234567890123456789:1h", None),
    ],
)
def test_parse_button_data_cases(data: str, expected: tuple[int, timedelta | None] | None) -> None:
    assert parse_button_data(data) == expected


async def test_fired_alert_carries_buttons(
    manager: AlertManager, store: Store, api: FakeTelegramApi
) -> None:
    message = await manager.handle_run(RULE, [outbid()], T0)
    alert = await store.get_open_alert(RULE, "vm-1")

    assert alert is not None
    assert message is not None
    assert message.buttons == alert_buttons(alert.id or 0)
    assert f"Alert #{alert.id}: {RULE}/vm-1" in message.lines
    rows = button_rows(api, 0)
    assert [button["callback_data"] for button in rows[0]] == [
        f"s:{alert.id}:1h",
        f"s:{alert.id}:1d",
        f"s:{alert.id}:res",
    ]


async def test_reminder_and_escalation_carry_buttons(manager: AlertManager, store: Store) -> None:
    alert = await open_alert(manager, store)

    escalation = await manager.handle_run(
        RULE, [outbid(severity=Severity.CRITICAL)], T0 + timedelta(minutes=5)
    )
    reminder = await manager.handle_run(
        RULE, [outbid(severity=Severity.CRITICAL)], T0 + timedelta(minutes=5) + REPEAT
    )

    assert escalation is not None
    assert escalation.buttons == alert_buttons(alert.id or 0)
    assert reminder is not None
    assert reminder.buttons == alert_buttons(alert.id or 0)


async def test_resolution_and_report_without_buttons(manager: AlertManager, store: Store) -> None:
    await open_alert(manager, store)
    report = Report(rule=RULE, subject="vm-2", summary="Bid unknown.", evidence={"reason": "x"})

    resolved = await manager.handle_run(RULE, [running_again()], T0 + timedelta(minutes=5))
    reported = await manager.handle_run(RULE, [report], T0 + timedelta(minutes=6))

    assert resolved is not None
    assert resolved.buttons == ()
    assert reported is not None
    assert reported.buttons == ()


async def test_grouped_alerts_number_buttons(manager: AlertManager, store: Store) -> None:
    message = await manager.handle_run(RULE, [outbid("vm-1"), outbid("vm-2")], T0)
    first = await store.get_open_alert(RULE, "vm-1")
    second = await store.get_open_alert(RULE, "vm-2")

    assert message is not None
    assert first is not None
    assert second is not None
    assert len(message.buttons) == 2
    assert message.buttons[0][0].text == f"#{first.id} Silence 1 h"
    assert message.buttons[1][2].callback_data == f"s:{second.id}:res"


# --- silence lifecycle -----------------------------------------------------------------


async def test_silence_hour_holds_reminder(
    manager: AlertManager, store: Store, api: FakeTelegramApi
) -> None:
    alert = await open_alert(manager, store)
    silenced_at = T0 + timedelta(minutes=30)
    await handle_alert_button(store, f"s:{alert.id}:1h", USER, silenced_at)

    # The reminder is due at T0 + 1 h, but the silence lasts until T0 + 1 h 30 m.
    held = await manager.handle_run(RULE, [outbid()], T0 + REPEAT)
    still_held = await manager.handle_run(RULE, [outbid()], T0 + timedelta(minutes=89))
    after = await manager.handle_run(RULE, [outbid()], T0 + timedelta(minutes=90))

    assert held is None
    assert still_held is None
    assert after is not None
    assert after.title == f"Still firing: alert from {RULE}"
    assert len(api.messages) == 2


async def test_silence_holds_escalation(manager: AlertManager, store: Store) -> None:
    alert = await open_alert(manager, store)
    await handle_alert_button(store, f"s:{alert.id}:1d", USER, T0)

    escalation = await manager.handle_run(
        RULE, [outbid(severity=Severity.CRITICAL)], T0 + timedelta(minutes=5)
    )

    assert escalation is None


async def test_until_resolved_holds_repeats(
    manager: AlertManager, store: Store, api: FakeTelegramApi
) -> None:
    alert = await open_alert(manager, store)
    await handle_alert_button(store, f"s:{alert.id}:res", USER, T0 + timedelta(minutes=1))

    repeats = [
        await manager.handle_run(RULE, [outbid()], T0 + hours * REPEAT) for hours in range(1, 30)
    ]
    resolved = await manager.handle_run(RULE, [running_again()], T0 + timedelta(days=2))

    assert repeats == [None] * 29
    assert resolved is not None
    assert resolved.title == f"Resolved: alert from {RULE}"
    assert "Resolved after 2d 0h." in resolved.lines
    assert len(api.messages) == 2


async def test_timed_silence_holds_resolution(manager: AlertManager, store: Store) -> None:
    alert = await open_alert(manager, store)
    await handle_alert_button(store, f"s:{alert.id}:1h", USER, T0)

    resolved = await manager.handle_run(RULE, [running_again()], T0 + timedelta(minutes=30))

    assert resolved is None


async def test_expired_silence_announces_resolution(manager: AlertManager, store: Store) -> None:
    alert = await open_alert(manager, store)
    await handle_alert_button(store, f"s:{alert.id}:1h", USER, T0)

    resolved = await manager.handle_run(RULE, [running_again()], T0 + timedelta(minutes=61))

    assert resolved is not None
    assert resolved.title == f"Resolved: alert from {RULE}"


async def test_restart_keeps_silence(
    db_path: Path, notifier: TelegramNotifier, api: FakeTelegramApi
) -> None:
    store = await Store.open(db_path)
    manager = AlertManager(store, notifier, repeat_interval=REPEAT)
    alert = await open_alert(manager, store)
    await silence_alert_by_ref(store, str(alert.id), timedelta(hours=3), T0)
    await store.close()

    reopened = await Store.open(db_path)
    restarted = AlertManager(reopened, notifier, repeat_interval=REPEAT)
    during = await restarted.handle_run(RULE, [outbid()], T0 + timedelta(hours=2))
    after = await restarted.handle_run(RULE, [outbid()], T0 + timedelta(hours=3))
    await reopened.close()

    assert during is None
    assert after is not None
    assert after.title == f"Still firing: alert from {RULE}"
    assert len(api.messages) == 2


async def test_refired_alert_not_silenced(manager: AlertManager, store: Store) -> None:
    alert = await open_alert(manager, store)
    await handle_alert_button(store, f"s:{alert.id}:res", USER, T0)
    await manager.handle_run(RULE, [running_again()], T0 + timedelta(minutes=5))

    again = await manager.handle_run(RULE, [outbid()], T0 + timedelta(minutes=6))

    assert again is not None
    assert again.title == f"Alert from {RULE}"


# --- button callbacks ------------------------------------------------------------------


async def test_button_hour_silences_and_logs(
    manager: AlertManager, store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    alert = await open_alert(manager, store)
    caplog.set_level(logging.INFO, logger="tdbot.alerts.silence")

    reply = await handle_alert_button(store, f"s:{alert.id}:1h", USER, T0)

    stored = await store.get_alert(alert.id or 0)
    assert stored is not None
    assert stored.silenced_until == T0 + timedelta(hours=1)
    assert reply == (
        f"Alert #{alert.id} ({RULE}/vm-1) is silenced for 1h, until 2025-01-06 13:00 UTC."
    )
    assert f"by user {USER}" in caplog.text


async def test_button_until_resolved_stored(manager: AlertManager, store: Store) -> None:
    alert = await open_alert(manager, store)

    reply = await handle_alert_button(store, f"s:{alert.id}:res", USER, T0)

    stored = await store.get_alert(alert.id or 0)
    assert stored is not None
    assert stored.silenced_until == UNTIL_RESOLVED
    assert "silenced until it resolves" in reply
    assert "resolution is still announced" in reply
    assert describe_silence(stored, T0) == "silenced until it resolves"


async def test_button_malformed_changes_nothing(manager: AlertManager, store: Store) -> None:
    alert = await open_alert(manager, store)

    reply = await handle_alert_button(store, f"s:{alert.id}:forever", USER, T0)

    stored = await store.get_alert(alert.id or 0)
    assert stored is not None
    assert stored.silenced_until is None
    assert reply == "This button is not valid, so nothing was silenced."


async def test_button_unknown_alert(store: Store) -> None:
    reply = await handle_alert_button(store, "s:999:1h", USER, T0)

    assert reply == "Alert #999 was not found, so nothing was silenced."


async def test_button_resolved_alert(manager: AlertManager, store: Store) -> None:
    alert = await open_alert(manager, store)
    await manager.handle_run(RULE, [running_again()], T0 + timedelta(minutes=5))

    reply = await handle_alert_button(store, f"s:{alert.id}:1d", USER, T0 + timedelta(minutes=6))

    stored = await store.get_alert(alert.id or 0)
    assert stored is not None
    assert stored.silenced_until is None
    assert reply == (
        f"Alert #{alert.id} ({RULE}/vm-1) is already resolved, so nothing was silenced."
    )


# --- /silence and /unsilence -----------------------------------------------------------


@pytest.mark.parametrize("form", ["{id}", "#{id}", " {id} "])
async def test_silence_ref_by_id(manager: AlertManager, store: Store, form: str) -> None:
    alert = await open_alert(manager, store)

    reply = await silence_alert_by_ref(store, form.format(id=alert.id), timedelta(minutes=30), T0)

    stored = await store.get_alert(alert.id or 0)
    assert stored is not None
    assert stored.silenced_until == T0 + timedelta(minutes=30)
    assert reply.startswith(f"Alert #{alert.id} ({RULE}/vm-1) is silenced for 30m")


async def test_silence_ref_by_rule_subject(manager: AlertManager, store: Store) -> None:
    alert = await open_alert(manager, store, subject="vm-1:rebid-failed")

    reply = await silence_alert_by_ref(store, f"{RULE}/vm-1:rebid-failed", None, T0)

    stored = await store.get_alert(alert.id or 0)
    assert stored is not None
    assert stored.silenced_until == UNTIL_RESOLVED
    assert "silenced until it resolves" in reply


async def test_silence_ref_unknown_alerts(manager: AlertManager, store: Store) -> None:
    await open_alert(manager, store)

    by_id = await silence_alert_by_ref(store, "999", timedelta(hours=1), T0)
    by_key = await silence_alert_by_ref(store, f"{RULE}/vm-9", timedelta(hours=1), T0)

    assert by_id == "Alert #999 was not found. Nothing was silenced."
    assert by_key == f"No alert {RULE}/vm-9 is firing. Nothing was silenced."


async def test_silence_ref_resolved_alert(manager: AlertManager, store: Store) -> None:
    alert = await open_alert(manager, store)
    await manager.handle_run(RULE, [running_again()], T0 + timedelta(minutes=5))

    reply = await silence_alert_by_ref(store, str(alert.id), timedelta(hours=1), T0)

    assert reply == f"Alert #{alert.id} ({RULE}/vm-1) is already resolved. Nothing was silenced."


@pytest.mark.parametrize("ref", ["", "vm-1", "/vm-1", f"{RULE}/", "12a"])
async def test_silence_ref_malformed_raises(store: Store, ref: str) -> None:
    with pytest.raises(ValueError, match="Usage: /silence ALERT DURATION"):
        await silence_alert_by_ref(store, ref, timedelta(hours=1), T0)


async def test_silence_nonpositive_duration_raises(manager: AlertManager, store: Store) -> None:
    alert = await open_alert(manager, store)

    with pytest.raises(ValueError, match="longer than zero"):
        await silence_alert_by_ref(store, str(alert.id), timedelta(0), T0)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("30m", timedelta(minutes=30)), ("1d", timedelta(days=1)), ("resolved", None)],
)
def test_parse_silence_duration_cases(text: str, expected: timedelta | None) -> None:
    assert parse_silence_duration(text) == expected


def test_parse_silence_duration_invalid() -> None:
    with pytest.raises(ValueError, match="Usage: /silence"):
        parse_silence_duration("soon")


async def test_unsilence_lets_reminder_through(
    manager: AlertManager, store: Store, api: FakeTelegramApi
) -> None:
    alert = await open_alert(manager, store)
    await silence_alert_by_ref(store, str(alert.id), None, T0)

    reply = await unsilence_alert_by_ref(store, f"{RULE}/vm-1", T0 + timedelta(minutes=10))
    reminder = await manager.handle_run(RULE, [outbid()], T0 + REPEAT)

    stored = await store.get_alert(alert.id or 0)
    assert stored is not None
    assert stored.silenced_until is None
    assert reply == (
        f"Alert #{alert.id} ({RULE}/vm-1) is no longer silenced; "
        "its next reminder is sent when due."
    )
    assert reminder is not None
    assert len(api.messages) == 2


async def test_unsilence_not_silenced(manager: AlertManager, store: Store) -> None:
    alert = await open_alert(manager, store)

    reply = await unsilence_alert_by_ref(store, str(alert.id), T0)

    assert reply == f"Alert #{alert.id} ({RULE}/vm-1) is not silenced."


async def test_unsilence_expired_silence(manager: AlertManager, store: Store) -> None:
    alert = await open_alert(manager, store)
    await silence_alert_by_ref(store, str(alert.id), timedelta(hours=1), T0)

    reply = await unsilence_alert_by_ref(store, str(alert.id), T0 + timedelta(hours=2))

    assert reply == f"Alert #{alert.id} ({RULE}/vm-1) is not silenced."


async def test_unsilence_malformed_raises(store: Store) -> None:
    with pytest.raises(ValueError, match="Usage: /unsilence ALERT"):
        await unsilence_alert_by_ref(store, "nothing", T0)
