"""Price history: a year of price changes in a real SQLite store, queried by GPU model.

Each GPU model is offered on 20 hostnodes, and every hour one of them changes its
price, so a model gets 8,760 rows a year; 50 models give 438,000 rows. The rows are
inserted in bulk through the store's own engine and table. Each row carries the
hostnode's vCPU, RAM and storage prices and free amounts, as the daemon writes them.
Then `Store.price_history` is timed for windows of 1, 7, 30 and 365 days, and the full
report (`tdbot.history.load_report`, which rebuilds the best full price of the default
size from the rows) for 30 and 365 days.
"""

from __future__ import annotations

import random
import sqlite3
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import insert

from bench.report import Measure, median, ms
from tdbot.evaluation.model import MarketSnapshot
from tdbot.history import load_report
from tdbot.store.db import Store
from tdbot.store.tables import PriceSnapshot

HOSTNODES_PER_MODEL = 20
HOURS_PER_YEAR = 24 * 365
MAX_QUERY_SECONDS = 0.1
# The report rebuilds the full price of every stored row in Python on top of the query,
# and a chat command or `tdbot prices` still replies at once within this.
MAX_REPORT_SECONDS = 0.2
WINDOWS_DAYS = (1, 7, 30, 365)
REPORT_DAYS = (30, 365)
INSERT_CHUNK = 20_000


def history_rows(model_count: int, end: datetime, seed: int) -> list[dict[str, Any]]:
    """Return rows of one price change per model per hour for the year before `end`."""
    rng = random.Random(seed)
    rows = []
    for index in range(model_count):
        model = f"bench-gpu-{index:02d}"
        hosts = [
            str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(HOSTNODES_PER_MODEL)
        ]
        price = rng.uniform(0.1, 3.0)
        for hour in range(HOURS_PER_YEAR):
            price = max(0.05, price * rng.uniform(0.97, 1.03))
            rows.append(
                {
                    "taken_at": end - timedelta(hours=HOURS_PER_YEAR - hour),
                    "hostnode_id": hosts[hour % HOSTNODES_PER_MODEL],
                    "gpu_model": model,
                    "usd_per_gpu_hour": round(price, 4),
                    "available": rng.random() < 0.95,
                    **_capacity(rng),
                }
            )
    return rows


def _capacity(rng: random.Random) -> dict[str, Any]:
    """Unit prices and free amounts of a hostnode, at the scale of the marketplace."""
    return {
        "gpus_free": rng.randint(0, 8),
        "usd_per_vcpu_hour": 0.003,
        "vcpus_free": rng.choice((8, 16, 32, 64)),
        "usd_per_gb_ram_hour": 0.002,
        "ram_gb_free": rng.choice((32, 64, 128, 256)),
        "usd_per_gb_storage_hour": 0.00005,
        "storage_gb_free": rng.choice((500, 1000, 4000)),
        "ports_free": rng.randint(0, 20),
        "restrictions": None,
    }


async def fill_store(store: Store, rows: list[dict[str, Any]]) -> None:
    async with store.engine.begin() as connection:
        for start in range(0, len(rows), INSERT_CHUNK):
            await connection.execute(insert(PriceSnapshot), rows[start : start + INSERT_CHUNK])


@dataclass(frozen=True)
class HistoryDatabase:
    """A filled price history database, kept for the measures taken after the tick."""

    path: Path
    end: datetime
    model_count: int


