"""Daemon tests: the rule engine and `tdbot run` against the simulator on 127.0.0.1.

In-process tests open the daemon with `open_daemon` on the simulator's frozen clock, so
every tick sees the same simulated time until a test moves it. Process tests run
`tdbot run` as a subprocess and stop it with a signal.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import sqlite3
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, closing
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from starlette.types import ASGIApp, Receive, Scope, Send

from tdbot.actions.outcome import OutcomeStatus
from tdbot.asgi import serve_app
from tdbot.config import (
    DaemonSettings,
    HeartbeatSettings,
    SafetySettings,
    Secrets,
    Settings,
    TensorDockSettings,
)
from tdbot.daemon.engine import TickResult
from tdbot.daemon.runner import Daemon, open_daemon, prune_samples
from tdbot.daemon.snapshot import SnapshotProvider
from tdbot.demo import outbid
from tdbot.evaluation import evaluate
from tdbot.evaluation.model import (
    Decision,
    IdleSample,
    IdleWarningState,
    MarketSnapshot,
    Report,
    RuleState,
    Stop,
)
from tdbot.rules.schema import (
    CheapestHostnodeRule,
    IdleStopRule,
    LowBalanceRule,
    RuleBase,
    SpotRebidRule,
)
from tdbot.simulator.app import API_PREFIX, create_app
from tdbot.simulator.clock import SimClock
from tdbot.simulator.faults import FaultMode
from tdbot.simulator.market import SimulatedMarket
from tdbot.simulator.testing import TEST_API_KEY, TEST_API_TOKEN, TEST_START, running_simulator
from tdbot.store.db import Store
from tdbot.store.tables import ActionState
from tdbot.tensordock.models import VmStatus
from tests.alerting import RecordingNotifier

TDBOT = str(Path(sys.executable).parent / "tdbot")
GPU_4090 = "geforcertx4090-pcie-24gb"
SECRETS = Secrets(api_key=TEST_API_KEY, api_token=TEST_API_TOKEN)
# Simulator events that mean the account was changed.
CHANGE_EVENTS = {"deployed", "started", "stopped", "modified", "deleted", "bid_changed"}

CHEAPEST = CheapestHostnodeRule.model_validate(
    {
        "name": "cheapest",
        "kind": "cheapest_hostnode",
        "every": "10m",
        "match": {"gpu": [GPU_4090], "vcpus": 8, "ram_gb": 32, "storage_gb": 200},
        "alert": {"below_usd_per_hour": 0.60},
    }
)
SPOT = SpotRebidRule.model_validate(
    {
        "name": "spot",
        "kind": "spot_rebid",
        "every": "1m",
        "bid": {"step_usd": 0.03, "max_usd_per_hour": 0.60, "max_steps": 4},
    }
)
IDLE = IdleStopRule.model_validate(
    {
        "name": "idle",
        "kind": "idle_stop",
        "every": "2m",
        "select": {"names": ["api-server-*"]},
        "window": "30m",
        "min_samples": 3,
        "max_sample_age": "10m",
        "grace_after_start": "20m",
        "warning": "15m",
    }
)
LOW_BALANCE = LowBalanceRule.model_validate(
    {
        "name": "low-balance",
        "kind": "low_balance",
        "every": "15m",
        "fire_below_balance_usd": 150.0,
        "clear_above_balance_usd": 200.0,
    }
)


class RequestCounter:
    """ASGI middleware that records the path of every API request the simulator serves."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.endpoints: list[str] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and path.startswith(API_PREFIX):
            self.endpoints.append(path.removeprefix(f"{API_PREFIX}/"))
        await self.app(scope, receive, send)

    def take(self) -> Counter[str]:
        """Return the requests counted since the last call and start counting afresh."""
        counted = Counter(self.endpoints)
        self.endpoints.clear()
        return counted


