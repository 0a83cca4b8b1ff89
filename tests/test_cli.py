"""Command-line tests: `tdbot` run as a subprocess against a simulator on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sqlite3
import sys
from collections.abc import AsyncIterator
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tdbot.demo import outbid
from tdbot.evaluation.model import IdleSample, IdleWarningState
from tdbot.simulator.faults import FaultMode
from tdbot.simulator.market import SimulatedMarket
from tdbot.simulator.server import SimulatorServer
from tdbot.simulator.testing import (
    TEST_API_KEY,
    TEST_API_TOKEN,
    make_test_market,
    running_simulator,
)
from tdbot.store.db import Store
from tdbot.tensordock.models import VmStatus

REPOSITORY = Path(__file__).resolve().parent.parent
TDBOT = str(Path(sys.executable).parent / "tdbot")
GPU_3060 = "geforcertx3060-pcie-12gb"
GPU_4090 = "geforcertx4090-pcie-24gb"
COMMANDS = ("run", "check", "rules", "hostnodes", "vms", "balance", "demo", "simulator")
# Simulator events that mean the account was changed.
CHANGE_EVENTS = {"deployed", "started", "stopped", "modified", "deleted", "bid_changed"}


@dataclass
class Completed:
    code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def clean_environment(**extra: str) -> dict[str, str]:
    """Return this process's environment without any TDBOT_ variable, plus `extra`."""
    environ = {name: value for name, value in os.environ.items() if not name.startswith("TDBOT_")}
    environ.update({"COLUMNS": "200", "NO_COLOR": "1"}, **extra)
    return environ


def credentials() -> dict[str, str]:
    return {"TDBOT_API_KEY": TEST_API_KEY, "TDBOT_API_TOKEN": TEST_API_TOKEN}


async def run_tdbot(*args: str, environ: dict[str, str] | None = None) -> Completed:
    """Run `tdbot ARGS` to completion without blocking the event loop the simulator uses."""
    process = await asyncio.create_subprocess_exec(
        TDBOT,
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=environ if environ is not None else clean_environment(),
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), 30)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return Completed(process.returncode, stdout.decode(), stderr.decode())


def write_config(folder: Path, api_url: str, rules_dir: Path | str = "rules") -> Path:
    path = folder / "config.toml"
    path.write_text(
        f'[tensordock]\nbase_url = "{api_url}"\ntimeout_seconds = 10\nread_retries = 0\n'
        f'[daemon]\nrules_dir = "{rules_dir}"\ndatabase = "tdbot.db"\nlog_level = "WARNING"\n'
        "[heartbeat]\nenabled = false\n",
        encoding="utf-8",
    )
    return path


@pytest.fixture
def market() -> SimulatedMarket:
    market = make_test_market()
    market.seed_example_vms()
    return market


@pytest.fixture
async def simulator(market: SimulatedMarket) -> AsyncIterator[SimulatorServer]:
    async with running_simulator(market) as server:
        yield server


def vm_named(market: SimulatedMarket, name: str) -> str:
    return next(vm.id for vm in market.vms.values() if vm.name == name)


# --- help and rules ------------------------------------------------------------------


async def test_help_lists_commands() -> None:
    result = await run_tdbot("--help")

    assert result.code == 0
    for command in COMMANDS:
        assert re.search(rf"^\s+{command}\s", result.stdout, re.MULTILINE), command


async def test_help_skips_heavy_imports() -> None:
    script = (
        "import sys\n"
        "from tdbot.cli import main\n"
        "try:\n"
        "    main(['--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = ['telegram', 'sqlmodel', 'sqlalchemy', 'httpx', 'uvicorn', 'tdbot.simulator']\n"
        "print('loaded:', [name for name in heavy if name in sys.modules])\n"
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, stdout=asyncio.subprocess.PIPE, env=clean_environment()
    )
    stdout, _ = await process.communicate()

    assert process.returncode == 0
    assert "loaded: []" in stdout.decode()


