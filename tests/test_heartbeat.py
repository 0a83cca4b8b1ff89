"""Heartbeat endpoint tests: real HTTP to the app served on 127.0.0.1, samples in a SQLite file.

The agent script runs with sh and real curl against the endpoint. Only nvidia-smi is a
fake on its PATH, and ps too where a test needs exact command lines.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from tdbot.asgi import serve_app
from tdbot.cli import main
from tdbot.daemon.heartbeat import (
    MAX_BODY_BYTES,
    MAX_PROCESS_CHARS,
    MAX_PROCESSES,
    RejectionLog,
    agent_token,
    create_heartbeat_app,
)
from tdbot.evaluation.model import IdleSample
from tdbot.simulator.clock import SimClock
from tdbot.store.db import Store

TOKEN = "heartbeat-test-token-5b1e"
VM_ID = "1f0c9d8e-7b6a-4c5d-9e8f-0a1b2c3d4e5f"
OTHER_VM_ID = "9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d"
VM_TOKEN = agent_token(TOKEN, VM_ID)
SERVER_TIME = datetime(2024, 11, 4, 12, 0, tzinfo=UTC)
AUTH = {"Authorization": f"Bearer {VM_TOKEN}"}


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


def test_agent_token_matches_openssl() -> None:
    # Computed with: printf %s VM_ID | openssl dgst -sha256 -hmac TOKEN
    expected = "5b526e0d2e0b2d489ce6b3ee502c023a365e22ee88e6eba768f39ba0d3ec51c4"

    assert agent_token(TOKEN, VM_ID) == expected
    assert agent_token(TOKEN, OTHER_VM_ID) != expected


async def test_each_vm_own_token_accepted(endpoint: Endpoint) -> None:
    other_auth = {"Authorization": f"Bearer {agent_token(TOKEN, OTHER_VM_ID)}"}

    first = await endpoint.post(valid_body())
    second = await endpoint.post(valid_body(vm_id=OTHER_VM_ID), headers=other_auth)

    assert first.status_code == 200
    assert second.status_code == 200
    assert sorted(sample.vm_id for sample in await endpoint.stored()) == sorted(
        [VM_ID, OTHER_VM_ID]
    )


async def test_token_for_other_vm_rejected(endpoint: Endpoint) -> None:
    # The agent of VM_ID must not push readings in the name of another VM.
    response = await endpoint.post(valid_body(vm_id=OTHER_VM_ID))

    assert response.status_code == 401
    assert await endpoint.stored() == []


async def test_processes_stored_in_order(endpoint: Endpoint) -> None:
    processes = ["/sbin/init", 'python train.py --name "run 1"', "jupyter-lab --port=8888"]

    response = await endpoint.post(valid_body(processes=processes))

    assert response.status_code == 200
    [sample] = await endpoint.stored()
    assert sample.processes == tuple(processes)


async def test_processes_left_out_is_none(endpoint: Endpoint) -> None:
    await endpoint.post(valid_body())
    await endpoint.post(valid_body(processes=[]))

    first, second = await endpoint.stored()
    assert first.processes is None
    assert second.processes == ()


async def test_processes_at_limits_accepted(endpoint: Endpoint) -> None:
    many = [f"worker {index}" for index in range(MAX_PROCESSES)]
    longest = ["x" * MAX_PROCESS_CHARS]

    for processes in (many, longest):
        response = await endpoint.post(valid_body(processes=processes))
        assert response.status_code == 200, response.text

    assert len(await endpoint.stored()) == 2


@pytest.mark.parametrize(
    ("processes", "named"),
    [
        ("python train.py", "processes must be a list"),
        (["ok", 7], "processes[1] must be a string"),
        (["ok", None], "processes[1] must be a string"),
        (["w"] * (MAX_PROCESSES + 1), f"at most {MAX_PROCESSES}"),
        (["ok", "y" * (MAX_PROCESS_CHARS + 1)], f"processes[1] is {MAX_PROCESS_CHARS + 1}"),
    ],
    ids=["not-a-list", "number-entry", "null-entry", "too-many", "too-long"],
)
async def test_invalid_processes_rejected(endpoint: Endpoint, processes: Any, named: str) -> None:
    response = await endpoint.post(valid_body(processes=processes))

    assert response.status_code == 400
    assert named in response.json()["error"]
    assert await endpoint.stored() == []


async def test_deep_nesting_rejected(endpoint: Endpoint) -> None:
    content = b"[" * (MAX_BODY_BYTES - 1)

    response = await endpoint.post_raw(content)

    assert response.status_code == 400
    assert "nested too deeply" in response.json()["error"]


async def test_invalid_utf8_replaced(endpoint: Endpoint) -> None:
    # An agent that cuts a command line inside a UTF-8 sequence still gets its sample in.
    content = b'{"vm_id":"' + VM_ID.encode() + b'","processes":["caf\xc3\xa9","cut \xc3"]}'

    response = await endpoint.post_raw(content)

    assert response.status_code == 200, response.text
    [sample] = await endpoint.stored()
    assert sample.processes == ("caf\u00e9", "cut \ufffd")


async def test_token_not_ascii_rejected(endpoint: Endpoint) -> None:
    headers = {b"Authorization": "Bearer t\u00f6ken".encode()}

    response = await endpoint.http.post(endpoint.url, json=valid_body(), headers=headers)

    assert response.status_code == 401
    assert await endpoint.stored() == []


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
        {"Authorization": f"Basic {VM_TOKEN}"},
        {"Authorization": VM_TOKEN},
        {"Authorization": f"Bearer {TOKEN}"},
        {"Authorization": f"Bearer {agent_token(TOKEN, OTHER_VM_ID)}"},
        {"Authorization": f"Bearer {agent_token('another-secret', VM_ID)}"},
    ],
    ids=[
        "missing",
        "wrong",
        "wrong-scheme",
        "no-scheme",
        "shared-secret",
        "other-vm",
        "other-secret",
    ],
)
async def test_bad_token_rejected(endpoint: Endpoint, headers: dict[str, str]) -> None:
    response = await endpoint.post(valid_body(), headers=headers)

    assert response.status_code == 401
    assert response.json()["ok"] is False
    assert TOKEN not in response.text
    assert VM_TOKEN not in response.text
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
        (valid_body(gpu_util_percent=100.5), "between 0 and 100"),
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
        "percent-over-100",
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


async def test_gpu_util_100_accepted(endpoint: Endpoint) -> None:
    response = await endpoint.post(valid_body(gpu_util_percent=100))

    assert response.status_code == 200


async def test_unknown_field_lists_valid(endpoint: Endpoint) -> None:
    response = await endpoint.post(valid_body(gpu_util=3))

    message = response.json()["error"]
    assert "['gpu_util']" in message
    assert (
        "vm_id, gpu_util_percent, gpu_memory_mb, cpu_load, network_kbps, processes, error"
        in message
    )


async def test_bad_token_warning_rate_limited(
    endpoint: Endpoint, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="tdbot.daemon.heartbeat")

    for _ in range(3):
        response = await endpoint.post(valid_body(), headers={})
        assert response.status_code == 401

    assert len(caplog.records) == 1
    assert TOKEN not in caplog.text


def test_rejection_log_counts_per_minute(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="tdbot.daemon.heartbeat")
    now = [1000.0]
    rejections = RejectionLog(lambda: now[0], interval_seconds=60.0)

    for offset in (0.0, 1.0, 30.0, 59.0, 61.0, 62.0, 125.0):
        now[0] = 1000.0 + offset
        rejections.record("10.0.0.7")

    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 3
    assert "10.0.0.7" in messages[0]
    assert "4 rejections since the previous warning" in messages[1]
    assert "2 rejections since the previous warning" in messages[2]


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
    assert "65536" in response.json()["error"]
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


# --- tdbot agent-token ------------------------------------------------------------------


def test_agent_token_command_prints_token() -> None:
    result = CliRunner().invoke(main, ["agent-token", VM_ID], env={"TDBOT_HEARTBEAT_TOKEN": TOKEN})

    assert result.exit_code == 0, result.output
    assert result.output == f"{VM_TOKEN}\n"


def test_agent_token_command_reads_file(tmp_path: Path) -> None:
    secret_file = tmp_path / "heartbeat.secret"
    secret_file.write_text(f"{TOKEN}\n")
    env = {"TDBOT_HEARTBEAT_TOKEN": None, "TDBOT_HEARTBEAT_TOKEN_FILE": str(secret_file)}

    result = CliRunner().invoke(main, ["agent-token", VM_ID], env=env)

    assert result.exit_code == 0, result.output
    assert result.output == f"{VM_TOKEN}\n"


def test_agent_token_command_without_secret() -> None:
    env = {"TDBOT_HEARTBEAT_TOKEN": None, "TDBOT_HEARTBEAT_TOKEN_FILE": None}

    result = CliRunner().invoke(main, ["agent-token", VM_ID], env=env)

    assert result.exit_code == 1
    assert "TDBOT_HEARTBEAT_TOKEN is not set" in result.output
    assert VM_TOKEN not in result.output


# --- the agent script -------------------------------------------------------------------

AGENT = Path(__file__).parent.parent / "agent" / "tdbot-agent.sh"
needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="the agent needs curl")
NVIDIA_SMI_OK = "#!/bin/sh\nprintf '35, 1200\\n80, 800\\n'\n"
NVIDIA_SMI_BROKEN = (
    "#!/bin/sh\necho 'NVIDIA-SMI has failed: \"driver\" not loaded in C:\\drivers' >&2\nexit 9\n"
)
# Arguments of a process the agent must report verbatim: quotes, backslashes, non-ASCII.
TRICKY_ARGUMENTS = ("train.py", 'say "hi"', "back\\slash", "caf\u00e9")


@dataclass
class Agent:
    """The agent script with its settings file and a PATH that contains a fake nvidia-smi."""

    folder: Path

    @property
    def state(self) -> Path:
        return self.folder / "state" / "network"

    def install_nvidia_smi(self, script: str) -> None:
        tool = self.folder / "bin" / "nvidia-smi"
        tool.parent.mkdir(exist_ok=True)
        tool.write_text(script)
        tool.chmod(0o755)

    def install_ps(self, lines: list[str]) -> None:
        listing = self.folder / "ps-output"
        listing.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
        tool = self.folder / "bin" / "ps"
        tool.write_text(f"#!/bin/sh\ncat '{listing}'\n")
        tool.chmod(0o755)

    def write_settings(self, url: str, token: str, vm_id: str = VM_ID) -> None:
        (self.folder / "agent.env").write_text(
            f"# written by the test\nTDBOT_URL={url}\nTDBOT_VM_ID='{vm_id}'\n"
            f'export TDBOT_AGENT_TOKEN="{token}"\n'
        )

    async def run(self, *arguments: str) -> tuple[int, str, str]:
        """Run the script with sh; return its exit status, output and error output."""
        env = {
            "PATH": f"{self.folder / 'bin'}:{os.environ['PATH']}",
            "LANG": "C.UTF-8",
            "TDBOT_AGENT_ENV": str(self.folder / "agent.env"),
            "TDBOT_AGENT_STATE": str(self.state),
        }
        process = await asyncio.create_subprocess_exec(
            "sh",
            str(AGENT),
            *arguments,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        async with asyncio.timeout(30):
            out, err = await process.communicate()
        assert process.returncode is not None
        return process.returncode, out.decode(), err.decode()


@pytest.fixture
def agent(tmp_path: Path) -> Agent:
    folder = tmp_path / "agent"
    folder.mkdir()
    script = Agent(folder)
    script.install_nvidia_smi(NVIDIA_SMI_OK)
    # Port 9 (discard) is never contacted, because tests that send replace these settings.
    script.write_settings("http://127.0.0.1:9", VM_TOKEN)
    return script


def agent_token_from_cli(vm_id: str) -> str:
    result = CliRunner().invoke(main, ["agent-token", vm_id], env={"TDBOT_HEARTBEAT_TOKEN": TOKEN})
    assert result.exit_code == 0, result.output
    return result.output.strip()


def endpoint_root(endpoint: Endpoint) -> str:
    return endpoint.url.removesuffix("/v1/heartbeat")


@pytest.fixture
def tricky_process() -> Iterator[subprocess.Popen[bytes]]:
    command = [sys.executable, "-c", "import time; time.sleep(60)", *TRICKY_ARGUMENTS]
    process = subprocess.Popen(command)
    try:
        yield process
    finally:
        process.kill()
        process.wait()


@needs_curl
async def test_agent_pushes_reading(
    endpoint: Endpoint, agent: Agent, tricky_process: subprocess.Popen[bytes]
) -> None:
    agent.write_settings(endpoint_root(endpoint), agent_token_from_cli(VM_ID))

    status, _, err = await agent.run()

    assert status == 0, err
    [sample] = await endpoint.stored()
    assert sample.vm_id == VM_ID
    assert sample.error is None
    assert sample.gpu_util_percent == 80.0
    assert sample.gpu_memory_mb == 2000.0
    assert sample.cpu_load is not None
    assert sample.network_kbps is None
    assert sample.processes is not None
    expected = " ".join([sys.executable, "-c", "import time; time.sleep(60)", *TRICKY_ARGUMENTS])
    assert expected in sample.processes
    assert not any(command.startswith("[") for command in sample.processes)


@needs_curl
async def test_agent_network_rate_between_runs(endpoint: Endpoint, agent: Agent) -> None:
    agent.write_settings(endpoint_root(endpoint), VM_TOKEN)
    await agent.run()
    saved_at, saved_bytes = agent.state.read_text().split()
    # Pretend the previous run was a minute ago and no byte had moved yet.
    agent.state.write_text(f"{int(saved_at) - 60} 0\n")

    status, _, err = await agent.run()

    assert status == 0, err
    first, second = await endpoint.stored()
    assert first.network_kbps is None
    assert second.network_kbps is not None
    # The agent counts whole seconds, so a run that crosses a second boundary measures 61 s
    # or 62 s, and the counters may grow a little between the runs.
    kilobits = int(saved_bytes) * 8 / 1000
    assert kilobits / 62 - 1 <= second.network_kbps <= kilobits / 60 * 1.02 + 1


@needs_curl
async def test_agent_reports_nvidia_failure(endpoint: Endpoint, agent: Agent) -> None:
    agent.install_nvidia_smi(NVIDIA_SMI_BROKEN)
    agent.write_settings(endpoint_root(endpoint), VM_TOKEN)

    status, _, err = await agent.run()

    assert status == 0, err
    [sample] = await endpoint.stored()
    assert (
        sample.error
        == 'nvidia-smi failed: NVIDIA-SMI has failed: "driver" not loaded in C:\\drivers'
    )
    assert sample.gpu_util_percent is None
    assert sample.gpu_memory_mb is None
    assert sample.cpu_load is not None


@needs_curl
async def test_agent_other_vm_token_fails(endpoint: Endpoint, agent: Agent) -> None:
    agent.write_settings(endpoint_root(endpoint), agent_token(TOKEN, OTHER_VM_ID))

    status, _, err = await agent.run()

    assert status == 1
    assert "rejected with HTTP 401" in err
    assert await endpoint.stored() == []


async def test_agent_escapes_command_lines(agent: Agent) -> None:
    lines = [
        "/sbin/init splash",
        "[kworker/0:1-events]",
        'python -c "print(\\"hi\\")"',
        "tab\there",
        "bell\x07 and escape\x1b[0m",
        "trailing backslash \\",
        "caf\u00e9 \u00fcber \u65e5\u672c",
    ]
    agent.install_ps(lines)

    status, out, err = await agent.run("--print")

    assert status == 0, err
    body = json.loads(out)
    assert body["processes"] == [line for line in lines if not line.startswith("[")]
    assert body["vm_id"] == VM_ID


async def test_agent_cuts_long_command_lines(agent: Agent) -> None:
    agent.install_ps(["x" * (MAX_PROCESS_CHARS + 10)])

    status, out, err = await agent.run("--print")

    assert status == 0, err
    assert json.loads(out)["processes"] == ["x" * MAX_PROCESS_CHARS]


async def test_agent_leaves_out_too_many_processes(agent: Agent) -> None:
    agent.install_ps([f"worker {index}" for index in range(MAX_PROCESSES + 1)])

    status, out, err = await agent.run("--print")

    assert status == 0, err
    assert "processes" not in json.loads(out)
    assert "process list is too long" in err


async def test_agent_without_vm_id_fails(agent: Agent) -> None:
    (agent.folder / "agent.env").write_text("TDBOT_URL=http://127.0.0.1:9\n")

    status, _, err = await agent.run()

    assert status == 1
    assert "TDBOT_VM_ID is not set" in err


async def test_agent_rejects_malformed_token(agent: Agent) -> None:
    agent.write_settings("http://127.0.0.1:9", TOKEN)

    status, _, err = await agent.run()

    assert status == 1
    assert "TDBOT_AGENT_TOKEN must be" in err
    assert TOKEN not in err