@dataclass
class World:
    market: SimulatedMarket
    requests: RequestCounter
    api_url: str
    folder: Path
    notifier: RecordingNotifier = field(default_factory=RecordingNotifier)

    @property
    def database(self) -> Path:
        return self.folder / "tdbot.db"

    def vm_id(self, name: str) -> str:
        return next(vm.id for vm in self.market.vms.values() if vm.name == name)

    def settings(self, *, dry_run: bool = False) -> Settings:
        return Settings(
            tensordock=TensorDockSettings(
                base_url=self.api_url, timeout_seconds=10, read_retries=1
            ),
            safety=SafetySettings(dry_run=dry_run, fleet_max_usd_per_hour=50.0),
            daemon=DaemonSettings(rules_dir=self.folder / "rules", database=str(self.database)),
            heartbeat=HeartbeatSettings(enabled=False),
        )

    def open(
        self, rules: list[RuleBase], *, dry_run: bool = False
    ) -> AbstractAsyncContextManager[Daemon]:
        return open_daemon(
            self.settings(dry_run=dry_run),
            SECRETS,
            clock=self.market.clock,
            notifier=self.notifier,
            rules=rules,
        )

    def changes(self, since: int) -> list[str]:
        return [event.kind for event in self.market.events[since:] if event.kind in CHANGE_EVENTS]


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    market = SimulatedMarket.from_packaged(
        clock=SimClock(TEST_START, time_scale=0.0),
        api_key=TEST_API_KEY,
        api_token=TEST_API_TOKEN,
        seed=0,
    )
    market.seed_example_vms()
    requests = RequestCounter(create_app(market))
    async with serve_app(requests, "127.0.0.1", 0, name="counted-simulator") as server:
        yield World(market, requests, f"{server.url}{API_PREFIX}", tmp_path)


async def seed_idle(world: World, vm_id: str, *, warning_due: bool) -> None:
    """Store a start 2 h ago and three idle samples for a VM, plus a due warning on request."""
    now = world.market.now()
    store = await Store.open(world.database)
    try:
        await store.set_running_since(IDLE.name, vm_id, now - timedelta(hours=2))
        for minutes_ago in (20, 12, 4):
            at = now - timedelta(minutes=minutes_ago)
            await store.add_idle_sample(IdleSample(vm_id=vm_id, at=at, gpu_util_percent=0.0))
        if warning_due:
            warning = IdleWarningState(
                warned_at=now - timedelta(minutes=20), due_at=now - timedelta(minutes=1)
            )
            await store.save_idle_warning(IDLE.name, vm_id, warning)
    finally:
        await store.close()


def rule_runs(database: Path) -> list[tuple[str, int | None, str | None, int, bool]]:
    """Return (rule, ok, error, decision_count, finished) of every run, oldest first."""
    if not database.exists():
        return []
    try:
        with closing(sqlite3.connect(database, timeout=5)) as connection:
            rows = connection.execute(
                "SELECT rule, ok, error, decision_count, finished_at IS NOT NULL "
                "FROM rule_run ORDER BY id"
            ).fetchall()
    except sqlite3.OperationalError:
        # The daemon has not created the tables yet.
        return []
    return [(rule, ok, error, count, bool(done)) for rule, ok, error, count, done in rows]


def decision_kinds(database: Path, rule: str) -> list[str]:
    with closing(sqlite3.connect(database)) as connection:
        rows = connection.execute(
            "SELECT kind FROM decision WHERE rule = ? ORDER BY id", (rule,)
        ).fetchall()
    return [kind for (kind,) in rows]


def action_states(database: Path) -> dict[int, str]:
    with closing(sqlite3.connect(database)) as connection:
        rows = connection.execute("SELECT id, state FROM action ORDER BY id").fetchall()
    return dict(rows)


def kinds_of(decisions: list[Decision]) -> list[str]:
    return [type(decision).__name__ for decision in decisions]


# --- one tick of each rule kind ------------------------------------------------------


