"""Start `bench.simserver` as a child process and talk to its control routes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from bench.simserver import ENV_API_KEY, ENV_API_TOKEN

REPO_ROOT = Path(__file__).resolve().parent.parent
# Building 5,000 hostnodes takes about a second; allow for a slow or busy machine.
START_TIMEOUT_SECONDS = 120.0
STOP_TIMEOUT_SECONDS = 10.0


@dataclass
class RequestLog:
    """Request counts and arrival times since the simulator's last reset."""

    total: int
    by_endpoint: dict[str, int]
    arrivals: list[tuple[float, str]]
    now: float

    def arrivals_of(self, endpoint: str, after: float = float("-inf")) -> list[float]:
        """Arrival times of `endpoint` requests later than `after` (simulator clock)."""
        return [at for at, name in self.arrivals if name == endpoint and at > after]


@dataclass
class SimulatorProcess:
    """A running simulator child process; `api_url` is its v0 base URL."""

    process: asyncio.subprocess.Process
    root_url: str
    api_url: str
    api_key: str
    api_token: str
    summary: dict[str, Any]
    http: httpx.AsyncClient

    @property
    def pid(self) -> int:
        return self.process.pid

    async def requests(self) -> RequestLog:
        response = await self.http.get(f"{self.root_url}/_bench/requests")
        response.raise_for_status()
        body = response.json()
        arrivals = [(float(at), str(name)) for at, name in body["arrivals"]]
        return RequestLog(body["total"], body["by_endpoint"], arrivals, body["now"])

    async def reset(self) -> None:
        response = await self.http.post(f"{self.root_url}/_bench/reset")
        response.raise_for_status()

    async def outbid(self, vm_id: str) -> float:
        """Outbid a spot VM and return the moment it happened (simulator clock)."""
        response = await self.http.post(f"{self.root_url}/_bench/outbid", params={"vm_id": vm_id})
        response.raise_for_status()
        return float(response.json()["at"])

    async def vm_status(self, vm_id: str) -> str:
        response = await self.http.get(f"{self.root_url}/_bench/vm", params={"vm_id": vm_id})
        response.raise_for_status()
        return str(response.json()["status"])


@contextlib.asynccontextmanager
async def running_simulator(*args: str) -> AsyncIterator[SimulatorProcess]:
    """Start the simulator with `bench.simserver` arguments and stop it on exit."""
    api_key, api_token = secrets.token_hex(16), secrets.token_hex(16)
    env = dict(os.environ)
    env.update({ENV_API_KEY: api_key, ENV_API_TOKEN: api_token, "PYTHONPATH": str(REPO_ROOT)})
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.simserver",
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        env=env,
        cwd=REPO_ROOT,
    )
    try:
        start_line = await _read_start_line(process)
        async with httpx.AsyncClient(timeout=30) as http:
            yield SimulatorProcess(
                process=process,
                root_url=start_line["root_url"],
                api_url=start_line["api_url"],
                api_key=api_key,
                api_token=api_token,
                summary=start_line["summary"],
                http=http,
            )
    finally:
        await _stop(process)


async def _read_start_line(process: asyncio.subprocess.Process) -> dict[str, Any]:
    assert process.stdout is not None
    try:
        line = await asyncio.wait_for(process.stdout.readline(), START_TIMEOUT_SECONDS)
    except TimeoutError:
        raise RuntimeError(
            f"the benchmark simulator did not start within {START_TIMEOUT_SECONDS:.0f} s"
        ) from None
    if not line:
        raise RuntimeError(
            f"the benchmark simulator exited with code {await process.wait()} before it served"
        )
    start_line: dict[str, Any] = json.loads(line)
    return start_line


async def _stop(process: asyncio.subprocess.Process) -> None:
    """Close the child's standard input, then terminate it if it does not exit."""
    if process.stdin is not None:
        process.stdin.close()
    try:
        await asyncio.wait_for(process.wait(), STOP_TIMEOUT_SECONDS)
        return
    except TimeoutError:
        process.terminate()
    try:
        await asyncio.wait_for(process.wait(), STOP_TIMEOUT_SECONDS)
    except TimeoutError:
        process.kill()
        await process.wait()
