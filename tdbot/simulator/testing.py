"""Helpers for tests that need a simulator running on loopback.

market = make_test_market()
async with running_simulator(market) as sim:
    client = TensorDockClient(base_url=sim.api_url, api_key=TEST_API_KEY, ...)
    market.advance(timedelta(hours=1))
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

from tdbot.simulator.clock import SimClock
from tdbot.simulator.market import SimulatedMarket
from tdbot.simulator.server import SimulatorServer, serve

TEST_API_KEY = "simulator-test-key"
TEST_API_TOKEN = "simulator-test-token"  # noqa: S105 (a fake credential of the simulator)
TEST_START = datetime(2024, 11, 4, 12, 0, tzinfo=UTC)


def make_test_market(
    *,
    balance_usd: float = 100.0,
    start: datetime = TEST_START,
    **options: Any,
) -> SimulatedMarket:
    """Build a market from the packaged marketplace with a frozen clock and test credentials.

    The clock stays at `start` until `market.advance()` moves it, and VM ids
    come from a fixed seed, so a test sees the same values on every run.
    """
    options.setdefault("seed", 0)
    return SimulatedMarket.from_packaged(
        clock=SimClock(start, time_scale=0.0),
        api_key=TEST_API_KEY,
        api_token=TEST_API_TOKEN,
        balance_usd=balance_usd,
        **options,
    )


@asynccontextmanager
async def running_simulator(
    market: SimulatedMarket | None = None,
) -> AsyncIterator[SimulatorServer]:
    """Serve `market` (a fresh test market by default) on 127.0.0.1 for the block's length.

    The handle's `api_url` is the v0 base URL, `admin_url` the `/_sim` base URL.
    """
    server = await serve(market or make_test_market(), "127.0.0.1", 0)
    try:
        yield server
    finally:
        await server.stop()
