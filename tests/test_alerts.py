"""AlertManager over a real SQLite store, notifying through the fake Bot API server."""

from __future__ import annotations

import logging
from datetime import timedelta
from pathlib import Path

import pytest

from tdbot.alerts.manager import AlertManager, report_rule
from tdbot.alerts.messages import format_duration
from tdbot.evaluation.model import FireAlert, Severity, Stop
from tdbot.notify.telegram import TelegramNotifier
from tdbot.store.db import Store
from tdbot.store.tables import AlertState
from tests.alerting import REPEAT, RULE, T0, outbid, running_again, unknown_bid
from tests.fakes.telegram_api import FakeTelegramApi


@pytest.mark.parametrize(
    ("duration", "text"),
    [
        (timedelta(seconds=45), "45s"),
        (timedelta(minutes=14, seconds=59), "14m"),
        (timedelta(hours=2, minutes=14), "2h 14m"),
        (timedelta(days=3, hours=4, minutes=5), "3d 4h"),
        (timedelta(seconds=-5), "0s"),
    ],
)
def test_format_duration_cases(duration: timedelta, text: str) -> None:
    assert format_duration(duration) == text


async def test_alert_fires_once(manager: AlertManager, api: FakeTelegramApi) -> None:
    first = await manager.handle_run(RULE, [outbid()], T0)
    second = await manager.handle_run(RULE, [outbid()], T0 + timedelta(minutes=10))

    assert first is not None
    assert first.title == f"Alert from {RULE}"
    assert first.key == (RULE, "vm-1")
    assert first.severity == "warning"
    assert second is None
    assert len(api.messages) == 1
    assert "Spot VM vm-1 is outbid." in api.texts()[0]


async def test_alert_repeats_after_interval(manager: AlertManager, api: FakeTelegramApi) -> None:
    await manager.handle_run(RULE, [outbid()], T0)
    early = await manager.handle_run(RULE, [outbid()], T0 + REPEAT - timedelta(seconds=1))
    reminder = await manager.handle_run(RULE, [outbid()], T0 + REPEAT)

    assert early is None
    assert reminder is not None
    assert reminder.title == f"Still firing: alert from {RULE}"
    assert "Firing for 1h 0m, since 2025-01-06 12:00 UTC." in reminder.lines
    assert len(api.messages) == 2


async def test_alert_resolves_with_duration(
    manager: AlertManager, store: Store, api: FakeTelegramApi
) -> None:
    await manager.handle_run(RULE, [outbid()], T0)
    resolved_at = T0 + timedelta(hours=2, minutes=14)

    message = await manager.handle_run(RULE, [running_again()], resolved_at)

    assert message is not None
    assert message.title == f"Resolved: alert from {RULE}"
    assert "Resolved after 2h 14m." in message.lines
    assert "Resolved after 2h 14m." in api.texts()[-1]
    (record,) = await store.list_alerts(rule=RULE)
    assert record.state == AlertState.RESOLVED.value
    assert record.resolved_at == resolved_at


async def test_resolve_not_open_ignored(
    manager: AlertManager, store: Store, api: FakeTelegramApi
) -> None:
    message = await manager.handle_run(RULE, [running_again()], T0)

    assert message is None
    assert api.messages == []
    assert await store.list_alerts(rule=RULE) == []


async def test_refire_after_resolve_opens_new(manager: AlertManager, store: Store) -> None:
    await manager.handle_run(RULE, [outbid()], T0)
    await manager.handle_run(RULE, [running_again()], T0 + timedelta(minutes=5))

    again = await manager.handle_run(RULE, [outbid()], T0 + timedelta(minutes=6))

    assert again is not None
    assert again.title == f"Alert from {RULE}"
    assert len(await store.list_alerts(rule=RULE)) == 2


async def test_restart_does_not_resend(
    db_path: Path, notifier: TelegramNotifier, api: FakeTelegramApi
) -> None:
    store = await Store.open(db_path)
    await AlertManager(store, notifier, repeat_interval=REPEAT).handle_run(RULE, [outbid()], T0)
    await store.close()

    reopened = await Store.open(db_path)
    restarted = AlertManager(reopened, notifier, repeat_interval=REPEAT)
    too_soon = await restarted.handle_run(RULE, [outbid()], T0 + timedelta(minutes=30))
    due = await restarted.handle_run(RULE, [outbid()], T0 + REPEAT)
    await reopened.close()

    assert too_soon is None
    assert due is not None
    assert due.title == f"Still firing: alert from {RULE}"
    assert len(api.messages) == 2