async def measure_history(
    folder: Path, model_count: int, repeats: int
) -> tuple[list[Measure], HistoryDatabase]:
    """Fill the store and time the queries while this process keeps no large data.

    Run it before the tick stage: the tick's snapshot of 5,000 hostnodes adds enough
    live objects to slow every garbage collection, and so the ORM queries.
    """
    end = datetime.now(UTC).replace(microsecond=0)
    rows = history_rows(model_count, end, seed=11)
    row_count = len(rows)
    database = HistoryDatabase(folder / "history.db", end, model_count)
    store = await Store.open(database.path)
    try:
        started = time.perf_counter()
        await fill_store(store, rows)
        fill_seconds = time.perf_counter() - started
        # The list is as large as a snapshot, and a daemon keeps no such list.
        del rows
        measures = [
            Measure(
                "price history rows (1 year)",
                f"{row_count} rows, inserted in {fill_seconds:.1f} s",
            )
        ]
        for days in WINDOWS_DAYS:
            measures.append(await _time_window(store, end, days, repeats, model_count))
        for days in REPORT_DAYS:
            measures.append(await _time_report(store, end, days, repeats, model_count))
        measures.append(Measure("  query plan", _query_plan(database.path)))
    finally:
        await store.close()
    return measures, database


async def measure_history_with_snapshot(
    database: HistoryDatabase, snapshot: MarketSnapshot, repeats: int
) -> list[Measure]:
    """Time the year query while a snapshot is in memory, then a tick's price write.

    A running daemon keeps its latest snapshot, so this is the query a chat command
    of a daemon watching 5,000 hostnodes gets.
    """
    store = await Store.open(database.path)
    try:
        year = await _time_window(store, database.end, 365, repeats, database.model_count)
        measures = [
            Measure(
                "  price_history, last 365 days, 5000-hostnode snapshot in memory",
                year.value,
            )
        ]
        measures.extend(await _time_price_write(store, snapshot))
    finally:
        await store.close()
    return measures


async def _time_window(
    store: Store, end: datetime, days: int, repeats: int, model_count: int
) -> Measure:
    since = end - timedelta(days=days)
    times = []
    found = 0
    for repeat in range(repeats):
        # Rotate over models, so that no query reads rows the previous one just cached.
        model = f"bench-gpu-{repeat % model_count:02d}"
        started = time.perf_counter()
        found = len(await store.price_history(model, since=since))
        times.append(time.perf_counter() - started)
    elapsed = median(times)
    return Measure(
        f"price_history, last {days} days",
        f"{ms(elapsed)} ({found} rows, median of {repeats})",
        f"< {ms(MAX_QUERY_SECONDS)}",
        elapsed < MAX_QUERY_SECONDS,
    )


async def _time_report(
    store: Store, end: datetime, days: int, repeats: int, model_count: int
) -> Measure:
    """Time the whole report a user gets from `tdbot prices` or /prices, default size."""
    times = []
    steps = 0
    for repeat in range(repeats):
        model = f"bench-gpu-{repeat % model_count:02d}"
        started = time.perf_counter()
        report = await load_report(store, model, days=days, until=end)
        times.append(time.perf_counter() - started)
        steps = len(report.steps)
    elapsed = median(times)
    return Measure(
        f"price report (full price series and statistics), last {days} days",
        f"{ms(elapsed)} ({steps} steps, median of {repeats})",
        f"< {ms(MAX_REPORT_SECONDS)}",
        elapsed < MAX_REPORT_SECONDS,
    )


def _query_plan(database: Path) -> str:
    with sqlite3.connect(database) as connection:
        plan = connection.execute(
            "EXPLAIN QUERY PLAN SELECT * FROM price_snapshot "
            "WHERE gpu_model = ? AND taken_at >= ? ORDER BY taken_at",
            ("bench-gpu-00", "2000-01-01 00:00:00"),
        ).fetchall()
    return "; ".join(str(row[-1]) for row in plan)


async def _time_price_write(store: Store, snapshot: MarketSnapshot) -> list[Measure]:
    """Time `record_prices` of the tick's 5,000-hostnode snapshot on top of a year of rows."""
    started = time.perf_counter()
    added = await store.record_prices(snapshot)
    first = time.perf_counter() - started
    started = time.perf_counter()
    await store.record_prices(snapshot)
    again = time.perf_counter() - started
    return [
        Measure("record_prices after a year, new hostnodes", f"{ms(first)} ({added} rows)"),
        Measure("record_prices after a year, unchanged snapshot", ms(again)),
    ]
