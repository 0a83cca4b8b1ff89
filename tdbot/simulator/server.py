"""Run the simulator over HTTP with uvicorn, on loopback unless `allow_remote` is set."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tdbot.asgi import RunningServer, start_server
from tdbot.simulator.app import API_PREFIX, create_app
from tdbot.simulator.clock import SimClock
from tdbot.simulator.hostnodes import load_packaged_marketplace
from tdbot.simulator.market import SimulatedMarket
from tdbot.simulator.vms import SimVm

__all__ = ["SimulatorServer", "load_packaged_marketplace", "run_simulator", "serve"]

logger = logging.getLogger("tdbot.simulator.server")

# Uvicorn logs this error when an app ends a response early. The drop_response fault
# does that on purpose to close the connection, so the line is noise there.
_UNFINISHED_RESPONSE = "ASGI callable returned without completing response."


class _DroppedResponseFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != _UNFINISHED_RESPONSE


def check_host(host: str, *, allow_remote: bool) -> None:
    """Reject a listening address other than loopback unless `allow_remote` is set."""
    if allow_remote or host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(
            f"refusing to listen on {host!r}: the simulator accepts any request from anyone "
            "who can reach it; use 127.0.0.1, or pass allow_remote=True on purpose"
        )


@dataclass
class SimulatorServer:
    """A simulator listening on a port; `api_url` is the v0 base URL for clients."""

    market: SimulatedMarket
    running: RunningServer
    _log_filter: logging.Filter

    @property
    def host(self) -> str:
        return self.running.host

    @property
    def port(self) -> int:
        return self.running.port

    @property
    def root_url(self) -> str:
        return self.running.url

    @property
    def api_url(self) -> str:
        return f"{self.root_url}{API_PREFIX}"

    @property
    def admin_url(self) -> str:
        return f"{self.root_url}/_sim"

    async def stop(self) -> None:
        """Stop serving and wait for the server task; open requests get one second."""
        await self.running.stop()
        logging.getLogger("uvicorn.error").removeFilter(self._log_filter)
        logger.info("simulator stopped on %s", self.root_url)

    async def wait(self) -> None:
        """Wait until the server stops, for example on Ctrl-C."""
        await self.running.wait()


async def serve(
    market: SimulatedMarket,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    allow_remote: bool = False,
    log_level: str = "warning",
) -> SimulatorServer:
    """Start serving `market` in the running event loop; port 0 picks a free port.

    Raises ValueError for a non-loopback host without `allow_remote`, and RuntimeError
    when the port cannot be bound.
    """
    check_host(host, allow_remote=allow_remote)
    log_filter = _DroppedResponseFilter()
    logging.getLogger("uvicorn.error").addFilter(log_filter)
    try:
        running = await start_server(
            create_app(market), host, port, log_level=log_level, name="tdbot-simulator"
        )
    except BaseException:
        logging.getLogger("uvicorn.error").removeFilter(log_filter)
        raise
    handle = SimulatorServer(market, running, log_filter)
    logger.info("simulator listening on %s", handle.root_url)
    return handle


def load_marketplace(path: Path | None) -> dict[str, Any]:
    """Load a marketplace file, or the packaged one when `path` is None."""
    if path is None:
        return load_packaged_marketplace()
    payload: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return payload


def run_simulator(
    host: str,
    port: int,
    marketplace_path: Path | None = None,
    api_key: str | None = None,
    api_token: str | None = None,
    time_scale: float = 1.0,
    *,
    allow_remote: bool = False,
    balance_usd: float = 100.0,
    seed_example_vms: bool = False,
) -> None:
    """Serve a fresh simulated market until interrupted (the `tdbot simulator` command).

    When no key and token are given, a random pair is generated and printed once to
    the terminal, the only place the simulator shows a credential.
    """
    check_host(host, allow_remote=allow_remote)
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
    generated = {
        name: secrets.token_hex(16)
        for name, given in (("api_key", api_key), ("api_token", api_token))
        if not given
    }
    market = SimulatedMarket.from_marketplace(
        load_marketplace(marketplace_path),
        clock=SimClock(time_scale=time_scale),
        api_key=api_key or generated["api_key"],
        api_token=api_token or generated["api_token"],
        balance_usd=balance_usd,
    )
    seeded = market.seed_example_vms() if seed_example_vms else []
    # Uvicorn shuts down on Ctrl-C and then raises the signal again; that ends the command.
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve_forever(market, host, port, allow_remote, generated, seeded))


async def _serve_forever(
    market: SimulatedMarket,
    host: str,
    port: int,
    allow_remote: bool,
    generated: dict[str, str],
    seeded: list[SimVm],
) -> None:
    server = await serve(market, host, port, allow_remote=allow_remote, log_level="info")
    print(f"TensorDock v0 simulator: {server.api_url}")
    print(f"Admin endpoints: {server.admin_url}/state")
    for name, value in generated.items():
        print(f"generated {name}: {value}")
    for vm in seeded:
        print(f"seeded VM {vm.name}: {vm.status.value}, id {vm.id}")
    await server.wait()
