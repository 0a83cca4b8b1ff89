"""SSH probe tests against real asyncssh servers on 127.0.0.1.

Each test server runs the command the probe sends (`sh -s` with the probe script on
standard input) with the real /bin/sh. Its PATH contains only a folder with links to
`sh`, `cat`, `head`, `cut` and `wc`, and fake `nvidia-smi`, `who` and `ps` scripts that
print files the test writes. The server rewrites "/proc/" in the script to a folder
with the test's `loadavg` and `net/dev`. So the probe script, the SSH connection, the
host key check and the parser all run for real, on outputs each test chooses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncssh
import pytest

from tdbot.alerts.manager import AlertManager
from tdbot.config import (
    DaemonSettings,
    HeartbeatSettings,
    SafetySettings,
    Secrets,
    Settings,
    SshSettings,
    TensorDockSettings,
    load_settings,
)
from tdbot.daemon.engine import RuleEngine, TickResult
from tdbot.daemon.runner import open_daemon
from tdbot.evaluation.model import (
    Decision,
    FireAlert,
    MarketSnapshot,
    ResolveAlert,
    Severity,
    Stop,
    WarnIdle,
)
from tdbot.probes.hook import ProbeHook
from tdbot.probes.script import (
    MAX_PROCESS_CHARS,
    PROBE_SCRIPT,
    ProbeOutputError,
    parse_probe_output,
)
from tdbot.probes.ssh import SshProbe, probe_vms
from tdbot.rules.schema import IdleStopRule
from tdbot.simulator.testing import (
    TEST_API_KEY,
    TEST_API_TOKEN,
    make_test_market,
    running_simulator,
)
from tdbot.store.db import Store
from tdbot.tensordock.models import VirtualMachine, VmStatus
from tests.alerting import RecordingNotifier

NOW = datetime(2024, 11, 4, 12, 0, tzinfo=UTC)
SYSTEM_TOOLS = ("sh", "cat", "head", "cut", "wc")
HOSTNODE_4090 = "0b60f80c-e16a-4cda-a8cd-dbc01cc0512c"
GPU_4090 = "geforcertx4090-pcie-24gb"

FAKE_NVIDIA_SMI = """#!/bin/sh
cat "$FAKE_ROOT/gpu.out"
exit "$(cat "$FAKE_ROOT/gpu.status")"
"""
FAKE_WHO = '#!/bin/sh\ncat "$FAKE_ROOT/who.out"\n'
FAKE_PS = '#!/bin/sh\ncat "$FAKE_ROOT/ps.out"\n'

NETDEV_HEADER = (
    "Inter-|   Receive                                                |  Transmit\n"
    " face |bytes    packets errs drop fifo frame compressed multicast|"
    "bytes    packets errs drop fifo colls carrier compressed\n"
)


# --- a fake VM behind a real SSH server ----------------------------------------------


@dataclass
class FakeVmFiles:
    """The files a fake VM's commands print; the setters change what the next probe reads."""

    root: Path

    def __post_init__(self) -> None:
        bin_dir = self.root / "bin"
        bin_dir.mkdir(parents=True)
        (self.root / "proc" / "net").mkdir(parents=True)
        for tool in SYSTEM_TOOLS:
            found = shutil.which(tool)
            assert found is not None, f"{tool} is needed to run the probe script"
            (bin_dir / tool).symlink_to(found)
        for name, text in (("nvidia-smi", FAKE_NVIDIA_SMI), ("who", FAKE_WHO), ("ps", FAKE_PS)):
            (bin_dir / name).write_text(text)
            (bin_dir / name).chmod(0o755)
        self.set_gpu(["0, 0"])
        self.set_load(0.05)
        self.set_network(rx_bytes=1000, tx_bytes=1000)
        self.set_sessions(0)
        self.set_processes(["/sbin/init", "sshd: /usr/sbin/sshd -D"])

    @property
    def bin_dir(self) -> Path:
        return self.root / "bin"

    def set_gpu(self, lines: list[str], status: int = 0) -> None:
        (self.root / "gpu.out").write_text("".join(line + "\n" for line in lines))
        (self.root / "gpu.status").write_text(str(status))

    def remove_nvidia_smi(self) -> None:
        (self.bin_dir / "nvidia-smi").unlink()

    def set_load(self, one_minute: float) -> None:
        (self.root / "proc" / "loadavg").write_text(f"{one_minute:.2f} 0.10 0.05 1/123 4567\n")

    def set_network(self, *, rx_bytes: int, tx_bytes: int, lo_bytes: int = 999_999) -> None:
        lines = [
            f"    lo: {lo_bytes} 10 0 0 0 0 0 0 {lo_bytes} 10 0 0 0 0 0 0",
            f"  eth0: {rx_bytes} 20 0 0 0 0 0 0 {tx_bytes} 20 0 0 0 0 0 0",
        ]
        (self.root / "proc" / "net" / "dev").write_text(NETDEV_HEADER + "\n".join(lines) + "\n")

    def set_sessions(self, count: int) -> None:
        lines = [f"alice    pts/{n}        2024-11-04 11:00 (10.0.0.{n})" for n in range(count)]
        (self.root / "who.out").write_text("".join(line + "\n" for line in lines))

    def set_processes(self, commands: list[str]) -> None:
        (self.root / "ps.out").write_text("".join(command + "\n" for command in commands))


