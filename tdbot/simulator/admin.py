"""Admin endpoints under `/_sim/` that steer a running simulator (JSON in and out).

    GET    /_sim/state                     market state, events and pending faults
    POST   /_sim/clock/advance             {"seconds": n}
    POST   /_sim/clock/scale               {"time_scale": x}
    POST   /_sim/balance                   {"set_usd": x} or {"add_usd": x}
    POST   /_sim/spot-price                {"hostnode_id", "gpu_model", "usd_per_gpu_hour"}
    POST   /_sim/faults                    {"endpoint", "mode", "count", "delay_seconds"}
    DELETE /_sim/faults                    drop every pending fault
    GET    /_sim/vms/{vm_id}/activity      activity readings of a VM
    POST   /_sim/vms/{vm_id}/activity      {"gpu_util_percent", "gpu_memory_mb", ...}

They need no credentials, which is safe only because the server listens on loopback.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from datetime import timedelta
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tdbot.simulator.errors import SimApiError, bad_request
from tdbot.simulator.market import SimulatedMarket

AdminHandler = Callable[[SimulatedMarket, Request, dict[str, Any]], dict[str, Any]]


def _json(status_code: int, body: Mapping[str, Any]) -> Response:
    content = json.dumps(body, sort_keys=True).encode()
    return Response(content, status_code=status_code, media_type="application/json")


async def _read_json(request: Request) -> dict[str, Any]:
    body = await request.body()
    if not body:
        return {}
    try:
        value = json.loads(body)
    except ValueError:
        raise bad_request("Request body is not valid JSON") from None
    if not isinstance(value, dict):
        raise bad_request("Request body must be a JSON object")
    return value


def _number(payload: Mapping[str, Any], name: str) -> float:
    value = payload.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise bad_request(f"Field {name!r} must be a number, got {value!r}")
    return float(value)


def _text(payload: Mapping[str, Any], name: str) -> str:
    value = payload.get(name)
    if not isinstance(value, str) or not value:
        raise bad_request(f"Field {name!r} must be a non-empty string, got {value!r}")
    return value


def show_state(
    market: SimulatedMarket, request: Request, payload: dict[str, Any]
) -> dict[str, Any]:
    return market.state()


def advance_clock(
    market: SimulatedMarket, request: Request, payload: dict[str, Any]
) -> dict[str, Any]:
    seconds = _number(payload, "seconds")
    if seconds < 0:
        raise bad_request(f"Field 'seconds' must be 0 or more, got {seconds}")
    moment = market.advance(timedelta(seconds=seconds))
    return {"now": moment.isoformat(), "success": True}


def scale_clock(
    market: SimulatedMarket, request: Request, payload: dict[str, Any]
) -> dict[str, Any]:
    scale = _number(payload, "time_scale")
    if scale < 0:
        raise bad_request(f"Field 'time_scale' must be 0 or more, got {scale}")
    market.settle()
    market.clock.time_scale = scale
    return {"success": True, "time_scale": scale}


def change_balance(
    market: SimulatedMarket, request: Request, payload: dict[str, Any]
) -> dict[str, Any]:
    if "set_usd" in payload:
        market.set_balance(_number(payload, "set_usd"))
    elif "add_usd" in payload:
        market.add_balance(_number(payload, "add_usd"))
    else:
        raise bad_request("Send either 'set_usd' or 'add_usd'")
    return market.balance()


def set_spot_price(
    market: SimulatedMarket, request: Request, payload: dict[str, Any]
) -> dict[str, Any]:
    market.set_spot_price(
        _text(payload, "hostnode_id"),
        _text(payload, "gpu_model"),
        _number(payload, "usd_per_gpu_hour"),
    )
    return {"success": True}


def add_fault(market: SimulatedMarket, request: Request, payload: dict[str, Any]) -> dict[str, Any]:
    count = payload.get("count", 1)
    if isinstance(count, bool) or not isinstance(count, int):
        raise bad_request(f"Field 'count' must be a whole number, got {count!r}")
    delay = _number(payload, "delay_seconds") if "delay_seconds" in payload else 30.0
    try:
        rule = market.inject_fault(
            _text(payload, "endpoint"), _text(payload, "mode"), count, delay_seconds=delay
        )
    except ValueError as error:
        raise bad_request(str(error)) from None
    return {"fault": rule.to_json(), "success": True}


def clear_faults(
    market: SimulatedMarket, request: Request, payload: dict[str, Any]
) -> dict[str, Any]:
    market.faults.clear()
    return {"success": True}


def show_activity(
    market: SimulatedMarket, request: Request, payload: dict[str, Any]
) -> dict[str, Any]:
    vm_id = request.path_params["vm_id"]
    vm = market.vm(vm_id)
    return {"activity": vm.activity.to_json(), "status": vm.status.value, "success": True}


def set_activity(
    market: SimulatedMarket, request: Request, payload: dict[str, Any]
) -> dict[str, Any]:
    activity = market.set_activity(request.path_params["vm_id"], **payload)
    return {"activity": activity.to_json(), "success": True}


def _route(market: SimulatedMarket, path: str, handler: AdminHandler, method: str) -> Route:
    async def serve(request: Request) -> Response:
        try:
            payload = await _read_json(request)
            return _json(200, handler(market, request, payload))
        except SimApiError as error:
            return _json(error.status_code, {"error": error.message, "success": False})

    endpoint: Callable[[Request], Awaitable[Response]] = serve
    return Route(path, endpoint, methods=[method])


def admin_routes(market: SimulatedMarket) -> list[Route]:
    """Routes to mount at `/_sim`."""
    table: list[tuple[str, AdminHandler, str]] = [
        ("/state", show_state, "GET"),
        ("/clock/advance", advance_clock, "POST"),
        ("/clock/scale", scale_clock, "POST"),
        ("/balance", change_balance, "POST"),
        ("/spot-price", set_spot_price, "POST"),
        ("/faults", add_fault, "POST"),
        ("/faults", clear_faults, "DELETE"),
        ("/vms/{vm_id}/activity", show_activity, "GET"),
        ("/vms/{vm_id}/activity", set_activity, "POST"),
    ]
    return [_route(market, path, handler, method) for path, handler, method in table]
