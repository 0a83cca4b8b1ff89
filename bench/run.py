"""Measure tdbot against its performance budgets: `python bench/run.py [--quick]`.

Prints one table of measures with their budgets and exits with 1 when a budget is
missed. docs/benchmarks.md explains each measure.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    # Run as a script, sys.path starts with this file's folder, whose module names
    # (report, settings, ...) could shadow others; import from the repository instead.
    if sys.path and Path(sys.path[0]).resolve() == REPO_ROOT / "bench":
        sys.path[0] = str(REPO_ROOT)
    elif str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    from bench.suite import main as run_suite

    return run_suite(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