@dataclass
class FakeSshServer:
    """A real SSH server on 127.0.0.1 that runs the probe against a FakeVmFiles."""

    files: FakeVmFiles
    host_key: asyncssh.SSHKey
    authorized: asyncssh.SSHAuthorizedKeys
    mode: str = "run"  # "run", "hang" or "garbage"
    delay_seconds: float = 0.0
    port: int = 0
    users: list[str] = field(default_factory=list)
    active: int = 0
    max_active: int = 0
    server: asyncssh.SSHAcceptor | None = None

    async def start(self) -> None:
        self.server = await asyncssh.create_server(
            asyncssh.SSHServer,
            "127.0.0.1",
            0,
            server_host_keys=[self.host_key],
            authorized_client_keys=self.authorized,
            process_factory=self._handle,
        )
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _handle(self, process: asyncssh.SSHServerProcess[str]) -> None:
        self.users.append(str(process.get_extra_info("username")))
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            await self._answer(process)
        finally:
            self.active -= 1

    async def _answer(self, process: asyncssh.SSHServerProcess[str]) -> None:
        script = await process.stdin.read()
        if self.delay_seconds:
            await asyncio.sleep(self.delay_seconds)
        if self.mode == "hang":
            await process.channel.wait_closed()
            return
        if self.mode == "garbage":
            process.stdout.write("Welcome to the machine\n")
            process.exit(0)
            return

        script = script.replace("/proc/", f"{self.files.root}/proc/")
        shell = await asyncio.create_subprocess_exec(
            "/bin/sh",
            "-c",
            str(process.command),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env={"PATH": str(self.files.bin_dir), "FAKE_ROOT": str(self.files.root)},
        )
        output, _ = await shell.communicate(script.encode())
        process.stdout.write(output.decode())
        process.exit(shell.returncode or 0)


@dataclass
class Keys:
    """A client key (and its file) that the test servers accept."""

    client: asyncssh.SSHKey
    client_file: Path
    authorized: asyncssh.SSHAuthorizedKeys


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    client = asyncssh.generate_private_key("ssh-ed25519")
    client_file = tmp_path / "probe_key"
    client.write_private_key(client_file)
    authorized = asyncssh.import_authorized_keys(client.export_public_key().decode())
    return Keys(client, client_file, authorized)


StartServer = Callable[..., Awaitable[FakeSshServer]]


@pytest.fixture
async def start_server(keys: Keys, tmp_path: Path) -> AsyncIterator[StartServer]:
    """Start FakeSshServers for the test and stop them all at its end."""
    servers: list[FakeSshServer] = []

    async def start(
        *,
        host_key: asyncssh.SSHKey | None = None,
        files: FakeVmFiles | None = None,
        **options: object,
    ) -> FakeSshServer:
        files = files or FakeVmFiles(tmp_path / f"vm{len(servers)}")
        server = FakeSshServer(
            files,
            host_key or asyncssh.generate_private_key("ssh-ed25519"),
            keys.authorized,
            **options,  # type: ignore[arg-type]
        )
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.stop()


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    opened = await Store.open(tmp_path / "tdbot.db")
    yield opened
    await opened.close()


