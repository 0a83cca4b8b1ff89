"""A throwaway PostgreSQL server for the store tests, and a fresh database per test.

`tests/conftest.py` registers this module as a pytest plugin. One server runs per test
session: initdb into a temporary folder, trust authentication for connections from
127.0.0.1 only, listening on 127.0.0.1 at a free port, stopped with `pg_ctl stop -m fast`
when the session ends, even after failed tests. Each test that takes `postgres_url`
gets a new database, which is dropped after the test.

The server binaries are found with `pg_config --bindir`, then beside an `initdb` on PATH,
then in /usr/lib/postgresql/<version>/bin. Without them, or without the asyncpg driver,
the PostgreSQL tests are skipped, except when the CI environment variable is set: CI
installs both, so there they fail. initdb refuses to run as root, so as root the server
runs as the `postgres` user.

Tests that take the `store_url` fixture run once on SQLite and once on PostgreSQL,
unless they are marked `sqlite_only`. Deselect the PostgreSQL runs with
`-m "not postgresql"`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import re
import shlex
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

# Bounds of every wait on the server, in seconds. On a 2-core test machine initdb took
# about 1 s and the start 0.1 s, so the bounds leave room for a loaded CI machine.
INITDB_TIMEOUT = 60
START_TIMEOUT = 30
STOP_TIMEOUT = 30
QUERY_TIMEOUT = 30
# Ports a start tries, because another process may take a free port before the server
# binds it.
START_ATTEMPTS = 3
BIND_FAILURE = "could not create any TCP/IP sockets"

SUPERUSER = "postgres"
HOST = "127.0.0.1"
SERVER_BINARIES = ("initdb", "pg_ctl", "postgres")
INSTALL_HINT = "install them with `apt-get install postgresql` (Debian, Ubuntu)"

# Durability is useless for a server that is deleted after the session, and without
# it CREATE DATABASE and commits wait for no disk flush.
SERVER_SETTINGS = (
    "fsync=off",
    "synchronous_commit=off",
    "full_page_writes=off",
    # Only TCP on 127.0.0.1, so no Unix socket folder has to exist or be writable.
    "unix_socket_directories=",
)

# Connections from 127.0.0.1 are trusted, and every other address is rejected because
# no line matches it. There is no Unix socket, so no "local" line.
PG_HBA = "host all all 127.0.0.1/32 trust\n"


@dataclass(frozen=True)
class PostgresServer:
    """A running server: its binaries, data folder, log file and port on 127.0.0.1."""

    bin_dir: Path
    data_dir: Path
    log_file: Path
    port: int

    def url(self, database: str) -> str:
        """Return the SQLAlchemy asyncpg URL of `database` on this server."""
        return f"postgresql+asyncpg://{SUPERUSER}@{HOST}:{self.port}/{database}"

    def create_database(self, name: str, options: str = "") -> str:
        """Create database `name` with CREATE DATABASE `options`, and return its URL."""
        self.run_sql(f"CREATE DATABASE {name} {options}".strip())
        return self.url(name)

    def drop_database(self, name: str) -> None:
        # FORCE ends connections a failed test left open, so the drop cannot hang on them.
        self.run_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def run_sql(self, statement: str) -> None:
        """Run one SQL statement as the superuser in the `postgres` database with psql."""
        command = [
            str(self.bin_dir / "psql"),
            "--no-psqlrc",
            "--quiet",
            "--set=ON_ERROR_STOP=1",
            f"--host={HOST}",
            f"--port={self.port}",
            f"--username={SUPERUSER}",
            "--dbname=postgres",
            f"--command={statement}",
        ]
        environment = {**os.environ, "PGCONNECT_TIMEOUT": str(QUERY_TIMEOUT)}
        _run(command, timeout=QUERY_TIMEOUT, env=environment)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "postgresql: runs against the throwaway PostgreSQL server of the session"
    )
    config.addinivalue_line(
        "markers", "sqlite_only: runs on SQLite only, even where `store_url` takes both"
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Run each test that takes `store_url` on SQLite and, unless `sqlite_only`, PostgreSQL."""
    if "store_url" not in metafunc.fixturenames:
        return
    backends = [pytest.param("sqlite", id="sqlite")]
    if metafunc.definition.get_closest_marker("sqlite_only") is None:
        backends.append(pytest.param("postgresql", id="postgresql", marks=pytest.mark.postgresql))
    metafunc.parametrize("store_url", backends, indirect=True)