async def test_each_rule_kind_ticks(world: World) -> None:
    spot_vm = world.vm_id("whisper-2x3090")
    idle_vm = world.vm_id("api-server-4090")
    outbid(world.market, world.market.vm(spot_vm))
    await seed_idle(world, idle_vm, warning_due=False)

    async with world.open([CHEAPEST, SPOT, IDLE, LOW_BALANCE]) as daemon:
        results = {rule.name: await daemon.engine.run_rule(rule) for rule in daemon.rules}
        idle_state = await daemon.store.load_rule_state(IDLE.name)

    cheapest, spot, idle, low = (results[rule.name] for rule in (CHEAPEST, SPOT, IDLE, LOW_BALANCE))
    assert all(result.error is None for result in results.values())
    assert kinds_of(cheapest.decisions) == ["FireAlert"]
    assert cheapest.decisions[0].subject == "best"
    assert kinds_of(spot.decisions) == ["Rebid"]
    assert [outcome.status for outcome in spot.outcomes] == [OutcomeStatus.DONE]
    assert world.market.vm(spot_vm).status is VmStatus.RUNNING
    assert world.market.vm(spot_vm).compute_price == pytest.approx(0.33)
    assert kinds_of(idle.decisions) == ["WarnIdle"]
    assert idle_vm in idle_state.idle_warnings
    assert world.market.vm(idle_vm).status is VmStatus.RUNNING
    assert kinds_of(low.decisions) == ["FireAlert"]

    runs = rule_runs(world.database)
    assert [run[0] for run in runs] == ["cheapest", "spot", "idle", "low-balance"]
    for rule, ok, error, count, finished in runs:
        assert ok == 1, rule
        assert error is None, rule
        assert finished, rule
        assert count == len(decision_kinds(world.database, rule)), rule
    assert decision_kinds(world.database, "spot") == ["Rebid"]
    assert action_states(world.database) == {1: ActionState.VERIFIED.value}

    titles = [message.title for message in world.notifier.messages]
    assert "Alert from cheapest" in titles
    assert "Alert from low-balance" in titles


async def test_critical_balance_groups_tick(world: World) -> None:
    world.market.set_balance(0.5)

    async with world.open([CHEAPEST, LOW_BALANCE]) as daemon:
        await tick_together(daemon)

    assert len(world.notifier.messages) == 1
    grouped = world.notifier.text()
    assert "from cheapest" in grouped
    assert "low-balance" in grouped


async def test_separate_messages_without_critical(world: World) -> None:
    async with world.open([CHEAPEST, LOW_BALANCE]) as daemon:
        await tick_together(daemon)

    titles = sorted(message.title for message in world.notifier.messages)
    assert titles == ["Alert from cheapest", "Alert from low-balance"]


# --- snapshot sharing ----------------------------------------------------------------


def many_rules(count: int) -> list[RuleBase]:
    """Return `count` rules that only alert, alternating the cheapest and low-balance kinds."""
    rules: list[RuleBase] = []
    for index in range(count):
        template: RuleBase = CHEAPEST if index % 2 == 0 else LOW_BALANCE
        rules.append(template.model_copy(update={"name": f"{template.name}-{index}"}))
    return rules


async def tick_together(daemon: Daemon) -> list[TickResult]:
    return list(await asyncio.gather(*(daemon.engine.run_rule(r) for r in daemon.rules)))


async def test_snapshot_shared_by_rules(world: World) -> None:
    requests_per_tick: dict[int, Counter[str]] = {}
    for count in (1, 2, 20):
        world.requests.take()
        async with world.open(many_rules(count)) as daemon:
            results = await tick_together(daemon)
        assert all(result.error is None for result in results)
        assert len(results) == count
        requests_per_tick[count] = world.requests.take()

    expected = Counter({"client/deploy/hostnodes": 1, "client/list": 1, "billing/balance": 1})
    assert requests_per_tick[1] == expected
    assert requests_per_tick[2] == expected
    assert requests_per_tick[20] == expected


async def test_snapshot_refetched_when_old(world: World) -> None:
    async with world.open(many_rules(4)) as daemon:
        await tick_together(daemon)
        world.requests.take()
        world.market.advance(timedelta(seconds=2))
        await tick_together(daemon)
        within_max_age = world.requests.take()
        world.market.advance(timedelta(seconds=5))
        await tick_together(daemon)
        after_max_age = world.requests.take()

    assert within_max_age == Counter()
    assert sum(after_max_age.values()) == 3


