"""The daily digest over a hand-built SQLite store, its settings and its schedule.

The expected figures are worked out by hand in the comments of `build_history`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import pytest
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from tdbot.alerts.digest import (
    DigestFigures,
    build_digest,
    collect_figures,
    digest_message,
    digest_trigger,
    send_digest,
)
from tdbot.config import AlertSettings, ConfigError, Settings, load_settings
from tdbot.daemon.runner import Daemon, schedule_digest
from tdbot.daemon.scheduler import create_scheduler
from tdbot.evaluation.model import MarketSnapshot
from tdbot.notify.telegram import TelegramNotifier
from tdbot.store.db import Store
from tdbot.store.tables import ActionKind, ActionState
from tdbot.tensordock.models import VirtualMachine, VmStatus
from tests.fakes.telegram_api import FakeTelegramApi

NOW = datetime(2025, 1, 7, 8, 0, tzinfo=UTC)


def hours_ago(hours: float) -> datetime:
    return NOW - timedelta(hours=hours)


class FixedClock:
    """A clock the test moves by hand; the store stamps journal rows with it."""

    def __init__(self, now: datetime) -> None:
        self.current = now

    def now(self) -> datetime:
        return self.current

    @property
    def time_scale(self) -> float:
        return 1.0


@pytest.fixture
def clock() -> FixedClock:
    return FixedClock(NOW)


@pytest.fixture
async def store(tmp_path: Path, clock: FixedClock) -> AsyncIterator[Store]:
    opened = await Store.open(tmp_path / "tdbot.db", clock=clock.now)
    yield opened
    await opened.close()


async def observe(
    store: Store,
    at: datetime,
    vm_id: str,
    status: VmStatus,
    *,
    total: float | None = None,
    storage: float | None = None,
) -> None:
    vm = VirtualMachine(
        id=vm_id, name=vm_id, status=status, total_price=total, storage_price=storage
    )
    await store.record_observations(
        MarketSnapshot(taken_at=at, hostnodes=None, vms={vm_id: vm}, balance=None)
    )


async def journal(
    store: Store,
    clock: FixedClock,
    at: datetime,
    kind: ActionKind,
    vm_id: str,
    state: ActionState,
    params: dict[str, Any],
) -> None:
    """Write a journal row created and last changed at `at`."""
    clock.current = at
    action_id = await store.record_intent("rule", kind.value, vm_id, params, vm_id=vm_id)
    await store.mark_action(action_id, state)
    clock.current = NOW


async def build_history(store: Store, clock: FixedClock) -> None:
    """Store two days of VMs, actions and alerts.

    Spend over the 24 h before NOW:
      vm-a  Running $1.00/h from -30 h, released (storage $0.05/h) at -10 h, Running at -4 h:
            14 h x 1.00 + 6 h x 0.05 + 4 h x 1.00 = 18.30
      vm-b  Stopped (plain stop, billed in full) $0.50/h from -6 h: 6 h x 0.50 = 3.00
      vm-c  Running at an unknown price from -2 h: 2 VM-hours unknown
      vm-d  released (storage $0.02/h) since -48 h: 24 h x 0.02 = 0.48
      vm-e  Running $0.30/h since -40 h: 24 h x 0.30 = 7.20
      total 28.98, with 2.0 VM-hours unknown
    Saved by releasing stops:
      vm-a  stopped -10 h, Running again -4 h: 6 h x 0.95 = 5.70
      vm-d  stopped -48 h, never ran again: the whole 24 h x 0.80 = 19.20
      vm-e  stopped -50 h, Running again -40 h: nothing inside the 24 h
      vm-f  stopped -3 h with an unknown price: counted apart
      total 24.90 from 2 stops, 1 with an unknown price
    """
    await observe(store, hours_ago(30), "vm-a", VmStatus.RUNNING, total=1.00, storage=0.05)
    await observe(
        store, hours_ago(10), "vm-a", VmStatus.STOPPED_DISASSOCIATED, total=1.00, storage=0.05
    )
    await observe(store, hours_ago(4), "vm-a", VmStatus.RUNNING, total=1.00, storage=0.05)
    await observe(store, hours_ago(6), "vm-b", VmStatus.STOPPED, total=0.50, storage=0.10)
    await observe(store, hours_ago(2), "vm-c", VmStatus.RUNNING)
    await observe(
        store, hours_ago(48), "vm-d", VmStatus.STOPPED_DISASSOCIATED, total=0.82, storage=0.02
    )
    await observe(
        store, hours_ago(50), "vm-e", VmStatus.STOPPED_DISASSOCIATED, total=0.30, storage=0.01
    )
    await observe(store, hours_ago(40), "vm-e", VmStatus.RUNNING, total=0.30, storage=0.01)

    stop = ActionKind.STOP
    verified = ActionState.VERIFIED
    release = {"release": True}
    await journal(
        store, clock, hours_ago(10), stop, "vm-a", verified, release | {"saves_usd_per_hour": 0.95}
    )
    await journal(
        store, clock, hours_ago(48), stop, "vm-d", verified, release | {"saves_usd_per_hour": 0.80}
    )
    await journal(
        store, clock, hours_ago(50), stop, "vm-e", verified, release | {"saves_usd_per_hour": 0.29}
    )
    await journal(
        store, clock, hours_ago(3), stop, "vm-f", verified, release | {"saves_usd_per_hour": None}
    )
    await journal(
        store,
        clock,
        hours_ago(6),
        stop,
        "vm-b",
        verified,
        {"release": False, "saves_usd_per_hour": 0.0},
    )
    await journal(store, clock, hours_ago(1), ActionKind.REBID, "vm-g", verified, {})
    await journal(store, clock, hours_ago(2), ActionKind.REBID, "vm-h", ActionState.FAILED, {})
    await journal(store, clock, hours_ago(5), ActionKind.DEPLOY, "new", ActionState.DRY_RUN, {})
    await journal(store, clock, hours_ago(26), stop, "vm-i", ActionState.BLOCKED, {})

    # Alerts: opened in the span 2 (-5 h, -3 h), resolved in it 2 (-20 h, -1 h),
    # firing now 2 (-5 h and -40 h); the report is left out.
    await store.upsert_alert("r", "old", severity="warning", message="m", now=hours_ago(30))
    await store.resolve_alert("r", "old", now=hours_ago(20))
    await store.upsert_alert("r", "open", severity="warning", message="m", now=hours_ago(5))
    await store.upsert_alert("r", "brief", severity="warning", message="m", now=hours_ago(3))
    await store.resolve_alert("r", "brief", now=hours_ago(1))
    await store.upsert_alert("r", "long", severity="critical", message="m", now=hours_ago(40))
    await store.upsert_alert("r:report", "x", severity="info", message="m", now=hours_ago(2))


async def test_digest_figures_hand_computed(store: Store, clock: FixedClock) -> None:
    await build_history(store, clock)

    figures = await collect_figures(store, NOW)

    assert figures.since == hours_ago(24)
    assert figures.spend_usd == pytest.approx(28.98)
    assert figures.unknown_cost_vm_hours == pytest.approx(2.0)
    assert figures.saved_usd == pytest.approx(24.90)
    assert figures.release_stops_counted == 2
    assert figures.release_stops_unknown_price == 1
    assert figures.plain_stops == 1
    assert figures.rebids_back == 1
    assert figures.actions == {
        "verified": {"stop": 3, "rebid": 1},
        "failed": {"rebid": 1},
        "dry_run": {"deploy": 1},
    }
    assert figures.alerts_opened == 2
    assert figures.alerts_resolved == 2
    assert figures.alerts_firing == 2


async def test_digest_message_lines(store: Store, clock: FixedClock) -> None:
    await build_history(store, clock)

    message = await build_digest(store, NOW)

    assert message.title == "Daily digest"
    assert message.severity == "info"
    assert message.lines == (
        "The 24 h to 2025-01-07 08:00 UTC. Money figures are estimates.",
        "Spend: about $28.98, from each VM's hourly cost over the time it had it. "
        "It leaves out 2.0 VM-hours at an unknown cost.",
        "Actions: 4 verified (1 rebid, 3 stop); 1 dry run (1 deploy); 1 failed (1 rebid).",
        "Alerts: 2 opened, 2 resolved, 2 firing now.",
        "Saved: about $24.90 by 2 idle stops that released resources. "
        "1 stop with an unknown price not counted.",
        "Plain stops: 1. They save nothing, because the GPU stays reserved and billed.",
        "Re-bids: 1 VM running again. A re-bid saves nothing but keeps the VM working.",
    )


async def test_digest_empty_store(store: Store) -> None:
    message = await build_digest(store, NOW)

    assert message.lines == (
        "The 24 h to 2025-01-07 08:00 UTC. Money figures are estimates.",
        "Spend: about $0.00, from each VM's hourly cost over the time it had it.",
        "Actions: none.",
        "Alerts: 0 opened, 0 resolved, 0 firing now.",
        "Saved: about $0.00 by 0 idle stops that released resources.",
    )


def test_digest_message_one_stop() -> None:
    figures = DigestFigures(since=hours_ago(24), until=NOW, saved_usd=1.5, release_stops_counted=1)

    message = digest_message(figures)

    assert "Saved: about $1.50 by 1 idle stop that released resources." in message.lines


async def test_send_digest_reaches_telegram(store: Store, clock: FixedClock) -> None:
    async with FakeTelegramApi() as api:
        notifier = TelegramNotifier(api.token, [42], base_url=api.base_url)
        try:
            message = await send_digest(store, notifier, clock)
        finally:
            await notifier.stop()

        assert message.title == "Daily digest"
        assert len(api.messages) == 1
        assert "Daily digest" in api.texts()[0]


# --- settings and schedule -------------------------------------------------------------


def test_digest_trigger_in_zone() -> None:
    trigger = digest_trigger("08:30", "Europe/Berlin")

    assert trigger is not None
    next_fire = trigger.get_next_fire_time(None, datetime(2025, 1, 6, 12, 0, tzinfo=UTC))
    assert next_fire is not None
    # Berlin is UTC+1 in January.
    assert next_fire.astimezone(UTC) == datetime(2025, 1, 7, 7, 30, tzinfo=UTC)


def test_digest_trigger_unset_off() -> None:
    assert digest_trigger(None, "UTC") is None


def test_digest_settings_default_off() -> None:
    settings = AlertSettings()

    assert settings.digest_time is None
    assert settings.digest_timezone == "UTC"


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ('digest_time = "25:00"', "not a time of day"),
        ('digest_time = "8:30"', "not a time of day"),
        ('digest_timezone = "Mars/Olympus"', "unknown time zone"),
    ],
)
def test_digest_settings_invalid(tmp_path: Path, body: str, problem: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(f"[alerts]\n{body}\n", encoding="utf-8")

    with pytest.raises(ConfigError, match=problem):
        load_settings(path)


@dataclass
class DaemonParts:
    """The parts of a Daemon that `schedule_digest` reads."""

    settings: Settings
    store: Store
    notifier: object
    clock: FixedClock


async def scheduled_digest(store: Store, clock: FixedClock, alerts: AlertSettings) -> Any:
    scheduler: AsyncIOScheduler = create_scheduler()
    parts = DaemonParts(Settings(alerts=alerts), store, object(), clock)
    schedule_digest(scheduler, cast(Daemon, parts))
    return scheduler.get_job("digest")


async def test_schedule_digest_adds_job(store: Store, clock: FixedClock) -> None:
    alerts = AlertSettings(digest_time="07:15", digest_timezone="America/New_York")

    job = await scheduled_digest(store, clock, alerts)

    assert job is not None
    assert job.func is send_digest
    assert str(job.trigger.timezone) == "America/New_York"


async def test_schedule_digest_unset_adds_none(store: Store, clock: FixedClock) -> None:
    job = await scheduled_digest(store, clock, AlertSettings())

    assert job is None
