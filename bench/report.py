"""Rows of the benchmark table and how they are printed."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TextIO


@dataclass(frozen=True)
class Measure:
    """One row: a measured value and, when a budget applies, whether it was met.

    `passed` is None for rows that only give context, such as a time breakdown.
    """

    name: str
    value: str
    budget: str = ""
    passed: bool | None = None

    @property
    def verdict(self) -> str:
        if self.passed is None:
            return "info"
        return "PASS" if self.passed else "FAIL"


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def ms(seconds: float) -> str:
    """Format seconds as milliseconds with a precision that suits the size."""
    value = seconds * 1000
    if value < 10:
        return f"{value:.2f} ms"
    if value < 100:
        return f"{value:.1f} ms"
    return f"{value:.0f} ms"


def print_table(title: str, measures: Sequence[Measure], out: TextIO) -> None:
    """Print the measures as a table; a FAIL row is shown in bold red."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in ("measure", "value", "budget", "result"):
        table.add_column(column, overflow="fold")
    for measure in measures:
        style = {"PASS": "green", "FAIL": "bold red"}.get(measure.verdict, "dim")
        table.add_row(
            measure.name,
            measure.value,
            measure.budget,
            f"[{style}]{measure.verdict}[/{style}]",
        )
    Console(file=out, width=140).print(table)