def ssh_settings(keys: Keys, **overrides: object) -> SshSettings:
    values: dict[str, object] = {
        "key_file": keys.client_file,
        "connect_timeout": "2s",
        "command_timeout": "2s",
    }
    return SshSettings.model_validate(values | overrides)


def vm_at(
    port: int, vm_id: str = "vm-1", name: str = "train-1", **fields: object
) -> VirtualMachine:
    values: dict[str, object] = {
        "id": vm_id,
        "name": name,
        "status": "Running",
        "dedicated_ip_address": "127.0.0.1",
        "port_forwards": {str(port): "22"},
    }
    return VirtualMachine.model_validate(values | fields)


class FakeMonotonic:
    """A monotonic clock the test moves by hand, for network rates."""

    def __init__(self) -> None:
        self.seconds = 1000.0

    def __call__(self) -> float:
        return self.seconds


def closed_port() -> int:
    """Return a loopback port with nothing listening on it."""
    with contextlib.closing(socket.socket()) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# --- readings ------------------------------------------------------------------------


async def test_probe_busy_gpu_vm(start_server: StartServer, keys: Keys, store: Store) -> None:
    server = await start_server()
    server.files.set_gpu(["87, 20123"])
    server.files.set_load(3.5)
    probe = SshProbe(ssh_settings(keys))

    result = await probe.probe_vms([vm_at(server.port)], store, NOW, rule="idle")

    [sample] = result.samples
    assert sample.error is None
    assert sample.source == "ssh"
    assert sample.at == NOW
    assert sample.gpu_util_percent == 87.0
    assert sample.gpu_memory_mb == 20123.0
    assert sample.cpu_load == 3.5
    assert sample.network_kbps is None
    stored = await store.idle_samples(since=NOW)
    assert stored["vm-1"][0].gpu_util_percent == 87.0
    assert stored["vm-1"][0].source == "ssh"


async def test_probe_idle_vm_repeated(start_server: StartServer, keys: Keys, store: Store) -> None:
    server = await start_server()
    server.files.set_gpu(["0, 2"])
    server.files.set_load(0.02)
    clock = FakeMonotonic()
    probe = SshProbe(ssh_settings(keys), monotonic=clock)
    vm = vm_at(server.port)

    for minute in range(4):
        clock.seconds += 60
        await probe.probe_vms([vm], store, NOW + timedelta(minutes=minute), rule="idle")

    samples = (await store.idle_samples(since=NOW))["vm-1"]
    assert len(samples) == 4
    assert all(sample.error is None for sample in samples)
    assert [sample.gpu_util_percent for sample in samples] == [0.0] * 4
    assert [sample.cpu_load for sample in samples] == [0.02] * 4
    assert [sample.network_kbps for sample in samples] == [None, 0.0, 0.0, 0.0]
    record = await store.get_host_key("vm-1")
    assert record is not None
    assert record.fingerprint == server.host_key.get_fingerprint("sha256")
    assert record.last_seen_at == NOW + timedelta(minutes=3)
    assert record.first_seen_at == NOW


async def test_probe_gpu_memory_without_utilisation(
    start_server: StartServer, keys: Keys, store: Store
) -> None:
    server = await start_server()
    server.files.set_gpu(["0, 15000", "0, 3000"])

    result = await probe_vms([vm_at(server.port)], ssh_settings(keys), store, NOW, rule="idle")

    [sample] = result.samples
    assert sample.gpu_util_percent == 0.0
    assert sample.gpu_memory_mb == 18000.0


async def test_probe_several_gpus_max_utilisation(
    start_server: StartServer, keys: Keys, store: Store
) -> None:
    server = await start_server()
    server.files.set_gpu(["3, 100", "45, 200", "0, 0"])

    result = await probe_vms([vm_at(server.port)], ssh_settings(keys), store, NOW, rule="idle")

    [sample] = result.samples
    assert sample.gpu_util_percent == 45.0
    assert sample.gpu_memory_mb == 300.0