async def test_rules_validate_examples() -> None:
    result = await run_tdbot("rules", "validate", str(REPOSITORY / "rules"))

    assert result.code == 0
    assert "4 rules OK in 4 files" in result.stdout


async def test_rules_validate_bad_rules() -> None:
    folder = REPOSITORY / "tests" / "rules_bad"

    result = await run_tdbot("rules", "validate", str(folder))

    assert result.code == 1
    assert "Traceback" not in result.output
    # Every error is "file:line:column: field: message".
    errors = [line for line in result.stdout.splitlines() if line.startswith(str(folder))]
    assert len(errors) == 7
    for line in errors:
        assert re.match(rf"{re.escape(str(folder))}/[\w.]+:\d+:\d+: \S+: ", line), line
    assert "unknown_field.yaml:4:1: evry: unknown field 'evry'" in result.stdout
    assert "7 errors in 7 of 7 files" in result.stdout


# --- check ---------------------------------------------------------------------------


async def seed_idle_stop_due(database: Path, vm_id: str) -> None:
    """Store what the idle-stop rule needs to stop `vm_id` now: a start, samples, a due warning."""
    now = datetime.now(UTC)
    store = await Store.open(database)
    try:
        await store.set_running_since("idle-stop", vm_id, now - timedelta(hours=2))
        for minutes_ago in (20, 12, 4):
            sample = IdleSample(
                vm_id=vm_id, at=now - timedelta(minutes=minutes_ago), gpu_util_percent=0.0
            )
            await store.add_idle_sample(sample)
        warning = IdleWarningState(
            warned_at=now - timedelta(minutes=20), due_at=now - timedelta(minutes=1)
        )
        await store.save_idle_warning("idle-stop", vm_id, warning)
    finally:
        await store.close()


def count_rows(database: Path, table: str) -> int:
    with closing(sqlite3.connect(database)) as connection:
        (count,) = connection.execute(f"SELECT count(*) FROM {table}").fetchone()  # noqa: S608
    return int(count)


async def test_check_prints_plan_changes_nothing(
    tmp_path: Path, market: SimulatedMarket, simulator: SimulatorServer
) -> None:
    config = write_config(tmp_path, simulator.api_url, REPOSITORY / "rules")
    busy_vm = vm_named(market, "api-server-4090")
    spot_vm = vm_named(market, "whisper-2x3090")
    await seed_idle_stop_due(tmp_path / "tdbot.db", busy_vm)
    outbid(market, market.vm(spot_vm))
    statuses = {vm.id: vm.status for vm in market.vms.values()}
    events = len(market.events)

    result = await run_tdbot(
        "check", "--config", str(config), environ=clean_environment(**credentials())
    )

    assert result.code == 0, result.output
    for rule in ("cheapest-4090", "idle-stop", "low-balance", "spot-guard"):
        assert f"rule {rule}:" in result.stdout
    assert f"Stop {busy_vm}:" in result.stdout
    assert f"Rebid {spot_vm}:" in result.stdout
    assert result.stdout.count("-> dry_run:") == 2
    assert "evidence: " in result.stdout
    assert "window_seconds=" in result.stdout
    assert "Nothing was changed (dry run)." in result.stdout
    assert {event.kind for event in market.events[events:]} & CHANGE_EVENTS == set()
    assert {vm.id: vm.status for vm in market.vms.values()} == statuses
    assert market.vm(spot_vm).status is VmStatus.OUTBID
    # The pass ran on a copy of the database, so the daemon's own file is unchanged.
    assert count_rows(tmp_path / "tdbot.db", "rule_run") == 0
    assert count_rows(tmp_path / "tdbot.db", "action") == 0


async def test_check_without_database(tmp_path: Path, simulator: SimulatorServer) -> None:
    config = write_config(tmp_path, simulator.api_url, REPOSITORY / "rules")

    result = await run_tdbot(
        "check", "--config", str(config), environ=clean_environment(**credentials())
    )

    assert result.code == 0, result.output
    assert "4 rules checked" in result.stdout
    assert not (tmp_path / "tdbot.db").exists()


