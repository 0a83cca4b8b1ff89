"""Start-up cost of the command line: `tdbot --help` wall time and what it imports."""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass

from bench.memory import tdbot_command
from bench.report import Measure, median, ms

# 0.1 s is the usual limit for a response to feel instantaneous (Jakob Nielsen,
# "Usability Engineering", 1993, chapter 5).
MAX_HELP_SECONDS = 0.1
# Packages that only the commands needing them may load.
HEAVY_PACKAGES = ("telegram", "sqlalchemy", "apscheduler", "uvicorn")
# Packages reported for context; loading them at start is slower, not forbidden.
WATCHED_PACKAGES = ("sqlmodel", "httpx", "pydantic", "starlette", "rich", "asyncio")
RUN_HELP = "import sys; sys.argv = ['tdbot', '--help']; from tdbot.cli import main; main()"


@dataclass(frozen=True)
class ImportLine:
    """One line of `python -X importtime`: nesting depth, module and cumulative time."""

    depth: int
    module: str
    cumulative_us: int


def time_help(runs: int) -> float:
    """Median wall time of `tdbot --help` over `runs` runs, after one warm-up run."""
    command = [tdbot_command(), "--help"]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)  # noqa: S603
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)  # noqa: S603
        times.append(time.perf_counter() - started)
    return median(times)


def import_lines() -> list[ImportLine]:
    """Run `tdbot --help` in-process under `-X importtime` and parse what it imported."""
    result = subprocess.run(  # noqa: S603
        [sys.executable, "-X", "importtime", "-c", RUN_HELP],
        check=True,
        capture_output=True,
        text=True,
    )
    lines = []
    for line in result.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _, cumulative, name = line.removeprefix("import time:").split("|")
        depth = (len(name) - len(name.lstrip(" ")) - 1) // 2
        lines.append(ImportLine(depth, name.strip(), int(cumulative)))
    return lines


def measure_startup(runs: int) -> list[Measure]:
    help_seconds = time_help(runs)
    lines = import_lines()
    loaded = {line.module.split(".")[0] for line in lines}
    heavy = [name for name in HEAVY_PACKAGES if name in loaded]
    watched = [name for name in WATCHED_PACKAGES if name in loaded]
    root = next((line for line in lines if line.module == "tdbot.cli"), None)
    children = sorted(
        (line for line in lines if line.depth == 1), key=lambda line: -line.cumulative_us
    )[:3]
    breakdown = ", ".join(f"{line.module} {ms(line.cumulative_us / 1e6)}" for line in children)
    total = "not imported" if root is None else ms(root.cumulative_us / 1e6)
    return [
        Measure(
            "tdbot --help wall time",
            f"{ms(help_seconds)} (median of {runs})",
            f"< {ms(MAX_HELP_SECONDS)}",
            help_seconds < MAX_HELP_SECONDS,
        ),
        Measure(
            "heavy packages imported by tdbot --help",
            ", ".join(heavy) or "none",
            f"none of {', '.join(HEAVY_PACKAGES)}",
            not heavy,
        ),
        Measure("  other packages it imports", ", ".join(watched) or "none of the watched ones"),
        Measure("  import of tdbot.cli under -X importtime", f"{total} ({breakdown})"),
    ]
