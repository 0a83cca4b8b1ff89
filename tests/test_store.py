"""Store tests on a real SQLite file in a temporary folder."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import text

from tdbot.evaluation.model import (
    FireAlert,
    IdleSample,
    IdleWarningState,
    LadderState,
    MarketSnapshot,
    Stop,
)
from tdbot.store.db import Store, database_url
from tdbot.store.tables import ActionKind, ActionState, AlertState
from tdbot.tensordock.models import (
    CpuOffer,
    GpuOffer,
    Hostnode,
    HostnodeSpecs,
    HostnodeStatus,
    VirtualMachine,
)

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    opened = await Store.open(tmp_path / "state" / "tdbot.db")
    yield opened
    await opened.close()


def hostnode(
    hostnode_id: str,
    price: float,
    *,
    amount: int = 2,
    online: bool = True,
    cpu: CpuOffer | None = None,
) -> Hostnode:
    return Hostnode(
        id=hostnode_id,
        specs=HostnodeSpecs(
            gpu={"geforcertx4090-pcie-24gb": GpuOffer(amount=amount, price=price)},
            cpu=cpu or CpuOffer(),
        ),
        status=HostnodeStatus(online=online, listed=True),
    )


def market(at: datetime, *hostnodes: Hostnode) -> MarketSnapshot:
    return MarketSnapshot(
        taken_at=at, hostnodes={node.id: node for node in hostnodes}, vms={}, balance=None
    )


async def test_open_creates_folder_and_file(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "deeper" / "tdbot.db"
    opened = await Store.open(path)
    await opened.close()

    assert path.is_file()


async def test_open_turns_wal_on(store: Store, tmp_path: Path) -> None:
    async with store.engine.connect() as connection:
        mode = (await connection.execute(text("PRAGMA journal_mode"))).scalar_one()
        busy = (await connection.execute(text("PRAGMA busy_timeout"))).scalar_one()
        foreign_keys = (await connection.execute(text("PRAGMA foreign_keys"))).scalar_one()
        synchronous = (await connection.execute(text("PRAGMA synchronous"))).scalar_one()

    assert mode == "wal"
    assert busy == 5000
    assert foreign_keys == 1
    assert synchronous == 1  # NORMAL

    # WAL is a property of the file, so another connection reads the same mode.
    with sqlite3.connect(tmp_path / "state" / "tdbot.db") as other:
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_database_url_from_plain_path(tmp_path: Path) -> None:
    url = database_url(tmp_path / "x.db")

    assert url.drivername == "sqlite+aiosqlite"
    assert url.database == str(tmp_path / "x.db")


def test_database_url_keeps_postgres_url() -> None:
    url = database_url("postgresql+asyncpg://tdbot:secret@127.0.0.1:5432/tdbot")

    assert url.drivername == "postgresql+asyncpg"
    assert url.database == "tdbot"


async def test_aware_datetime_round_trip(store: Store) -> None:
    berlin = timezone(timedelta(hours=1))
    local = datetime(2025, 3, 1, 13, 30, 15, 123456, tzinfo=berlin)
    await store.upsert_alert("r", "vm-1", severity="warning", message="m", now=local)

    alert = await store.get_open_alert("r", "vm-1")

    assert alert is not None
    assert alert.first_fired_at.tzinfo is not None
    assert alert.first_fired_at.utcoffset() == timedelta(0)
    assert alert.first_fired_at == local


async def test_naive_datetime_rejected(store: Store) -> None:
    with pytest.raises(Exception, match="naive datetime"):
        await store.upsert_alert(
            "r", "vm-1", severity="warning", message="m", now=datetime(2025, 3, 1, 12, 0)
        )


async def test_prices_stored_only_on_change(store: Store) -> None:
    first = await store.record_prices(market(T0, hostnode("h1", 0.40), hostnode("h2", 0.50)))
    same = await store.record_prices(
        market(T0 + timedelta(minutes=10), hostnode("h1", 0.40), hostnode("h2", 0.50))
    )
    changed = await store.record_prices(
        market(T0 + timedelta(minutes=20), hostnode("h1", 0.35), hostnode("h2", 0.50, amount=0))
    )

    assert first == 2
    assert same == 0
    assert changed == 2
    history = await store.price_history("geforcertx4090-pcie-24gb", since=T0)
    assert [(row.hostnode_id, row.usd_per_gpu_hour, row.available) for row in history] == [
        ("h1", 0.40, True),
        ("h2", 0.50, True),
        ("h1", 0.35, True),
        ("h2", 0.50, False),
    ]
    assert history[-1].taken_at == T0 + timedelta(minutes=20)


async def test_prices_missing_hostnode_marked_unavailable(store: Store) -> None:
    await store.record_prices(market(T0, hostnode("h1", 0.40), hostnode("h2", 0.50)))
    added = await store.record_prices(market(T0 + timedelta(minutes=10), hostnode("h1", 0.40)))
    again = await store.record_prices(market(T0 + timedelta(minutes=20), hostnode("h1", 0.40)))

    assert added == 1
    assert again == 0
    history = await store.price_history("geforcertx4090-pcie-24gb", since=T0 + timedelta(minutes=5))
    assert [(row.hostnode_id, row.available) for row in history] == [("h2", False)]


async def test_prices_stored_on_unit_change(tmp_path: Path) -> None:
    database = tmp_path / "tdbot.db"
    store = await Store.open(database)
    await store.record_prices(market(T0, hostnode("h1", 0.40)))
    cheaper_cpu = hostnode("h1", 0.40, cpu=CpuOffer(amount=32, price=0.002))
    changed = await store.record_prices(market(T0 + timedelta(minutes=10), cheaper_cpu))
    await store.close()

    # A new process reads the latest offers from the table and writes nothing twice.
    reopened = await Store.open(database)
    again = await reopened.record_prices(market(T0 + timedelta(minutes=20), cheaper_cpu))
    history = await reopened.price_history("geforcertx4090-pcie-24gb", since=T0)
    await reopened.close()

    assert changed == 1
    assert again == 0
    assert [(row.usd_per_vcpu_hour, row.vcpus_free) for row in history] == [
        (0.0, 0),
        (0.002, 32),
    ]


async def test_open_adds_missing_columns(tmp_path: Path) -> None:
    database = tmp_path / "tdbot.db"
    # The price table as tdbot created it before it kept vCPU, RAM and storage prices.
    with sqlite3.connect(database) as connection:
        connection.execute(
            "CREATE TABLE price_snapshot (id INTEGER PRIMARY KEY, taken_at VARCHAR NOT NULL, "
            "hostnode_id VARCHAR NOT NULL, gpu_model VARCHAR NOT NULL, "
            "usd_per_gpu_hour FLOAT NOT NULL, available BOOLEAN NOT NULL)"
        )
        connection.execute(
            "INSERT INTO price_snapshot VALUES (1, ?, 'h1', 'geforcertx4090-pcie-24gb', 0.4, 1)",
            (T0.isoformat(),),
        )

    store = await Store.open(database)
    (old_row,) = await store.price_history("geforcertx4090-pcie-24gb", since=T0)
    added = await store.record_prices(market(T0 + timedelta(minutes=10), hostnode("h1", 0.40)))
    await store.close()

    assert (old_row.usd_per_gpu_hour, old_row.usd_per_vcpu_hour) == (0.4, None)
    # The old row lacks the new values, so the same offer counts as a change once.
    assert added == 1


async def test_prices_skipped_without_hostnodes(store: Store) -> None:
    snapshot = MarketSnapshot(taken_at=T0, hostnodes=None, vms=None, balance=None)

    assert await store.record_prices(snapshot) == 0


async def test_observations_stored_only_on_change(store: Store) -> None:
    def snapshot(at: datetime, status: str) -> MarketSnapshot:
        vm = VirtualMachine(id="vm-1", name="box", status=status, total_price=0.5)
        return MarketSnapshot(taken_at=at, hostnodes=None, vms={"vm-1": vm}, balance=None)

    first = await store.record_observations(snapshot(T0, "Running"))
    same = await store.record_observations(snapshot(T0 + timedelta(minutes=1), "Running"))
    stopped = await store.record_observations(snapshot(T0 + timedelta(minutes=2), "Stopped"))

    assert (first, same, stopped) == (1, 0, 1)


async def test_rule_state_round_trip(store: Store) -> None:
    ladder = LadderState(steps_taken=2, last_bid_usd=0.42, started_at=T0, exhausted=False)
    warning = IdleWarningState(warned_at=T0, due_at=T0 + timedelta(minutes=15))
    await store.save_best_price("r", 0.39)
    await store.save_ladder("r", "vm-1", ladder)
    await store.save_idle_warning("r", "vm-2", warning)
    await store.set_running_since("r", "vm-2", T0 - timedelta(hours=1))
    await store.add_deployed_vm("r", "vm-3")
    await store.save_best_price("other", 9.99)
    await store.upsert_alert("r", "vm-1", severity="warning", message="outbid", now=T0)

    state = await store.load_rule_state("r")

    assert state.best_price_usd == 0.39
    assert state.ladders == {"vm-1": ladder}
    assert state.idle_warnings == {"vm-2": warning}
    assert state.running_since == {"vm-2": T0 - timedelta(hours=1)}
    assert state.deployed_vm_ids == frozenset({"vm-3"})
    assert state.open_alerts == frozenset({"vm-1"})


async def test_rule_state_cleared_by_none(store: Store) -> None:
    await store.save_ladder("r", "vm-1", LadderState(steps_taken=1))
    await store.save_idle_warning("r", "vm-1", IdleWarningState(warned_at=T0, due_at=T0))
    await store.add_deployed_vm("r", "vm-1")

    await store.save_ladder("r", "vm-1", None)
    await store.save_idle_warning("r", "vm-1", None)
    await store.remove_deployed_vm("r", "vm-1")
    state = await store.load_rule_state("r")

    assert state.ladders == {}
    assert state.idle_warnings == {}
    assert state.deployed_vm_ids == frozenset()


async def test_rule_state_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "tdbot.db"
    first = await Store.open(path)
    await first.save_best_price("r", 0.5)
    await first.set_paused_until("r", T0)
    await first.close()

    second = await Store.open(path)
    state = await second.load_rule_state("r")
    paused = await second.paused_until("r")
    await second.close()

    assert state.best_price_usd == 0.5
    assert paused == T0


async def test_idle_samples_within_lookback(store: Store) -> None:
    for minutes in (90, 30, 10):
        sample = IdleSample(vm_id="vm-1", at=T0 - timedelta(minutes=minutes), gpu_util_percent=1.0)
        await store.add_idle_sample(sample)
    await store.add_idle_sample(IdleSample(vm_id="vm-2", at=T0, error="ssh timed out"))

    state = await store.load_rule_state("r", idle_lookback=timedelta(hours=1), now=T0)

    assert [sample.at for sample in state.idle_samples["vm-1"]] == [
        T0 - timedelta(minutes=30),
        T0 - timedelta(minutes=10),
    ]
    assert state.idle_samples["vm-2"][0].error == "ssh timed out"


async def test_run_records_decisions(store: Store) -> None:
    run_id = await store.start_run("r")
    decisions = [
        Stop(rule="r", subject="vm-1", summary="idle 2h", evidence={"since": T0}, release=True),
        FireAlert(rule="r", subject="vm-1", summary="idle"),
    ]

    await store.finish_run(run_id, True, None, decisions)
    stored = await store.recent_decisions(rule="r")

    assert [record.kind for record in stored] == ["FireAlert", "Stop"]
    assert stored[1].evidence == {"since": T0.isoformat()}
    assert all(record.run_id == run_id for record in stored)


async def test_intent_journal_states(store: Store) -> None:
    action_id = await store.record_intent("r", ActionKind.STOP, "vm-1", {"release": False})
    await store.mark_action(
        action_id, ActionState.SENT, api_call={"endpoint": "client/stop/single", "vm_id": "vm-1"}
    )
    await store.mark_action(
        action_id, ActionState.VERIFIED, result={"status": "Stopped"}, api_call={"endpoint": "x"}
    )

    action = await store.get_action(action_id)

    assert action is not None
    assert action.state == ActionState.VERIFIED
    assert action.result == {"status": "Stopped"}
    assert [call["endpoint"] for call in action.api_calls] == ["client/stop/single", "x"]
    assert action.created_at.tzinfo is not None


async def test_unfinished_actions_listed(store: Store) -> None:
    intent = await store.record_intent("r", ActionKind.DEPLOY, "r-1", {})
    sent = await store.record_intent("r", ActionKind.STOP, "vm-1", {})
    await store.mark_action(sent, ActionState.SENT)
    unknown = await store.record_intent("r", ActionKind.DEPLOY, "r-2", {})
    await store.mark_action(unknown, ActionState.UNKNOWN)
    done = await store.record_intent("r", ActionKind.STOP, "vm-2", {})
    await store.mark_action(done, ActionState.VERIFIED)
    await store.record_intent("r", ActionKind.STOP, "vm-3", {}, state=ActionState.DRY_RUN)
    await store.record_intent("r", ActionKind.STOP, "vm-4", {}, state=ActionState.BLOCKED)

    unfinished = await store.unfinished_actions()

    assert [action.id for action in unfinished] == [intent, sent, unknown]


async def test_open_alert_unique_per_key(store: Store) -> None:
    first = await store.upsert_alert("r", "vm-1", severity="warning", message="a", now=T0)
    second = await store.upsert_alert("r", "vm-1", severity="critical", message="b", now=T0)

    assert first.id == second.id
    assert second.severity == "critical"
    assert second.first_fired_at == T0


async def test_resolved_alert_reopens_new_row(store: Store) -> None:
    first = await store.upsert_alert("r", "vm-1", severity="warning", message="a", now=T0)
    resolved = await store.resolve_alert("r", "vm-1", now=T0 + timedelta(hours=1))
    second = await store.upsert_alert(
        "r", "vm-1", severity="warning", message="again", now=T0 + timedelta(hours=2)
    )

    assert resolved is not None
    assert resolved.resolved_at == T0 + timedelta(hours=1)
    assert second.id != first.id
    assert len(await store.list_alerts(state=AlertState.RESOLVED)) == 1
    assert len(await store.list_alerts(state=AlertState.FIRING)) == 1


async def test_alert_send_claimed_once(store: Store) -> None:
    alert = await store.upsert_alert("r", "vm-1", severity="warning", message="a", now=T0)
    assert alert.id is not None
    repeat = timedelta(hours=1)

    claims = await asyncio.gather(
        *(store.claim_alert_send(alert.id, repeat_every=repeat, now=T0) for _ in range(5))
    )
    too_soon = await store.claim_alert_send(alert.id, repeat_every=repeat, now=T0 + repeat / 2)
    due = await store.claim_alert_send(alert.id, repeat_every=repeat, now=T0 + repeat)

    assert claims.count(True) == 1
    assert too_soon is False
    assert due is True


async def test_silenced_alert_not_claimed(store: Store) -> None:
    alert = await store.upsert_alert("r", "vm-1", severity="warning", message="a", now=T0)
    assert alert.id is not None
    await store.silence_alert("r", "vm-1", T0 + timedelta(hours=4))

    during = await store.claim_alert_send(alert.id, repeat_every=None, now=T0 + timedelta(hours=1))
    after = await store.claim_alert_send(alert.id, repeat_every=None, now=T0 + timedelta(hours=5))

    assert during is False
    assert after is True
