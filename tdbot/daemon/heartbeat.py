"""HTTP endpoint where an agent on a VM pushes its activity for idle detection.

    POST /v1/heartbeat
    Authorization: Bearer <the VM's agent token>
    {"vm_id": "...", "gpu_util_percent": 3, "gpu_memory_mb": 120,
     "cpu_load": 0.1, "network_kbps": 4, "processes": ["python train.py"], "error": null}

Each VM has its own token, HMAC-SHA256 of its id keyed with TDBOT_HEARTBEAT_TOKEN
(`agent_token`, printed by `tdbot agent-token VM_ID`). The endpoint accepts a body only
with the token of the body's own `vm_id`, so an agent can push for its VM and no
other, and the shared secret never leaves the daemon's host. No token table is kept.

The sample is stamped with the daemon's clock when it arrives, not with the VM's
own clock, so a VM whose clock is wrong cannot make old activity look new.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import time
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
FIELDS = ("vm_id", *METRICS, "processes", "error")
# Upper bounds of metrics that have one; every metric must be 0 or more.
METRIC_MAXIMUMS = {"gpu_util_percent": 100.0}
MAX_BODY_BYTES = 64 * 1024
# Limits of the process list: entries, and characters of one command line. The agent
# cuts longer command lines and leaves the list out when it would not fit.
MAX_PROCESSES = 1000
MAX_PROCESS_CHARS = 1024
REJECTION_LOG_INTERVAL_SECONDS = 60.0


class HeartbeatError(ValueError):
    """A heartbeat body that cannot be stored; the message names the field."""


class RejectionLog:
    """Warnings for heartbeats with a bad or missing token, rate-limited.

    The first rejection is logged at once. Later ones are counted and logged at most
    once per `interval_seconds` of `monotonic` time, with the count since the last
    warning, so an agent with a stale token cannot flood the log.
    """

    def __init__(
        self,
        monotonic: Callable[[], float] = time.monotonic,
        interval_seconds: float = REJECTION_LOG_INTERVAL_SECONDS,
    ) -> None:
        self._monotonic = monotonic
        self._interval_seconds = interval_seconds
        self._last_warning_at: float | None = None
        self._unlogged = 0

    def record(self, peer: str) -> None:
        """Count one rejection from `peer` and log a warning if one is due."""
        now = self._monotonic()
        self._unlogged += 1
        last = self._last_warning_at
        if last is not None and now - last < self._interval_seconds:
            return

        if last is None:
            logger.warning(
                "heartbeat rejected from %s: bad or missing token; further rejections "
                "are counted and logged at most once per %.0f s",
                peer,
                self._interval_seconds,
            )
        else:
            logger.warning(
                "heartbeat rejected from %s: bad or missing token; %d rejections since "
                "the previous warning",
                peer,
                self._unlogged,
            )
        self._last_warning_at = now
        self._unlogged = 0


class BodyTooLarge(Exception):
    """A request body longer than MAX_BODY_BYTES."""


def agent_token(secret: str, vm_id: str) -> str:
    """Return the token of one VM's agent: hex HMAC-SHA256 of `vm_id` keyed with `secret`."""
    return hmac.new(secret.encode(), vm_id.encode(), hashlib.sha256).hexdigest()


def create_heartbeat_app(
    sink: SampleSink,
    clock: Clock,
    token: str | None,
    *,
    monotonic: Callable[[], float] = time.monotonic,
) -> Starlette:
    """Build the ASGI app; with no token configured every heartbeat is rejected.

    `token` is the shared secret TDBOT_HEARTBEAT_TOKEN, from which each VM's agent token
    is derived. `monotonic` is the clock that rate-limits the warnings for rejected tokens.
    """
    rejections = RejectionLog(monotonic)

    def reject(request: Request) -> JSONResponse:
        rejections.record(_peer(request))
        return _error("invalid or missing bearer token for this vm_id", 401)

    async def receive(request: Request) -> JSONResponse:
        # 1. A bearer token must be present before the body is read at all.
        presented = _bearer_token(request)
        if not token or presented is None:
            return reject(request)

        # 2. Read the body within its limit, and find the VM whose token it needs.
        try:
            payload = json.loads((await _read_body(request)).decode("utf-8", errors="replace"))
            vm_id = parse_vm_id(payload)
        except BodyTooLarge:
            return _unauthenticated_error(request, f"body larger than {MAX_BODY_BYTES} bytes", 413)
        except ValueError as error:
            return _unauthenticated_error(request, str(error), 400)
        except RecursionError:
            return _unauthenticated_error(
                request, "body is nested too deeply to be a heartbeat", 400
            )

        # 3. Only that VM's own token is accepted, compared in constant time. Bytes,
        # because compare_digest rejects text that is not ASCII.
        expected = agent_token(token, vm_id).encode()
        if not hmac.compare_digest(presented.encode("utf-8", errors="replace"), expected):
            return reject(request)
        try:
            sample = parse_heartbeat(payload, clock)
        except HeartbeatError as error:
            # The agent is genuine but sends a reading the endpoint cannot store.
            logger.warning("heartbeat of VM %s rejected: %s", vm_id, error)
            return _error(str(error), 400)

        await sink(sample)
        logger.debug("heartbeat stored for VM %s", sample.vm_id)
        return JSONResponse({"ok": True})

    return Starlette(routes=[Route("/v1/heartbeat", receive, methods=["POST"])])