async def test_check_fails_when_api_down(
    tmp_path: Path, market: SimulatedMarket, simulator: SimulatorServer
) -> None:
    config = write_config(tmp_path, simulator.api_url, REPOSITORY / "rules")
    market.inject_fault("client/list", FaultMode.HTTP_500, count=10)

    result = await run_tdbot(
        "check", "--config", str(config), environ=clean_environment(**credentials())
    )

    assert result.code == 1, result.output
    assert "Could not load vms" in result.stdout
    assert "plan is incomplete" in result.stdout


async def test_missing_rules_folder_named(tmp_path: Path, simulator: SimulatorServer) -> None:
    config = write_config(tmp_path, simulator.api_url, tmp_path / "no-such-rules")

    for command in ("check", "run"):
        result = await run_tdbot(
            command, "--config", str(config), environ=clean_environment(**credentials())
        )

        assert result.code != 0, command
        assert "no-such-rules not found" in result.output, command
        assert "Traceback" not in result.output, command


# --- market and account views --------------------------------------------------------


async def test_hostnodes_json_sorted_by_price(tmp_path: Path, simulator: SimulatorServer) -> None:
    config = write_config(tmp_path, simulator.api_url)

    result = await run_tdbot("hostnodes", "--gpu", GPU_4090, "--json", "--config", str(config))

    assert result.code == 0, result.output
    offers = json.loads(result.stdout)
    prices = [offer["price"]["total_usd_per_hour"] for offer in offers]
    assert len(offers) >= 2
    assert prices == sorted(prices)
    assert {offer["gpu_model"] for offer in offers} == {GPU_4090}
    assert all(offer["vcpus"] >= 8 and offer["ram_gb"] >= 32 for offer in offers)


async def test_hostnodes_without_gpu_fails(tmp_path: Path, simulator: SimulatorServer) -> None:
    config = write_config(tmp_path, simulator.api_url)

    result = await run_tdbot("hostnodes", "--config", str(config))

    assert result.code == 1
    assert "--gpu" in result.stderr
    assert "Traceback" not in result.output


async def test_hostnodes_empty_result_explained(tmp_path: Path, simulator: SimulatorServer) -> None:
    config = write_config(tmp_path, simulator.api_url)

    result = await run_tdbot("hostnodes", "gpu=4090 country=Canda", "--config", str(config))

    assert result.code == 0, result.output
    assert "No hostnode can host this spec; (hostnode, GPU model) pairs by reason:" in (
        result.stderr
    )
    assert "location" in result.stderr
    assert "No hostnode lists the country 'Canda'; did you mean Canada" in result.stderr


@pytest.mark.parametrize(
    ("gpu", "suggestion"),
    [("nonexistent-gpu", None), ("rtx4090", f"Did you mean {GPU_4090}?")],
)
async def test_hostnodes_unknown_gpu_fails(
    tmp_path: Path, simulator: SimulatorServer, gpu: str, suggestion: str | None
) -> None:
    config = write_config(tmp_path, simulator.api_url)

    result = await run_tdbot("hostnodes", "--gpu", gpu, "--config", str(config))

    assert result.code == 1
    assert result.stdout == ""
    assert f"no hostnode offers GPU model '{gpu}'." in result.stderr
    assert "GPU model ids on the market:" in result.stderr
    assert f"  a100-pcie-40gb, a100-pcie-80gb, a100-sxm4-80gb, {GPU_3060}\n" in result.stderr
    assert GPU_4090 in result.stderr
    if suggestion is None:
        assert "Did you mean" not in result.stderr
    else:
        assert suggestion in result.stderr


async def test_vms_json_lists_account(
    tmp_path: Path, market: SimulatedMarket, simulator: SimulatorServer
) -> None:
    config = write_config(tmp_path, simulator.api_url)

    result = await run_tdbot(
        "vms", "--json", "--config", str(config), environ=clean_environment(**credentials())
    )

    assert result.code == 0, result.output
    records = {record["name"]: record for record in json.loads(result.stdout)}
    assert set(records) == {"api-server-4090", "whisper-2x3090", "dev-box-a4000"}
    assert records["whisper-2x3090"]["type"] == "spot"
    assert records["whisper-2x3090"]["spot_bid_usd_per_hour"] == 0.30
    assert records["dev-box-a4000"]["status"] == VmStatus.STOPPED.value
    assert records["api-server-4090"]["id"] == vm_named(market, "api-server-4090")