async def test_snapshot_dropped_after_action(world: World) -> None:
    vm_id = world.vm_id("api-server-4090")
    await seed_idle(world, vm_id, warning_due=True)

    async with world.open([IDLE, LOW_BALANCE]) as daemon:
        stop_tick = await daemon.engine.run_rule(IDLE)
        world.requests.take()
        await daemon.engine.run_rule(LOW_BALANCE)
        after_stop = world.requests.take()

    assert [outcome.status for outcome in stop_tick.outcomes] == [OutcomeStatus.DONE]
    assert after_stop["client/list"] == 1


async def test_idle_rule_skips_hostnodes(world: World) -> None:
    async with world.open([IDLE]) as daemon:
        await daemon.engine.run_rule(IDLE)

    assert world.requests.take() == Counter({"client/list": 1})


async def test_new_parts_fetched_after_reload(world: World) -> None:
    async with world.open([IDLE]) as daemon:
        daemon.snapshots.parts = SnapshotProvider.parts_for({IDLE.kind, CHEAPEST.kind})
        snapshot = await daemon.snapshots.get()

    assert snapshot.hostnodes is not None
    assert world.requests.take()["client/deploy/hostnodes"] == 1


async def test_old_idle_samples_pruned(world: World) -> None:
    vm_id = world.vm_id("api-server-4090")
    now = world.market.now()
    store = await Store.open(world.database)
    try:
        for hours_ago in (50, 30, 2):
            at = now - timedelta(hours=hours_ago)
            await store.add_idle_sample(IdleSample(vm_id=vm_id, at=at, gpu_util_percent=1.0))
    finally:
        await store.close()

    async with world.open([IDLE]) as daemon:
        removed = await prune_samples(daemon)
        kept = await daemon.store.idle_samples(since=now - timedelta(days=7))

    assert removed == 2
    assert [sample.at for sample in kept[vm_id]] == [now - timedelta(hours=2)]


# --- overlap and failures ------------------------------------------------------------


async def test_tick_never_overlaps_itself(world: World) -> None:
    world.market.inject_fault("client/list", FaultMode.DELAY, delay_seconds=0.5)

    async with world.open([LOW_BALANCE]) as daemon:
        first, second = await asyncio.gather(
            daemon.engine.run_rule(LOW_BALANCE), daemon.engine.run_rule(LOW_BALANCE)
        )
        third = await daemon.engine.run_rule(LOW_BALANCE)

    assert first.skipped is None
    assert kinds_of(first.decisions) == ["FireAlert"]
    assert second.skipped == "previous tick still running"
    assert second.decisions == []
    assert third.skipped is None
    assert len(rule_runs(world.database)) == 2


