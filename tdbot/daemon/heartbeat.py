"""HTTP endpoint where an agent on a VM pushes its activity for idle detection.

    POST /v1/heartbeat
    Authorization: Bearer <TDBOT_HEARTBEAT_TOKEN>
    {"vm_id": "...", "gpu_util_percent": 3, "gpu_memory_mb": 120,
     "cpu_load": 0.1, "network_kbps": 4, "error": null}

The sample is stamped with the daemon's clock when it arrives, not with the VM's
own clock, so a VM whose clock is wrong cannot make old activity look new.
"""

from __future__ import annotations

import hmac
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tdbot.clock import Clock
from tdbot.evaluation.model import IdleSample

logger = logging.getLogger("tdbot.daemon.heartbeat")

SampleSink = Callable[[IdleSample], Awaitable[None]]
METRICS = ("gpu_util_percent", "gpu_memory_mb", "cpu_load", "network_kbps")
MAX_BODY_BYTES = 4096


class HeartbeatError(ValueError):
    """A heartbeat body that cannot be stored; the message names the field."""


def create_heartbeat_app(sink: SampleSink, clock: Clock, token: str | None) -> Starlette:
    """Build the ASGI app; with no token configured every heartbeat is rejected."""

    async def receive(request: Request) -> JSONResponse:
        if not _authorized(request, token):
            logger.warning("heartbeat rejected from %s: bad or missing token", _peer(request))
            return JSONResponse({"ok": False, "error": "invalid or missing bearer token"}, 401)

        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            return JSONResponse({"ok": False, "error": "body larger than 4096 bytes"}, 413)
        try:
            sample = parse_heartbeat(await request.json(), clock)
        except (HeartbeatError, ValueError) as error:
            return JSONResponse({"ok": False, "error": str(error)}, 400)

        await sink(sample)
        logger.debug("heartbeat stored for VM %s", sample.vm_id)
        return JSONResponse({"ok": True})

    return Starlette(routes=[Route("/v1/heartbeat", receive, methods=["POST"])])


def parse_heartbeat(payload: Any, clock: Clock) -> IdleSample:
    """Validate a heartbeat body and turn it into a sample stamped with `clock`."""
    if not isinstance(payload, dict):
        raise HeartbeatError("body must be a JSON object with vm_id and metrics")
    vm_id = payload.get("vm_id")
    if not isinstance(vm_id, str) or not vm_id:
        raise HeartbeatError("vm_id is missing; send the VM's UUID as a string")
    unknown = set(payload) - {"vm_id", "error", *METRICS}
    if unknown:
        raise HeartbeatError(f"unknown fields {sorted(unknown)}; valid metrics are {METRICS}")

    metrics: dict[str, float | None] = {}
    for name in METRICS:
        metrics[name] = _metric(payload, name)
    error = payload.get("error")
    if error is not None and not isinstance(error, str):
        raise HeartbeatError("error must be a string describing why a metric failed")
    return IdleSample(vm_id=vm_id, at=clock.now(), source="heartbeat", error=error, **metrics)


def _metric(payload: dict[str, Any], name: str) -> float | None:
    value = payload.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise HeartbeatError(f"{name} must be a finite number, got {value!r}")
    if value < 0:
        raise HeartbeatError(f"{name} must not be negative, got {value}")
    return float(value)


def _authorized(request: Request, token: str | None) -> bool:
    if not token:
        return False
    header = request.headers.get("authorization", "")
    scheme, _, presented = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(presented.strip(), token)


def _peer(request: Request) -> str:
    return request.client.host if request.client else "unknown"