async def test_balance_json_matches_account(
    tmp_path: Path, market: SimulatedMarket, simulator: SimulatorServer
) -> None:
    config = write_config(tmp_path, simulator.api_url)

    result = await run_tdbot(
        "balance", "--json", "--config", str(config), environ=clean_environment(**credentials())
    )

    assert result.code == 0, result.output
    record = json.loads(result.stdout)
    assert record["balance_usd"] == pytest.approx(market.balance()["balance"])
    assert record["hourly_cost_usd"] == pytest.approx(market.balance()["hourly_cost"])
    assert record["runway_hours"] > 0


@pytest.mark.parametrize("command", [["vms"], ["balance"], ["check"], ["run"]])
async def test_missing_credentials_named(
    tmp_path: Path, simulator: SimulatorServer, command: list[str]
) -> None:
    config = write_config(tmp_path, simulator.api_url)

    result = await run_tdbot(*command, "--config", str(config))

    assert result.code != 0
    assert "TDBOT_API_KEY" in result.output
    assert "Traceback" not in result.output


async def test_bad_config_named(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text("[daemon]\nlog_levle = 'INFO'\n", encoding="utf-8")

    result = await run_tdbot("vms", "--config", str(config))

    assert result.code != 0
    assert "daemon.log_levle" in result.output
    assert "Traceback" not in result.output


async def test_simulator_command_serves_api(tmp_path: Path) -> None:
    environ = clean_environment(PYTHONUNBUFFERED="1")
    process = await asyncio.create_subprocess_exec(
        TDBOT,
        "simulator",
        "--port",
        "0",
        "--api-key",
        TEST_API_KEY,
        "--api-token",
        TEST_API_TOKEN,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=environ,
    )
    try:
        assert process.stdout is not None
        first_line = (await asyncio.wait_for(process.stdout.readline(), 15)).decode()
        match = re.search(r"(http://127\.0\.0\.1:\d+/api/v0)", first_line)
        assert match, first_line
        result = await run_tdbot(
            "balance",
            "--json",
            "--config",
            str(write_config(tmp_path, match.group(1))),
            environ=clean_environment(**credentials()),
        )
        assert result.code == 0, result.output
        assert json.loads(result.stdout)["balance_usd"] == 100.0
    finally:
        process.send_signal(signal.SIGINT)
        code = await asyncio.wait_for(process.wait(), 15)
    assert code == 0


async def test_simulator_command_seeds_account(tmp_path: Path) -> None:
    process = await asyncio.create_subprocess_exec(
        TDBOT,
        "simulator",
        "--port",
        "0",
        "--api-key",
        TEST_API_KEY,
        "--api-token",
        TEST_API_TOKEN,
        "--seed-example-vms",
        "--balance-usd",
        "250",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=clean_environment(PYTHONUNBUFFERED="1"),
    )
    try:
        assert process.stdout is not None
        lines = [(await asyncio.wait_for(process.stdout.readline(), 15)).decode() for _ in range(5)]
        match = re.search(r"(http://127\.0\.0\.1:\d+/api/v0)", lines[0])
        assert match, lines
        config = str(write_config(tmp_path, match.group(1)))
        vms = await run_tdbot(
            "vms", "--json", "--config", config, environ=clean_environment(**credentials())
        )
        balance = await run_tdbot(
            "balance", "--json", "--config", config, environ=clean_environment(**credentials())
        )
    finally:
        process.send_signal(signal.SIGINT)
        await asyncio.wait_for(process.wait(), 15)

    assert lines[2].startswith("seeded VM api-server-4090: Running, id ")
    assert lines[3].startswith("seeded VM whisper-2x3090: Running, id ")
    assert lines[4].startswith("seeded VM dev-box-a4000: Stopped, id ")
    assert vms.code == 0, vms.output
    names = {record["name"] for record in json.loads(vms.stdout)}
    assert names == {"api-server-4090", "whisper-2x3090", "dev-box-a4000"}
    assert balance.code == 0, balance.output
    # The seeded VMs are billed by the real clock while the commands run.
    assert json.loads(balance.stdout)["balance_usd"] == pytest.approx(250.0, abs=0.5)


# --- spot searches -------------------------------------------------------------------

# A 4090 hostnode in the United States whose SPEC_4090 costs $0.463/h on demand.
HOST_US_4090 = "0b60f80c-e16a-4cda-a8cd-dbc01cc0512c"
# A 4090 hostnode in the Netherlands whose SPEC_4090 costs $0.459/h on demand.
HOST_NL_4090 = "b9ee75b9-b341-4482-a250-86597475ffae"
# 4090 hostnodes in Japan and Czechia, where SPEC_4090 costs $0.423/h and $0.551/h.
HOST_JP_4090 = "58ab3969-87c2-4228-a9ca-0c9fe191f0ef"
HOST_CZ_4090 = "9cd81ba3-dd17-4a09-81a7-4f0625eb3351"
# On demand, SPEC_4090 costs at least $0.423/h on every hostnode.
SPEC_4090 = "gpu=4090 vcpus=8 ram=32 storage=100"


async def test_hostnodes_spot_under_cap(
    tmp_path: Path, market: SimulatedMarket, simulator: SimulatorServer
) -> None:
    # Bids from 0.188 USD/h win on the US hostnode; the Dutch one takes none under 1.
    market.set_spot_price(HOST_US_4090, GPU_4090, 0.10)
    market.set_spot_price(HOST_NL_4090, GPU_4090, 1.0)
    config = write_config(tmp_path, simulator.api_url)

    result = await run_tdbot(
        "hostnodes",
        f"{SPEC_4090} spot price<0.40",
        "--spot-checks",
        "3",
        "--config",
        str(config),
        environ=clean_environment(**credentials()),
    )

    assert result.code == 0, result.output
    assert "checking spot bids on 3 hostnodes…" in result.stderr
    # The table wraps the hostnode id, so its row is found by the id's start.
    row = next(line for line in result.stdout.splitlines() if HOST_US_4090[:24] in line)
    cells = [cell.strip() for cell in row.split("│") if cell.strip()]
    spot_total, bid, on_demand = float(cells[2]), float(cells[3]), float(cells[5])
    assert spot_total < 0.40
    assert 0.188 <= bid < 0.40
    assert on_demand == 0.463
    assert HOST_NL_4090[:24] not in result.stdout
    assert "Only the 3 cheapest on-demand offers were checked for spot bids" in result.stdout
    assert "1 of them rejected every bid" in result.stdout


async def test_hostnodes_spot_json_fields(
    tmp_path: Path, market: SimulatedMarket, simulator: SimulatorServer
) -> None:
    market.set_spot_price(HOST_US_4090, GPU_4090, 0.10)
    config = write_config(tmp_path, simulator.api_url)

    result = await run_tdbot(
        "hostnodes",
        f"{SPEC_4090} spot price<0.40",
        "--json",
        "--config",
        str(config),
        environ=clean_environment(**credentials()),
    )

    assert result.code == 0, result.output
    assert "checking spot bids on" in result.stderr
    offers = json.loads(result.stdout)
    us = next(offer for offer in offers if offer["hostnode_id"] == HOST_US_4090)
    spot = us["spot"]
    assert spot["total_usd_per_hour"] < 0.40
    assert spot["total_usd_per_hour"] == round(
        spot["bid_usd_per_hour"] + spot["storage_usd_per_hour"], 6
    )
    assert spot["probes"] == 7
    assert us["price"]["total_usd_per_hour"] == 0.463
    totals = [offer["spot"]["total_usd_per_hour"] for offer in offers]
    assert totals == sorted(totals)
    assert offers[0]["hostnode_id"] == HOST_US_4090


async def test_hostnodes_spot_needs_credentials(tmp_path: Path, simulator: SimulatorServer) -> None:
    config = write_config(tmp_path, simulator.api_url)

    result = await run_tdbot("hostnodes", f"{SPEC_4090} spot", "--config", str(config))

    assert result.code == 1
    assert result.stdout == ""
    assert "the spot term needs TensorDock credentials" in result.stderr
    assert "TDBOT_API_KEY" in result.stderr
    assert "Traceback" not in result.output


async def test_hostnodes_spot_bad_credentials(tmp_path: Path, simulator: SimulatorServer) -> None:
    config = write_config(tmp_path, simulator.api_url)
    wrong = {"TDBOT_API_KEY": TEST_API_KEY, "TDBOT_API_TOKEN": "wrong-token-7d3e9b84"}

    result = await run_tdbot(
        "hostnodes",
        f"{SPEC_4090} spot",
        "--config",
        str(config),
        environ=clean_environment(**wrong),
    )

    assert result.code == 1
    assert result.stdout == ""
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert "the API key and token were rejected" in errors[0]
    assert "Not checked" not in result.output
    assert "wrong-token-7d3e9b84" not in result.output


async def test_hostnodes_spot_unchecked_exits_1(
    tmp_path: Path, market: SimulatedMarket, simulator: SimulatorServer
) -> None:
    market.set_spot_price(HOST_US_4090, GPU_4090, 0.10)
    # The first validation call fails; the config sets read_retries = 0, so it is not resent.
    market.inject_fault("client/spot/validate/new", FaultMode.HTTP_500)
    config = write_config(tmp_path, simulator.api_url)

    result = await run_tdbot(
        "hostnodes",
        f"{SPEC_4090} spot",
        "--config",
        str(config),
        environ=clean_environment(**credentials()),
    )

    assert result.code == 1, result.output
    assert "All 4 offers" not in result.stdout
    assert (
        "Of the 4 offers that can host the spec, 3 were checked for spot bids and 1 could "
        "not be checked." in result.stdout
    )
    unchecked = [line for line in result.stdout.splitlines() if line.startswith("Not checked: ")]
    assert len(unchecked) == 1
    assert "HTTP 500" in unchecked[0]
    assert "cheapest spot offers" in result.stdout


async def test_hostnodes_spot_json_accepted_only(
    tmp_path: Path, market: SimulatedMarket, simulator: SimulatorServer
) -> None:
    market.inject_fault("client/spot/validate/new", FaultMode.HTTP_500)
    config = write_config(tmp_path, simulator.api_url)

    result = await run_tdbot(
        "hostnodes",
        f"{SPEC_4090} spot",
        "--json",
        "--config",
        str(config),
        environ=clean_environment(**credentials()),
    )

    assert result.code == 1, result.output
    offers = json.loads(result.stdout)
    assert len(offers) == 3
    assert all("total_usd_per_hour" in offer["spot"] for offer in offers)
    [unchecked] = [line for line in result.stderr.splitlines() if line.startswith("Not checked: ")]
    listed = {offer["hostnode_id"] for offer in offers}
    missing = {HOST_US_4090, HOST_NL_4090, HOST_JP_4090, HOST_CZ_4090} - listed
    assert len(missing) == 1
    assert unchecked.startswith(f"Not checked: {missing.pop()} ({GPU_4090}): ")


async def test_hostnodes_spot_no_offers(
    tmp_path: Path, market: SimulatedMarket, simulator: SimulatorServer
) -> None:
    config = write_config(tmp_path, simulator.api_url)

    result = await run_tdbot(
        "hostnodes",
        "gpu=4090 count=8 spot",
        "--config",
        str(config),
        environ=clean_environment(**credentials()),
    )

    assert result.code == 0, result.output
    assert "No hostnode can host this spec" in result.stderr
    assert "checking spot bids" not in result.stderr
    assert "All 0 offers" not in result.output
