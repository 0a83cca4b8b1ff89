"""Read a VM's activity over SSH for idle_stop rules with `sources: [ssh]`.

`SshProbe` logs in to each selected Running VM through its forwarded SSH port
(`VirtualMachine.ssh_host`, `ssh_port`) with the configured key, runs one short shell
script (`tdbot.probes.script`) in one session, and turns the output into an
`IdleSample` with `source="ssh"`:

- GPU utilisation is the highest over the VM's GPUs and GPU memory the total. When
  nvidia-smi is missing or fails, both are None, so a rule with a GPU threshold finds a
  missing signal and does not judge the VM idle;
- the CPU load is the 1-minute load average;
- network traffic in kbit/s comes from the byte counters of two probes of the same VM,
  so the first probe after a start, and a probe after the counters were reset, has none;
- the process list is stored with the sample, for the rule's `busy_processes`.

The number of logged-in sessions (`who`) is returned in `ProbeResult.sessions` and
logged, but it does not make a VM busy, because `IdleSample` has no field for it. An
interactive OpenSSH login shows in the process list as "sshd: <user>@pts/<n>" (the
process is named "sshd-session" from OpenSSH 9.8 on), so a rule that should treat a
login as busy can list the pattern "sshd*: *@pts/*" in `busy_processes`.

Every failure (no address, no key, refused, timed out, login rejected, changed host
key, malformed output) gives a sample with `error` set, which keeps the VM from being
judged idle. A failure never stops a VM. Each failure is logged once per VM and
reason, not on every tick. A changed host key also gives a critical FireAlert.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import asyncssh

from tdbot.config import SshSettings
from tdbot.evaluation.model import (
    Decision,
    FireAlert,
    IdleSample,
    ResolveAlert,
    Severity,
)
from tdbot.probes.hook import SSH_SOURCE
from tdbot.probes.hostkeys import (
    HostKey,
    HostKeyCheck,
    forget_hint,
    host_key_algorithms,
    host_key_subject,
    trusted_keys,
)
from tdbot.probes.script import (
    PROBE_COMMAND,
    PROBE_SCRIPT,
    ProbeOutputError,
    ProbeReading,
    parse_probe_output,
)
from tdbot.store.db import Store
from tdbot.tensordock.models import VirtualMachine, VmStatus

logger = logging.getLogger("tdbot.probes.ssh")

# Output above this size is a failure, so a VM cannot fill the daemon's memory.
MAX_OUTPUT_BYTES = 256 * 1024
# Two readings of the byte counters closer than this give no rate, because a rate over
# a fraction of a second is not representative of the traffic over the window.
MIN_RATE_SECONDS = 1.0
# Time allowed to close a connection after the probe is done with it.
CLOSE_SECONDS = 2.0

VmMatcher = Callable[[str, str], bool]


class ProbeFailure(Exception):
    """A probe of one VM failed. `reason` is a stable key, and the message names what failed."""

    def __init__(self, reason: str, message: str, decisions: tuple[Decision, ...] = ()) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.decisions = decisions


@dataclass(frozen=True)
class VmProbe:
    """The outcome of probing one VM: its sample, and alerts the rule should raise."""

    sample: IdleSample
    sessions: int | None = None
    decisions: tuple[Decision, ...] = ()


@dataclass
class ProbeResult:
    """The outcome of probing a rule's VMs in one tick.

    `samples` are already stored, and `decisions` go to the rule's alert handling.
    `sessions` maps each VM whose probe succeeded to its number of logged-in sessions.
    """

    samples: list[IdleSample] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)
    sessions: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class _Target:
    host: str
    port: int
    username: str

    def describe(self) -> str:
        return f"{self.username}@{self.host}:{self.port}"


@dataclass(frozen=True)
class _Counter:
    at: float
    total_bytes: int


class SshProbe:
    """Probe VMs over SSH, keeping byte counters and logged failures between ticks.

    One instance lives as long as the daemon, so network rates can be computed and a
    failure is logged once. `monotonic` returns seconds and is replaceable in tests.
    """

    def __init__(
        self, settings: SshSettings, *, monotonic: Callable[[], float] = time.monotonic
    ) -> None:
        self._settings = settings
        self._monotonic = monotonic
        self._semaphore = asyncio.Semaphore(settings.max_concurrent)
        self._client_key: asyncssh.SSHKey | None = None
        self._counters: dict[str, _Counter] = {}
        # The last failure reason and the last GPU error logged for each VM id.
        self._failures: dict[str, str] = {}
        self._gpu_errors: dict[str, str] = {}
        # asyncssh logs every connection at INFO; a probe of every VM on every tick
        # would flood the daemon's log. An explicitly configured level is kept.
        asyncssh_logger = logging.getLogger("asyncssh")
        if asyncssh_logger.level == logging.NOTSET:
            asyncssh_logger.setLevel(logging.WARNING)

    async def probe_vms(
        self,
        vms: Iterable[VirtualMachine],
        store: Store,
        now: datetime,
        *,
        rule: str,
        matcher: VmMatcher | None = None,
    ) -> ProbeResult:
        """Probe every Running VM that `matcher(vm_id, vm_name)` selects, concurrently.

        Stores one sample per VM and returns them with the alert decisions of `rule`.
        At most `max_concurrent` probes run at a time.
        """
        selected = [
            vm
            for vm in vms
            if vm.status is VmStatus.RUNNING and (matcher is None or matcher(vm.id, vm.name))
        ]
        probes = await asyncio.gather(
            *(self.probe_vm(vm, store, now, rule=rule) for vm in selected)
        )

        result = ProbeResult()
        for probe in probes:
            await store.add_idle_sample(probe.sample)
            result.samples.append(probe.sample)
            result.decisions.extend(probe.decisions)
            if probe.sessions is not None:
                result.sessions[probe.sample.vm_id] = probe.sessions
        return result

    async def probe_vm(
        self, vm: VirtualMachine, store: Store, now: datetime, *, rule: str
    ) -> VmProbe:
        """Probe one VM and return its sample; failures become a sample with `error`."""
        async with self._semaphore:
            try:
                reading, decisions = await self._read(vm, store, now, rule)
            except ProbeFailure as failure:
                self._log_failure(vm, failure)
                sample = IdleSample(vm_id=vm.id, at=now, source=SSH_SOURCE, error=failure.message)
                return VmProbe(sample, decisions=failure.decisions)
            except Exception as error:
                # A bug in one VM's probe must not keep the rule's other VMs unprobed.
                if self._failures.get(vm.id) != "internal_error":
                    logger.exception("SSH probe of VM %s (%s) failed unexpectedly", vm.name, vm.id)
                self._failures[vm.id] = "internal_error"
                message = f"SSH probe failed unexpectedly: {type(error).__name__}: {error}"
                return VmProbe(IdleSample(vm_id=vm.id, at=now, source=SSH_SOURCE, error=message))

        self._log_success(vm, reading)
        sample = IdleSample(
            vm_id=vm.id,
            at=now,
            gpu_util_percent=reading.gpu_util_percent,
            gpu_memory_mb=reading.gpu_memory_mb,
            cpu_load=reading.cpu_load,
            network_kbps=self._network_kbps(vm.id, reading.network_bytes),
            processes=reading.processes,
            source=SSH_SOURCE,
        )
        return VmProbe(sample, reading.sessions, decisions)

    # --- one probe -------------------------------------------------------------------

    async def _read(
        self, vm: VirtualMachine, store: Store, now: datetime, rule: str
    ) -> tuple[ProbeReading, tuple[Decision, ...]]:
        """Connect, check the host key, run the script and parse its output."""
        target = self._target(vm)
        client_key = self._load_client_key()
        record = await store.get_host_key(vm.id)
        stored = None if record is None else HostKey.from_record(record)

        connection = await self._connect(vm, target, client_key, stored, rule)
        try:
            decisions = await self._remember_host_key(
                vm, target, connection, stored, store, now, rule
            )
            output = await self._run_script(connection, target)
        finally:
            connection.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CLOSE_SECONDS):
                    await connection.wait_closed()

        try:
            return parse_probe_output(output), decisions
        except ProbeOutputError as error:
            raise ProbeFailure(
                "malformed_output", f"probe output from {target.describe()} is malformed: {error}"
            ) from None

    def _target(self, vm: VirtualMachine) -> _Target:
        host, port = vm.ssh_host, vm.ssh_port
        if host is None or port is None:
            raise ProbeFailure(
                "no_address",
                "VM has no SSH address: the API lists no IP address or no port forwarded "
                "to port 22; forward port 22 when deploying",
            )
        return _Target(host, port, self._settings.username or vm.default_user)

    def _load_client_key(self) -> asyncssh.SSHKey:
        """Read the private key once; a missing or unreadable key fails every probe."""
        if self._client_key is not None:
            return self._client_key
        path = self._settings.key_file
        if path is None:
            raise ProbeFailure(
                "no_key_file",
                "ssh.key_file is not set; set it in the configuration to the private key "
                "whose public key is in the VM's authorized_keys",
            )
        self._client_key = _read_private_key(path)
        return self._client_key

    async def _connect(
        self,
        vm: VirtualMachine,
        target: _Target,
        client_key: asyncssh.SSHKey,
        stored: HostKey | None,
        rule: str,
    ) -> asyncssh.SSHClientConnection:
        check = HostKeyCheck(trust_first_key=stored is None)
        timeout = self._settings.connect_timeout.total_seconds()
        try:
            async with asyncio.timeout(timeout):
                connection, _ = await asyncssh.create_connection(
                    lambda: check,
                    target.host,
                    target.port,
                    username=target.username,
                    client_keys=[client_key],
                    known_hosts=trusted_keys(stored),
                    server_host_key_algs=host_key_algorithms(stored),
                    preferred_auth="publickey",
                    agent_path=None,
                    config=None,
                    gss_kex=False,
                )
        except asyncssh.HostKeyNotVerifiable:
            raise _host_key_changed(vm, target, stored, check.presented, rule) from None
        except TimeoutError:
            raise ProbeFailure(
                "connect_timeout",
                f"connecting to {target.describe()} timed out after {timeout:g} s",
            ) from None
        except ConnectionRefusedError:
            raise ProbeFailure(
                "refused",
                f"connection to {target.host}:{target.port} refused; check that sshd runs "
                "on the VM and the port is forwarded",
            ) from None
        except asyncssh.PermissionDenied:
            raise ProbeFailure(
                "login_rejected",
                f"login as {target.username!r} with the key in ssh.key_file was rejected by "
                f"{target.host}:{target.port}; add its public key to that user's "
                "~/.ssh/authorized_keys or set ssh.username",
            ) from None
        except asyncssh.Error as error:
            raise ProbeFailure(
                "ssh_error", f"SSH connection to {target.describe()} failed: {error.reason}"
            ) from None
        except OSError as error:
            raise ProbeFailure(
                "unreachable",
                f"cannot connect to {target.host}:{target.port}: {error.strerror or error}",
            ) from None
        return connection

    async def _remember_host_key(
        self,
        vm: VirtualMachine,
        target: _Target,
        connection: asyncssh.SSHClientConnection,
        stored: HostKey | None,
        store: Store,
        now: datetime,
        rule: str,
    ) -> tuple[Decision, ...]:
        """Store the key of a VM seen for the first time, or note that the stored one was seen.

        A newly trusted key resolves an alert about a changed key, which is open when
        the old key was forgotten after a reinstall.
        """
        server_key = connection.get_server_host_key()
        if server_key is None:
            raise ProbeFailure("ssh_error", f"{target.describe()} presented no host key")
        presented = HostKey.from_ssh_key(server_key)
        if stored is not None:
            await store.touch_host_key(vm.id, now)
            return ()

        record = await store.trust_host_key(
            vm.id,
            key_type=presented.key_type,
            fingerprint=presented.fingerprint,
            public_key=presented.public_key,
            now=now,
        )
        trusted = HostKey.from_record(record)
        if trusted.fingerprint != presented.fingerprint:
            # Another probe stored a different key between our read and our write.
            raise _host_key_changed(vm, target, trusted, presented, rule)
        logger.info(
            "SSH host key of VM %s (%s) trusted on first use: %s",
            vm.name,
            vm.id,
            presented.describe(),
        )
        resolve = ResolveAlert(
            rule=rule,
            subject=host_key_subject(vm.id),
            summary=f"VM {vm.name} now has the trusted SSH host key {presented.describe()}.",
            evidence={"vm_id": vm.id, "fingerprint": presented.fingerprint},
        )
        return (resolve,)

    async def _run_script(self, connection: asyncssh.SSHClientConnection, target: _Target) -> str:
        timeout = self._settings.command_timeout.total_seconds()
        try:
            async with asyncio.timeout(timeout):
                return await _run_probe_script(connection)
        except TimeoutError:
            raise ProbeFailure(
                "command_timeout",
                f"the probe's commands on {target.describe()} did not finish within {timeout:g} s",
            ) from None
        except asyncssh.Error as error:
            raise ProbeFailure(
                "ssh_error", f"running the probe on {target.describe()} failed: {error.reason}"
            ) from None
        except OSError as error:
            raise ProbeFailure(
                "unreachable", f"connection to {target.describe()} lost: {error.strerror or error}"
            ) from None

    # --- readings between probes -------------------------------------------------------

    def _network_kbps(self, vm_id: str, total_bytes: int | None) -> float | None:
        """Return kbit/s since the previous probe of the VM, or None when there is no rate.

        Counters that went down (a reboot resets them) start a new baseline.
        """
        at = self._monotonic()
        if total_bytes is None:
            self._counters.pop(vm_id, None)
            return None
        previous = self._counters.get(vm_id)
        if previous is None or total_bytes < previous.total_bytes:
            self._counters[vm_id] = _Counter(at, total_bytes)
            return None
        elapsed = at - previous.at
        if elapsed < MIN_RATE_SECONDS:
            return None
        self._counters[vm_id] = _Counter(at, total_bytes)
        return (total_bytes - previous.total_bytes) * 8 / 1000 / elapsed

    # --- logging -----------------------------------------------------------------------

    def _log_failure(self, vm: VirtualMachine, failure: ProbeFailure) -> None:
        """Log a failure when it is new for the VM; the same failure again is not logged."""
        if self._failures.get(vm.id) == failure.reason:
            return
        self._failures[vm.id] = failure.reason
        level = logging.ERROR if failure.reason == "host_key_changed" else logging.WARNING
        logger.log(
            level,
            "SSH probe of VM %s (%s) failed (%s), so it is not judged idle: %s",
            vm.name,
            vm.id,
            failure.reason,
            failure.message,
        )

    def _log_success(self, vm: VirtualMachine, reading: ProbeReading) -> None:
        if self._failures.pop(vm.id, None) is not None:
            logger.info("SSH probe of VM %s (%s) works again", vm.name, vm.id)
        if reading.gpu_error is None:
            self._gpu_errors.pop(vm.id, None)
        elif self._gpu_errors.get(vm.id) != reading.gpu_error:
            self._gpu_errors[vm.id] = reading.gpu_error
            logger.warning(
                "SSH probe of VM %s (%s) has no GPU readings: %s",
                vm.name,
                vm.id,
                reading.gpu_error,
            )
        logger.debug(
            "SSH probe of VM %s: GPU %s %%, %s MB, load %s, %s sessions, %d processes",
            vm.id,
            reading.gpu_util_percent,
            reading.gpu_memory_mb,
            reading.cpu_load,
            reading.sessions,
            len(reading.processes),
        )


async def _run_probe_script(connection: asyncssh.SSHClientConnection) -> str:
    """Run the probe script in one session and return its output, at most MAX_OUTPUT_BYTES."""
    async with connection.create_process(
        PROBE_COMMAND, encoding="utf-8", errors="replace"
    ) as process:
        process.stdin.write(PROBE_SCRIPT)
        process.stdin.write_eof()
        chunks: list[str] = []
        size = 0
        while chunk := await process.stdout.read(65536):
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_OUTPUT_BYTES:
                raise ProbeFailure(
                    "malformed_output", f"probe output is larger than {MAX_OUTPUT_BYTES} bytes"
                )
        await process.wait()
    return "".join(chunks)


def _read_private_key(path: Path) -> asyncssh.SSHKey:
    try:
        return asyncssh.read_private_key(path)
    except OSError as error:
        raise ProbeFailure(
            "no_key_file", f"cannot read ssh.key_file {path}: {error.strerror or error}"
        ) from None
    except asyncssh.KeyImportError as error:
        raise ProbeFailure(
            "no_key_file",
            f"ssh.key_file {path} is not a usable private key ({error}); use an OpenSSH or "
            "PEM key without a passphrase",
        ) from None


def _host_key_changed(
    vm: VirtualMachine,
    target: _Target,
    stored: HostKey | None,
    presented: HostKey | None,
    rule: str,
) -> ProbeFailure:
    """Build the failure, with its critical alert, for a host key that is not the stored one."""
    expected = stored.fingerprint if stored is not None else "the stored key"
    got = presented.fingerprint if presented is not None else "an unreadable key"
    hint = forget_hint(vm.id)
    message = f"host key changed: expected {expected}, got {got}; {hint}"
    alert = FireAlert(
        rule=rule,
        subject=host_key_subject(vm.id),
        summary=(
            f"SSH host key of VM {vm.name} at {target.host}:{target.port} changed: "
            f"expected {expected}, got {got}. Someone may be intercepting the connection, "
            f"so the VM is not probed and not judged idle. {hint[0].upper()}{hint[1:]}."
        ),
        evidence={
            "vm_id": vm.id,
            "host": target.host,
            "port": target.port,
            "expected_fingerprint": expected,
            "presented_fingerprint": got,
        },
        severity=Severity.CRITICAL,
    )
    return ProbeFailure("host_key_changed", message, (alert,))


# --- entry points ------------------------------------------------------------------------


async def probe_vms(
    vms: Iterable[VirtualMachine],
    settings: SshSettings,
    store: Store,
    now: datetime,
    *,
    rule: str,
    matcher: VmMatcher | None = None,
) -> ProbeResult:
    """Probe the selected Running VMs once with a new `SshProbe`.

    A new probe has no earlier byte counters, so its samples carry no network rate;
    the daemon keeps one `SshProbe` instead and calls its `probe_vms`.
    """
    return await SshProbe(settings).probe_vms(vms, store, now, rule=rule, matcher=matcher)
