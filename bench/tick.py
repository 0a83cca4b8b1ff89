"""A full evaluation tick of 20 rules over the synthetic market, through the daemon's engine.

The rules run concurrently, as the scheduler fires rules that share a schedule. The
measure compares the API requests of a 1-rule tick with those of a 20-rule tick, and
splits the tick's time into the API round trip (the snapshot), the evaluation and
the rest (store reads and writes, alerts).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from bench.report import Measure, median, ms
from bench.settings import bench_secrets, bench_settings, twenty_rules
from bench.simprocess import RequestLog, SimulatorProcess
from tdbot.daemon.engine import TickResult
from tdbot.daemon.runner import Daemon, open_daemon
from tdbot.daemon.snapshot import SnapshotProvider
from tdbot.evaluation import evaluate
from tdbot.evaluation.model import MarketSnapshot, RuleState
from tdbot.notify.base import NullNotifier
from tdbot.rules.schema import IdleStopRule, RuleBase
from tdbot.simulator.clock import SimClock
from tdbot.store.db import Store

# Evaluation counts as "small next to the API round trip" while it takes at most this
# share of the round trip. A real API's round trip is longer than the loopback one.
MAX_EVALUATION_SHARE = 0.25


@dataclass
class TickTimings:
    """Numbers later stages reuse: the round trips and the snapshot itself."""

    snapshot: MarketSnapshot
    round_trip_seconds: float
    small_request_seconds: float


@dataclass
class _TickRun:
    wall_seconds: float
    requests: RequestLog
    results: list[TickResult]


async def run_tick(daemon: Daemon, sim: SimulatorProcess, rules: list[RuleBase]) -> _TickRun:
    """Fire every rule at once, as the scheduler would, and count the API requests."""
    await sim.reset()
    started = time.perf_counter()
    results = await asyncio.gather(*(daemon.engine.run_rule(rule) for rule in rules))
    wall = time.perf_counter() - started
    return _TickRun(wall, await sim.requests(), list(results))


async def measure_tick(
    sim: SimulatorProcess, folder: Path, repeats: int
) -> tuple[list[Measure], TickTimings]:
    """Run the tick measures; return the table rows and the timings later stages need."""
    rules = twenty_rules()
    clock = SimClock(time_scale=1.0)
    secrets = bench_secrets(sim)

    one_settings = bench_settings(sim, folder, "tick-1.db", dry_run=True)
    async with open_daemon(
        one_settings, secrets, clock=clock, notifier=NullNotifier(), rules=rules[:1], dry_run=True
    ) as daemon:
        one = await run_tick(daemon, sim, rules[:1])

    settings = bench_settings(sim, folder, "tick-20.db", dry_run=True)
    async with open_daemon(
        settings, secrets, clock=clock, notifier=NullNotifier(), rules=rules, dry_run=True
    ) as daemon:
        cold = await run_tick(daemon, sim, rules)
        # Move the daemon's clock past the snapshot's maximum age, so the second tick
        # fetches a new snapshot and finds the rows the first one stored.
        clock.advance(settings.daemon.snapshot_max_age + timedelta(seconds=1))
        warm = await run_tick(daemon, sim, rules)
        timings, api_rows = await _measure_round_trips(daemon, clock, repeats)
        evaluation_rows = await _measure_evaluation(daemon, rules, timings, repeats)

    write_rows = await _measure_store_writes(folder, timings.snapshot)
    rows = [
        *_request_rows(one, cold, warm, len(rules)),
        *api_rows,
        *evaluation_rows,
        *_tick_rows(one, cold, warm, timings, len(rules)),
        *write_rows,
    ]
    return rows, timings


def _request_rows(one: _TickRun, cold: _TickRun, warm: _TickRun, count: int) -> list[Measure]:
    budget = f"= 1-rule tick ({one.requests.total})"
    errors = [f"{result.rule}: {result.error}" for result in cold.results + warm.results]
    errors = [text for text in errors if not text.endswith(": None")]
    return [
        Measure(
            "API requests, tick of 1 rule",
            f"{one.requests.total} ({_by_endpoint(one.requests)})",
        ),
        Measure(
            f"API requests, tick of {count} rules",
            f"{cold.requests.total} ({_by_endpoint(cold.requests)})",
            budget,
            cold.requests.total == one.requests.total,
        ),
        Measure(
            f"API requests, second tick of {count} rules",
            f"{warm.requests.total}",
            budget,
            warm.requests.total == one.requests.total,
        ),
        Measure(
            "rule ticks that raised an error",
            f"{len(errors)}" + (f": {errors[0]}" if errors else ""),
            "0",
            not errors,
        ),
    ]


def _by_endpoint(log: RequestLog) -> str:
    return ", ".join(f"{name} {count}" for name, count in sorted(log.by_endpoint.items()))


async def _median_time(call: Callable[[], Awaitable[Any]], repeats: int) -> tuple[float, Any]:
    times = []
    result: Any = None
    for _ in range(repeats):
        started = time.perf_counter()
        result = await call()
        times.append(time.perf_counter() - started)
    return median(times), result


async def _measure_round_trips(
    daemon: Daemon, clock: SimClock, repeats: int
) -> tuple[TickTimings, list[Measure]]:
    # A maximum age of zero makes every get() fetch, as the first rule of a tick does.
    provider = SnapshotProvider(daemon.client, clock, timedelta(0))
    round_trip, snapshot = await _median_time(provider.get, repeats)
    hostnodes, _ = await _median_time(daemon.client.list_hostnodes, repeats)
    vms, _ = await _median_time(daemon.client.list_vms, repeats)
    balance, _ = await _median_time(daemon.client.get_balance, repeats)

    hostnode_count = len(snapshot.hostnodes or {})
    vm_count = len(snapshot.vms or {})
    timings = TickTimings(snapshot, round_trip, balance)
    rows = [
        Measure(
            "API round trip: snapshot (3 requests at once)",
            f"{ms(round_trip)} (median of {repeats})",
            "the floor",
        ),
        Measure(f"  list of {hostnode_count} hostnodes", ms(hostnodes)),
        Measure(f"  list of {vm_count} VMs", ms(vms)),
        Measure("  balance", ms(balance)),
    ]
    return timings, rows


async def _measure_evaluation(
    daemon: Daemon, rules: list[RuleBase], timings: TickTimings, repeats: int
) -> list[Measure]:
    now = daemon.clock.now()
    states: dict[str, RuleState] = {}
    for rule in rules:
        lookback = rule.window if isinstance(rule, IdleStopRule) else None
        states[rule.name] = await daemon.store.load_rule_state(
            rule.name, idle_lookback=lookback, now=now
        )

    by_kind: dict[str, float] = {}
    totals = []
    for _ in range(repeats):
        total = 0.0
        for rule in rules:
            started = time.perf_counter()
            evaluate(rule, timings.snapshot, states[rule.name], now)
            elapsed = time.perf_counter() - started
            total += elapsed
            by_kind[rule.kind] = by_kind.get(rule.kind, 0.0) + elapsed / repeats
        totals.append(total)

    evaluation = median(totals)
    share = evaluation / timings.round_trip_seconds
    kinds = ", ".join(f"{kind} {ms(seconds)}" for kind, seconds in by_kind.items())
    return [
        Measure(f"evaluation of {len(rules)} rules", f"{ms(evaluation)} (median of {repeats})"),
        Measure("  by rule kind (mean)", kinds),
        Measure(
            "evaluation / API round trip",
            f"{share:.3f}",
            f"<= {MAX_EVALUATION_SHARE}",
            share <= MAX_EVALUATION_SHARE,
        ),
    ]


def _tick_rows(
    one: _TickRun, cold: _TickRun, warm: _TickRun, timings: TickTimings, count: int
) -> list[Measure]:
    def against_floor(run: _TickRun) -> str:
        return f"{ms(run.wall_seconds)} ({run.wall_seconds / timings.round_trip_seconds:.1f}x)"

    return [
        Measure("tick of 1 rule, empty database (x round trip)", against_floor(one)),
        Measure(f"tick of {count} rules, empty database", against_floor(cold)),
        Measure(f"tick of {count} rules, second tick", against_floor(warm)),
    ]


async def _measure_store_writes(folder: Path, snapshot: MarketSnapshot) -> list[Measure]:
    """Time the once-per-snapshot writes: VM observations and price changes."""
    store = await Store.open(folder / "writes.db")
    try:
        first, added = await _timed(store.record_prices(snapshot))
        again, unchanged = await _timed(store.record_prices(snapshot))
        observe, observed = await _timed(store.record_observations(snapshot))
    finally:
        await store.close()
    return [
        Measure("record_prices, first snapshot", f"{ms(first)} ({added} rows)"),
        Measure("record_prices, unchanged snapshot", f"{ms(again)} ({unchanged} rows)"),
        Measure("record_observations, first snapshot", f"{ms(observe)} ({observed} rows)"),
    ]


async def _timed(call: Awaitable[int]) -> tuple[float, int]:
    started = time.perf_counter()
    result = await call
    return time.perf_counter() - started, result
