"""Serve an ASGI app with uvicorn inside the running event loop.

The simulator, the heartbeat endpoint and the test servers all use this, so each
one starts on a chosen or free port, reports the port it got, and stops cleanly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import uvicorn

logger = logging.getLogger("tdbot.asgi")


@dataclass
class RunningServer:
    """A uvicorn server started by `start_server`; `url` is its root, such as http://127.0.0.1:8787."""

    host: str
    port: int
    server: uvicorn.Server
    task: asyncio.Task[None]

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def stop(self) -> None:
        """Stop accepting requests and wait for the server task; open requests get 1 s."""
        self.server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self.task

    async def wait(self) -> None:
        """Wait until the server stops."""
        await self.task


class _SignalFreeServer(uvicorn.Server):
    """A uvicorn server that leaves the process's SIGINT and SIGTERM handlers alone."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def start_server(
    app: Any,
    host: str,
    port: int,
    *,
    log_level: str = "warning",
    name: str = "asgi",
    handle_signals: bool = True,
) -> RunningServer:
    """Start serving `app`; port 0 picks a free port. Raises RuntimeError if it cannot bind.

    With `handle_signals`, uvicorn takes over SIGINT and SIGTERM while it serves and
    stops on them. A process that handles those signals itself, such as the daemon,
    passes False and stops the server with `RunningServer.stop`.
    """
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        lifespan="off",
        timeout_graceful_shutdown=1,
        access_log=False,
    )
    server = uvicorn.Server(config) if handle_signals else _SignalFreeServer(config)
    task = asyncio.create_task(server.serve(), name=name)
    while not server.started:
        if task.done():
            # uvicorn logs the bind error itself and exits the task without raising.
            with contextlib.suppress(SystemExit):
                await task
            raise RuntimeError(f"{name} server failed to start on {host}:{port}")
        await asyncio.sleep(0.01)
    bound_port = server.servers[0].sockets[0].getsockname()[1]
    return RunningServer(host, bound_port, server, task)


@contextlib.asynccontextmanager
async def serve_app(
    app: Any, host: str, port: int, *, name: str = "asgi", handle_signals: bool = True
) -> AsyncIterator[RunningServer]:
    """Serve `app` for the duration of the block."""
    running = await start_server(app, host, port, name=name, handle_signals=handle_signals)
    try:
        yield running
    finally:
        await running.stop()