async def test_failing_rule_spares_others(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    broken = LOW_BALANCE.model_copy(update={"name": "broken"})

    def evaluate_or_raise(
        rule: RuleBase, snapshot: MarketSnapshot, state: RuleState, now: Any
    ) -> list[Decision]:
        if rule.name == "broken":
            raise RuntimeError("evaluation exploded")
        return evaluate(rule, snapshot, state, now)

    monkeypatch.setattr("tdbot.daemon.engine.evaluate", evaluate_or_raise)
    async with world.open([broken, LOW_BALANCE]) as daemon:
        failed, healthy = await tick_together(daemon)
        monkeypatch.undo()
        retried = await daemon.engine.run_rule(broken)

    assert failed.error == "RuntimeError: evaluation exploded"
    assert healthy.error is None
    assert kinds_of(healthy.decisions) == ["FireAlert"]
    assert retried.error is None
    assert kinds_of(retried.decisions) == ["FireAlert"]
    runs = {(rule, ok, error) for rule, ok, error, _, _ in rule_runs(world.database)}
    assert ("broken", 0, "RuntimeError: evaluation exploded") in runs
    assert ("low-balance", 1, None) in runs
    assert ("broken", 1, None) in runs


async def test_api_down_stops_nothing(world: World) -> None:
    idle_vm = world.vm_id("api-server-4090")
    await seed_idle(world, idle_vm, warning_due=True)
    # read_retries is 1, so both attempts of the tick's VM list fail.
    world.market.inject_fault("client/list", FaultMode.HTTP_500, count=2)
    events = len(world.market.events)

    async with world.open([IDLE]) as daemon:
        down = await daemon.engine.run_rule(IDLE)
        world.market.advance(timedelta(minutes=1))
        recovered = await daemon.engine.run_rule(IDLE)

    assert down.error is None
    assert not any(isinstance(decision, Stop) for decision in down.decisions)
    [report] = down.decisions
    assert isinstance(report, Report)
    assert report.evidence["reason"] == "vms_unknown"
    assert "VM list failed to load" in report.summary
    assert down.outcomes == []
    assert "VM list failed to load" in world.notifier.text()
    # Once the list loads again, the same stored state stops the VM, so the first
    # tick held back only because the data was unknown.
    assert kinds_of(recovered.decisions) == ["Stop"]
    assert world.changes(events) == ["stopped"]
    assert world.market.vm(idle_vm).status is VmStatus.STOPPED


@pytest.mark.parametrize("scope", ["global", "per-rule"])
async def test_dry_run_changes_nothing(world: World, scope: str) -> None:
    spot_vm = world.vm_id("whisper-2x3090")
    idle_vm = world.vm_id("api-server-4090")
    outbid(world.market, world.market.vm(spot_vm))
    await seed_idle(world, idle_vm, warning_due=True)
    statuses = {vm.id: vm.status for vm in world.market.vms.values()}
    events = len(world.market.events)
    rules: list[RuleBase] = [SPOT, IDLE]
    if scope == "per-rule":
        rules = [rule.model_copy(update={"dry_run": True}) for rule in rules]

    async with world.open(rules, dry_run=scope == "global") as daemon:
        results = await tick_together(daemon)

    spot, idle = results
    assert kinds_of(spot.decisions) == ["Rebid"]
    assert kinds_of(idle.decisions) == ["Stop"]
    for result in results:
        assert [outcome.status for outcome in result.outcomes] == [OutcomeStatus.DRY_RUN]
    assert world.changes(events) == []
    assert {vm.id: vm.status for vm in world.market.vms.values()} == statuses
    assert world.market.vm(spot_vm).status is VmStatus.OUTBID
    assert action_states(world.database) == {1: "dry_run", 2: "dry_run"}


async def test_per_rule_dry_run_scoped(world: World) -> None:
    spot_vm = world.vm_id("whisper-2x3090")
    idle_vm = world.vm_id("api-server-4090")
    outbid(world.market, world.market.vm(spot_vm))
    await seed_idle(world, idle_vm, warning_due=True)
    events = len(world.market.events)

    async with world.open([SPOT.model_copy(update={"dry_run": True}), IDLE]) as daemon:
        spot, idle = await tick_together(daemon)

    assert [outcome.status for outcome in spot.outcomes] == [OutcomeStatus.DRY_RUN]
    assert [outcome.status for outcome in idle.outcomes] == [OutcomeStatus.DONE]
    assert world.changes(events) == ["stopped"]
    assert world.market.vm(spot_vm).status is VmStatus.OUTBID


# --- `tdbot run` as a process --------------------------------------------------------

LOW_BALANCE_FILE = """\
name = "low-balance"
kind = "low_balance"
every = "15m"
fire_below_balance_usd = 1000.0
clear_above_balance_usd = 1100.0
"""


@dataclass
class Completed:
    code: int
    stdout: str
    stderr: str
    seconds_after_signal: float

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


@dataclass
class ProcessWorld:
    """A simulator with credentials of its own and a daemon folder with a config file."""

    market: SimulatedMarket
    api_url: str
    folder: Path
    heartbeat_token: str = field(default_factory=lambda: f"heartbeat-{secrets.token_hex(8)}")

    @property
    def config(self) -> Path:
        return self.folder / "config.toml"

    @property
    def database(self) -> Path:
        return self.folder / "tdbot.db"

    def environment(self) -> dict[str, str]:
        environ = {k: v for k, v in os.environ.items() if not k.startswith("TDBOT_")}
        environ.update(
            {
                "TDBOT_API_KEY": self.market.api_key,
                "TDBOT_API_TOKEN": self.market.api_token,
                "TDBOT_HEARTBEAT_TOKEN": self.heartbeat_token,
                "NO_COLOR": "1",
            }
        )
        return environ

    def write_config(self, *, shutdown_timeout: str) -> None:
        # Relative paths, resolved against the config file's folder by the daemon.
        self.config.write_text(
            f'[tensordock]\nbase_url = "{self.api_url}"\ntimeout_seconds = 10\n'
            '[daemon]\nrules_dir = "rules"\ndatabase = "tdbot.db"\nlog_level = "DEBUG"\n'
            f'shutdown_timeout = "{shutdown_timeout}"\n'
            '[heartbeat]\nhost = "127.0.0.1"\nport = 0\n',
            encoding="utf-8",
        )

    def secret_values(self) -> list[str]:
        return [self.market.api_key, self.market.api_token, self.heartbeat_token]


@pytest.fixture
async def process_world(tmp_path: Path) -> AsyncIterator[ProcessWorld]:
    market = SimulatedMarket.from_packaged(
        clock=SimClock(TEST_START, time_scale=0.0),
        api_key=f"key-{secrets.token_hex(12)}",
        api_token=f"token-{secrets.token_hex(12)}",
        seed=0,
    )
    market.seed_example_vms()
    (tmp_path / "rules").mkdir()
    async with running_simulator(market) as server:
        world = ProcessWorld(market, server.api_url, tmp_path)
        world.write_config(shutdown_timeout="10s")
        yield world


async def start_daemon(world: ProcessWorld) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        TDBOT,
        "run",
        "--config",
        str(world.config),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=world.environment(),
    )