async def test_probe_network_rate_two_probes(
    start_server: StartServer, keys: Keys, store: Store
) -> None:
    server = await start_server()
    clock = FakeMonotonic()
    probe = SshProbe(ssh_settings(keys), monotonic=clock)
    vm = vm_at(server.port)

    server.files.set_network(rx_bytes=1_000_000, tx_bytes=500_000)
    first = await probe.probe_vms([vm], store, NOW, rule="idle")
    clock.seconds += 10
    # 100,000 received and 25,000 sent bytes in 10 s: 1,000,000 bits / 10 s = 100 kbit/s.
    # The loopback counter moves too, and must not count.
    server.files.set_network(rx_bytes=1_100_000, tx_bytes=525_000, lo_bytes=5_000_000)
    second = await probe.probe_vms([vm], store, NOW + timedelta(minutes=1), rule="idle")

    assert first.samples[0].network_kbps is None
    assert second.samples[0].network_kbps == pytest.approx(100.0)


async def test_probe_network_counter_reset(
    start_server: StartServer, keys: Keys, store: Store
) -> None:
    server = await start_server()
    clock = FakeMonotonic()
    probe = SshProbe(ssh_settings(keys), monotonic=clock)
    vm = vm_at(server.port)

    rates = []
    for rx_bytes in (9_000_000, 2_000, 14_500):
        server.files.set_network(rx_bytes=rx_bytes, tx_bytes=0)
        result = await probe.probe_vms([vm], store, NOW, rule="idle")
        rates.append(result.samples[0].network_kbps)
        clock.seconds += 5

    # The reboot between the first two probes reset the counters: no rate, a new base.
    assert rates[0] is None
    assert rates[1] is None
    assert rates[2] == pytest.approx(12_500 * 8 / 1000 / 5)


async def test_probe_process_list(start_server: StartServer, keys: Keys, store: Store) -> None:
    server = await start_server()
    long_command = "python train.py " + "--flag " * 60
    server.files.set_processes(
        ["/sbin/init", "python3 -m torch.distributed.run train.py", long_command, "sh -s"]
    )
    server.files.set_sessions(2)

    result = await probe_vms([vm_at(server.port)], ssh_settings(keys), store, NOW, rule="idle")

    processes = result.samples[0].processes
    assert processes is not None
    assert processes[:2] == ("/sbin/init", "python3 -m torch.distributed.run train.py")
    assert processes[2] == long_command[:MAX_PROCESS_CHARS].strip()
    assert "sh -s" not in processes
    assert result.sessions == {"vm-1": 2}
    stored = await store.idle_samples(since=NOW)
    assert stored["vm-1"][0].processes == processes


async def test_probe_username_from_config(
    start_server: StartServer, keys: Keys, store: Store
) -> None:
    server = await start_server()
    vm = vm_at(server.port, default_user="ubuntu")

    await probe_vms([vm], ssh_settings(keys), store, NOW, rule="idle")
    await probe_vms([vm], ssh_settings(keys, username="ops"), store, NOW, rule="idle")

    assert server.users == ["ubuntu", "ops"]


async def test_probe_skips_unselected_vms(
    start_server: StartServer, keys: Keys, store: Store
) -> None:
    server = await start_server()
    vms = [
        vm_at(server.port, "vm-1", "train-1"),
        vm_at(server.port, "vm-2", "notebook-1"),
        vm_at(server.port, "vm-3", "train-3", status="Stopped"),
    ]

    result = await probe_vms(
        vms,
        ssh_settings(keys),
        store,
        NOW,
        rule="idle",
        matcher=lambda vm_id, name: name.startswith("train-"),
    )

    assert [sample.vm_id for sample in result.samples] == ["vm-1"]
    assert server.users == ["user"]


