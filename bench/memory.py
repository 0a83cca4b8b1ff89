"""Resident memory of `tdbot run` at rest, after every example rule has ticked once.

The daemon runs as its own process, started with the console script, in dry-run
mode, with the repository's `rules/` folder, against the benchmark simulator. Its
resident set size (VmRSS) and peak (VmHWM) are read from /proc, which is Linux only.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import signal
import sqlite3
import sys
import time
from pathlib import Path

from bench.report import Measure
from bench.settings import API_TIMEOUT_SECONDS
from bench.simprocess import REPO_ROOT, SimulatorProcess

MAX_RSS_MIB = 100.0
START_TIMEOUT_SECONDS = 60.0
# Above the daemon's default shutdown_timeout of 30 s, so a slow stop is still measured.
STOP_TIMEOUT_SECONDS = 40.0


def tdbot_command() -> str:
    """Find the `tdbot` console script of this interpreter's environment."""
    beside = Path(sys.executable).parent / "tdbot"
    if beside.exists():
        return str(beside)
    found = shutil.which("tdbot")
    if found is None:
        raise RuntimeError("the tdbot command is not installed; run: pip install -e .")
    return found


def write_config(sim: SimulatorProcess, folder: Path) -> Path:
    """Write a configuration file and a copy of the example rules into `folder`."""
    rules = folder / "rules"
    shutil.copytree(REPO_ROOT / "rules", rules)
    config = folder / "config.toml"
    config.write_text(
        f"""[tensordock]
base_url = "{sim.api_url}"
timeout_seconds = {API_TIMEOUT_SECONDS}

[safety]
dry_run = true

[daemon]
rules_dir = "rules"
database = "memory.db"
log_level = "WARNING"

[heartbeat]
host = "127.0.0.1"
port = 0
""",
        encoding="utf-8",
    )
    return config


def prepare_folder(sim: SimulatorProcess, folder: Path) -> tuple[Path, int]:
    """Create `folder` with the configuration and rules; return the config and rule count."""
    folder.mkdir(parents=True)
    config = write_config(sim, folder)
    rule_count = len([path for path in (folder / "rules").iterdir() if path.is_file()])
    return config, rule_count


def _count_error_lines(log_path: Path) -> int:
    lines = log_path.read_text(encoding="utf-8", errors="replace").splitlines()
    return sum(" ERROR " in line for line in lines)


async def measure_memory(sim: SimulatorProcess, folder: Path, label: str) -> list[Measure]:
    """Start the daemon, wait for a tick of every rule, read its memory, then stop it."""
    config, rule_count = prepare_folder(sim, folder)
    env = dict(os.environ)
    env.update(
        {
            "TDBOT_API_KEY": sim.api_key,
            "TDBOT_API_TOKEN": sim.api_token,
            "TDBOT_HEARTBEAT_TOKEN": secrets.token_hex(16),
        }
    )
    log_path = folder / "daemon.log"
    with log_path.open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            tdbot_command(), "run", "--config", str(config), stdout=log, stderr=log, env=env
        )
        try:
            ticked = await _wait_for_runs(folder / "memory.db", rule_count, process)
            # At rest means after the daemon released the tick's snapshot, which it does
            # once the snapshot is older than snapshot_max_age (5 s by default).
            await asyncio.sleep(8)
            rss, peak = _memory_mb(process.pid)
            stopped_in, code = await _stop(process)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()

    errors = _count_error_lines(log_path)
    return [
        Measure(
            f"daemon RSS at rest, {label}",
            f"{rss:.1f} MiB" if ticked else f"{rss:.1f} MiB (rules had not all ticked)",
            f"< {MAX_RSS_MIB:.0f} MiB",
            ticked and rss < MAX_RSS_MIB,
        ),
        Measure(f"  peak RSS (VmHWM), {label}", f"{peak:.1f} MiB"),
        Measure(
            f"  SIGTERM to exit, {label}",
            f"{stopped_in:.1f} s, exit code {code}; {errors} ERROR log lines",
        ),
    ]


async def _wait_for_runs(database: Path, count: int, process: asyncio.subprocess.Process) -> bool:
    """Wait until `count` rule runs have finished; False on timeout or early exit."""
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while time.monotonic() < deadline and process.returncode is None:
        if _finished_runs(database) >= count:
            return True
        await asyncio.sleep(0.5)
    return False


def _finished_runs(database: Path) -> int:
    if not database.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as connection:
            row = connection.execute(
                "SELECT COUNT(DISTINCT rule) FROM rule_run WHERE finished_at IS NOT NULL"
            ).fetchone()
    except sqlite3.OperationalError:
        # The daemon has not created the table yet, or holds a write lock.
        return 0
    return int(row[0])


def _memory_mb(pid: int) -> tuple[float, float]:
    """Read VmRSS and VmHWM of a process from /proc, in MiB."""
    values: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            values[name] = int(rest.split()[0]) / 1024
    return values["VmRSS"], values["VmHWM"]


async def _stop(process: asyncio.subprocess.Process) -> tuple[float, int | None]:
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    try:
        code = await asyncio.wait_for(process.wait(), STOP_TIMEOUT_SECONDS)
    except TimeoutError:
        return time.monotonic() - started, None
    return time.monotonic() - started, code
