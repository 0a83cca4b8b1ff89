"""Simulated UTC time for the simulator, so tests and the demo can fast-forward."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta


class SimClock:
    """A UTC clock that runs at `time_scale` simulated seconds per real second.

    With `time_scale=0` the clock stands still until `advance()` moves it, which keeps
    tests deterministic. The real elapsed time is read from a monotonic clock, so a
    change of the machine's wall clock does not move simulated time.
    """

    def __init__(
        self,
        start: datetime | None = None,
        *,
        time_scale: float = 0.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if start is None:
            start = datetime.now(UTC).replace(microsecond=0)
        if start.tzinfo is None:
            raise ValueError("SimClock start must be timezone-aware, got a naive datetime")
        _check_scale(time_scale)
        self._monotonic = monotonic
        self._anchor_sim = start.astimezone(UTC)
        self._anchor_real = monotonic()
        self._time_scale = time_scale

    def now(self) -> datetime:
        """Return the current simulated time as an aware UTC datetime."""
        real_elapsed = self._monotonic() - self._anchor_real
        return self._anchor_sim + timedelta(seconds=real_elapsed * self._time_scale)

    def advance(self, delta: timedelta) -> datetime:
        """Move simulated time forward by `delta` and return the new time."""
        if delta < timedelta(0):
            raise ValueError(f"SimClock cannot go backwards, got a delta of {delta}")
        self._reanchor()
        self._anchor_sim += delta
        return self._anchor_sim

    @property
    def time_scale(self) -> float:
        """Simulated seconds per real second; 0 means frozen until advanced."""
        return self._time_scale

    @time_scale.setter
    def time_scale(self, value: float) -> None:
        _check_scale(value)
        self._reanchor()
        self._time_scale = value

    def _reanchor(self) -> None:
        # Fold the time run so far into the anchor, so that a new scale or an advance
        # applies from this moment on and never rewrites the past.
        self._anchor_sim = self.now()
        self._anchor_real = self._monotonic()


def _check_scale(value: float) -> None:
    if value < 0:
        raise ValueError(f"time_scale must be 0 or more simulated seconds per second, got {value}")