async def wait_until(condition: Any, process: asyncio.subprocess.Process, what: str) -> None:
    """Poll `condition()` every 50 ms for up to 20 s while the daemon process lives."""
    deadline = time.monotonic() + 20
    while not condition():
        if process.returncode is not None or time.monotonic() > deadline:
            if process.returncode is None:
                process.kill()
            stdout, stderr = await process.communicate()
            pytest.fail(f"gave up waiting for {what}:\n{stdout.decode()}\n{stderr.decode()}")
        await asyncio.sleep(0.05)


async def stop_daemon(
    process: asyncio.subprocess.Process, signum: signal.Signals = signal.SIGTERM
) -> Completed:
    process.send_signal(signum)
    signalled = time.monotonic()
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), 20)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    elapsed = time.monotonic() - signalled
    return Completed(process.returncode, stdout.decode(), stderr.decode(), elapsed)


def write_ahead_log_left(database: Path) -> bool:
    return Path(f"{database}-wal").exists()


def finished_runs(database: Path) -> int:
    return sum(1 for run in rule_runs(database) if run[4])


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_run_stops_cleanly_on_signal(
    process_world: ProcessWorld, signum: signal.Signals
) -> None:
    (process_world.folder / "rules" / "low-balance.toml").write_text(LOW_BALANCE_FILE)
    # The first tick's VM list takes 3 s, so the signal arrives while the tick runs.
    process_world.market.inject_fault("client/list", FaultMode.DELAY, delay_seconds=3.0)

    process = await start_daemon(process_world)
    await wait_until(
        lambda: not process_world.market.faults.pending(), process, "the slow VM list request"
    )
    completed = await stop_daemon(process, signum)

    assert completed.code == 0, completed.output
    assert completed.seconds_after_signal < 10
    assert completed.stderr.count(f"received {signum.name}; shutting down") == 1
    assert "tdbot stopped" in completed.stderr
    assert "Traceback" not in completed.output
    for value in process_world.secret_values():
        assert value not in completed.output
    # SQLite removes the write-ahead log when the last connection closes, so a log
    # left behind means the daemon exited with the database still open.
    assert not write_ahead_log_left(process_world.database)
    # The running tick was allowed to finish.
    assert rule_runs(process_world.database) == [("low-balance", 1, None, 1, True)]
    assert "Alert from low-balance" in completed.stdout
    with closing(sqlite3.connect(process_world.database)) as connection:
        assert connection.execute("PRAGMA integrity_check").fetchone() == ("ok",)


