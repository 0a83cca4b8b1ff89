"""Print what one evaluation pass decided, for `tdbot check`."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, TextIO

from tdbot.daemon.engine import TickResult
from tdbot.evaluation.model import Decision


def print_plan(results: Sequence[TickResult], out: TextIO) -> int:
    """Write each rule's decisions and what would be done.

    Returns 1 when a rule failed or part of the account could not be read, else 0.
    """
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
            if decision.evidence:
                out.write(f"    evidence: {describe_evidence(decision.evidence)}\n")
        for outcome in result.outcomes:
            out.write(f"    -> {outcome.status}: {outcome.message}\n")

    data_errors: dict[str, str] = {}
    for result in results:
        data_errors.update(result.data_errors)
    for part, error in sorted(data_errors.items()):
        out.write(f"\nCould not load {part}: {error}\n")

    total = sum(len(result.decisions) for result in results)
    out.write(
        f"\n{len(results)} rules checked, {total} decisions, {failed} failed. "
        "Nothing was changed (dry run).\n"
    )
    if data_errors:
        out.write("The plan is incomplete because part of the account could not be read.\n")
    return 1 if failed or data_errors else 0


def describe_decision(decision: Decision) -> str:
    """Return "Kind subject: summary" for one decision."""
    return f"{type(decision).__name__} {decision.subject}: {decision.summary}"


# Long evidence values (lists of offers, sample series) are cut so the plan stays readable.
EVIDENCE_VALUE_CHARS = 120


def describe_evidence(evidence: dict[str, Any]) -> str:
    """Return the evidence as "key=value" pairs in one line, long values shortened."""
    pairs = []
    for key, value in evidence.items():
        text = json.dumps(value, default=str, separators=(",", ":"))
        if len(text) > EVIDENCE_VALUE_CHARS:
            text = text[: EVIDENCE_VALUE_CHARS - 3] + "..."
        pairs.append(f"{key}={text}")
    return ", ".join(pairs)
