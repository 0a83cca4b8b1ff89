"""Price history: the best full-price series, its statistics, `tdbot prices`, /prices,
retention and the deal alert.

Statistics are checked against values worked out by hand from a small history. The
store is a real SQLite file, and /prices goes through the fake Bot API.
"""

from __future__ import annotations

import asyncio
import json
import sys
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlmodel.ext.asyncio.session import AsyncSession

from tdbot import history
from tdbot.cli import main
from tdbot.daemon.runner import run_maintenance
from tdbot.evaluation import evaluate
from tdbot.evaluation.cheapest import SUBJECT_DEAL, ranked_offers
from tdbot.evaluation.model import FireAlert, MarketSnapshot, ResolveAlert, RuleState
from tdbot.evaluation.pricing import rank_hostnodes
from tdbot.history import (
    DEFAULT_SIZE,
    DeploymentSize,
    PriceStep,
    load_report,
    lowest_price_series,
    mask_unwatched,
    point_price,
    render_png,
    sample_series,
    sparkline,
    weighted_percentile,
    weighted_values,
    with_price_percentiles,
)
from tdbot.rules.schema import CheapestHostnodeRule
from tdbot.store.codec import encode_restrictions
from tdbot.store.db import PricePoint, Store, Watch
from tdbot.store.tables import PriceSnapshot
from tdbot.tensordock.models import Bounds, Hostnode, Restriction
from tests.test_bot import Chat, api, chat, market  # noqa: F401

MODEL = "test-gpu-80gb"
UNTIL = datetime(2026, 1, 31, tzinfo=UTC)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
HOUR = timedelta(hours=1)
FIXTURES = Path(__file__).parent / "fixtures" / "tensordock-v0"
GPU_4090 = "geforcertx4090-pcie-24gb"

Row = tuple[float, str, float, bool]

# Every stored row has these unit prices and free amounts besides its GPU price. The
# default size (1 GPU, 8 vCPUs, 32 GB RAM, 100 GB storage) then costs the GPU price
# plus 8 × 0.01 + 32 × 0.005 + 100 × 0.0001 = 0.25 USD per hour.
UNITS: dict[str, Any] = {
    "gpus_free": 4,
    "usd_per_vcpu_hour": 0.01,
    "vcpus_free": 64,
    "usd_per_gb_ram_hour": 0.005,
    "ram_gb_free": 256,
    "usd_per_gb_storage_hour": 0.0001,
    "storage_gb_free": 2000,
    "ports_free": 10,
}
EXTRAS = 0.25

# (hours before the end, hostnode, USD per GPU-hour, available). The best full price
# over the last day: 2.25 for 10 h, 1.25 for 2 h, 2.25 for 9 h, 3.25 for 3 h. The week
# adds the day before it, 24 h at 2.25; nothing is stored before that.
HISTORY: list[Row] = [
    (48, "node-a", 2.0, True),
    (14, "node-b", 1.0, True),
    (12, "node-b", 1.0, False),
    (3, "node-a", 3.0, True),
]


def price_points(rows: list[Row], end: datetime = UNTIL) -> list[PricePoint]:
    return [
        PricePoint(MODEL, end - hours * HOUR, node, price, available, **UNITS)
        for hours, node, price, available in rows
    ]


async def add_rows(
    store: Store, rows: list[Row], end: datetime, model: str = MODEL, **columns: Any
) -> None:
    """Store rows with the UNITS columns, or with `columns` in their place."""
    async with AsyncSession(store.engine) as session:
        for hours, node, price, available in rows:
            session.add(
                PriceSnapshot(
                    taken_at=end - hours * HOUR,
                    hostnode_id=node,
                    gpu_model=model,
                    usd_per_gpu_hour=price,
                    available=available,
                    **(columns or UNITS),
                )
            )
        await session.commit()


def one_point(**changes: Any) -> PricePoint:
    fields = {"usd_per_gpu_hour": 2.0, "available": True, **UNITS, **changes}
    return PricePoint(MODEL, UNTIL, "node-a", **fields)