async def test_escalation_sent_at_once(manager: AlertManager, api: FakeTelegramApi) -> None:
    await manager.handle_run(RULE, [outbid()], T0)

    message = await manager.handle_run(
        RULE, [outbid(severity=Severity.CRITICAL)], T0 + timedelta(minutes=10)
    )
    same = await manager.handle_run(
        RULE, [outbid(severity=Severity.CRITICAL)], T0 + timedelta(minutes=20)
    )

    assert message is not None
    assert message.title == f"Now critical: alert from {RULE}"
    assert message.severity == "critical"
    assert same is None
    assert len(api.messages) == 2


async def test_silenced_alert_not_sent(
    manager: AlertManager, store: Store, api: FakeTelegramApi
) -> None:
    await manager.handle_run(RULE, [outbid()], T0)
    await store.silence_alert(RULE, "vm-1", T0 + timedelta(hours=4))

    during = await manager.handle_run(RULE, [outbid()], T0 + timedelta(hours=2))
    resolved = await manager.handle_run(RULE, [running_again()], T0 + timedelta(hours=3))

    assert during is None
    assert resolved is None
    assert len(api.messages) == 1
    assert await store.get_open_alert(RULE, "vm-1") is None


async def test_report_sent_once(manager: AlertManager, store: Store, api: FakeTelegramApi) -> None:
    first = await manager.handle_run(RULE, [unknown_bid()], T0)
    repeated = await manager.handle_run(RULE, [unknown_bid()], T0 + timedelta(minutes=10))
    other_reason = await manager.handle_run(
        RULE, [unknown_bid(), unknown_bid("step_too_small")], T0 + timedelta(minutes=20)
    )

    assert first is not None
    assert first.title == f"Report from {RULE}"
    assert first.severity == "info"
    assert repeated is None
    assert other_reason is not None
    assert len(api.messages) == 2
    open_reports = await store.list_alerts(state=AlertState.FIRING, rule=report_rule(RULE))
    assert sorted(a.subject for a in open_reports) == ["vm-1:bid_unknown", "vm-1:step_too_small"]


async def test_report_resolved_when_absent(
    manager: AlertManager, store: Store, api: FakeTelegramApi
) -> None:
    await manager.handle_run(RULE, [unknown_bid()], T0)

    quiet = await manager.handle_run(RULE, [], T0 + timedelta(minutes=10))
    again = await manager.handle_run(RULE, [unknown_bid()], T0 + timedelta(minutes=20))

    assert quiet is None
    assert again is not None
    assert len(api.messages) == 2
    resolved = await store.list_alerts(state=AlertState.RESOLVED, rule=report_rule(RULE))
    assert [a.resolved_at for a in resolved] == [T0 + timedelta(minutes=10)]


async def test_reports_not_open_alerts(manager: AlertManager, store: Store) -> None:
    await manager.handle_run(RULE, [unknown_bid(), outbid("vm-2")], T0)

    state = await store.load_rule_state(RULE)

    assert state.open_alerts == frozenset({"vm-2"})


async def test_run_messages_grouped(manager: AlertManager, api: FakeTelegramApi) -> None:
    decisions = [
        outbid("vm-1"),
        outbid("vm-2", Severity.CRITICAL),
        unknown_bid(),
        Stop(rule=RULE, subject="vm-3", summary="Stop vm-3."),
    ]

    message = await manager.handle_run(RULE, decisions, T0)

    assert message is not None
    assert message.title == f"3 updates from {RULE}"
    assert message.severity == "critical"
    assert message.key is None
    assert len(api.messages) == 1
    text = api.texts()[0]
    assert "Spot VM vm-1 is outbid." in text
    assert "Spot VM vm-2 is outbid." in text
    assert "The current bid of vm-1 is unknown" in text
    assert "Stop vm-3" not in text


async def test_failed_send_logged(
    manager: AlertManager, api: FakeTelegramApi, caplog: pytest.LogCaptureFixture
) -> None:
    api.blocked_chats.add(42)

    message = await manager.handle_run(RULE, [outbid()], T0)

    assert message is not None
    assert "bot was blocked by the user" in caplog.text
    assert any(r.levelno == logging.ERROR and r.name == "tdbot.alerts" for r in caplog.records)


async def test_foreign_rule_rejected(manager: AlertManager, store: Store) -> None:
    other = FireAlert(rule="other-rule", subject="vm-1", summary="Not this rule's alert.")

    with pytest.raises(ValueError, match="other-rule"):
        await manager.handle_run(RULE, [outbid(), other], T0)

    assert await store.list_alerts() == []


def test_manager_rejects_zero_interval(store: Store, notifier: TelegramNotifier) -> None:
    with pytest.raises(ValueError, match="repeat_interval must be positive"):
        AlertManager(store, notifier, repeat_interval=timedelta(0))
