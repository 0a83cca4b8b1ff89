"""Helpers shared by the rule kinds: the report for data that failed to load."""

from __future__ import annotations

from typing import Literal

from tdbot.evaluation.model import MarketSnapshot, Report

SnapshotPart = Literal["hostnodes", "vms", "balance"]

_PART_NAMES: dict[SnapshotPart, str] = {
    "hostnodes": "hostnode list",
    "vms": "VM list",
    "balance": "account balance",
}


def unknown_data_report(
    rule_name: str, part: SnapshotPart, snapshot: MarketSnapshot, subject: str, consequence: str
) -> Report:
    """Report that a part of the snapshot failed to load and what the rule did not decide.

    The evidence carries the stable reason "<part>_unknown", so the caller can send the
    report once per outage instead of once per tick.
    """
    name = _PART_NAMES[part]
    error = snapshot.errors.get(part)
    summary = f"The {name} failed to load, so {consequence}."
    if error:
        summary = f"The {name} failed to load ({error}), so {consequence}."
    return Report(
        rule=rule_name,
        subject=subject,
        summary=summary,
        evidence={
            "reason": f"{part}_unknown",
            "error": error,
            "taken_at": snapshot.taken_at.isoformat(),
        },
    )
