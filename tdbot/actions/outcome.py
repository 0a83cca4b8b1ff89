"""Outcome of one decision the executor handled."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from tdbot.evaluation.model import Decision


class OutcomeStatus(StrEnum):
    """End state of a decision: carried out and verified, only recorded, or not carried out."""

    DONE = "done"
    DRY_RUN = "dry_run"
    # Not sent: a guard blocked it, or no hostnode accepted a spot bid within the limit.
    BLOCKED = "blocked"
    FAILED = "failed"
    UNKNOWN = "unknown"
    AWAITING_CONFIRMATION = "awaiting_confirmation"


@dataclass(frozen=True)
class ActionOutcome:
    """The outcome of one decision; `action_id` is its journal row, if one was written."""

    decision: Decision
    action_id: int | None
    status: OutcomeStatus
    message: str
