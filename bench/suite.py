"""Run every benchmark stage, print the table, and return the exit code."""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.history import measure_history, measure_history_with_snapshot
from bench.memory import measure_memory
from bench.reaction import measure_reaction
from bench.report import Measure, print_table
from bench.simprocess import running_simulator
from bench.startup import measure_startup
from bench.tick import measure_tick

HOSTNODES = 5000
VMS = 500
SEED = 7


@dataclass(frozen=True)
class Options:
    """How much each stage repeats; a quick run repeats less and waits less."""

    quick: bool
    repeats: int
    help_runs: int
    history_models: int
    history_repeats: int


def parse_options(argv: list[str]) -> Options:
    parser = argparse.ArgumentParser(
        prog="python bench/run.py",
        description="Measure tdbot against its performance budgets; exit 1 on a FAIL.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="fewer repeats, one reaction trial and 10 GPU models of history (under a minute)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        return Options(True, repeats=1, help_runs=5, history_models=10, history_repeats=5)
    return Options(False, repeats=3, help_runs=7, history_models=50, history_repeats=9)


def _stage(name: str) -> float:
    print(f"[bench] {name} ...", file=sys.stderr, flush=True)
    return time.perf_counter()


async def run_stages(options: Options, folder: Path) -> list[Measure]:
    measures: list[Measure] = []
    _stage("price history")
    history_rows, history_database = await measure_history(
        folder, options.history_models, options.history_repeats
    )

    started = _stage(f"starting the simulator with {HOSTNODES} hostnodes and {VMS} VMs")
    async with running_simulator(
        "--hostnodes", str(HOSTNODES), "--vms", str(VMS), "--seed", str(SEED)
    ) as sim:
        summary = sim.summary
        start_seconds = time.perf_counter() - started
        measures.append(
            Measure(
                "synthetic market",
                f"{summary['hostnodes']} hostnodes, {summary['gpu_models']} GPU models, "
                f"{summary['vms']} VMs ({summary['spot_vms']} spot, "
                f"{summary['outbid_vms']} outbid); started in {start_seconds:.1f} s",
            )
        )

        _stage("tick of 20 rules")
        tick_rows, timings = await measure_tick(sim, folder, options.repeats)
        measures.extend(tick_rows)

        _stage("reaction time to an outbid, on the real clock")
        api_latency = timings.round_trip_seconds + timings.small_request_seconds
        measures.extend(await measure_reaction(sim, folder, options.quick, api_latency, SEED))

        _stage("daemon memory at rest")
        label = f"{HOSTNODES} hostnodes"
        measures.extend(await measure_memory(sim, folder / "memory-large", label))

    if not options.quick:
        _stage("daemon memory at rest, packaged market")
        async with running_simulator("--packaged") as small:
            label = f"packaged market ({small.summary['hostnodes']} hostnodes)"
            measures.extend(await measure_memory(small, folder / "memory-small", label))

    _stage("price history with the tick's snapshot in memory")
    measures.extend(history_rows)
    measures.extend(
        await measure_history_with_snapshot(
            history_database, timings.snapshot, options.history_repeats
        )
    )
    return measures


def machine_line() -> str:
    cpu = "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.partition(":")[2].strip()
                break
    return (
        f"{os.cpu_count()} CPUs ({cpu}), Python {platform.python_version()}, "
        f"{platform.system()} {platform.release()}"
    )


def main(argv: list[str]) -> int:
    options = parse_options(argv)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tdbot-bench-") as folder:
        measures = asyncio.run(run_stages(options, Path(folder)))
    _stage("tdbot --help")
    measures.extend(measure_startup(options.help_runs))

    mode = "quick" if options.quick else "full"
    elapsed = time.perf_counter() - started
    title = f"tdbot benchmark ({mode} run, {elapsed:.0f} s) on {machine_line()}"
    print_table(title, measures, sys.stdout)
    failed = [measure.name.strip() for measure in measures if measure.passed is False]
    if failed:
        print(f"FAIL: {', '.join(failed)}")
        return 1
    print("All budgets met.")
    return 0
