"""The Starlette app that serves a `SimulatedMarket` as the TensorDock v0 API.

Paths, methods, form fields and responses follow the v0 marketplace API, so any v0
client can talk to it unchanged: POST with form fields for authenticated endpoints,
GET for hostnodes and container replicas, `{"success": false, "error": ...}` on
failure. Admin endpoints under `/_sim/` (JSON) steer the simulation; see `admin.py`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from email.parser import BytesParser
from email.policy import HTTP
from typing import Any
from urllib.parse import parse_qsl

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.types import Receive, Scope, Send

from tdbot.simulator.admin import admin_routes
from tdbot.simulator.billing import parse_period
from tdbot.simulator.containers import parse_container_form
from tdbot.simulator.errors import SimApiError, bad_request
from tdbot.simulator.faults import FaultMode, FaultRule
from tdbot.simulator.forms import (
    Form,
    optional_text,
    parse_bool,
    parse_deploy_form,
    parse_modify_form,
    parse_shape,
    required_float,
    required_int,
    required_text,
)
from tdbot.simulator.market import SimulatedMarket

logger = logging.getLogger("tdbot.simulator.app")

API_PREFIX = "/api/v0"

BAD_GATEWAY_PAGE = """<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><title>502 Bad Gateway</title></head>
<body>
<h1>502 Bad Gateway</h1>
<p>The upstream server returned an invalid response. Please try again in a few moments.</p>
<hr><small>nginx</small>
</body>
</html>
"""


@dataclass(frozen=True)
class ApiRequest:
    """Fields of a request: query parameters overlaid by form fields, and path values."""

    fields: Form
    path: Mapping[str, str]


Handler = Callable[[SimulatedMarket, ApiRequest], dict[str, Any]]


@dataclass(frozen=True)
class Endpoint:
    """One v0 endpoint: its path under /api/v0, method, handler and whether it needs auth."""

    path: str
    method: str
    handler: Handler
    authenticated: bool = True

    @property
    def name(self) -> str:
        """The endpoint as fault injection names it, such as "client/deploy/single"."""
        return self.path.strip("/")


# --- handlers --------------------------------------------------------------------------


def _ok(**values: Any) -> dict[str, Any]:
    return {"success": True, **values}


def auth_test(market: SimulatedMarket, request: ApiRequest) -> dict[str, Any]:
    return _ok()


def auth_list(market: SimulatedMarket, request: ApiRequest) -> dict[str, Any]:
    return _ok(authorizations=market.authorizations())


def list_hostnodes(market: SimulatedMarket, request: ApiRequest) -> dict[str, Any]:
    return _ok(hostnodes=market.list_hostnodes(request.fields))


def get_hostnode(market: SimulatedMarket, request: ApiRequest) -> dict[str, Any]:
    return _ok(hostnode=market.hostnode_to_api(request.path["hostnode_id"]))


def deploy_single(market: SimulatedMarket, request: ApiRequest) -> dict[str, Any]:
    return market.deploy(parse_deploy_form(request.fields))


def validate_spot_new(market: SimulatedMarket, request: ApiRequest) -> dict[str, Any]:
    # A refused bid is {"success": false} without an "error" key, as the API sends it.
    shape = parse_shape(request.fields)
    bid = required_float(request.fields, "price")
    return {"success": market.validate_spot_new(shape, bid)}


def validate_spot_existing(market: SimulatedMarket, request: ApiRequest) -> dict[str, Any]:
    server = required_text(request.fields, "server")
    market.validate_spot_existing(server, required_float(request.fields, "price"))
    return _ok()


def list_vms(market: SimulatedMarket, request: ApiRequest) -> dict[str, Any]:
    return _ok(virtualmachines=market.list_vms())


def get_vm(market: SimulatedMarket, request: ApiRequest) -> dict[str, Any]:
    # The API sends the one VM under the plural key, as client/list names its map.
    return _ok(virtualmachines=market.vm_to_api(required_text(request.fields, "server")))


def start_vm(market: SimulatedMarket, request: ApiRequest) -> dict[str, Any]:
    market.start(required_text(request.fields, "server"))
    return _ok()


def stop_vm(market: SimulatedMarket, request: ApiRequest) -> dict[str, Any]:
    release = parse_bool(request.fields, "disassociate_resources", default=False)
    market.stop(required_text(request.fields, "server"), release=release)
    return _ok()


def modify_vm(market: SimulatedMarket, request: ApiRequest) -> dict[str, Any]:
    return market.modify(parse_modify_form(request.fields))


def delete_vm(market: SimulatedMarket, request: ApiRequest) -> dict[str, Any]:
    market.delete(required_text(request.fields, "server"))
    return _ok()


def balance(market: SimulatedMarket, request: ApiRequest) -> dict[str, Any]:
    return market.balance()


def revenue(market: SimulatedMarket, request: ApiRequest) -> dict[str, Any]:
    return market.revenue(optional_text(request.fields, "hostnode_id"))


def summary(market: SimulatedMarket, request: ApiRequest) -> dict[str, Any]:
    text = required_text(request.fields, "period")
    period = parse_period(text)
    if period is None:
        raise bad_request(f"Invalid period: {text!r}, expected YYYY-MM")
    return market.summary(period)


def deploy_container(market: SimulatedMarket, request: ApiRequest) -> dict[str, Any]:
    spec, replicas = parse_container_form(request.fields)
    market.deploy_container(spec, replicas)
    return _ok()


def scale_container(market: SimulatedMarket, request: ApiRequest) -> dict[str, Any]:
    container_id = required_text(request.fields, "container_id")
    market.scale_container(container_id, required_int(request.fields, "replicas"))
    return _ok()


def stop_container(market: SimulatedMarket, request: ApiRequest) -> dict[str, Any]:
    market.stop_container(required_text(request.fields, "container_id"))
    return _ok()


def container_replicas(market: SimulatedMarket, request: ApiRequest) -> dict[str, Any]:
    container = market.container(request.path["container_id"])
    return {"result": [replica.to_api() for replica in container.replicas]}


ENDPOINTS = (
    Endpoint("auth/test", "POST", auth_test),
    Endpoint("auth/list", "POST", auth_list),
    Endpoint("client/deploy/hostnodes", "GET", list_hostnodes, authenticated=False),
    Endpoint("client/deploy/hostnodes/{hostnode_id}", "GET", get_hostnode, authenticated=False),
    Endpoint("client/deploy/single", "POST", deploy_single),
    Endpoint("client/spot/validate/new", "POST", validate_spot_new),
    Endpoint("client/spot/validate/existing", "POST", validate_spot_existing),
    Endpoint("client/list", "POST", list_vms),
    Endpoint("client/get/single", "POST", get_vm),
    Endpoint("client/start/single", "POST", start_vm),
    Endpoint("client/stop/single", "POST", stop_vm),
    Endpoint("client/modify/single", "POST", modify_vm),
    Endpoint("client/delete/single", "POST", delete_vm),
    Endpoint("billing/balance", "POST", balance),
    Endpoint("billing/revenue", "POST", revenue),
    Endpoint("billing/summary", "POST", summary),
    Endpoint("client/container/deploy", "POST", deploy_container),
    Endpoint("client/container/scale", "POST", scale_container),
    Endpoint("client/container/stop", "POST", stop_container),
    Endpoint("client/container/{container_id}/replicas", "GET", container_replicas),
)


# --- request and response plumbing ------------------------------------------------------


def json_response(status_code: int, body: Mapping[str, Any]) -> Response:
    # Keys are sorted, as the API's Flask-style jsonify sends them.
    content = json.dumps(body, sort_keys=True).encode()
    return Response(content, status_code=status_code, media_type="application/json")


def error_body(message: str) -> dict[str, Any]:
    return {"error": message, "success": False}


class CutConnectionResponse(Response):
    """Send the headers and a little of the body, then end the exchange unfinished.

    Uvicorn closes the connection when an app returns before completing its response,
    so the client sees the connection drop without a response.
    """

    def __init__(self) -> None:
        super().__init__(status_code=200, media_type="application/json")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = [(b"content-type", b"application/json"), (b"content-length", b"4096")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b'{"success"', "more_body": True})


async def read_fields(request: Request) -> dict[str, str]:
    """Read query parameters and form fields (URL-encoded or multipart) into one mapping."""
    fields = dict(request.query_params)
    body = await request.body()
    if not body:
        return fields
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        fields.update(_parse_multipart(content_type, body))
    else:
        text = body.decode("utf-8", errors="replace")
        fields.update(parse_qsl(text, keep_blank_values=True))
    return fields


def _parse_multipart(content_type: str, body: bytes) -> dict[str, str]:
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode()
    message = BytesParser(policy=HTTP).parsebytes(head + body)
    fields: dict[str, str] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True)
        if isinstance(name, str) and isinstance(payload, bytes):
            fields[name] = payload.decode("utf-8", errors="replace")
    return fields


def fault_response(rule: FaultRule, status_code: int, body: Mapping[str, Any]) -> Response:
    """Replace the real response with the one the fault calls for."""
    if rule.mode is FaultMode.HTTP_500:
        return json_response(500, error_body("Internal Server Error"))
    if rule.mode in (FaultMode.HTML_502, FaultMode.DROP_RESPONSE_502):
        return HTMLResponse(BAD_GATEWAY_PAGE, status_code=502)
    if rule.mode is FaultMode.TRUNCATED_JSON:
        content = json.dumps(body, sort_keys=True).encode()
        cut = content[: max(1, len(content) // 2)]
        return Response(cut, status_code=status_code, media_type="application/json")
    if rule.mode is FaultMode.DROP_RESPONSE:
        return CutConnectionResponse()
    return json_response(status_code, body)


def make_route(market: SimulatedMarket, endpoint: Endpoint) -> Route:
    async def serve(request: Request) -> Response:
        rule = market.faults.take(endpoint.name)
        if rule is not None:
            logger.info("simulator fault %s on %s", rule.mode.value, endpoint.name)
            if not rule.mode.carries_out:
                return fault_response(rule, 500, {})

        # Read the body before any delay: once the client has given up, uvicorn hands
        # the app a disconnect instead of the body, and a delayed request must still
        # be carried out then.
        fields = await read_fields(request)
        if rule is not None and rule.mode is FaultMode.DELAY:
            await asyncio.sleep(rule.delay_seconds)

        status_code, body = _carry_out(market, endpoint, ApiRequest(fields, request.path_params))
        if rule is not None:
            return fault_response(rule, status_code, body)
        return json_response(status_code, body)

    return Route(f"{API_PREFIX}/{endpoint.path}", serve, methods=[endpoint.method])


def _carry_out(
    market: SimulatedMarket, endpoint: Endpoint, request: ApiRequest
) -> tuple[int, dict[str, Any]]:
    fields = request.fields
    try:
        if endpoint.authenticated:
            market.check_credentials(fields.get("api_key"), fields.get("api_token"))
        return 200, endpoint.handler(market, request)
    except SimApiError as error:
        logger.info(
            "simulator rejected %s with HTTP %d: %s",
            endpoint.name,
            error.status_code,
            error.message,
        )
        return error.status_code, error_body(error.message)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return json_response(exc.status_code, error_body(exc.detail))


ExceptionHandler = Callable[[Request, Exception], Awaitable[Response]]


def create_app(market: SimulatedMarket) -> Starlette:
    """Build the ASGI app serving `market` under /api/v0 and its admin under /_sim."""
    routes: list[BaseRoute] = [make_route(market, endpoint) for endpoint in ENDPOINTS]
    routes.append(Mount("/_sim", routes=admin_routes(market)))
    handlers: dict[Any, ExceptionHandler] = {HTTPException: _http_error}
    app = Starlette(routes=routes, exception_handlers=handlers)
    app.state.market = market
    return app