async def test_probe_nvidia_smi_missing(
    start_server: StartServer, keys: Keys, store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    server = await start_server()
    server.files.remove_nvidia_smi()
    server.files.set_load(0.4)
    probe = SshProbe(ssh_settings(keys))

    with caplog.at_level(logging.WARNING, logger="tdbot.probes.ssh"):
        for _ in range(3):
            result = await probe.probe_vms([vm_at(server.port)], store, NOW, rule="idle")

    sample = result.samples[0]
    assert sample.error is None
    assert sample.gpu_util_percent is None
    assert sample.gpu_memory_mb is None
    assert sample.cpu_load == 0.4
    gpu_warnings = [r for r in caplog.records if "no GPU readings" in r.getMessage()]
    assert len(gpu_warnings) == 1
    assert "not installed" in gpu_warnings[0].getMessage()


async def test_probe_nvidia_smi_failing(
    start_server: StartServer, keys: Keys, store: Store
) -> None:
    server = await start_server()
    server.files.set_gpu(
        ["NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver."],
        status=9,
    )

    result = await probe_vms([vm_at(server.port)], ssh_settings(keys), store, NOW, rule="idle")

    sample = result.samples[0]
    assert sample.error is None
    assert sample.gpu_util_percent is None
    assert sample.gpu_memory_mb is None
    assert sample.cpu_load == 0.05


# --- failures ------------------------------------------------------------------------


async def test_probe_connection_refused(keys: Keys, store: Store) -> None:
    result = await probe_vms([vm_at(closed_port())], ssh_settings(keys), store, NOW, rule="idle")

    [sample] = result.samples
    assert sample.error is not None
    assert "refused" in sample.error
    assert sample.gpu_util_percent is None
    assert result.decisions == []
    assert (await store.idle_samples(since=NOW))["vm-1"][0].error == sample.error


async def test_probe_command_timeout(start_server: StartServer, keys: Keys, store: Store) -> None:
    server = await start_server(mode="hang")
    settings = ssh_settings(keys, command_timeout="300ms")

    started = asyncio.get_running_loop().time()
    result = await probe_vms([vm_at(server.port)], settings, store, NOW, rule="idle")
    elapsed = asyncio.get_running_loop().time() - started

    [sample] = result.samples
    assert sample.error is not None
    assert "did not finish within 0.3 s" in sample.error
    assert elapsed < 3.0


async def test_probe_connect_timeout(keys: Keys, store: Store) -> None:
    async def never_greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    silent = await asyncio.start_server(never_greet, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    settings = ssh_settings(keys, connect_timeout="300ms")
    try:
        result = await probe_vms([vm_at(port)], settings, store, NOW, rule="idle")
    finally:
        silent.close()
        await silent.wait_closed()

    [sample] = result.samples
    assert sample.error is not None
    assert "timed out after 0.3 s" in sample.error


async def test_probe_login_rejected(
    start_server: StartServer, tmp_path: Path, store: Store
) -> None:
    server = await start_server()
    stranger = asyncssh.generate_private_key("ssh-ed25519")
    stranger_file = tmp_path / "stranger_key"
    stranger.write_private_key(stranger_file)
    settings = SshSettings(key_file=stranger_file)

    result = await probe_vms([vm_at(server.port)], settings, store, NOW, rule="idle")

    [sample] = result.samples
    assert sample.error is not None
    assert "rejected" in sample.error
    assert "authorized_keys" in sample.error


async def test_probe_malformed_output(start_server: StartServer, keys: Keys, store: Store) -> None:
    server = await start_server(mode="garbage")

    result = await probe_vms([vm_at(server.port)], ssh_settings(keys), store, NOW, rule="idle")

    [sample] = result.samples
    assert sample.error is not None
    assert "malformed" in sample.error


async def test_probe_without_key_file(store: Store) -> None:
    result = await probe_vms([vm_at(22)], SshSettings(), store, NOW, rule="idle")

    [sample] = result.samples
    assert sample.error is not None
    assert "ssh.key_file is not set" in sample.error


async def test_probe_vm_without_address(keys: Keys, store: Store) -> None:
    vm = VirtualMachine.model_validate({"id": "vm-1", "name": "x", "status": "Running"})

    result = await probe_vms([vm], ssh_settings(keys), store, NOW, rule="idle")

    [sample] = result.samples
    assert sample.error is not None
    assert "no SSH address" in sample.error


async def test_probe_failure_logged_once(
    keys: Keys, store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    probe = SshProbe(ssh_settings(keys))
    vms = [vm_at(closed_port(), "vm-1"), vm_at(closed_port(), "vm-2")]

    with caplog.at_level(logging.WARNING, logger="tdbot.probes.ssh"):
        for _ in range(3):
            await probe.probe_vms(vms, store, NOW, rule="idle")

    failures = [r for r in caplog.records if "failed (refused)" in r.getMessage()]
    assert len(failures) == 2
    assert sorted(r.getMessage().split("(")[1].split(")")[0] for r in failures) == ["vm-1", "vm-2"]


# --- host keys -----------------------------------------------------------------------


async def test_probe_changed_host_key(start_server: StartServer, keys: Keys, store: Store) -> None:
    original = await start_server()
    impostor = await start_server()
    probe = SshProbe(ssh_settings(keys))
    await probe.probe_vms([vm_at(original.port)], store, NOW, rule="idle")

    result = await probe.probe_vms([vm_at(impostor.port)], store, NOW, rule="idle")

    [sample] = result.samples
    expected = original.host_key.get_fingerprint("sha256")
    presented = impostor.host_key.get_fingerprint("sha256")
    assert sample.error is not None
    assert sample.error.startswith(f"host key changed: expected {expected}, got {presented}")
    assert "forget_host_key('vm-1')" in sample.error
    assert impostor.users == []
    [alert] = result.decisions
    assert isinstance(alert, FireAlert)
    assert alert.severity is Severity.CRITICAL
    assert alert.rule == "idle"
    assert alert.subject == "vm-1:ssh-host-key"
    assert alert.evidence["presented_fingerprint"] == presented
    record = await store.get_host_key("vm-1")
    assert record is not None
    assert record.fingerprint == expected


async def test_probe_changed_key_type(start_server: StartServer, keys: Keys, store: Store) -> None:
    original = await start_server()
    rsa = await start_server(host_key=asyncssh.generate_private_key("ssh-rsa", key_size=2048))
    probe = SshProbe(ssh_settings(keys))
    await probe.probe_vms([vm_at(original.port)], store, NOW, rule="idle")

    result = await probe.probe_vms([vm_at(rsa.port)], store, NOW, rule="idle")

    [sample] = result.samples
    assert sample.error is not None
    assert sample.error.startswith("host key changed")
    assert rsa.host_key.get_fingerprint("sha256") in sample.error


async def test_forgotten_host_key_trusted_again(
    start_server: StartServer, keys: Keys, store: Store
) -> None:
    original = await start_server()
    rebuilt = await start_server()
    probe = SshProbe(ssh_settings(keys))
    first = await probe.probe_vms([vm_at(original.port)], store, NOW, rule="idle")
    await probe.probe_vms([vm_at(rebuilt.port)], store, NOW, rule="idle")

    assert await store.forget_host_key("vm-1") is True
    assert await store.forget_host_key("vm-1") is False
    again = await probe.probe_vms([vm_at(rebuilt.port)], store, NOW, rule="idle")

    assert isinstance(first.decisions[0], ResolveAlert)
    assert again.samples[0].error is None
    [resolve] = again.decisions
    assert isinstance(resolve, ResolveAlert)
    assert resolve.subject == "vm-1:ssh-host-key"
    record = await store.get_host_key("vm-1")
    assert record is not None
    assert record.fingerprint == rebuilt.host_key.get_fingerprint("sha256")


async def test_changed_key_alert_sent_once(
    start_server: StartServer, keys: Keys, store: Store
) -> None:
    original = await start_server()
    impostor = await start_server()
    probe = SshProbe(ssh_settings(keys))
    notifier = RecordingNotifier()
    alerts = AlertManager(store, notifier, repeat_interval=timedelta(hours=4))
    await probe.probe_vms([vm_at(original.port)], store, NOW, rule="idle")

    for minute in range(3):
        now = NOW + timedelta(minutes=minute)
        result = await probe.probe_vms([vm_at(impostor.port)], store, now, rule="idle")
        await alerts.handle_run("idle", result.decisions, now, kind="idle_stop")

    assert len(notifier.messages) == 1
    text = notifier.messages[0].title + "\n".join(notifier.messages[0].lines)
    assert "changed" in text


# --- concurrency ---------------------------------------------------------------------


async def test_probe_concurrency_bounded(
    start_server: StartServer, keys: Keys, store: Store
) -> None:
    server = await start_server(delay_seconds=0.2)
    vms = [vm_at(server.port, f"vm-{n}", f"train-{n}") for n in range(5)]

    result = await probe_vms(vms, ssh_settings(keys, max_concurrent=2), store, NOW, rule="idle")

    assert [sample.error for sample in result.samples] == [None] * 5
    assert server.max_active == 2


# --- parser and settings -------------------------------------------------------------


def probe_output(**sections: str) -> str:
    values = {
        "gpu": "10, 100",
        "gpu-status": "0",
        "loadavg": "0.10 0.10 0.10 1/1 1",
        "netdev": NETDEV_HEADER + "  eth0: 5 0 0 0 0 0 0 0 7 0 0 0 0 0 0 0",
        "who": "0",
        "ps": "init",
    } | sections
    lines = ["@@tdbot:probe 1", "@@tdbot:gpu", values["gpu"]]
    lines.append(f"@@tdbot:gpu-status {values['gpu-status']}")
    for name in ("loadavg", "netdev", "who", "ps"):
        lines += [f"@@tdbot:{name}", values[name]]
    return "\n".join([*lines, "@@tdbot:end"]) + "\n"


def test_parser_reads_every_section() -> None:
    reading = parse_probe_output(probe_output())

    assert reading.gpu_util_percent == 10.0
    assert reading.gpu_memory_mb == 100.0
    assert reading.cpu_load == 0.1
    assert reading.network_bytes == 12
    assert reading.sessions == 0
    assert reading.processes == ("init",)


def test_parser_gpu_not_available() -> None:
    reading = parse_probe_output(probe_output(gpu="[N/A], 100\n50, 200"))

    assert reading.gpu_util_percent is None
    assert reading.gpu_memory_mb == 300.0
    assert reading.gpu_error is None


def test_parser_keeps_marker_in_ps() -> None:
    reading = parse_probe_output(probe_output(ps="init\n@@tdbot:end --fake"))

    assert reading.processes == ("init", "@@tdbot:end --fake")


@pytest.mark.parametrize(
    ("output", "problem"),
    [
        ("", "does not start"),
        ("@@tdbot:probe 1\n@@tdbot:gpu\n", "does not end"),
        (probe_output(gpu="lots, of, fields"), "2 fields"),
        (probe_output(loadavg="high"), "not a load average"),
        (probe_output(netdev="eth0: 1 2"), "malformed"),
        (probe_output().replace("@@tdbot:who\n0\n", ""), "sections missing"),
    ],
)
def test_parser_rejects_malformed(output: str, problem: str) -> None:
    with pytest.raises(ProbeOutputError, match=problem):
        parse_probe_output(output)


def test_script_is_posix_sh() -> None:
    assert "pipefail" not in PROBE_SCRIPT
    assert "[[" not in PROBE_SCRIPT


def test_settings_key_file_relative(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(
        '[ssh]\nkey_file = "keys/probe"\nconnect_timeout = "5s"\nmax_concurrent = 3\n'
    )

    settings = load_settings(config)

    assert settings.ssh.key_file == tmp_path / "keys" / "probe"
    assert settings.ssh.connect_timeout == timedelta(seconds=5)
    assert settings.ssh.command_timeout == timedelta(seconds=15)
    assert settings.ssh.max_concurrent == 3
    assert settings.ssh.username is None


# --- engine --------------------------------------------------------------------------

IDLE_SSH = IdleStopRule.model_validate(
    {
        "name": "idle-ssh",
        "kind": "idle_stop",
        "every": "5m",
        "select": {"names": ["train-*"]},
        "window": "30m",
        "min_samples": 3,
        "max_sample_age": "10m",
        "grace_after_start": "15m",
        "warning": "15m",
        "signals": {
            "gpu_util_below_percent": 5,
            "gpu_memory_below_mb": 500,
            "cpu_load_below": 0.5,
            "network_below_kbps": 50,
        },
        "sources": ["ssh"],
    }
)


async def test_engine_ssh_rule_stops_idle(
    start_server: StartServer, keys: Keys, tmp_path: Path
) -> None:
    """The simulator's VMs get 127.0.0.1 as dedicated IP and port 22 forwarded to a test server."""
    idle_server = await start_server()
    busy_server = await start_server()
    busy_server.files.set_gpu(["96, 22000"])
    busy_server.files.set_load(7.5)
    market = make_test_market()
    vm_ids = {}
    for name, server in (("train-idle", idle_server), ("train-busy", busy_server)):
        vm = market.add_vm(
            hostnode_id=HOSTNODE_4090,
            gpu_model=GPU_4090,
            vcpus=8,
            ram=32,
            storage=200,
            name=name,
            dedicated_ip_address="127.0.0.1",
        )
        # The hostnode's own free ports are not ours to listen on; point port 22 at
        # the test server instead.
        vm.port_forwards = {server.port: 22}
        vm_ids[name] = vm.id

    notifier = RecordingNotifier()
    results: list[TickResult] = []
    async with running_simulator(market) as simulator:
        settings = Settings(
            tensordock=TensorDockSettings(base_url=simulator.api_url, read_retries=1),
            safety=SafetySettings(fleet_max_usd_per_hour=50.0),
            daemon=DaemonSettings(rules_dir=tmp_path, database=str(tmp_path / "tdbot.db")),
            heartbeat=HeartbeatSettings(enabled=False),
        )
        secrets = Secrets(api_key=TEST_API_KEY, api_token=TEST_API_TOKEN)
        async with open_daemon(
            settings, secrets, clock=market.clock, notifier=notifier, rules=[IDLE_SSH]
        ) as daemon:
            assert daemon.executor is not None
            probe = SshProbe(ssh_settings(keys), monotonic=lambda: market.now().timestamp())
            engine = RuleEngine(
                store=daemon.store,
                snapshots=daemon.snapshots,
                executor=daemon.executor,
                alerts=AlertManager(daemon.store, notifier, repeat_interval=timedelta(hours=4)),
                clock=market.clock,
                ssh_probe=probe,
            )
            for _ in range(12):
                results.append(await engine.run_rule(IDLE_SSH))
                market.advance(timedelta(minutes=5))

    assert [result.error for result in results] == [None] * 12
    idle_vm, busy_vm = vm_ids["train-idle"], vm_ids["train-busy"]
    warned = tick_of(results, WarnIdle, idle_vm)
    stopped = tick_of(results, Stop, idle_vm)
    # The first sample has no network rate, so the first full window with a rate in
    # every sample ends at minute 35: tick 7. The warning is due 15 minutes later.
    assert warned == 7
    assert stopped == 10
    assert market.vm(idle_vm).status is VmStatus.STOPPED
    assert tick_of(results, WarnIdle, busy_vm) is None
    assert tick_of(results, Stop, busy_vm) is None
    assert market.vm(busy_vm).status is VmStatus.RUNNING
    assert busy_server.users == ["user"] * 12
    assert len(idle_server.users) == 11


def tick_of(results: list[TickResult], kind: type[Decision], vm_id: str) -> int | None:
    """Return the index of the first tick with a decision of `kind` about `vm_id`."""
    for index, result in enumerate(results):
        if any(isinstance(d, kind) and d.subject == vm_id for d in result.decisions):
            return index
    return None


async def test_engine_without_ssh_probe(caplog: pytest.LogCaptureFixture, store: Store) -> None:
    vm = vm_at(22, name="train-1")
    snapshot = MarketSnapshot(taken_at=NOW, hostnodes=None, vms={vm.id: vm}, balance=None)
    hook = ProbeHook(None)

    with caplog.at_level(logging.WARNING, logger="tdbot.probes"):
        for _ in range(3):
            assert await hook.before_evaluation(IDLE_SSH, snapshot, store, NOW) == []

    assert await store.idle_samples(since=NOW) == {}
    assert len([r for r in caplog.records if "not set up" in r.getMessage()]) == 1
