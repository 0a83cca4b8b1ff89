"""Inhibition of alerts about VMs that are not running, and batching of a tick's messages.

VM statuses come from observations stored from real snapshots; messages go through
the fake Bot API server.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from tdbot.alerts.manager import AlertManager, RuleAlerts, report_rule
from tdbot.evaluation.model import (
    Decision,
    FireAlert,
    MarketSnapshot,
    Report,
    ResolveAlert,
    Severity,
)
from tdbot.store.db import Store
from tdbot.store.tables import AlertState
from tdbot.tensordock.models import VirtualMachine, VmStatus
from tests.alerting import T0
from tests.fakes.telegram_api import FakeTelegramApi

IDLE = "idle-stop"
CHEAP = "cheapest-4090"
SPOT = "spot-guard"
BALANCE = "low-balance"


async def observe(store: Store, at: datetime, **statuses: VmStatus) -> None:
    """Store one snapshot in which each VM (keyword: VM id) has the given status."""
    vms = {
        vm_id: VirtualMachine(id=vm_id, name=f"name-{vm_id}", status=status, type="spot")
        for vm_id, status in statuses.items()
    }
    await store.record_observations(
        MarketSnapshot(taken_at=at, hostnodes=None, vms=vms, balance=None)
    )


def idle_report(vm_id: str = "vm-1") -> Report:
    return Report(
        rule=IDLE,
        subject=vm_id,
        summary=f"Cannot tell whether VM {vm_id} is idle.",
        evidence={"reason": "no_samples"},
    )


def balance_alert(severity: Severity = Severity.CRITICAL) -> FireAlert:
    return FireAlert(rule=BALANCE, subject="account", summary="Runway is 3.0 h.", severity=severity)


def spot_alert(vm_id: str = "vm-2") -> FireAlert:
    return FireAlert(
        rule=SPOT,
        subject=vm_id,
        summary=f"Spot VM {vm_id} is still outbid.",
        severity=Severity.WARNING,
    )


def price_alert() -> FireAlert:
    return FireAlert(rule=CHEAP, subject="best", summary="Best price $0.41/h.")


# --- inhibition ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "status",
    [VmStatus.OUTBID, VmStatus.STOPPED, VmStatus.STOPPED_DISASSOCIATED, VmStatus.TERMINATED],
)
async def test_idle_report_inhibited_when_down(
    manager: AlertManager, store: Store, api: FakeTelegramApi, status: VmStatus
) -> None:
    await observe(store, T0, **{"vm-1": status})

    message = await manager.handle_run(IDLE, [idle_report()], T0, kind="idle_stop")

    assert message is None
    assert api.messages == []
    assert await store.list_alerts() == []


async def test_idle_report_kept_when_running(manager: AlertManager, store: Store) -> None:
    await observe(store, T0, **{"vm-1": VmStatus.RUNNING})

    message = await manager.handle_run(IDLE, [idle_report()], T0, kind="idle_stop")

    assert message is not None
    assert message.title == f"Report from {IDLE}"


async def test_idle_report_kept_when_unobserved(manager: AlertManager) -> None:
    message = await manager.handle_run(IDLE, [idle_report("vm-9")], T0, kind="idle_stop")

    assert message is not None


async def test_idle_warning_alert_inhibited(manager: AlertManager, store: Store) -> None:
    await observe(store, T0, **{"vm-1": VmStatus.STOPPED})
    warning = FireAlert(rule=IDLE, subject="vm-1", summary="VM vm-1 idles.")

    message = await manager.handle_run(IDLE, [warning], T0, kind="idle_stop")

    assert message is None
    assert await store.get_open_alert(IDLE, "vm-1") is None


async def test_failed_stop_alert_not_inhibited(manager: AlertManager, store: Store) -> None:
    await observe(store, T0, **{"vm-1": VmStatus.STOPPED})
    failure = FireAlert(
        rule=IDLE,
        subject="vm-1:stop-failed",
        summary="Stopping VM vm-1 failed.",
        severity=Severity.CRITICAL,
    )

    message = await manager.handle_run(IDLE, [failure], T0, kind="idle_stop")

    assert message is not None
    assert message.severity == "critical"


async def test_latest_observation_decides(manager: AlertManager, store: Store) -> None:
    await observe(store, T0, **{"vm-1": VmStatus.STOPPED})
    await observe(store, T0 + timedelta(minutes=5), **{"vm-1": VmStatus.RUNNING})

    message = await manager.handle_run(
        IDLE, [idle_report()], T0 + timedelta(minutes=5), kind="idle_stop"
    )

    assert message is not None


async def test_open_report_resolved_when_down(
    manager: AlertManager, store: Store, api: FakeTelegramApi
) -> None:
    await observe(store, T0, **{"vm-1": VmStatus.RUNNING})
    await manager.handle_run(IDLE, [idle_report()], T0, kind="idle_stop")
    later = T0 + timedelta(minutes=5)
    await observe(store, later, **{"vm-1": VmStatus.OUTBID})

    message = await manager.handle_run(IDLE, [idle_report()], later, kind="idle_stop")

    assert message is None
    assert len(api.messages) == 1
    resolved = await store.list_alerts(state=AlertState.RESOLVED, rule=report_rule(IDLE))
    assert [alert.resolved_at for alert in resolved] == [later]


async def test_resolution_not_inhibited(manager: AlertManager, store: Store) -> None:
    failure = FireAlert(
        rule=IDLE, subject="vm-1:stop-failed", summary="Stop failed.", severity=Severity.CRITICAL
    )
    await manager.handle_run(IDLE, [failure], T0, kind="idle_stop")
    await observe(store, T0, **{"vm-1": VmStatus.STOPPED})
    fixed = ResolveAlert(rule=IDLE, subject="vm-1:stop-failed", summary="Stop succeeded.")

    message = await manager.handle_run(IDLE, [fixed], T0 + timedelta(minutes=5), kind="idle_stop")

    assert message is not None
    assert message.title == f"Resolved: alert from {IDLE}"


async def test_price_alert_naming_vm_inhibited(manager: AlertManager, store: Store) -> None:
    await observe(store, T0, **{"vm-1": VmStatus.OUTBID})
    about_vm = FireAlert(
        rule=CHEAP,
        subject="vm-1-price",
        summary="VM vm-1 could run cheaper elsewhere.",
        evidence={"vm_id": "vm-1"},
    )

    message = await manager.handle_run(
        CHEAP, [about_vm, price_alert()], T0, kind="cheapest_hostnode"
    )

    assert message is not None
    assert message.key == (CHEAP, "best")
    assert await store.get_open_alert(CHEAP, "vm-1-price") is None


async def test_spot_alert_not_inhibited(manager: AlertManager, store: Store) -> None:
    await observe(store, T0, **{"vm-2": VmStatus.OUTBID})

    message = await manager.handle_run(SPOT, [spot_alert()], T0, kind="spot_rebid")

    assert message is not None


async def test_no_kind_no_inhibition(manager: AlertManager, store: Store) -> None:
    await observe(store, T0, **{"vm-1": VmStatus.OUTBID})

    message = await manager.handle_run(IDLE, [idle_report()], T0)

    assert message is not None


# --- batching of one tick ---------------------------------------------------------------


async def test_critical_balance_groups_tick(manager: AlertManager, api: FakeTelegramApi) -> None:
    runs = [
        RuleAlerts(CHEAP, [price_alert()], kind="cheapest_hostnode"),
        RuleAlerts(BALANCE, [balance_alert()], kind="low_balance"),
        RuleAlerts(SPOT, [spot_alert("vm-2"), spot_alert("vm-3")], kind="spot_rebid"),
    ]

    sent = await manager.handle_tick(runs, T0)

    assert len(sent) == 1
    assert len(api.messages) == 1
    (message,) = sent
    assert message.title == "Balance critical: 3 updates"
    assert message.severity == "critical"
    assert message.lines[0] == f"• Alert from {BALANCE}"
    text = api.texts()[0]
    assert "Best price $0.41/h." in text
    assert "Spot VM vm-2 is still outbid." in text
    assert "Spot VM vm-3 is still outbid." in text
    assert len(message.buttons) == 4
    assert all(row[0].text.startswith("#") for row in message.buttons)


async def test_open_critical_balance_leads_group(
    manager: AlertManager, api: FakeTelegramApi
) -> None:
    await manager.handle_run(BALANCE, [balance_alert()], T0, kind="low_balance")
    later = T0 + timedelta(minutes=10)
    runs = [
        RuleAlerts(BALANCE, [balance_alert()], kind="low_balance"),
        RuleAlerts(CHEAP, [price_alert()], kind="cheapest_hostnode"),
        RuleAlerts(SPOT, [spot_alert()], kind="spot_rebid"),
    ]

    sent = await manager.handle_tick(runs, later)

    assert len(sent) == 1
    assert sent[0].title == "Balance critical: 2 updates"
    assert sent[0].lines[0] == "The balance is critically low: Runway is 3.0 h."
    assert len(api.messages) == 2


async def test_warning_balance_sends_separately(
    manager: AlertManager, api: FakeTelegramApi
) -> None:
    runs = [
        RuleAlerts(BALANCE, [balance_alert(Severity.WARNING)], kind="low_balance"),
        RuleAlerts(CHEAP, [price_alert()], kind="cheapest_hostnode"),
    ]

    sent = await manager.handle_tick(runs, T0)

    assert [message.title for message in sent] == [
        f"Alert from {BALANCE}",
        f"Alert from {CHEAP}",
    ]
    assert len(api.messages) == 2


async def test_batch_holds_until_flush(manager: AlertManager, api: FakeTelegramApi) -> None:
    batch = manager.begin_batch()

    held = await manager.handle_run(CHEAP, [price_alert()], T0, batch=batch)
    before_flush = len(api.messages)
    sent = await manager.flush_batch(batch)
    again = await manager.flush_batch(batch)

    assert held is not None
    assert before_flush == 0
    assert sent == [held]
    assert again == []
    assert len(api.messages) == 1


async def test_tick_sends_earlier_runs_on_error(
    manager: AlertManager, api: FakeTelegramApi
) -> None:
    wrong: list[Decision] = [spot_alert()]
    runs = [RuleAlerts(CHEAP, [price_alert()]), RuleAlerts(BALANCE, wrong)]

    with pytest.raises(ValueError, match=SPOT):
        await manager.handle_tick(runs, T0)

    assert len(api.messages) == 1
