"""Print what one evaluation pass decided, for `tdbot check`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TextIO

from tdbot.daemon.engine import TickResult
from tdbot.evaluation.model import Decision


def print_plan(results: Sequence[TickResult], out: TextIO) -> int:
    """Write each rule's decisions and what would be done; return 1 if a rule failed."""
    failed = 0
    for result in results:
        out.write(f"rule {result.rule}:\n")
        if result.skipped:
            out.write(f"  skipped: {result.skipped}\n")
            continue
        if result.error:
            failed += 1
            out.write(f"  FAILED: {result.error}\n")
            continue
        if not result.decisions:
            out.write("  nothing to do\n")
        for decision in result.decisions:
            out.write(f"  {describe_decision(decision)}\n")
        for outcome in result.outcomes:
            out.write(f"    -> {outcome.status}: {outcome.message}\n")

    total = sum(len(result.decisions) for result in results)
    out.write(
        f"\n{len(results)} rules checked, {total} decisions, {failed} failed. "
        "Nothing was changed (dry run).\n"
    )
    return 1 if failed else 0


def describe_decision(decision: Decision) -> str:
    """Return "Kind subject: summary" for one decision."""
    return f"{type(decision).__name__} {decision.subject}: {decision.summary}"
