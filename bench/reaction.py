"""Reaction time from a spot VM turning Outbid to the re-bid request reaching the API.

The daemon runs with its own scheduler on the real clock, with one spot re-bid rule
every 10 s that watches `WATCHED_SPOT_VM`. A trial outbids that VM through the
simulator's control route and reads when `client/spot/validate/existing` arrived.
Both moments are taken by the simulator process on the same monotonic clock.

Trials:

- "random": the outbid happens at a random moment of the schedule;
- "after-fetch": the outbid happens 0.5 s after the daemon fetched the VM list, the
  worst moment for a daemon that reads the VM list once per tick.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from bench.report import Measure
from bench.settings import bench_secrets, bench_settings
from bench.simprocess import SimulatorProcess
from bench.synthetic import WATCHED_SPOT_VM
from tdbot.daemon.runner import Daemon, run_daemon
from tdbot.notify.base import NullNotifier
from tdbot.rules.schema import BidLadder, RuleBase, SpotRebidRule, VmSelector

POLL_INTERVAL = timedelta(seconds=10)
REBID_ENDPOINT = "client/spot/validate/existing"
VM_LIST_ENDPOINT = "client/list"
# How often the benchmark reads the simulator's request log while it waits.
WATCH_SECONDS = 0.1


@dataclass
class Trial:
    """One outbid and what the daemon did about it; times in seconds after the outbid."""

    mode: str
    reaction_seconds: float | None = None
    first_list_seconds: float | None = None
    # Re-bid requests from the outbid until the daemon saw the VM running; None when
    # the trial did not watch that long.
    rebid_requests: int | None = None


@dataclass(frozen=True)
class ReactionPlan:
    """Which trials to run and how long to wait.

    `wait_seconds` bounds the wait for each re-bid. A wait past the budget already
    means FAIL, so a quick run need not wait for the whole reaction.
    `watch_after` keeps watching after each re-bid but the last until the daemon has
    fetched a VM list that shows the VM running again, to count re-bids the outbid
    did not need; the next trial starts from that settled state.
    No trial starts after `stage_seconds`.
    """

    modes: tuple[str, ...]
    wait_seconds: float
    watch_after: bool
    stage_seconds: float


@dataclass
class _Run:
    trials: list[Trial] = field(default_factory=list)
    error: BaseException | None = None


def spot_rule() -> RuleBase:
    return SpotRebidRule(
        name="spot-watch",
        kind="spot_rebid",
        every=POLL_INTERVAL,
        select=VmSelector(names=[WATCHED_SPOT_VM]),
        bid=BidLadder(step_usd=0.05, max_usd_per_hour=50.0, max_steps=10),
    )


def reaction_plan(quick: bool, api_latency_seconds: float, max_age: timedelta) -> ReactionPlan:
    """Plan one random trial that waits just past the budget (quick), or both trials (full)."""
    interval = POLL_INTERVAL.total_seconds()
    if quick:
        return ReactionPlan(("random",), interval + api_latency_seconds + 5, False, 30)
    longest = interval + max_age.total_seconds() + 10
    return ReactionPlan(("after-fetch", "random"), longest, True, 90)


async def measure_reaction(
    sim: SimulatorProcess,
    folder: Path,
    quick: bool,
    api_latency_seconds: float,
    seed: int,
) -> list[Measure]:
    """Run the trials and compare the slowest reaction with the budget."""
    settings = bench_settings(sim, folder, "reaction.db", dry_run=False)
    max_age = settings.daemon.snapshot_max_age
    plan = reaction_plan(quick, api_latency_seconds, max_age)
    vm_id = str(sim.summary["watched_vm_id"])
    stop = asyncio.Event()
    run = _Run()
    background: list[asyncio.Task[None]] = []

    async def started(daemon: Daemon) -> None:
        background.append(asyncio.create_task(_run_trials(sim, vm_id, plan, seed, run, stop)))

    # Bound the whole stage, in case the daemon never reaches `started`.
    bound = plan.stage_seconds + 3 * plan.wait_seconds + 30
    try:
        await asyncio.wait_for(
            run_daemon(
                settings,
                bench_secrets(sim),
                notifier=NullNotifier(),
                stop=stop,
                rules=[spot_rule()],
                started=started,
            ),
            bound,
        )
    finally:
        _remove_signal_handlers()
        for task in background:
            task.cancel()
    if run.error is not None:
        raise run.error
    return _rows(run.trials, api_latency_seconds, max_age, plan)


async def _run_trials(
    sim: SimulatorProcess, vm_id: str, plan: ReactionPlan, seed: int, run: _Run, stop: asyncio.Event
) -> None:
    rng = random.Random(seed)
    stage_end = time.monotonic() + plan.stage_seconds
    try:
        await sim.reset()
        fetched = await _wait_for_request(
            sim, VM_LIST_ENDPOINT, after=float("-inf"), bound=plan.wait_seconds
        )
        if fetched is None:
            raise RuntimeError(f"no {VM_LIST_ENDPOINT} request within {plan.wait_seconds:.0f} s")
        for index, mode in enumerate(plan.modes):
            if time.monotonic() > stage_end:
                break
            # The last trial need not wait for the daemon to settle before the next one.
            watch = plan.watch_after and index < len(plan.modes) - 1
            trial, fetched = await _trial(sim, vm_id, mode, plan, rng, fetched, watch)
            run.trials.append(trial)
    except Exception as error:
        run.error = error
    finally:
        stop.set()


async def _trial(
    sim: SimulatorProcess,
    vm_id: str,
    mode: str,
    plan: ReactionPlan,
    rng: random.Random,
    last_fetch: float | None,
    watch: bool,
) -> tuple[Trial, float | None]:
    """Run one trial; return it and the time of the last VM list fetch it saw."""
    if mode == "after-fetch":
        log = await sim.requests()
        if last_fetch is None or log.now - last_fetch > 0.5:
            last_fetch = await _wait_for_request(
                sim, VM_LIST_ENDPOINT, after=log.now, bound=plan.wait_seconds
            )
            log = await sim.requests()
        await asyncio.sleep(max(0.0, (last_fetch or log.now) + 0.5 - log.now))
    else:
        await asyncio.sleep(rng.uniform(0, POLL_INTERVAL.total_seconds()))

    outbid_at = await sim.outbid(vm_id)
    trial = Trial(mode)
    rebid_at = await _wait_for_request(
        sim, REBID_ENDPOINT, after=outbid_at, bound=plan.wait_seconds
    )
    if rebid_at is not None:
        trial.reaction_seconds = rebid_at - outbid_at
    log = await sim.requests()
    lists = log.arrivals_of(VM_LIST_ENDPOINT, after=outbid_at)
    trial.first_list_seconds = lists[0] - outbid_at if lists else None
    if rebid_at is None or not watch:
        return trial, None

    # Wait until a VM list fetched after the VM runs again, so the daemon has seen it.
    await _wait_until_running(sim, vm_id, bound=10)
    resumed = (await sim.requests()).now
    last_fetch = await _wait_for_request(
        sim, VM_LIST_ENDPOINT, after=resumed, bound=plan.wait_seconds
    )
    await asyncio.sleep(2)
    log = await sim.requests()
    trial.rebid_requests = len(log.arrivals_of(REBID_ENDPOINT, after=outbid_at))
    return trial, last_fetch


async def _wait_for_request(
    sim: SimulatorProcess, endpoint: str, *, after: float, bound: float
) -> float | None:
    """Return when the first `endpoint` request after `after` arrived, or None after `bound` s."""
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline:
        arrivals = (await sim.requests()).arrivals_of(endpoint, after=after)
        if arrivals:
            return arrivals[0]
        await asyncio.sleep(WATCH_SECONDS)
    return None


async def _wait_until_running(sim: SimulatorProcess, vm_id: str, *, bound: float) -> None:
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline:
        if await sim.vm_status(vm_id) == "Running":
            return
        await asyncio.sleep(WATCH_SECONDS)


def _remove_signal_handlers() -> None:
    # run_daemon installs SIGTERM and SIGINT handlers that set its own stop event;
    # remove them, so Ctrl-C interrupts the later stages of the benchmark.
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.remove_signal_handler(signum)


def _rows(
    trials: list[Trial], api_latency: float, max_age: timedelta, plan: ReactionPlan
) -> list[Measure]:
    rows = [_reaction_row(trials, api_latency, plan)]
    rows.extend(_trial_row(trial, plan) for trial in trials)

    counted = [trial.rebid_requests for trial in trials if trial.rebid_requests is not None]
    if counted:
        rows.append(
            Measure(
                "re-bid requests per outbid (until the daemon saw the VM running)",
                f"max {max(counted)}",
                "1 (one step raises the bid above the new minimum)",
                max(counted) == 1,
            )
        )

    rows.append(Measure("  snapshot_max_age (daemon default)", f"{max_age.total_seconds():.0f} s"))
    return rows


def _reaction_row(trials: list[Trial], api_latency: float, plan: ReactionPlan) -> Measure:
    interval = POLL_INTERVAL.total_seconds()
    budget_seconds = interval + api_latency
    budget = f"<= {budget_seconds:.1f} s ({interval:.0f} s interval + {api_latency:.1f} s API)"

    measured = [trial.reaction_seconds for trial in trials if trial.reaction_seconds is not None]
    worst = max(measured) if measured else None
    missing = len(trials) - len(measured)
    if not trials:
        value = "no trial ran"
    elif missing:
        value = f"> {plan.wait_seconds:.1f} s ({missing} of {len(trials)} trials saw no re-bid)"
    else:
        value = f"{worst:.1f} s (slowest of {len(trials)})"

    passed = worst is not None and not missing and worst <= budget_seconds
    return Measure("reaction: Outbid to re-bid request", value, budget, passed)


def _trial_row(trial: Trial, plan: ReactionPlan) -> Measure:
    if trial.reaction_seconds is None:
        reaction = f"more than {plan.wait_seconds:.1f} s"
    else:
        reaction = f"{trial.reaction_seconds:.1f} s"
    if trial.first_list_seconds is None:
        first_list = "none seen"
    else:
        first_list = f"{trial.first_list_seconds:.1f} s"
    requests = "" if trial.rebid_requests is None else f"; {trial.rebid_requests} re-bid(s)"
    return Measure(
        f"  trial at {trial.mode} moment",
        f"re-bid after {reaction}; first VM list after {first_list}{requests}",
    )
