"""Where the daemon reads the time.

Evaluation never reads a clock; the daemon passes `now` in. Production uses the
system clock; the demo passes the simulator's accelerated clock instead, so the
whole daemon runs on simulated time.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Protocol


class Clock(Protocol):
    def now(self) -> datetime:
        """Return the current time, timezone-aware in UTC."""
        ...

    @property
    def time_scale(self) -> float:
        """Simulated seconds per real second: 1 for the system clock."""
        ...


class SystemClock:
    """The real wall clock in UTC."""

    def now(self) -> datetime:
        return datetime.now(UTC)

    @property
    def time_scale(self) -> float:
        return 1.0