@pytest.fixture
async def store(store_url: str) -> Any:
    # On SQLite and on PostgreSQL (tests/postgres.py), as the store's own tests.
    opened = await Store.open(store_url)
    yield opened
    await opened.close()


# --- series and statistics ---------------------------------------------------------


def test_full_price_default_size() -> None:
    assert point_price(one_point(), DEFAULT_SIZE) == 2.0 + EXTRAS


def test_full_price_larger_size() -> None:
    size = DeploymentSize(gpu_count=2, vcpus=7, ram_gb=64, storage_gb=500)

    # vCPUs are rounded up to 8: 2 × 2.0 + 8 × 0.01 + 64 × 0.005 + 500 × 0.0001.
    assert point_price(one_point(), size) == pytest.approx(4.45)


def test_full_price_restriction_minimum() -> None:
    restrictions = encode_restrictions({1: Restriction(cpu=Bounds(min=16), ram=Bounds(max=64))})

    # The vCPU minimum of 16 adds 8 × 0.01 to the default size's price.
    assert point_price(one_point(restrictions=restrictions), DEFAULT_SIZE) == pytest.approx(2.33)
    too_big = DeploymentSize(gpu_count=1, vcpus=8, ram_gb=128, storage_gb=100)
    assert point_price(one_point(restrictions=restrictions), too_big) is None


def test_full_price_unknown_cases() -> None:
    assert point_price(one_point(vcpus_free=6), DEFAULT_SIZE) is None
    assert point_price(one_point(gpus_free=1), DeploymentSize(2, 8, 32, 100)) is None
    assert point_price(one_point(ports_free=0), DEFAULT_SIZE) is None
    assert point_price(one_point(available=False), DEFAULT_SIZE) is None
    # A row stored before vCPU, RAM and storage prices were kept.
    assert point_price(PricePoint(MODEL, UNTIL, "node-a", 2.0, True), DEFAULT_SIZE) is None


def test_series_steps_from_changes() -> None:
    steps = lowest_price_series(
        price_points(HISTORY), DEFAULT_SIZE, since=UNTIL - 24 * HOUR, until=UNTIL
    )

    assert steps == [
        PriceStep(UNTIL - 24 * HOUR, 2.25),
        PriceStep(UNTIL - 14 * HOUR, 1.25),
        PriceStep(UNTIL - 12 * HOUR, 2.25),
        PriceStep(UNTIL - 3 * HOUR, 3.25),
    ]


def test_series_size_changes_ranking() -> None:
    # node-a has the cheaper GPU but only one free; at 2 GPUs node-b is the best.
    points = [
        PricePoint(MODEL, UNTIL - 2 * HOUR, "node-a", 1.0, True, **{**UNITS, "gpus_free": 1}),
        PricePoint(MODEL, UNTIL - 2 * HOUR, "node-b", 1.5, True, **UNITS),
    ]
    size = DeploymentSize(gpu_count=2, vcpus=8, ram_gb=32, storage_gb=100)

    one_gpu = lowest_price_series(points, DEFAULT_SIZE, since=UNTIL - HOUR, until=UNTIL)
    two_gpus = lowest_price_series(points, size, since=UNTIL - HOUR, until=UNTIL)

    assert one_gpu == [PriceStep(UNTIL - HOUR, 1.25)]
    assert two_gpus == [PriceStep(UNTIL - HOUR, 3.25)]