async def _read_body(request: Request) -> bytes:
    """Read the body, stopping with BodyTooLarge as soon as it passes MAX_BODY_BYTES."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise BodyTooLarge
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise BodyTooLarge
    return bytes(body)


def _error(message: str, status: int) -> JSONResponse:
    return JSONResponse({"ok": False, "error": message}, status)


def _unauthenticated_error(request: Request, message: str, status: int) -> JSONResponse:
    # Logged at DEBUG only, because anyone who can reach the port can send these.
    logger.debug("heartbeat from %s rejected before authentication: %s", _peer(request), message)
    return _error(message, status)


def parse_vm_id(payload: Any) -> str:
    """Return the body's `vm_id`, or raise HeartbeatError naming what is wrong."""
    if not isinstance(payload, dict):
        raise HeartbeatError("body must be a JSON object with vm_id and metrics")
    vm_id = payload.get("vm_id")
    if not isinstance(vm_id, str) or not vm_id:
        raise HeartbeatError("vm_id is missing; send the VM's UUID as a string")
    return vm_id


def parse_heartbeat(payload: Any, clock: Clock) -> IdleSample:
    """Validate a heartbeat body and turn it into a sample stamped with `clock`."""
    vm_id = parse_vm_id(payload)
    unknown = set(payload) - set(FIELDS)
    if unknown:
        valid = ", ".join(FIELDS)
        raise HeartbeatError(f"unknown fields {sorted(unknown)}; valid fields are {valid}")

    metrics: dict[str, float | None] = {}
    for name in METRICS:
        metrics[name] = _metric(payload, name)
    error = payload.get("error")
    if error is not None and not isinstance(error, str):
        raise HeartbeatError("error must be a string describing why a metric failed")
    return IdleSample(
        vm_id=vm_id,
        at=clock.now(),
        source="heartbeat",
        error=error,
        processes=_processes(payload.get("processes")),
        **metrics,
    )


def _processes(value: Any) -> tuple[str, ...] | None:
    """Validate the optional list of command lines; None when the agent sent none."""
    if value is None:
        return None
    if not isinstance(value, list):
        raise HeartbeatError("processes must be a list of command lines (strings)")
    if len(value) > MAX_PROCESSES:
        raise HeartbeatError(
            f"processes has {len(value)} entries; send at most {MAX_PROCESSES}, "
            "or leave the list out"
        )
    for index, command in enumerate(value):
        if not isinstance(command, str):
            raise HeartbeatError(f"processes[{index}] must be a string, got {command!r}")
        if len(command) > MAX_PROCESS_CHARS:
            raise HeartbeatError(
                f"processes[{index}] is {len(command)} characters long; "
                f"cut each command line to at most {MAX_PROCESS_CHARS}"
            )
    return tuple(value)


def _metric(payload: dict[str, Any], name: str) -> float | None:
    value = payload.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise HeartbeatError(f"{name} must be a finite number, got {value!r}")
    if value < 0:
        raise HeartbeatError(f"{name} must not be negative, got {value}")
    maximum = METRIC_MAXIMUMS.get(name)
    if maximum is not None and value > maximum:
        raise HeartbeatError(f"{name} must be between 0 and {maximum:g}, got {value}")
    return float(value)


def _bearer_token(request: Request) -> str | None:
    """Return the token of an `Authorization: Bearer` header, or None without one."""
    header = request.headers.get("authorization", "")
    scheme, _, presented = header.partition(" ")
    presented = presented.strip()
    if scheme.lower() != "bearer" or not presented:
        return None
    return presented


def _peer(request: Request) -> str:
    return request.client.host if request.client else "unknown"
