"""Serve a synthetic market in its own process, counting every API request it receives.

The benchmark runs the simulator in a separate process so that the simulator's own
work (building 5,000 hostnodes into JSON) does not share an event loop or the GIL
with the daemon being measured, as a remote API would not.

`bench.simprocess.SimulatorProcess` starts it. It prints one JSON line with its URL
and the market's summary. Then it serves on 127.0.0.1 until its standard input
closes or it receives SIGTERM. Control routes under `/_bench/` read the request counters
and outbid the watched spot VM; the simulator's own `/_sim/` routes stay available.

python -m bench.simserver --hostnodes 5000 --vms 500 --seed 7
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import json
import os
import sys
import time
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from bench.synthetic import MarketSummary, build_market, outbid_vm
from tdbot.asgi import start_server
from tdbot.simulator.app import API_PREFIX, create_app
from tdbot.simulator.clock import SimClock
from tdbot.simulator.market import SimulatedMarket
from tdbot.simulator.server import check_host

HOST = "127.0.0.1"
ENV_API_KEY = "BENCH_SIM_API_KEY"
ENV_API_TOKEN = "BENCH_SIM_API_TOKEN"  # noqa: S105 (the name of a variable, not a secret)
# Arrival times kept per run; the benchmark sends a few hundred requests at most.
MAX_ARRIVALS = 100_000


class RequestCounter:
    """Counts of API requests by endpoint, and each request's arrival time.

    Times are `time.monotonic()` in this process, so the reaction-time measure
    compares them only with other times taken here.
    """

    def __init__(self) -> None:
        self.by_endpoint: collections.Counter[str] = collections.Counter()
        self.arrivals: collections.deque[tuple[float, str]] = collections.deque(maxlen=MAX_ARRIVALS)

    def record(self, endpoint: str) -> None:
        self.by_endpoint[endpoint] += 1
        self.arrivals.append((time.monotonic(), endpoint))

    def reset(self) -> None:
        self.by_endpoint.clear()
        self.arrivals.clear()

    def to_json(self) -> dict[str, Any]:
        return {
            "total": sum(self.by_endpoint.values()),
            "by_endpoint": dict(self.by_endpoint),
            "arrivals": list(self.arrivals),
            "now": time.monotonic(),
        }


class CountingMiddleware:
    """Count requests under the API prefix and serve the `/_bench/` control routes."""

    def __init__(self, app: ASGIApp, control: ASGIApp, counter: RequestCounter) -> None:
        self._app = app
        self._control = control
        self._counter = counter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if path.startswith("/_bench/"):
            await self._control(scope, receive, send)
            return
        if path.startswith(f"{API_PREFIX}/"):
            self._counter.record(path.removeprefix(f"{API_PREFIX}/"))
        await self._app(scope, receive, send)


def control_app(market: SimulatedMarket, counter: RequestCounter) -> Starlette:
    """Routes the benchmark uses to read counters and change the market."""

    async def requests(request: Request) -> JSONResponse:
        return JSONResponse(counter.to_json())

    async def reset(request: Request) -> JSONResponse:
        counter.reset()
        return JSONResponse({"reset_at": time.monotonic()})

    async def outbid(request: Request) -> JSONResponse:
        vm_id = request.query_params["vm_id"]
        minimum = outbid_vm(market, vm_id)
        return JSONResponse({"at": time.monotonic(), "vm_id": vm_id, "minimum_usd": minimum})

    async def vm_state(request: Request) -> JSONResponse:
        vm = market.vm(request.query_params["vm_id"])
        return JSONResponse({"status": vm.status.value, "bid_usd": vm.compute_price})

    return Starlette(
        routes=[
            Route("/_bench/requests", requests, methods=["GET"]),
            Route("/_bench/reset", reset, methods=["POST"]),
            Route("/_bench/outbid", outbid, methods=["POST"]),
            Route("/_bench/vm", vm_state, methods=["GET"]),
        ]
    )


def packaged_market(api_key: str, api_token: str) -> tuple[SimulatedMarket, MarketSummary]:
    """Build the packaged 41-hostnode market with its three example VMs."""
    market = SimulatedMarket.from_packaged(
        clock=SimClock(time_scale=1.0), api_key=api_key, api_token=api_token
    )
    vms = market.seed_example_vms()
    summary = MarketSummary(
        hostnodes=len(market.hostnodes),
        gpu_models=len({model for host in market.hostnodes.values() for model in host.gpus}),
        vms=len(vms),
        spot_vms=sum(vm.is_spot for vm in vms),
        outbid_vms=0,
        watched_vm_id="",
    )
    return market, summary


async def serve_until_closed(market: SimulatedMarket, summary: MarketSummary) -> None:
    """Serve, print the start line, and stop when standard input reaches its end."""
    check_host(HOST, allow_remote=False)
    counter = RequestCounter()
    app = CountingMiddleware(create_app(market), control_app(market, counter), counter)
    running = await start_server(app, HOST, 0, name="bench-simulator")
    start_line = {
        "root_url": running.url,
        "api_url": f"{running.url}{API_PREFIX}",
        "summary": dataclasses.asdict(summary),
    }
    print(json.dumps(start_line), flush=True)

    # The parent closes our standard input to stop us; uvicorn handles SIGTERM itself.
    closed = asyncio.create_task(_read_to_end_of_stdin())
    await asyncio.wait({closed, running.task}, return_when=asyncio.FIRST_COMPLETED)
    closed.cancel()
    await running.stop()


async def _read_to_end_of_stdin() -> None:
    reader = asyncio.StreamReader()
    loop = asyncio.get_running_loop()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while await reader.read(4096):
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hostnodes", type=int, default=5000)
    parser.add_argument("--vms", type=int, default=500)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--packaged", action="store_true", help="serve the packaged 41-hostnode market instead"
    )
    args = parser.parse_args()

    api_key, api_token = os.environ[ENV_API_KEY], os.environ[ENV_API_TOKEN]
    if args.packaged:
        market, summary = packaged_market(api_key, api_token)
    else:
        market, summary = build_market(
            args.hostnodes, args.vms, seed=args.seed, api_key=api_key, api_token=api_token
        )
    asyncio.run(serve_until_closed(market, summary))


if __name__ == "__main__":
    main()