def test_unwatched_time_is_gap() -> None:
    steps = lowest_price_series(
        price_points(HISTORY), DEFAULT_SIZE, since=UNTIL - 24 * HOUR, until=UNTIL
    )
    # Watched until 20 h before the end (plus the gap allowance) and again from 4 h.
    watches = [
        Watch(UNTIL - 30 * HOUR, UNTIL - 18 * HOUR),
        Watch(UNTIL - 4 * HOUR, UNTIL + HOUR),
    ]

    masked = mask_unwatched(steps, watches, since=UNTIL - 24 * HOUR, until=UNTIL)

    assert masked == [
        PriceStep(UNTIL - 24 * HOUR, 2.25),
        PriceStep(UNTIL - 18 * HOUR, None),
        PriceStep(UNTIL - 4 * HOUR, 2.25),
        PriceStep(UNTIL - 3 * HOUR, 3.25),
    ]


WATCHED_NODE = Hostnode.model_validate(
    {
        "id": "node-a",
        "status": {"online": True, "listed": True},
        "networking": {"ports": [22000]},
        "specs": {
            "gpu": {MODEL: {"amount": 1, "price": 1.0}},
            "cpu": {"amount": 16, "price": 0.01},
            "ram": {"amount": 64, "price": 0.005},
            "storage": {"amount": 500, "price": 0.0001},
        },
    }
)


def watch_snapshot(hours_before_end: float) -> MarketSnapshot:
    """Return a snapshot of one hostnode whose default size costs 1.25 USD per hour."""
    taken_at = UNTIL - hours_before_end * HOUR
    return MarketSnapshot(
        taken_at=taken_at, hostnodes={"node-a": WATCHED_NODE}, vms=None, balance=None
    )


async def test_crashed_daemon_leaves_gap(store: Store) -> None:
    # Snapshots every 10 minutes from 12 h to 10 h before the end, then none for 8 h
    # after a crash (the first store is never closed, so no stop is recorded), then
    # from 2 h before the end.
    for minutes in range(0, 121, 10):
        await store.record_prices(watch_snapshot(12 - minutes / 60))
    restarted = await Store.open(store.engine.url)
    try:
        await restarted.record_prices(watch_snapshot(2))
        await restarted.record_prices(watch_snapshot(1))
        report = await load_report(restarted, MODEL, days=0.5, until=UNTIL)
    finally:
        await restarted.close()

    # The price is known until 2 h (WATCH_GAP) after the last snapshot before the stop.
    assert report.steps == [
        PriceStep(UNTIL - 12 * HOUR, 1.25),
        PriceStep(UNTIL - 8 * HOUR, None),
        PriceStep(UNTIL - 2 * HOUR, 1.25),
    ]
    assert report.windows[0].covered_hours == 6.0


async def test_clean_stop_ends_watch(store_url: str) -> None:
    stop_time = UNTIL - 5 * HOUR
    first = await Store.open(store_url, clock=lambda: stop_time)
    for minutes in range(0, 61, 10):
        await first.record_prices(watch_snapshot(6 - minutes / 60))
    await first.close()
    second = await Store.open(store_url)
    try:
        await second.record_prices(watch_snapshot(4.5))
        report = await load_report(second, MODEL, days=0.25, until=UNTIL)
    finally:
        await second.close()

    # Watched from 6 h to the clean stop at 5 h, unwatched until the restart, then for
    # WATCH_GAP after the one snapshot of the restarted store.
    assert report.steps == [
        PriceStep(UNTIL - 6 * HOUR, 1.25),
        PriceStep(UNTIL - 5 * HOUR, None),
        PriceStep(UNTIL - 4.5 * HOUR, 1.25),
        PriceStep(UNTIL - 2.5 * HOUR, None),
    ]


async def test_unwatched_window_explained(store: Store) -> None:
    await store.record_prices(watch_snapshot(10))

    # The one watch ended 8 h before the end; the last hour saw no snapshot.
    report = await load_report(store, MODEL, days=1 / 24, until=UNTIL)

    assert not history.has_prices(report)
    assert "the daemon took no market snapshot in the last" in (
        history.no_history_message(report, 1 / 24)
    )


async def test_history_before_watches_counts(store: Store) -> None:
    await add_rows(store, HISTORY, UNTIL)

    report = await load_report(store, MODEL, days=1, until=UNTIL)

    # No watch is stored, so nothing is known about gaps and the day counts whole.
    assert report.windows[0].covered_hours == 24.0


