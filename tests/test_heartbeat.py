"""Heartbeat endpoint tests: real HTTP to the app served on 127.0.0.1, samples in a SQLite file."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from tdbot.asgi import serve_app
from tdbot.daemon.heartbeat import MAX_BODY_BYTES, create_heartbeat_app
from tdbot.evaluation.model import IdleSample
from tdbot.simulator.clock import SimClock
from tdbot.store.db import Store

TOKEN = "heartbeat-test-token-5b1e"
VM_ID = "1f0c9d8e-7b6a-4c5d-9e8f-0a1b2c3d4e5f"
SERVER_TIME = datetime(2024, 11, 4, 12, 0, tzinfo=UTC)
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@dataclass
class Endpoint:
    url: str
    store: Store
    http: httpx.AsyncClient

    async def post(self, body: Any, headers: dict[str, str] | None = None) -> httpx.Response:
        return await self.http.post(
            self.url, json=body, headers=AUTH if headers is None else headers
        )

    async def post_raw(self, content: bytes) -> httpx.Response:
        headers = AUTH | {"Content-Type": "application/json"}
        return await self.http.post(self.url, content=content, headers=headers)

    async def stored(self) -> list[IdleSample]:
        samples = await self.store.idle_samples(since=SERVER_TIME - timedelta(days=1))
        return [sample for per_vm in samples.values() for sample in per_vm]


async def serve_endpoint(tmp_path: Path, token: str | None) -> AsyncIterator[Endpoint]:
    store = await Store.open(tmp_path / "heartbeat.db")
    app = create_heartbeat_app(store.add_idle_sample, SimClock(SERVER_TIME), token)
    try:
        async with (
            serve_app(app, "127.0.0.1", 0, name="heartbeat-test") as server,
            httpx.AsyncClient(timeout=5) as http,
        ):
            yield Endpoint(f"{server.url}/v1/heartbeat", store, http)
    finally:
        await store.close()


@pytest.fixture
async def endpoint(tmp_path: Path) -> AsyncIterator[Endpoint]:
    async for served in serve_endpoint(tmp_path, TOKEN):
        yield served


@pytest.fixture
async def endpoint_without_token(tmp_path: Path) -> AsyncIterator[Endpoint]:
    async for served in serve_endpoint(tmp_path, None):
        yield served


def valid_body(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "vm_id": VM_ID,
        "gpu_util_percent": 3,
        "gpu_memory_mb": 120.5,
        "cpu_load": 0.1,
        "network_kbps": 4,
        "error": None,
    }
    body.update(changes)
    return body


async def test_valid_push_stored(endpoint: Endpoint) -> None:
    response = await endpoint.post(valid_body())

    assert response.status_code == 200
    assert response.json() == {"ok": True}
    [sample] = await endpoint.stored()
    assert sample.vm_id == VM_ID
    assert sample.at == SERVER_TIME
    assert sample.source == "heartbeat"
    assert sample.gpu_util_percent == 3.0
    assert sample.gpu_memory_mb == 120.5
    assert sample.cpu_load == 0.1
    assert sample.network_kbps == 4.0
    assert sample.error is None


async def test_partial_push_with_error_stored(endpoint: Endpoint) -> None:
    body = {"vm_id": VM_ID, "cpu_load": 0.5, "error": "nvidia-smi not found"}

    response = await endpoint.post(body)

    assert response.status_code == 200
    [sample] = await endpoint.stored()
    assert sample.gpu_util_percent is None
    assert sample.cpu_load == 0.5
    assert sample.error == "nvidia-smi not found"


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-token"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": TOKEN},
    ],
    ids=["missing", "wrong", "wrong-scheme", "no-scheme"],
)
async def test_bad_token_rejected(endpoint: Endpoint, headers: dict[str, str]) -> None:
    response = await endpoint.post(valid_body(), headers=headers)

    assert response.status_code == 401
    assert response.json()["ok"] is False
    assert TOKEN not in response.text
    assert await endpoint.stored() == []


async def test_no_token_configured_rejects(endpoint_without_token: Endpoint) -> None:
    for headers in ({}, {"Authorization": "Bearer"}, AUTH):
        response = await endpoint_without_token.post(valid_body(), headers=headers)
        assert response.status_code == 401
    assert await endpoint_without_token.stored() == []


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({"gpu_util_percent": 3}, "vm_id"),
        (valid_body(vm_id=""), "vm_id"),
        (valid_body(vm_id=42), "vm_id"),
        (valid_body(gpu_util=3), "gpu_util"),
        (valid_body(at="2030-01-01T00:00:00Z"), "at"),
        (valid_body(gpu_util_percent=-1), "gpu_util_percent"),
        (valid_body(gpu_memory_mb="120"), "gpu_memory_mb"),
        (valid_body(gpu_memory_mb=True), "gpu_memory_mb"),
        (valid_body(error=7), "error"),
        ([VM_ID], "JSON object"),
    ],
    ids=[
        "missing-vm-id",
        "empty-vm-id",
        "number-vm-id",
        "unknown-field",
        "client-timestamp",
        "negative",
        "string-metric",
        "bool-metric",
        "error-not-text",
        "not-an-object",
    ],
)
async def test_invalid_body_names_field(endpoint: Endpoint, body: Any, named: str) -> None:
    response = await endpoint.post(body)

    assert response.status_code == 400
    assert named in response.json()["error"]
    assert await endpoint.stored() == []


@pytest.mark.parametrize(
    ("content", "named"),
    [
        (b'{"vm_id": "' + VM_ID.encode() + b'", "cpu_load": NaN}', "cpu_load"),
        (b'{"vm_id": "' + VM_ID.encode() + b'", "network_kbps": -Infinity}', "network_kbps"),
    ],
    ids=["nan", "infinite"],
)
async def test_non_finite_metric_rejected(endpoint: Endpoint, content: bytes, named: str) -> None:
    response = await endpoint.post_raw(content)

    assert response.status_code == 400
    assert named in response.json()["error"]
    assert await endpoint.stored() == []


async def test_bad_json_rejected(endpoint: Endpoint) -> None:
    response = await endpoint.post_raw(b'{"vm_id": ')

    assert response.status_code == 400
    assert response.json()["ok"] is False
    assert await endpoint.stored() == []


async def test_body_over_limit_rejected(endpoint: Endpoint) -> None:
    body = valid_body(error="x" * MAX_BODY_BYTES)

    response = await endpoint.post(body)

    assert response.status_code == 413
    assert "4096" in response.json()["error"]
    assert await endpoint.stored() == []


async def test_body_at_limit_accepted(endpoint: Endpoint) -> None:
    padding = MAX_BODY_BYTES - len(b'{"vm_id":"' + VM_ID.encode() + b'","error":""}')
    content = b'{"vm_id":"' + VM_ID.encode() + b'","error":"' + b"x" * padding + b'"}'
    assert len(content) == MAX_BODY_BYTES

    response = await endpoint.post_raw(content)

    assert response.status_code == 200
    assert len(await endpoint.stored()) == 1


async def test_get_not_allowed(endpoint: Endpoint) -> None:
    response = await endpoint.http.get(endpoint.url, headers=AUTH)

    assert response.status_code == 405