@pytest.fixture
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Return the path or URL of a new, empty database on the backend of the test's run."""
    if request.param == "sqlite":
        return str(tmp_path / "tdbot.db")
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """Create a database with a unique name, return its URL, and drop it after the test."""
    name = unique_database_name()
    yield postgres_server.create_database(name)
    postgres_server.drop_database(name)


def unique_database_name() -> str:
    return f"tdbot_test_{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """Start a PostgreSQL server for the session and stop it when the session ends."""
    _require_driver()
    bin_dir = _server_bin_dir()
    runner_prefix = _runner_prefix()
    folder = Path(tempfile.mkdtemp(prefix="tdbot-postgres-"))
    try:
        if runner_prefix:
            shutil.chown(folder, user=SUPERUSER, group=None)
        data_dir = folder / "data"
        _init_data_dir(bin_dir, data_dir, runner_prefix)
        server = _start_on_free_port(bin_dir, data_dir, folder / "server.log", runner_prefix)
        try:
            yield server
        finally:
            _stop(server, runner_prefix)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# --- finding the driver and the binaries -------------------------------------------


def _require_driver() -> None:
    """Skip (fail under CI) when asyncpg, the driver of `postgresql+asyncpg` URLs, is missing."""
    if importlib.util.find_spec("asyncpg") is not None:
        return
    message = (
        "asyncpg not installed; install it with `pip install -e '.[postgres]'` "
        "or `pip install asyncpg`"
    )
    if os.environ.get("CI"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def _server_bin_dir() -> Path:
    """Return the folder of initdb, pg_ctl and postgres, or skip (fail under CI) without one."""
    for candidate in _candidate_bin_dirs():
        if all((candidate / name).is_file() for name in SERVER_BINARIES):
            return candidate

    binaries = ", ".join(SERVER_BINARIES)
    message = f"PostgreSQL server binaries ({binaries}) not found; {INSTALL_HINT}"
    if os.environ.get("CI"):
        pytest.fail(f"{message}. CI must install them before the tests run.", pytrace=False)
    pytest.skip(message)


def _candidate_bin_dirs() -> Iterator[Path]:
    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        # NOTE: libpq-dev's pg_config names the server's folder even when no server is
        # installed there, so every candidate is checked for the binaries.
        result = subprocess.run(
            [pg_config, "--bindir"], capture_output=True, text=True, timeout=QUERY_TIMEOUT
        )
        if result.returncode == 0 and result.stdout.strip():
            yield Path(result.stdout.strip())

    initdb = shutil.which("initdb")
    if initdb is not None:
        yield Path(initdb).parent

    # Debian and Ubuntu keep each major version in its own folder; the newest goes first.
    versions = Path("/usr/lib/postgresql").glob("*/bin")
    yield from sorted(versions, key=_version_key, reverse=True)


def _version_key(bin_dir: Path) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", bin_dir.parent.name))


def _runner_prefix() -> list[str]:
    """Return the command prefix that runs the server binaries as a non-root user.

    As root that is `runuser -u postgres --`, because initdb refuses to run as root.
    Otherwise the binaries run as the current user and the prefix is empty.
    """
    if os.geteuid() != 0:
        return []

    runuser = shutil.which("runuser")
    try:
        pwd.getpwnam(SUPERUSER)
    except KeyError:
        runuser = None
    if runuser is None:
        message = (
            "running as root, but initdb refuses root and no `postgres` user or runuser "
            f"command exists to run it as; {INSTALL_HINT}, which creates the user"
        )
        if os.environ.get("CI"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return [runuser, "-u", SUPERUSER, "--"]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        port: int = probe.getsockname()[1]
        return port


# --- running the server ------------------------------------------------------------


def _init_data_dir(bin_dir: Path, data_dir: Path, prefix: list[str]) -> None:
    command = [
        *prefix,
        str(bin_dir / "initdb"),
        f"--pgdata={data_dir}",
        f"--username={SUPERUSER}",
        "--auth=trust",
        "--encoding=UTF8",
        # The C locale sorts text byte by byte, as SQLite does, on every machine.
        "--locale=C",
        "--no-sync",
    ]
    _run(command, timeout=INITDB_TIMEOUT)

    # Replace the generated rules, which also trust Unix socket connections.
    hba_file = data_dir / "pg_hba.conf"
    hba_file.write_text(PG_HBA)
    if prefix:
        shutil.chown(hba_file, user=SUPERUSER, group=None)


def _start_on_free_port(
    bin_dir: Path, data_dir: Path, log_file: Path, prefix: list[str]
) -> PostgresServer:
    """Start the server on a free port, and on another one when that port was taken."""
    for attempt in range(1, START_ATTEMPTS + 1):
        server = PostgresServer(bin_dir, data_dir, log_file, port=_free_port())
        log_start = log_file.stat().st_size if log_file.exists() else 0
        try:
            _start(server, prefix)
        except RuntimeError:
            # Another process may take the port between _free_port and the server's
            # bind; only that failure is worth another port.
            port_taken = BIND_FAILURE in _read_log(server, log_start)
            if port_taken and attempt < START_ATTEMPTS:
                continue
            raise
        return server
    raise AssertionError("unreachable: the last attempt returns or raises")


def _start(server: PostgresServer, prefix: list[str]) -> None:
    """Start the server and wait until it accepts connections, for START_TIMEOUT at most."""
    options = " ".join(
        [f"-c listen_addresses={HOST}", f"-p {server.port}"]
        + [f"-c {setting}" for setting in SERVER_SETTINGS]
    )
    command = [
        *prefix,
        str(server.bin_dir / "pg_ctl"),
        "start",
        f"--pgdata={server.data_dir}",
        f"--log={server.log_file}",
        "--wait",
        f"--timeout={START_TIMEOUT}",
        f"--options={options}",
    ]
    try:
        # pg_ctl waits until the server accepts connections; the extra seconds only
        # bound pg_ctl itself.
        _run(command, timeout=START_TIMEOUT + 10)
    except RuntimeError as error:
        # A server that started too slowly may still be running. The start failure is
        # the error to report, so a failed stop adds nothing to it.
        with contextlib.suppress(RuntimeError):
            _stop(server, prefix, mode="immediate")
        raise RuntimeError(
            f"PostgreSQL failed to start on {HOST}:{server.port} "
            f"(time limit {START_TIMEOUT} s): {error}\n"
            f"Server log {server.log_file}:\n{_read_log(server)}"
        ) from error


def _stop(server: PostgresServer, prefix: list[str], *, mode: str = "fast") -> None:
    if not (server.data_dir / "postmaster.pid").exists():
        return
    command = [
        *prefix,
        str(server.bin_dir / "pg_ctl"),
        "stop",
        f"--pgdata={server.data_dir}",
        f"--mode={mode}",
        "--wait",
        f"--timeout={STOP_TIMEOUT}",
    ]
    _run(command, timeout=STOP_TIMEOUT + 10)


def _run(command: list[str], *, timeout: float, env: dict[str, str] | None = None) -> None:
    """Run a command; raise RuntimeError with its output when it fails or times out."""
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as error:
        raise RuntimeError(f"{shlex.join(command)} timed out after {timeout} s") from error
    if result.returncode != 0:
        output = (result.stdout + result.stderr).strip()
        raise RuntimeError(
            f"{shlex.join(command)} failed with exit code {result.returncode}:\n{output}"
        )


def _read_log(server: PostgresServer, offset: int = 0) -> str:
    """Return the server log from byte `offset` on, or why it cannot be read."""
    try:
        with server.log_file.open("rb") as log:
            log.seek(offset)
            return log.read().decode(errors="replace")
    except OSError as error:
        return f"(not readable: {error})"