def test_series_gap_without_offers() -> None:
    rows: list[Row] = [
        (10, "node-a", 2.0, True),
        (6, "node-a", 2.0, False),
        (2, "node-a", 4.0, True),
    ]
    steps = lowest_price_series(
        price_points(rows), DEFAULT_SIZE, since=UNTIL - 24 * HOUR, until=UNTIL
    )
    values = weighted_values(steps, since=UNTIL - 24 * HOUR, until=UNTIL)

    assert steps[1] == PriceStep(UNTIL - 6 * HOUR, None)
    assert values == [(2.25, 4 * 3600.0), (4.25, 2 * 3600.0)]


def test_weighted_percentile_hand_values() -> None:
    values = [(5.0, 1.0), (1.0, 1.0), (3.0, 2.0)]

    assert weighted_percentile(values, 25) == 1.0
    assert weighted_percentile(values, 50) == 3.0
    assert weighted_percentile(values, 75) == 3.0
    assert weighted_percentile(values, 90) == 5.0
    assert weighted_percentile([], 50) is None


async def test_report_windows_hand_values(store: Store) -> None:
    await add_rows(store, HISTORY, UNTIL)

    report = await load_report(store, MODEL, days=7, until=UNTIL)
    day, week = report.windows

    assert (day.days, day.lowest, day.p10, day.median, day.p90) == (1, 1.25, 2.25, 2.25, 3.25)
    assert day.covered_hours == 24.0
    assert (week.lowest, week.p10, week.median, week.p90) == (1.25, 2.25, 2.25, 2.25)
    assert week.days == 7
    assert week.covered_hours == 48.0


async def test_report_uses_row_before_window(store: Store) -> None:
    await add_rows(store, HISTORY, UNTIL)

    report = await load_report(store, MODEL, days=1, until=UNTIL)

    assert report.steps[0] == PriceStep(UNTIL - 24 * HOUR, 2.25)
    assert [stats.days for stats in report.windows] == [1]


def test_sparkline_shows_short_dip() -> None:
    steps = lowest_price_series(
        price_points(HISTORY), DEFAULT_SIZE, since=UNTIL - 24 * HOUR, until=UNTIL
    )

    samples = sample_series(steps, since=UNTIL - 24 * HOUR, until=UNTIL, width=4)

    # Slots of 6 h: the 2 h dip to 1.25 lies in the second slot. The last slot's
    # lowest price is the 2.25 before the rise to 3.25.
    assert samples == [2.25, 1.25, 2.25, 2.25]


def test_sparkline_levels_and_gaps() -> None:
    assert sparkline([1.0, 2.0, None, 8.0]) == "▁▂ █"
    assert sparkline([3.0, 3.0]) == "▁▁"
    assert sparkline([None, None]) == "  "


# --- command line ------------------------------------------------------------------


async def fill_database(database: Path) -> None:
    store = await Store.open(database)
    await add_rows(store, HISTORY, datetime.now(UTC))
    await store.close()


def test_cli_prices_table_and_json(tmp_path: Path) -> None:
    # A plain function, because the command runs its own event loop.
    database = tmp_path / "tdbot.db"
    config = tmp_path / "tdbot.toml"
    config.write_text(f'[daemon]\ndatabase = "{database}"\n')
    asyncio.run(fill_database(database))
    runner = CliRunner()

    table = runner.invoke(main, ["prices", MODEL, "--days", "7", "--config", str(config)])
    as_json = runner.invoke(main, ["prices", MODEL, "--json", "--config", str(config)])
    missing = runner.invoke(main, ["prices", "no-such-gpu", "--config", str(config)])

    assert table.exit_code == 0, table.output
    assert "median" in table.output
    assert "7d" in table.output
    assert "▁" in table.output
    assert "█" in table.output
    data = json.loads(as_json.output)
    assert data["unit"] == "usd_per_hour"
    assert data["size"] == {"gpu_count": 1, "vcpus": 8, "ram_gb": 32, "storage_gb": 100}
    assert [window["days"] for window in data["windows"]] == [1, 7, 30]
    assert data["windows"][0]["lowest"] == 1.25
    assert missing.exit_code == 1
    assert "no price history for a GPU model matching 'no-such-gpu'" in missing.output


