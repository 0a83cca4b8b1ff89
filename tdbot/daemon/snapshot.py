"""One market snapshot per tick, shared by every rule that runs in that tick.

Rules that fire together call `SnapshotProvider.get()` at about the same moment; the
first call fetches hostnodes, VMs and the balance concurrently, and every call within
`max_age` of the end of that fetch reuses the result. So the number of API requests
per tick does not grow with the number of rules.

`max_age` must stay well under the shortest rule interval, or a rule would decide on
data from an earlier tick. For the same reason the snapshot is dropped as soon as an
action may have changed the account, and it is released after `max_age` so a large
market is not kept in memory between ticks.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any, TypeVar

from tdbot.clock import Clock
from tdbot.evaluation.model import MarketSnapshot
from tdbot.tensordock.client import TensorDockClient
from tdbot.tensordock.errors import TensorDockError

logger = logging.getLogger("tdbot.daemon.snapshot")

T = TypeVar("T")

# Which parts of the snapshot each rule kind reads; the others are not fetched for it.
PARTS_BY_KIND: dict[str, frozenset[str]] = {
    "cheapest_hostnode": frozenset({"hostnodes", "vms", "balance"}),
    "spot_rebid": frozenset({"vms", "balance", "hostnodes"}),
    "idle_stop": frozenset({"vms"}),
    "low_balance": frozenset({"balance", "vms"}),
}
ALL_PARTS = frozenset({"hostnodes", "vms", "balance"})


class SnapshotProvider:
    """Fetch and share market snapshots; parts that fail to load are None, never stale."""

    def __init__(
        self,
        client: TensorDockClient,
        clock: Clock,
        max_age: timedelta,
        parts: frozenset[str] = ALL_PARTS,
    ) -> None:
        self._client = client
        self._clock = clock
        self._max_age = max_age
        self._parts = parts
        self._lock = asyncio.Lock()
        self._latest: MarketSnapshot | None = None
        self._fetched_at: datetime | None = None
        self._release: asyncio.TimerHandle | None = None
        self.fetch_count = 0

    @property
    def parts(self) -> frozenset[str]:
        """The parts each snapshot fetches; a reload of the rules may change them."""
        return self._parts

    @parts.setter
    def parts(self, value: frozenset[str]) -> None:
        self._parts = value
        self.invalidate()

    def invalidate(self) -> None:
        """Forget the shared snapshot, so the next rule fetches a fresh one."""
        self._latest = None
        self._fetched_at = None
        if self._release is not None:
            self._release.cancel()
            self._release = None

    @classmethod
    def parts_for(cls, kinds: set[str]) -> frozenset[str]:
        """Return the snapshot parts that rules of these kinds read."""
        parts: frozenset[str] = frozenset()
        for kind in kinds:
            parts |= PARTS_BY_KIND.get(kind, ALL_PARTS)
        return parts

    async def get(self) -> MarketSnapshot:
        """Return the shared snapshot, fetching a new one if the last is too old."""
        async with self._lock:
            if self._latest is not None and self._is_fresh():
                return self._latest

            snapshot = await self._fetch(self._clock.now(), self._parts)
            self.invalidate()
            self._latest = snapshot
            self._fetched_at = self._clock.now()
            self._schedule_release()
            return snapshot

    def _is_fresh(self) -> bool:
        if self._fetched_at is None:
            return False
        return self._clock.now() - self._fetched_at < self._max_age

    def _schedule_release(self) -> None:
        # The snapshot is useless once older than max_age; releasing it then keeps a
        # market of thousands of hostnodes out of memory between ticks.
        delay = self._max_age.total_seconds() / max(self._clock.time_scale, 1e-9)
        loop = asyncio.get_running_loop()
        self._release = loop.call_later(delay, self.invalidate)

    async def _fetch(self, now: datetime, parts: frozenset[str]) -> MarketSnapshot:
        self.fetch_count += 1
        errors: dict[str, str] = {}
        calls: dict[str, Callable[[], Awaitable[Any]]] = {
            "hostnodes": self._client.list_hostnodes,
            "vms": self._client.list_vms,
            "balance": self._client.get_balance,
        }
        names = [name for name in calls if name in parts]
        results = await asyncio.gather(*(self._load(name, calls[name], errors) for name in names))
        loaded = dict(zip(names, results, strict=True))
        snapshot = MarketSnapshot(
            taken_at=now,
            hostnodes=loaded.get("hostnodes"),
            vms=loaded.get("vms"),
            balance=loaded.get("balance"),
            errors=errors,
        )
        logger.debug(
            "snapshot taken: %s hostnodes, %s VMs, balance %s, errors %s",
            _count(snapshot.hostnodes),
            _count(snapshot.vms),
            "known" if snapshot.balance else "unknown",
            sorted(errors) or "none",
        )
        return snapshot

    @staticmethod
    async def _load(
        name: str, call: Callable[[], Awaitable[T]], errors: dict[str, str]
    ) -> T | None:
        try:
            return await call()
        except TensorDockError as error:
            logger.warning("could not load %s for this tick: %s", name, error)
            errors[name] = str(error)
            return None


def _count(items: dict[str, Any] | None) -> str:
    return "?" if items is None else str(len(items))
