"""Store tests on a real SQLite file in a temporary folder and on a real PostgreSQL server.

Tests that take the `store` or `store_url` fixture run on both. `tests/postgres.py`
starts the server and gives each PostgreSQL run a new database.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import (
    Boolean,
    Column,
    Connection,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    inspect,
    text,
)
from sqlalchemy.ext.asyncio import create_async_engine
from sqlmodel.ext.asyncio.session import AsyncSession

from tdbot.config import ConfigError
from tdbot.evaluation.model import (
    FireAlert,
    IdleSample,
    IdleWarningState,
    LadderState,
    MarketSnapshot,
    Stop,
)
from tdbot.store.db import WATCH_GAP, Store, Watch, database_url
from tdbot.store.tables import (
    ActionKind,
    ActionState,
    AlertState,
    ConfirmationRecord,
    PriceSnapshot,
    UtcDateTime,
)
from tdbot.tensordock.models import (
    Bounds,
    CpuOffer,
    GpuOffer,
    Hostnode,
    HostnodeSpecs,
    HostnodeStatus,
    Restriction,
    VirtualMachine,
)
from tests.postgres import PostgresServer, unique_database_name

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[Store]:
    opened = await Store.open(store_url)
    yield opened
    await opened.close()


GPU = "geforcertx4090-pcie-24gb"

# The price table as tdbot created it before it kept vCPU, RAM and storage prices.
OLD_PRICE_TABLE = Table(
    "price_snapshot",
    MetaData(),
    Column("id", Integer, primary_key=True),
    Column("taken_at", UtcDateTime, nullable=False),
    Column("hostnode_id", String, nullable=False),
    Column("gpu_model", String, nullable=False),
    Column("usd_per_gpu_hour", Float, nullable=False),
    Column("available", Boolean, nullable=False),
)


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


def price_row(model: str, node: str, at: datetime, price: float) -> PriceSnapshot:
    return PriceSnapshot(
        taken_at=at, hostnode_id=node, gpu_model=model, usd_per_gpu_hour=price, available=True
    )


async def column_types(store: Store, table: str) -> dict[str, type]:
    """Return the Python type of each column of `table` as the database reports it."""

    def read(connection: Connection) -> dict[str, type]:
        columns = inspect(connection).get_columns(table)
        return {column["name"]: column["type"].python_type for column in columns}

    async with store.engine.connect() as connection:
        return await connection.run_sync(read)


@pytest.mark.sqlite_only
async def test_open_creates_folder_and_file(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "deeper" / "tdbot.db"
    opened = await Store.open(path)
    await opened.close()

    assert path.is_file()


@pytest.mark.sqlite_only
async def test_open_turns_wal_on(store: Store, store_url: str) -> None:
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
    with sqlite3.connect(store_url) as other:
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


async def test_prices_stored_on_unit_change(store_url: str) -> None:
    store = await Store.open(store_url)
    await store.record_prices(market(T0, hostnode("h1", 0.40)))
    cheaper_cpu = hostnode("h1", 0.40, cpu=CpuOffer(amount=32, price=0.002))
    changed = await store.record_prices(market(T0 + timedelta(minutes=10), cheaper_cpu))
    await store.close()

    # A new process reads the latest offers from the table and writes nothing twice.
    reopened = await Store.open(store_url)
    again = await reopened.record_prices(market(T0 + timedelta(minutes=20), cheaper_cpu))
    history = await reopened.price_history("geforcertx4090-pcie-24gb", since=T0)
    await reopened.close()

    assert changed == 1
    assert again == 0
    assert [(row.usd_per_vcpu_hour, row.vcpus_free) for row in history] == [
        (0.0, 0),
        (0.002, 32),
    ]


async def test_restrictions_survive_reopen(store_url: str) -> None:
    restricted = Hostnode(
        id="h1",
        specs=HostnodeSpecs(
            gpu={"geforcertx4090-pcie-24gb": GpuOffer(amount=2, price=0.4)},
            restrictions={1: Restriction(cpu=Bounds(min=4, max=16)), 2: Restriction()},
        ),
        status=HostnodeStatus(online=True, listed=True),
    )
    first = await Store.open(store_url)
    await first.record_prices(market(T0, restricted))
    await first.close()

    # A new process compares with the restrictions read back, which must be equal.
    reopened = await Store.open(store_url)
    again = await reopened.record_prices(market(T0 + timedelta(minutes=10), restricted))
    (row,) = await reopened.price_history("geforcertx4090-pcie-24gb", since=T0)
    await reopened.close()

    assert again == 0
    assert row.restrictions == '{"1":{"cpu":[4,16]},"2":{}}'


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("postgresql+asyncpg://tdbot@127.0.0.1:notaport/tdbot", "invalid database URL"),
        ("postgres+nosuchdriver://tdbot@127.0.0.1/tdbot", "invalid database URL"),
    ],
)
async def test_open_rejects_bad_url(url: str, reason: str) -> None:
    with pytest.raises(ConfigError, match=reason) as caught:
        await Store.open(url)

    assert "Set daemon.database to a SQLite file path" in str(caught.value)


async def test_open_rejects_missing_required_column(tmp_path: Path) -> None:
    database = tmp_path / "tdbot.db"
    with sqlite3.connect(database) as connection:
        connection.execute("CREATE TABLE price_snapshot (id INTEGER PRIMARY KEY)")

    with pytest.raises(ConfigError, match="lacks the required column taken_at"):
        await Store.open(database)


@pytest.mark.postgresql
async def test_open_rejects_missing_postgres_database(postgres_url: str) -> None:
    missing = postgres_url.rsplit("/", 1)[0] + "/tdbot_no_such_database"

    with pytest.raises(ConfigError, match='database "tdbot_no_such_database" does not exist'):
        await Store.open(missing)


@pytest.mark.sqlite_only
async def test_open_rejects_non_database_file(tmp_path: Path) -> None:
    damaged = tmp_path / "tdbot.db"
    damaged.write_text("not a database\n")

    with pytest.raises(ConfigError, match=r"file is not a database\. Set daemon\.database"):
        await Store.open(damaged)


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


async def test_open_alters_old_price_table(store_url: str) -> None:
    # The old table is built through SQLAlchemy, so each backend gets its own DDL and
    # PostgreSQL is covered too, where Store.open adds the columns with ALTER TABLE.
    engine = create_async_engine(database_url(store_url))
    async with engine.begin() as connection:
        await connection.run_sync(OLD_PRICE_TABLE.metadata.create_all)
        await connection.execute(
            OLD_PRICE_TABLE.insert().values(
                taken_at=T0, hostnode_id="h1", gpu_model=GPU, usd_per_gpu_hour=0.4, available=True
            )
        )
    await engine.dispose()

    store = await Store.open(store_url)
    (old_row,) = await store.price_history(GPU, since=T0)
    added = await store.record_prices(market(T0 + timedelta(minutes=10), hostnode("h1", 0.40)))
    history = await store.price_history(GPU, since=T0)
    columns = await column_types(store, "price_snapshot")
    await store.close()
    # A second open finds every column and changes nothing.
    reopened = await Store.open(store_url)
    await reopened.close()

    assert old_row.taken_at == T0
    assert (old_row.usd_per_gpu_hour, old_row.usd_per_vcpu_hour, old_row.restrictions) == (
        0.4,
        None,
        None,
    )
    assert added == 1
    assert history[-1].vcpus_free == 0
    assert columns["usd_per_vcpu_hour"] is float
    assert columns["vcpus_free"] is int
    assert columns["restrictions"] is str


async def test_watch_extended_or_restarted(store: Store) -> None:
    await store.record_prices(market(T0, hostnode("h1", 0.40)))
    await store.record_prices(market(T0 + timedelta(minutes=30), hostnode("h1", 0.40)))
    # The hostnode list failed: the market was not seen, so the watch is not extended.
    failed = MarketSnapshot(taken_at=T0 + timedelta(hours=1), hostnodes=None, vms={}, balance=None)
    await store.record_prices(failed)
    await store.record_prices(market(T0 + timedelta(hours=3), hostnode("h1", 0.40)))

    watches = await store.price_watches(since=T0, until=T0 + timedelta(hours=4))

    assert watches == [
        Watch(T0, T0 + timedelta(minutes=30) + WATCH_GAP),
        Watch(T0 + timedelta(hours=3), T0 + timedelta(hours=3) + WATCH_GAP),
    ]


async def test_prune_drops_old_watches(store: Store) -> None:
    await store.record_prices(market(T0, hostnode("h1", 0.40)))
    await store.record_prices(market(T0 + timedelta(days=3), hostnode("h1", 0.40)))
    later = T0 + timedelta(days=10)
    await store.record_prices(market(later, hostnode("h1", 0.40)))

    await store.prune_price_history(older_than=T0 + timedelta(days=5))
    watches = await store.price_watches(since=T0, until=later + timedelta(hours=1))

    # The watch of day 3 is gone. The first one stays, so that the days up to `later`
    # remain a gap instead of counting as history from before watches were kept.
    assert watches == [
        Watch(T0, T0 + WATCH_GAP),
        Watch(later, later + WATCH_GAP),
    ]


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


async def test_rule_state_survives_reopen(store_url: str) -> None:
    first = await Store.open(store_url)
    await first.save_best_price("r", 0.5)
    await first.set_paused_until("r", T0)
    await first.close()

    second = await Store.open(store_url)
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


async def test_alert_silence_skips_resolved(store: Store) -> None:
    alert = await store.upsert_alert("r", "vm-1", severity="warning", message="a", now=T0)
    assert alert.id is not None

    silenced = await store.set_alert_silence(alert.id, T0 + timedelta(hours=2))
    await store.resolve_alert("r", "vm-1", now=T0 + timedelta(hours=1))
    after_resolve = await store.set_alert_silence(alert.id, None)
    stored = await store.get_alert(alert.id)

    assert silenced is not None
    assert silenced.silenced_until == T0 + timedelta(hours=2)
    assert after_resolve is None
    assert stored is not None
    assert stored.silenced_until == T0 + timedelta(hours=2)


# --- price history -------------------------------------------------------------------


async def test_price_series_leading_rows(store: Store) -> None:
    await store.record_prices(market(T0, hostnode("h1", 0.40), hostnode("h2", 0.50)))
    await store.record_prices(
        market(T0 + timedelta(hours=1), hostnode("h1", 0.35), hostnode("h2", 0.50))
    )
    await store.record_prices(
        market(T0 + timedelta(hours=3), hostnode("h1", 0.35), hostnode("h2", 0.30))
    )
    await store.record_prices(
        market(T0 + timedelta(hours=5), hostnode("h1", 0.20), hostnode("h2", 0.30))
    )

    points = await store.price_series_points(
        GPU, since=T0 + timedelta(hours=2), until=T0 + timedelta(hours=4)
    )

    # Each hostnode's last row before `since` leads, then the rows inside the range.
    assert [(point.taken_at, point.hostnode_id, point.usd_per_gpu_hour) for point in points] == [
        (T0, "h2", 0.50),
        (T0 + timedelta(hours=1), "h1", 0.35),
        (T0 + timedelta(hours=3), "h2", 0.30),
    ]
    assert all(point.gpu_model == GPU for point in points)


async def test_price_rows_same_time_ordered(store: Store) -> None:
    # Reverse name order, so rows sorted by hostnode id cannot pass for the stored order.
    names = [f"h{number:02d}" for number in reversed(range(40))]
    await store.record_prices(market(T0, *(hostnode(name, 0.40) for name in names)))
    await store.record_prices(market(T0, *(hostnode(name, 0.30) for name in names)))

    history = await store.price_history(GPU, since=T0)
    points = await store.price_series_points(GPU, since=T0)

    expected = [(name, 0.40) for name in names] + [(name, 0.30) for name in names]
    assert [(point.hostnode_id, point.usd_per_gpu_hour) for point in history] == expected
    assert [(point.hostnode_id, point.usd_per_gpu_hour) for point in points] == expected


# Python's order is "A-gpu", "a-gpu", "a_gpu", "aa-gpu", "b-gpu". An en-US collation
# puts "a_gpu" first, because it compares letters before case and punctuation.
MODELS = ["b-gpu", "a_gpu", "A-gpu", "a-gpu", "aa-gpu"]


async def add_models(store: Store, models: list[str]) -> None:
    async with AsyncSession(store.engine) as session:
        for model in models:
            session.add(price_row(model, "h1", T0, 1.0))
        await session.commit()


async def test_price_history_models_sorted(store: Store) -> None:
    await add_models(store, MODELS)

    assert await store.price_history_models() == sorted(MODELS)


@pytest.mark.postgresql
async def test_models_sorted_under_icu_collation(postgres_server: PostgresServer) -> None:
    # Many PostgreSQL servers use an en_US collation by default, but the test server uses C.
    name = unique_database_name()
    try:
        url = postgres_server.create_database(
            name, "TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'en-US'"
        )
    except RuntimeError as error:
        pytest.skip(f"the server cannot create an ICU database (PostgreSQL 15+ with ICU): {error}")
    try:
        store = await Store.open(url)
        await add_models(store, MODELS)
        models = await store.price_history_models()
        await store.close()
    finally:
        postgres_server.drop_database(name)

    assert models == sorted(MODELS)


async def test_prune_keeps_last_rows(store: Store) -> None:
    rows = [
        ("h1", 500, 1.0),
        ("h1", 450, 2.0),
        ("h1", 420, 3.0),
        ("h1", 10, 4.0),
        ("h2", 410, 5.0),
        ("h3", 600, 6.0),
        ("h3", 590, 7.0),
    ]
    async with AsyncSession(store.engine) as session:
        for node, days_ago, price in rows:
            session.add(price_row(GPU, node, T0 - timedelta(days=days_ago), price))
        await session.commit()

    removed = await store.prune_price_history(older_than=T0 - timedelta(days=400))
    left = await store.price_history(GPU, since=T0 - timedelta(days=1000))

    assert removed == 3
    # The last row before the cut stays for each hostnode, so the prices at the cut
    # are known; h3's only row left is its latest.
    assert [(point.hostnode_id, point.usd_per_gpu_hour) for point in left] == [
        ("h3", 7.0),
        ("h1", 3.0),
        ("h2", 5.0),
        ("h1", 4.0),
    ]


# --- observations and the journal ----------------------------------------------------


async def test_observation_history_and_first(store: Store) -> None:
    def snapshot(at: datetime, status: str, cost: float) -> MarketSnapshot:
        vm = VirtualMachine(id="vm-1", name="box", status=status, total_price=cost)
        return MarketSnapshot(taken_at=at, hostnodes=None, vms={"vm-1": vm}, balance=None)

    await store.record_observations(snapshot(T0, "Running", 0.5))
    await store.record_observations(snapshot(T0 + timedelta(hours=1), "Stopped", 0.1))
    await store.record_observations(snapshot(T0 + timedelta(hours=2), "Running", 0.5))
    await store.record_observations(snapshot(T0 + timedelta(hours=3), "Stopped", 0.1))

    history = await store.vm_observation_history(
        since=T0 + timedelta(minutes=30), until=T0 + timedelta(hours=3)
    )
    first_stop = await store.first_vm_observation(
        "vm-1", statuses=["Stopped"], after=T0 + timedelta(hours=1), until=T0 + timedelta(hours=4)
    )
    latest = await store.latest_vm_observations()

    assert [(row.observed_at, row.status) for row in history["vm-1"]] == [
        (T0, "Running"),
        (T0 + timedelta(hours=1), "Stopped"),
        (T0 + timedelta(hours=2), "Running"),
    ]
    assert first_stop is not None
    assert first_stop.observed_at == T0 + timedelta(hours=3)
    assert latest["vm-1"].status == "Stopped"


async def test_journal_queries_by_time(store: Store) -> None:
    clock = [T0]
    timed = Store(store.engine, clock=lambda: clock[0])
    stop = await timed.record_intent("r", ActionKind.STOP, "vm-1", {})
    clock[0] = T0 + timedelta(hours=1)
    deploy = await timed.record_intent("r", ActionKind.DEPLOY, "r-1", {"gpu": GPU})
    await timed.mark_action(deploy, ActionState.SENT, vm_id="vm-9")

    created = await timed.actions_created_between(T0, T0 + timedelta(hours=1))
    sent = await timed.actions_in_state(
        ActionKind.DEPLOY, ActionState.SENT, updated_before=T0 + timedelta(hours=2)
    )
    not_yet = await timed.actions_in_state(
        ActionKind.DEPLOY, ActionState.SENT, updated_before=T0 + timedelta(hours=1)
    )
    recent = await timed.recent_actions(rule="r")

    assert [action.id for action in created] == [stop]
    assert [(action.id, action.vm_id) for action in sent] == [(deploy, "vm-9")]
    assert not_yet == []
    assert [action.id for action in recent] == [deploy, stop]
    assert recent[0].params == {"gpu": GPU}
    assert recent[0].updated_at == T0 + timedelta(hours=1)


# --- confirmations, idle warnings and host keys --------------------------------------


def confirmation(confirmation_id: str, **changes: Any) -> ConfirmationRecord:
    fields: dict[str, Any] = {
        "id": confirmation_id,
        "origin": "chat",
        "action": "stop",
        "subject": "vm-1",
        "summary": "Stop vm-1",
        "params": {"status": "Running", "lines": ["Stops billing for compute."]},
        "created_at": T0,
        "expires_at": T0 + timedelta(minutes=10),
        **changes,
    }
    return ConfirmationRecord(**fields)


async def test_confirmation_keeps_large_ids(store: Store) -> None:
    # Telegram supergroup chat ids and newer user ids exceed 32 bits.
    chat_id = -1_001_234_567_890
    user_id = 7_123_456_789
    await store.add_confirmation(confirmation("abcd1234", chat_id=chat_id, user_id=user_id))

    stored = await store.get_confirmation("abcd1234")

    assert stored is not None
    assert (stored.chat_id, stored.user_id) == (chat_id, user_id)
    assert stored.params == {"status": "Running", "lines": ["Stops billing for compute."]}
    assert stored.expires_at == T0 + timedelta(minutes=10)


async def test_confirmation_claimed_once(store: Store) -> None:
    await store.add_confirmation(confirmation("abcd1234"))
    await store.add_confirmation(confirmation("late5678"))
    now = T0 + timedelta(minutes=1)

    claims = await asyncio.gather(
        *(store.claim_confirmation("abcd1234", now=now) for _ in range(5))
    )
    expired = await store.claim_confirmation("late5678", now=T0 + timedelta(minutes=10))
    await store.finish_confirmation("abcd1234", "done")
    stored = await store.get_confirmation("abcd1234")

    assert claims.count(True) == 1
    assert expired is False
    assert stored is not None
    assert stored.used_at == now
    assert stored.outcome == "done"


async def test_open_confirmation_newest_unused(store: Store) -> None:
    await store.add_confirmation(confirmation("old11111"))
    await store.add_confirmation(confirmation("new22222", created_at=T0 + timedelta(minutes=1)))
    await store.add_confirmation(confirmation("other333", subject="vm-2"))
    now = T0 + timedelta(minutes=2)

    newest = await store.open_confirmation(origin="chat", action="stop", subject="vm-1", now=now)
    await store.claim_confirmation("new22222", now=now)
    next_open = await store.open_confirmation(origin="chat", action="stop", subject="vm-1", now=now)
    expired = await store.open_confirmation(
        origin="chat", action="stop", subject="vm-1", now=T0 + timedelta(minutes=10)
    )

    assert newest is not None
    assert newest.id == "new22222"
    assert next_open is not None
    assert next_open.id == "old11111"
    assert expired is None


async def test_idle_warning_due_moved(store: Store) -> None:
    warning = IdleWarningState(warned_at=T0, due_at=T0 + timedelta(minutes=15))
    await store.save_idle_warning("idle", "vm-1", warning)
    stored = await store.idle_warning("idle", "vm-1")
    assert stored is not None

    moved = await store.move_idle_warning_due(stored, T0 + timedelta(hours=1))
    by_row = await store.idle_warning_by_row(stored.row_id)
    await store.save_idle_warning("idle", "vm-1", None)
    after_cancel = await store.move_idle_warning_due(stored, T0 + timedelta(hours=2))

    assert moved is True
    assert by_row is not None
    assert by_row.warning == IdleWarningState(warned_at=T0, due_at=T0 + timedelta(hours=1))
    assert by_row.button_id == stored.button_id
    assert after_cancel is False
    assert await store.idle_warning("idle", "vm-1") is None


async def test_host_key_trusted_first(store: Store) -> None:
    first = await store.trust_host_key(
        "vm-1", key_type="ssh-ed25519", fingerprint="SHA256:one", public_key="k1", now=T0
    )
    second = await store.trust_host_key(
        "vm-1", key_type="ssh-ed25519", fingerprint="SHA256:two", public_key="k2", now=T0
    )
    await store.touch_host_key("vm-1", T0 + timedelta(days=1))
    touched = await store.get_host_key("vm-1")
    forgotten = await store.forget_host_key("vm-1")
    forgotten_again = await store.forget_host_key("vm-1")

    assert first.fingerprint == "SHA256:one"
    assert second.fingerprint == "SHA256:one"
    assert touched is not None
    assert touched.last_seen_at == T0 + timedelta(days=1)
    assert touched.first_seen_at == T0
    assert forgotten is True
    assert forgotten_again is False