def test_cli_prices_name_and_size(tmp_path: Path) -> None:
    database = tmp_path / "tdbot.db"
    config = tmp_path / "tdbot.toml"
    config.write_text(f'[daemon]\ndatabase = "{database}"\n')
    asyncio.run(fill_database(database))
    runner = CliRunner()
    size = ["--gpu-count", "2", "--vcpus", "16", "--storage-gb", "200", "--json"]

    result = runner.invoke(main, ["prices", "test-gpu", *size, "--config", str(config)])
    too_big = runner.invoke(main, ["prices", MODEL, "--vcpus", "128", "--config", str(config)])

    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["gpu_model"] == MODEL
    # 2 × 1.0 + 16 × 0.01 + 32 × 0.005 + 200 × 0.0001 at the lowest GPU price.
    assert data["windows"][0]["lowest"] == pytest.approx(2.34)
    assert too_big.exit_code == 1
    assert "no full price of 1 GPU, 128 vCPUs" in too_big.output


def test_cli_prices_bad_days_and_database(tmp_path: Path) -> None:
    database = tmp_path / "tdbot.db"
    config = tmp_path / "tdbot.toml"
    config.write_text(f'[daemon]\ndatabase = "{database}"\n')
    runner = CliRunner()

    huge = runner.invoke(main, ["prices", MODEL, "--days", "1e9", "--config", str(config)])
    nan = runner.invoke(main, ["prices", MODEL, "--days", "nan", "--config", str(config)])
    missing = runner.invoke(main, ["prices", MODEL, "--config", str(config)])

    assert huge.exit_code == 2
    assert "is not in the range 0<x<=3650" in huge.output
    assert nan.exit_code == 2
    assert "nan is not a number of days" in nan.output
    assert missing.exit_code == 1
    assert f"no database at {database}" in missing.output
    # A report reads history; it must not leave an empty database behind.
    assert not database.exists()


async def test_rows_without_unit_prices_explained(store: Store) -> None:
    # Rows as stored before vCPU, RAM and storage prices were kept.
    old_columns = {name: None for name in UNITS}
    await add_rows(store, HISTORY, UNTIL, **old_columns)

    report = await load_report(store, MODEL, days=7, until=UNTIL)

    assert not history.has_prices(report)
    assert "hold GPU prices only" in history.no_history_message(report, 7)


def test_size_describes_even_vcpus() -> None:
    size = DeploymentSize(gpu_count=2, vcpus=3, ram_gb=16, storage_gb=50)

    assert size.describe() == "2 GPUs, 4 vCPUs, 16 GB RAM, 50 GB storage"


async def test_gpu_name_ambiguous(store: Store) -> None:
    await add_rows(store, HISTORY, UNTIL)
    await add_rows(store, HISTORY, UNTIL, model="test-gpu-40gb")

    with pytest.raises(ValueError, match="matches test-gpu-40gb, test-gpu-80gb"):
        history.resolve_gpu_model("test-gpu", await store.price_history_models())
    assert history.resolve_gpu_model("Test-GPU-80gb", await store.price_history_models()) == MODEL


# --- chart and bot -----------------------------------------------------------------


async def test_chart_is_png(store: Store) -> None:
    await add_rows(store, HISTORY, UNTIL)
    report = await load_report(store, MODEL, days=7, until=UNTIL)

    assert render_png(report).startswith(PNG_SIGNATURE)