async def test_run_cancels_tick_after_timeout(process_world: ProcessWorld) -> None:
    process_world.write_config(shutdown_timeout="1s")
    (process_world.folder / "rules" / "low-balance.toml").write_text(LOW_BALANCE_FILE)
    process_world.market.inject_fault("client/list", FaultMode.DELAY, delay_seconds=4.0)

    process = await start_daemon(process_world)
    await wait_until(
        lambda: not process_world.market.faults.pending(), process, "the slow VM list request"
    )
    slow_request_ends = time.monotonic() + 4.0
    completed = await stop_daemon(process)
    # Let the simulator finish the abandoned request, so it stops without cancelling it.
    await asyncio.sleep(max(slow_request_ends - time.monotonic(), 0) + 0.1)

    assert completed.code == 0, completed.output
    assert completed.seconds_after_signal < 3
    assert "cancelling a tick still running after 1 s" in completed.stderr
    assert "tdbot stopped" in completed.stderr
    assert not write_ahead_log_left(process_world.database)
    # The cancelled tick did not complete: its run is not marked ok and it sent nothing.
    [(rule, ok, _, _, _)] = rule_runs(process_world.database)
    assert rule == "low-balance"
    assert ok != 1
    assert "Alert from low-balance" not in completed.stdout


async def test_restart_keeps_alert_quiet(process_world: ProcessWorld) -> None:
    (process_world.folder / "rules" / "low-balance.toml").write_text(LOW_BALANCE_FILE)

    first = await start_daemon(process_world)
    await wait_until(lambda: finished_runs(process_world.database) == 1, first, "the first tick")
    first_run = await stop_daemon(first)
    second = await start_daemon(process_world)
    await wait_until(lambda: finished_runs(process_world.database) == 2, second, "a second tick")
    second_run = await stop_daemon(second)

    assert first_run.code == 0, first_run.output
    assert second_run.code == 0, second_run.output
    assert "Alert from low-balance" in first_run.stdout
    assert "low-balance" not in second_run.stdout
    # The second run evaluated the rule and found the alert still firing.
    assert rule_runs(process_world.database)[1] == ("low-balance", 1, None, 1, True)
    assert decision_kinds(process_world.database, "low-balance") == ["FireAlert", "FireAlert"]


async def test_start_reconciles_sent_actions(process_world: ProcessWorld) -> None:
    stopped_vm = next(
        vm.id for vm in process_world.market.vms.values() if vm.status is VmStatus.STOPPED
    )
    running_vm = next(
        vm.id for vm in process_world.market.vms.values() if vm.name == "api-server-4090"
    )
    store = await Store.open(process_world.database)
    try:
        took_effect = await store.record_intent(
            "idle-stop", "stop", stopped_vm, {"release": False}, state=ActionState.SENT
        )
        lost = await store.record_intent(
            "idle-stop", "stop", running_vm, {"release": False}, state=ActionState.SENT
        )
    finally:
        await store.close()
    events = len(process_world.market.events)

    process = await start_daemon(process_world)
    await wait_until(
        lambda: "sent" not in action_states(process_world.database).values(),
        process,
        "reconciliation",
    )
    completed = await stop_daemon(process)

    assert completed.code == 0, completed.output
    states = action_states(process_world.database)
    assert states[took_effect] == ActionState.VERIFIED.value
    assert states[lost] == ActionState.FAILED.value
    assert "reconciled after restart" in completed.stderr
    # Reconciliation only reads: the lost stop was not sent again.
    assert [e.kind for e in process_world.market.events[events:] if e.kind in CHANGE_EVENTS] == []
    assert process_world.market.vm(running_vm).status is VmStatus.RUNNING