async def test_chart_without_matplotlib(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    await add_rows(store, HISTORY, UNTIL)
    report = await load_report(store, MODEL, days=7, until=UNTIL)
    # None in sys.modules makes `import matplotlib` raise ImportError.
    monkeypatch.setitem(sys.modules, "matplotlib", None)

    with pytest.raises(ImportError):
        render_png(report)


async def test_bot_prices_sends_photo(chat: Chat) -> None:  # noqa: F811
    await add_rows(chat.daemon.store, HISTORY, chat.daemon.clock.now())

    (reply,) = await chat.say(f"/prices {MODEL} 7")

    assert reply.method == "sendPhoto"
    assert reply.photo is not None
    assert reply.photo.startswith(PNG_SIGNATURE)
    assert "median" in (reply.caption or "")


async def test_bot_prices_text_fallback(
    chat: Chat,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await add_rows(chat.daemon.store, HISTORY, chat.daemon.clock.now())
    monkeypatch.setitem(sys.modules, "matplotlib", None)

    (reply,) = await chat.say(f"/prices {MODEL} 7")

    assert reply.method == "sendMessage"
    assert "median" in (reply.text or "")
    assert "█" in (reply.text or "")


async def test_bot_prices_usage_errors(chat: Chat) -> None:  # noqa: F811
    no_model = await chat.reply("/prices")
    bad_days = await chat.reply(f"/prices {MODEL} soon")
    nothing_stored = await chat.reply("/prices no-such-gpu")
    bad_size = await chat.reply(f"/prices {MODEL} 7 count=9")
    misspelt = await chat.reply(f"/prices {MODEL} vcpu=16")

    assert "Usage: /prices" in no_model
    assert "DAYS must be a number" in bad_days
    assert "No price history is stored yet" in nothing_stored
    assert "size: count=9 is out of range: count must be at most 8" in bad_size
    assert "unknown key 'vcpu'; did you mean 'vcpus'?" in misspelt


async def test_bot_prices_with_size(chat: Chat) -> None:  # noqa: F811
    await add_rows(chat.daemon.store, HISTORY, chat.daemon.clock.now())
    (reply,) = await chat.say("/prices test-gpu 1 count=2 storage=200")

    assert "2 GPUs, 8 vCPUs, 32 GB RAM, 200 GB storage" in (reply.caption or reply.text or "")


# --- retention ---------------------------------------------------------------------


async def test_prune_keeps_boundary_row(store: Store) -> None:
    rows: list[Row] = [
        (500 * 24, "node-a", 1.0, True),
        (450 * 24, "node-a", 2.0, True),
        (420 * 24, "node-a", 3.0, True),
        (10 * 24, "node-a", 4.0, True),
        (410 * 24, "node-b", 5.0, True),
    ]
    await add_rows(store, rows, UNTIL)
    cut = UNTIL - timedelta(days=400)

    removed = await store.prune_price_history(older_than=cut)
    left = await store.price_history(MODEL, since=UNTIL - timedelta(days=1000))
    report = await load_report(store, MODEL, days=400, until=UNTIL)

    assert removed == 2
    assert [(point.hostnode_id, point.usd_per_gpu_hour) for point in left] == [
        ("node-a", 3.0),
        ("node-b", 5.0),
        ("node-a", 4.0),
    ]
    assert report.steps[0] == PriceStep(cut, 3.25)


async def test_maintenance_prunes_old_prices(chat: Chat) -> None:  # noqa: F811
    now = chat.daemon.clock.now()
    rows: list[Row] = [(402 * 24, "node-a", 1.0, True), (401 * 24, "node-a", 2.0, True)]
    await add_rows(chat.daemon.store, rows, now)

    await run_maintenance(chat.daemon)
    left = await chat.daemon.store.price_history(MODEL, since=now - timedelta(days=1000))

    assert chat.daemon.settings.daemon.price_history_retention == 400
    assert [point.usd_per_gpu_hour for point in left] == [2.0]


# --- deal alert --------------------------------------------------------------------


def fixture_snapshot() -> MarketSnapshot:
    data = json.loads((FIXTURES / "marketplace.json").read_text())
    hostnodes = {
        key: Hostnode.model_validate({"id": key, **value})
        for key, value in data["hostnodes"].items()
    }
    return MarketSnapshot(taken_at=UNTIL, hostnodes=hostnodes, vms=None, balance=None)


def deal_rule() -> CheapestHostnodeRule:
    return CheapestHostnodeRule.model_validate(
        {
            "name": "deal-4090",
            "kind": "cheapest_hostnode",
            "every": "10m",
            "match": {"gpu": [GPU_4090], "vcpus": 8, "ram_gb": 32, "storage_gb": 200},
            "alert": {"on_new_best": False, "deal_below_percentile": 10, "deal_window": "7d"},
        }
    )


def best_price(rule: CheapestHostnodeRule, snapshot: MarketSnapshot) -> float:
    return ranked_offers(rule, snapshot)[0].price_usd_per_hour


def deal_decisions(
    percentile: float | None, open_alerts: frozenset[str] = frozenset()
) -> list[Any]:
    snapshot = fixture_snapshot()
    percentiles = {} if percentile is None else {GPU_4090: percentile}
    state = RuleState(open_alerts=open_alerts, price_percentiles=percentiles)
    decisions = evaluate(deal_rule(), snapshot, state, UNTIL)
    return [decision for decision in decisions if decision.subject == SUBJECT_DEAL]


@pytest.mark.parametrize("size", [DEFAULT_SIZE, DeploymentSize(2, 15, 64, 500)])
async def test_history_matches_ranking(store: Store, size: DeploymentSize) -> None:
    snapshot = fixture_snapshot()
    await store.record_prices(replace(snapshot, taken_at=UNTIL - HOUR))
    assert snapshot.hostnodes is not None
    models = sorted({model for node in snapshot.hostnodes.values() for model in node.specs.gpu})

    for model in models:
        report = await load_report(store, model, size, days=1, until=UNTIL)
        offers = rank_hostnodes(snapshot.hostnodes, size.spec(model))

        expected = offers[0].price_usd_per_hour if offers else None
        assert report.steps[-1].usd_per_hour == expected, model


def test_deal_fires_under_percentile() -> None:
    price = best_price(deal_rule(), fixture_snapshot())

    (decision,) = deal_decisions(price + 0.05)

    assert isinstance(decision, FireAlert)
    assert decision.evidence["percentile"] == 10


def test_deal_quiet_at_percentile() -> None:
    price = best_price(deal_rule(), fixture_snapshot())

    assert deal_decisions(price) == []
    assert deal_decisions(None) == []


def test_deal_resolves_above_percentile() -> None:
    price = best_price(deal_rule(), fixture_snapshot())

    (decision,) = deal_decisions(price - 0.05, frozenset({SUBJECT_DEAL}))

    assert isinstance(decision, ResolveAlert)


async def test_deal_percentile_from_store(store: Store) -> None:
    rule = deal_rule()
    snapshot = fixture_snapshot()
    price = best_price(rule, snapshot)
    # The rule's size costs the GPU price plus 8 × 0.01 + 32 × 0.005 + 200 × 0.0001 =
    # 0.26 on node-x. Its full price is 24 h at price + 0.1, then 1 h at price + 0.2, so
    # the p10 of the week is price + 0.1.
    gpu_price = price - 0.26
    rows: list[Row] = [
        (25, "node-x", gpu_price + 0.1, True),
        (1, "node-x", gpu_price + 0.2, True),
    ]
    await add_rows(store, rows, UNTIL, model=GPU_4090)

    state = await with_price_percentiles(rule, snapshot, RuleState(), store, UNTIL)
    decisions = evaluate(rule, snapshot, state, UNTIL)

    assert state.price_percentiles == {GPU_4090: pytest.approx(price + 0.1)}
    assert [type(d) for d in decisions if d.subject == SUBJECT_DEAL] == [FireAlert]
