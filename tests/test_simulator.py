"""Tests of the TensorDock v0 simulator over real HTTP on 127.0.0.1.

Requests are form-encoded as the real API expects, sent with plain httpx, so these
tests do not depend on tdbot's own client, except the delay fault test, which checks
the timeout error that client raises. The clock is frozen and moved explicitly.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from tdbot.simulator.app import ENDPOINTS
from tdbot.simulator.clock import SimClock
from tdbot.simulator.faults import FaultMode
from tdbot.simulator.market import SimulatedMarket
from tdbot.simulator.server import check_host
from tdbot.simulator.testing import (
    TEST_API_KEY,
    TEST_API_TOKEN,
    make_test_market,
    running_simulator,
)
from tdbot.simulator.vms import SimVm
from tdbot.tensordock import ApiTimeoutError, TensorDockClient
from tdbot.tensordock.models import VmStatus

FIXTURES = Path(__file__).parent / "fixtures" / "tensordock-v0"
AUTH = {"api_key": TEST_API_KEY, "api_token": TEST_API_TOKEN}

LV_4090 = "0b60f80c-e16a-4cda-a8cd-dbc01cc0512c"
RTX_4090 = "geforcertx4090-pcie-24gb"
EY_A6000 = "e4f74ea1-11c7-4ce8-b1e9-bce5d1af93c4"
RTX_A6000 = "rtxa6000-pcie-48gb"
CHI_H100 = "f1ce2515-54fd-4dd3-83a1-cadbddccd3b5"
ORL_NO_PORTS = "e5d7e9c6-63db-4713-9ca4-100b77c5ba5b"
PRG_STRINGS = "9cd81ba3-dd17-4a09-81a7-4f0625eb3351"
WPG_2022 = "40730580-35d7-404d-be34-493f36436e6c"


@dataclass
class Sim:
    market: SimulatedMarket
    http: httpx.AsyncClient
    api_url: str

    async def api(self, path: str, **fields: Any) -> httpx.Response:
        """POST form fields with valid credentials to /api/v0/<path>."""
        data = {**AUTH, **{name: str(value) for name, value in fields.items()}}
        return await self.http.post(f"/api/v0/{path}", data=data)

    async def admin(self, path: str, payload: dict[str, Any]) -> httpx.Response:
        return await self.http.post(f"/_sim/{path}", json=payload)


@pytest.fixture
async def sim() -> AsyncIterator[Sim]:
    market = make_test_market()
    async with (
        running_simulator(market) as server,
        httpx.AsyncClient(base_url=server.root_url, timeout=5.0) as http,
    ):
        yield Sim(market, http, server.api_url)


def deploy_fields(**overrides: Any) -> dict[str, Any]:
    """Fields of a valid on-demand 1x RTX 4090 deploy on the Las Vegas hostnode."""
    fields: dict[str, Any] = {
        "name": "test-4090",
        "hostnode": LV_4090,
        "gpu_model": RTX_4090,
        "gpu_count": 1,
        "vcpus": 8,
        "ram": 32,
        "storage": 200,
        "operating_system": "Ubuntu 22.04 LTS",
        "external_ports": "{51116, 51129}",
        "internal_ports": "{22, 8888}",
        "password": "correct-horse-battery",
    }
    fields.update(overrides)
    return fields


async def deploy(sim: Sim, **overrides: Any) -> str:
    response = await sim.api("client/deploy/single", **deploy_fields(**overrides))
    assert response.status_code == 200, response.text
    server: str = response.json()["server"]
    return server


async def vm_status(sim: Sim, vm_id: str) -> str:
    response = await sim.api("client/get/single", server=vm_id)
    status: str = response.json()["virtualmachines"]["status"]
    return status


def seed_a6000(market: SimulatedMarket) -> SimVm:
    return market.add_vm(
        hostnode_id=EY_A6000, gpu_model=RTX_A6000, vcpus=8, ram=32, storage=100, name="a6000"
    )


# --- clock and server guards -------------------------------------------------------------


def test_clock_scale_runs_simulated_time() -> None:
    real = [100.0]
    clock = SimClock(datetime(2024, 1, 1, tzinfo=UTC), time_scale=60, monotonic=lambda: real[0])
    real[0] += 2.0

    assert clock.now() == datetime(2024, 1, 1, 0, 2, tzinfo=UTC)


def test_clock_frozen_until_advanced() -> None:
    real = [0.0]
    start = datetime(2024, 1, 1, tzinfo=UTC)
    clock = SimClock(start, monotonic=lambda: real[0])
    real[0] += 500.0

    assert clock.now() == start
    clock.advance(timedelta(minutes=5))
    assert clock.now() == start + timedelta(minutes=5)


def test_clock_rejects_going_backwards() -> None:
    clock = SimClock(datetime(2024, 1, 1, tzinfo=UTC))

    with pytest.raises(ValueError, match="backwards"):
        clock.advance(timedelta(seconds=-1))


def test_check_host_rejects_remote_address() -> None:
    check_host("127.0.0.1", allow_remote=False)
    check_host("::1", allow_remote=False)
    check_host("0.0.0.0", allow_remote=True)

    with pytest.raises(ValueError, match="refusing to listen"):
        check_host("0.0.0.0", allow_remote=False)


# --- hostnodes --------------------------------------------------------------------------


async def test_hostnode_list_documented_shape(sim: Sim) -> None:
    response = await sim.http.get("/api/v0/client/deploy/hostnodes")
    body = response.json()

    assert response.status_code == 200
    assert body["success"] is True
    assert len(body["hostnodes"]) == 41
    strings_host = body["hostnodes"][PRG_STRINGS]
    assert strings_host["specs"]["gpu"][RTX_4090]["price"] == 0.45
    assert strings_host["specs"]["restrictions"]["1"]["cpu"] == {"max": 14, "min": 2}
    assert strings_host["networking"]["ports"][0] == 61840
    assert strings_host["status"]["uptime"] == 0.9987
    old_host = body["hostnodes"][WPG_2022]
    assert "vram" not in old_host["specs"]["gpu"]["geforcertx3080-pcie-10gb"]
    assert "restrictions" not in old_host["specs"]
    assert "reserved" not in old_host["status"]


async def test_hostnode_list_filters_per_host(sim: Sim) -> None:
    response = await sim.http.get(
        "/api/v0/client/deploy/hostnodes", params={"minGPUCount": 7, "minvCPUs": 150}
    )
    hostnodes = response.json()["hostnodes"]

    assert CHI_H100 in hostnodes
    assert LV_4090 not in hostnodes


async def test_hostnode_details_matches_fixture(sim: Sim) -> None:
    expected = json.loads((FIXTURES / "hostnode_details.ok.json").read_text())

    response = await sim.http.get(f"/api/v0/client/deploy/hostnodes/{CHI_H100}")

    assert response.status_code == 200
    assert response.json() == expected


async def test_hostnode_details_unknown_404(sim: Sim) -> None:
    response = await sim.http.get("/api/v0/client/deploy/hostnodes/no-such-host")

    assert response.status_code == 404
    assert response.json() == {"error": "Hostnode not found", "success": False}


# --- deploy -----------------------------------------------------------------------------


async def test_deploy_response_shape(sim: Sim) -> None:
    response = await sim.api("client/deploy/single", **deploy_fields())
    body = response.json()

    assert response.status_code == 200
    assert body["success"] is True
    assert body["port_forwards"] == {"51116": 22, "51129": 8888}
    assert body["cost"] == {"compute_price": 0.458, "storage_price": 0.01, "total_price": 0.468}
    assert body["ip"] == sim.market.hostnodes[LV_4090].ip_address
    assert isinstance(body["execution_id"], int)
    assert body["server"] in sim.market.vms


async def test_deploy_vm_pending_then_completed(sim: Sim) -> None:
    vm_id = await deploy(sim)

    listed = (await sim.api("client/list")).json()["virtualmachines"][vm_id]
    assert listed["status"] == "Running"
    assert listed["type"] == "ondemand"
    assert listed["deployment"]["status"] == "Pending"
    assert listed["port_forwards"] == {"51116": "22", "51129": "8888"}
    assert listed["timestamp_creation"] == "Mon, 04 Nov 2024 12:00:00 GMT"
    assert listed["specs"] == {
        "gpu": {"amount": 1, "type": RTX_4090},
        "ram": 32,
        "storage": 200,
        "vcpus": 8,
    }

    sim.market.advance(timedelta(minutes=5))
    later = (await sim.api("client/list")).json()["virtualmachines"][vm_id]
    assert later["deployment"]["status"] == "Completed"


async def test_deploy_square_bracket_ports(sim: Sim) -> None:
    vm_id = await deploy(sim, external_ports="[51134]", internal_ports="[22]")

    assert sim.market.vms[vm_id].port_forwards == {51134: 22}


async def test_deploy_odd_vcpus_400(sim: Sim) -> None:
    response = await sim.api("client/deploy/single", **deploy_fields(vcpus=5))

    assert response.status_code == 400
    assert response.json() == {
        "error": "The number of vCPUs must be an even number",
        "success": False,
    }


async def test_deploy_port_not_free_400(sim: Sim) -> None:
    response = await sim.api(
        "client/deploy/single", **deploy_fields(external_ports="{51116, 40000}")
    )

    assert response.status_code == 400
    assert response.json()["success"] is False
    assert "40000" in response.json()["error"]


async def test_deploy_host_without_ports_400(sim: Sim) -> None:
    fields = deploy_fields(
        hostnode=ORL_NO_PORTS, gpu_model="geforcertx3090-pcie-24gb", external_ports="{30000}"
    )

    response = await sim.api("client/deploy/single", **fields)

    assert response.status_code == 400
    assert response.json() == {
        "error": "No external ports are available on this hostnode",
        "success": False,
    }


@pytest.mark.parametrize(
    ("overrides", "expected_text"),
    [
        ({"hostnode": "no-such-host"}, "Hostnode not found"),
        ({"gpu_model": "h100-sxm5-80gb"}, "not offered"),
        ({"gpu_count": 9, "vcpus": 8}, "gpu_count 9 is not offered"),
        ({"vcpus": 14}, "vcpus 14 is outside"),
        ({"operating_system": "Plan 9"}, "Unknown operating_system"),
        ({"password": ""}, "password or ssh_key"),
        ({"vcpus": ""}, "Missing required field: vcpus"),
    ],
)
async def test_deploy_rejects_invalid_request(
    sim: Sim, overrides: dict[str, Any], expected_text: str
) -> None:
    response = await sim.api("client/deploy/single", **deploy_fields(**overrides))

    assert response.status_code == 400
    assert expected_text in response.json()["error"]
    assert sim.market.vms == {}


async def test_deploy_not_enough_gpus_400(sim: Sim) -> None:
    seed_a6000(sim.market)
    fields = deploy_fields(
        hostnode=EY_A6000, gpu_model=RTX_A6000, external_ports="{44445}", internal_ports="{22}"
    )

    response = await sim.api("client/deploy/single", **fields)

    assert response.status_code == 400
    assert "Not enough GPUs" in response.json()["error"]


async def test_deploy_low_balance_400(sim: Sim) -> None:
    sim.market.set_balance(0.5)

    response = await sim.api("client/deploy/single", **deploy_fields())

    assert response.status_code == 400
    assert "balance is too low" in response.json()["error"]


# --- stock ------------------------------------------------------------------------------


async def test_stock_taken_and_returned(sim: Sim) -> None:
    host = sim.market.hostnodes[LV_4090]
    before = (host.gpus[RTX_4090].amount, host.cpu_amount, host.ram_amount, host.storage_amount)

    vm_id = await deploy(sim)
    assert host.gpus[RTX_4090].amount == before[0] - 1
    assert host.cpu_amount == before[1] - 8
    assert host.ram_amount == before[2] - 32
    assert host.storage_amount == before[3] - 200
    assert 51116 not in host.ports

    await sim.api("client/stop/single", server=vm_id, disassociate_resources="true")
    assert host.gpus[RTX_4090].amount == before[0]
    assert host.cpu_amount == before[1]
    assert host.ram_amount == before[2]
    assert host.storage_amount == before[3] - 200
    assert 51116 not in host.ports

    response = await sim.api("client/delete/single", server=vm_id)
    assert response.json() == {"success": True}
    assert host.storage_amount == before[3]
    assert 51116 in host.ports
    assert 51129 in host.ports


async def test_stock_visible_in_hostnode_response(sim: Sim) -> None:
    await deploy(sim)

    response = await sim.http.get(f"/api/v0/client/deploy/hostnodes/{LV_4090}")
    hostnode = response.json()["hostnode"]

    assert hostnode["specs"]["gpu"][RTX_4090]["amount"] == 5
    assert 51116 not in hostnode["networking"]["ports"]


async def test_stop_keep_resources_holds_stock(sim: Sim) -> None:
    host = sim.market.hostnodes[LV_4090]
    vm_id = await deploy(sim)

    response = await sim.api("client/stop/single", server=vm_id, disassociate_resources="false")

    assert response.json() == {"success": True}
    assert await vm_status(sim, vm_id) == "Stopped"
    assert host.gpus[RTX_4090].amount == 5


async def test_start_released_without_stock_fails(sim: Sim) -> None:
    first = seed_a6000(sim.market)
    await sim.api("client/stop/single", server=first.id, disassociate_resources="true")
    sim.market.add_vm(hostnode_id=EY_A6000, gpu_model=RTX_A6000, vcpus=8, ram=32, name="taker")

    response = await sim.api("client/start/single", server=first.id)

    assert response.status_code == 400
    assert "Not enough GPUs" in response.json()["error"]
    assert await vm_status(sim, first.id) == "StoppedDisassociated"


async def test_start_released_takes_stock_again(sim: Sim) -> None:
    vm = seed_a6000(sim.market)
    await sim.api("client/stop/single", server=vm.id, disassociate_resources="true")

    response = await sim.api("client/start/single", server=vm.id)

    assert response.json() == {"success": True}
    assert await vm_status(sim, vm.id) == "Running"
    assert sim.market.hostnodes[EY_A6000].gpus[RTX_A6000].amount == 0


# --- lifecycle errors -------------------------------------------------------------------


async def test_start_running_vm_500(sim: Sim) -> None:
    vm_id = await deploy(sim)

    response = await sim.api("client/start/single", server=vm_id)

    assert response.status_code == 500
    assert response.json() == {
        "error": "Machine is running, therefore it cannot be started",
        "success": False,
    }


async def test_stop_released_vm_500(sim: Sim) -> None:
    vm_id = await deploy(sim)
    await sim.api("client/stop/single", server=vm_id, disassociate_resources="true")

    response = await sim.api("client/stop/single", server=vm_id)

    assert response.status_code == 500
    assert response.json() == {
        "error": "Machine is stoppeddisassociated, therefore it cannot be stopped",
        "success": False,
    }


async def test_stop_stopped_vm_500(sim: Sim) -> None:
    vm_id = await deploy(sim)
    await sim.api("client/stop/single", server=vm_id)

    response = await sim.api("client/stop/single", server=vm_id)

    assert response.status_code == 500
    assert response.json()["error"] == "Machine is stopped, therefore it cannot be stopped"


async def test_stop_stopped_vm_with_release(sim: Sim) -> None:
    vm_id = await deploy(sim)
    await sim.api("client/stop/single", server=vm_id)

    response = await sim.api("client/stop/single", server=vm_id, disassociate_resources="true")

    assert response.json() == {"success": True}
    assert await vm_status(sim, vm_id) == "StoppedDisassociated"


async def test_get_single_plural_key(sim: Sim) -> None:
    vm_id = await deploy(sim)

    response = await sim.api("client/get/single", server=vm_id)
    body = response.json()

    assert response.status_code == 200
    assert body["success"] is True
    assert body["virtualmachines"]["name"] == "test-4090"
    assert body["virtualmachines"]["hostnode"] == LV_4090
    assert body["virtualmachines"]["hostname"] == vm_id


async def test_get_single_unknown_404(sim: Sim) -> None:
    response = await sim.api("client/get/single", server="no-such-vm")

    assert response.status_code == 404
    assert response.json()["success"] is False
    assert "not found" in response.json()["error"]


async def test_delete_twice_already_terminated(sim: Sim) -> None:
    vm_id = await deploy(sim)
    await sim.api("client/delete/single", server=vm_id)

    second = await sim.api("client/delete/single", server=vm_id)
    listed = (await sim.api("client/list")).json()["virtualmachines"]

    assert second.status_code == 500
    assert "already terminated" in second.json()["error"]
    assert listed == {}
    assert (await sim.api("client/get/single", server=vm_id)).status_code == 404


async def test_modify_requires_stopped_vm(sim: Sim) -> None:
    vm_id = await deploy(sim)

    response = await sim.api("client/modify/single", server_id=vm_id, vcpus=10)

    assert response.status_code == 500
    assert response.json()["error"] == "Machine is running, therefore it cannot be modified"


async def test_modify_resizes_and_reprices(sim: Sim) -> None:
    host = sim.market.hostnodes[LV_4090]
    vm_id = await deploy(sim)
    await sim.api("client/stop/single", server=vm_id)
    cpus_before = host.cpu_amount

    response = await sim.api("client/modify/single", server_id=vm_id, vcpus=12, storage=300)
    vm = (await sim.api("client/get/single", server=vm_id)).json()["virtualmachines"]

    assert response.json() == {"server": vm_id, "success": True}
    assert vm["specs"]["vcpus"] == 12
    assert vm["compute_price"] == 0.47
    assert vm["storage_price"] == 0.015
    assert host.cpu_amount == cpus_before - 4


# --- spot auction ------------------------------------------------------------------------


async def test_spot_outbid_and_rebid(sim: Sim) -> None:
    # Minimum for 1x 4090, 8 vCPU, 32 GB: 0.185 + 0.024 + 0.064 = 0.273 USD/h.
    vm_id = await deploy(sim, price_type="spot", price="0.30")
    assert sim.market.vm_spot_minimum(vm_id) == pytest.approx(0.273)

    raised = await sim.admin(
        "spot-price",
        {"hostnode_id": LV_4090, "gpu_model": RTX_4090, "usd_per_gpu_hour": 0.25},
    )
    assert raised.json() == {"success": True}
    assert await vm_status(sim, vm_id) == "Outbid"

    too_low = await sim.api("client/spot/validate/existing", server=vm_id, price="0.30")
    assert too_low.status_code == 200
    assert too_low.json() == {
        "error": "Your bid is too low to be scheduled on this hostnode",
        "success": False,
    }
    assert await vm_status(sim, vm_id) == "Outbid"

    accepted = await sim.api("client/spot/validate/existing", server=vm_id, price="0.34")
    assert accepted.json() == {"success": True}
    vm = (await sim.api("client/get/single", server=vm_id)).json()["virtualmachines"]
    assert vm["status"] == "Running"
    assert vm["type"] == "spot"
    assert vm["compute_price"] == 0.34


async def test_spot_deploy_below_minimum_400(sim: Sim) -> None:
    response = await sim.api("client/deploy/single", **deploy_fields(price_type="spot", price=0.2))

    assert response.status_code == 400
    assert response.json()["error"] == "Your bid is too low to be scheduled on this hostnode"


async def test_spot_validate_new_answers(sim: Sim) -> None:
    shape = {"hostnode": LV_4090, "gpu_model": RTX_4090, "gpu_count": 1}
    shape |= {"vcpus": 8, "ram": 32, "storage": 200}

    low = await sim.api("client/spot/validate/new", **shape, price="0.20")
    high = await sim.api("client/spot/validate/new", **shape, price="0.28")

    assert low.status_code == 200
    assert low.json() == {"success": False}
    assert high.json() == {"success": True}


async def test_spot_validate_new_no_stock(sim: Sim) -> None:
    seed_a6000(sim.market)
    shape = {"hostnode": EY_A6000, "gpu_model": RTX_A6000, "gpu_count": 1}
    shape |= {"vcpus": 8, "ram": 32, "storage": 100}

    response = await sim.api("client/spot/validate/new", **shape, price="5.0")

    assert response.json() == {"success": False}


async def test_spot_price_drop_resumes_outbid(sim: Sim) -> None:
    vm_id = await deploy(sim, price_type="spot", price="0.30")
    sim.market.set_spot_price(LV_4090, RTX_4090, 0.25)

    sim.market.set_spot_price(LV_4090, RTX_4090, 0.20)

    assert await vm_status(sim, vm_id) == "Running"
    assert [event.kind for event in sim.market.events_of("outbid")] == ["outbid"]


# --- billing ------------------------------------------------------------------------------


async def test_balance_drains_with_clock(sim: Sim) -> None:
    vm_id = await deploy(sim)

    first = (await sim.api("billing/balance")).json()
    sim.market.advance(timedelta(hours=2))
    second = (await sim.api("billing/balance")).json()
    await sim.api("client/stop/single", server=vm_id, disassociate_resources="true")
    sim.market.advance(timedelta(hours=10))
    third = (await sim.api("billing/balance")).json()

    assert first == {"balance": 100.0, "hourly_cost": 0.468, "success": True}
    # Two hours at the full 0.468 USD/h: 100 - 0.936.
    assert second["balance"] == pytest.approx(99.064)
    # Ten hours of storage only, 200 GB at 0.00005 USD/GB/h: 99.064 - 0.1.
    assert third == {"balance": pytest.approx(98.964), "hourly_cost": 0.01, "success": True}


async def test_balance_outbid_bills_storage_only(sim: Sim) -> None:
    vm_id = await deploy(sim, price_type="spot", price="0.30")
    sim.market.set_spot_price(LV_4090, RTX_4090, 0.5)

    sim.market.advance(timedelta(hours=4))
    body = (await sim.api("billing/balance")).json()

    assert await vm_status(sim, vm_id) == "Outbid"
    assert body["hourly_cost"] == 0.01
    assert body["balance"] == pytest.approx(100 - 0.04)


async def test_balance_exhausted_stops_vms(sim: Sim) -> None:
    vm_id = await deploy(sim)
    sim.market.set_balance(1.0)

    sim.market.advance(timedelta(hours=3))
    body = (await sim.api("billing/balance")).json()

    assert body["balance"] == 0.0
    assert await vm_status(sim, vm_id) == "StoppedDisassociated"
    stops = [e for e in sim.market.events_of("stopped") if e.vm_id == vm_id]
    assert len(stops) == 1
    # 1 USD lasts 1 / 0.468 h, about 2 h 8 min 12 s.
    expected = datetime(2024, 11, 4, 12, tzinfo=UTC) + timedelta(hours=1 / 0.468)
    assert abs(stops[0].at - expected) < timedelta(seconds=1)


async def test_admin_balance_and_clock(sim: Sim) -> None:
    await deploy(sim)

    set_answer = await sim.admin("balance", {"set_usd": 50})
    add_answer = await sim.admin("balance", {"add_usd": 10})
    advance_answer = await sim.admin("clock/advance", {"seconds": 3600})
    balance = (await sim.api("billing/balance")).json()

    assert set_answer.json()["balance"] == 50.0
    assert add_answer.json()["balance"] == 60.0
    assert advance_answer.json()["now"] == "2024-11-04T13:00:00+00:00"
    assert balance["balance"] == pytest.approx(60 - 0.468)


async def test_billing_revenue_and_summary(sim: Sim) -> None:
    vm_id = await deploy(sim)
    sim.market.advance(timedelta(hours=10))

    revenue = (await sim.api("billing/revenue")).json()
    summary = (await sim.api("billing/summary", period="2024-11")).json()

    assert "success" not in revenue
    host = revenue["data"][0]
    assert host["hostnode_id"] == LV_4090
    assert host["used_gpus"] == 1
    assert host["revenue_compute"] == pytest.approx(4.58)
    assert host["virtual_machines"][0]["id"] == vm_id
    assert "success" not in summary
    assert summary["bill_period"] == {
        "endM": "12",
        "endY": "2024",
        "startM": "11",
        "startY": "2024",
    }
    assert summary["changes"]["expenses"] == "4.68"
    assert summary["previous_balance"] == "100.00"
    assert summary["final_balance"] == "95.32"
    assert summary["transactions"]["vm_expenses"][0]["total_amount"] == pytest.approx(4.58)


async def test_billing_summary_splits_months(sim: Sim) -> None:
    sim.market.set_balance(1000.0)
    await deploy(sim)
    # From 4 Nov 12:00 to 1 Dec 00:00 is 26.5 days; the rest of the 30 days is December.
    sim.market.advance(timedelta(days=30))

    november = (await sim.api("billing/summary", period="2024-11")).json()
    december = (await sim.api("billing/summary", period="2024-12")).json()

    assert float(november["changes"]["expenses"]) == pytest.approx(0.468 * 24 * 26.5, abs=0.01)
    assert float(december["changes"]["expenses"]) == pytest.approx(0.468 * 24 * 3.5, abs=0.01)
    assert december["previous_balance"] == november["final_balance"]


async def test_billing_summary_bad_period_400(sim: Sim) -> None:
    response = await sim.api("billing/summary", period="November")

    assert response.status_code == 400
    assert "YYYY-MM" in response.json()["error"]


# --- auth ---------------------------------------------------------------------------------


async def test_auth_test_and_list(sim: Sim) -> None:
    test = await sim.api("auth/test")
    listed = await sim.api("auth/list")

    assert test.json() == {"success": True}
    entries = listed.json()["authorizations"]
    assert isinstance(entries, dict)
    assert next(iter(entries.values()))["permissions"] == "All"


@pytest.mark.parametrize(
    "endpoint", [e for e in ENDPOINTS if e.authenticated], ids=lambda e: e.name
)
async def test_auth_rejected_with_401(sim: Sim, endpoint: Any) -> None:
    path = "/api/v0/" + endpoint.path.replace("{container_id}", "any-container")
    bad = {"api_key": TEST_API_KEY, "api_token": "wrong-token"}

    if endpoint.method == "GET":
        response = await sim.http.get(path, params=bad)
    else:
        response = await sim.http.post(path, data={**bad, "server": "x"})

    assert response.status_code == 401
    assert response.json() == {"error": "Invalid authorization", "success": False}


async def test_auth_missing_credentials_401(sim: Sim) -> None:
    response = await sim.http.post("/api/v0/client/list")

    assert response.status_code == 401


async def test_hostnodes_need_no_auth(sim: Sim) -> None:
    response = await sim.http.get("/api/v0/client/deploy/hostnodes", params={"api_key": "x"})

    assert response.status_code == 200


# --- faults -------------------------------------------------------------------------------


async def test_fault_http_500_then_recovers(sim: Sim) -> None:
    await sim.admin("faults", {"endpoint": "client/list", "mode": "http_500", "count": 2})

    first = await sim.api("client/list")
    second = await sim.api("client/list")
    third = await sim.api("client/list")

    assert first.status_code == 500
    assert first.json() == {"error": "Internal Server Error", "success": False}
    assert second.status_code == 500
    assert third.status_code == 200


async def test_fault_html_502_page(sim: Sim) -> None:
    sim.market.inject_fault("client/list", FaultMode.HTML_502)

    response = await sim.api("client/list")

    assert response.status_code == 502
    assert response.headers["content-type"].startswith("text/html")
    assert "502 Bad Gateway" in response.text


async def test_fault_truncated_json_body(sim: Sim) -> None:
    sim.market.seed_example_vms()
    sim.market.inject_fault("client/list", FaultMode.TRUNCATED_JSON)

    response = await sim.api("client/list")

    assert response.status_code == 200
    with pytest.raises(json.JSONDecodeError):
        json.loads(response.text)


async def test_fault_delay_times_out_client(sim: Sim) -> None:
    sim.market.inject_fault("billing/balance", FaultMode.DELAY, delay_seconds=0.5)

    with pytest.raises(httpx.ReadTimeout):
        await sim.http.post("/api/v0/billing/balance", data=AUTH, timeout=0.1)


async def test_fault_delay_acts_after_client_gone(sim: Sim) -> None:
    vm = seed_a6000(sim.market)
    sim.market.inject_fault("client/stop/single", FaultMode.DELAY, delay_seconds=1.0)
    server_errors = _ErrorRecords()
    logging.getLogger("uvicorn.error").addHandler(server_errors)
    client = TensorDockClient(
        TEST_API_KEY, TEST_API_TOKEN, base_url=sim.api_url, timeout_seconds=0.3
    )

    try:
        async with client:
            with pytest.raises(ApiTimeoutError):
                await client.stop_vm(vm.id)
            status_before_delay = vm.status
            await _wait_for_status(vm, VmStatus.STOPPED, within_seconds=3.0)
    finally:
        logging.getLogger("uvicorn.error").removeHandler(server_errors)

    assert status_before_delay is VmStatus.RUNNING
    assert vm.status is VmStatus.STOPPED
    assert server_errors.records == []


async def _wait_for_status(vm: SimVm, status: VmStatus, *, within_seconds: float) -> None:
    poll_seconds = 0.05
    for _ in range(round(within_seconds / poll_seconds)):
        if vm.status is status:
            return
        await asyncio.sleep(poll_seconds)


class _ErrorRecords(logging.Handler):
    """Collect the server's ERROR records, such as a traceback of the request handler."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


async def test_fault_drop_response_creates_vm(sim: Sim) -> None:
    sim.market.inject_fault("client/deploy/single", FaultMode.DROP_RESPONSE)

    with pytest.raises(httpx.RemoteProtocolError):
        await sim.api("client/deploy/single", **deploy_fields())
    listed = (await sim.api("client/list")).json()["virtualmachines"]

    assert [vm["name"] for vm in listed.values()] == ["test-4090"]


async def test_fault_drop_response_502_creates_vm(sim: Sim) -> None:
    await sim.admin("faults", {"endpoint": "client/deploy/single", "mode": "drop_response_502"})

    response = await sim.api("client/deploy/single", **deploy_fields())
    listed = (await sim.api("client/list")).json()["virtualmachines"]

    assert response.status_code == 502
    assert len(listed) == 1


async def test_fault_unknown_mode_400(sim: Sim) -> None:
    response = await sim.admin("faults", {"endpoint": "client/list", "mode": "explode"})

    assert response.status_code == 400
    assert "explode" in response.json()["error"]


# --- activity, containers, state ------------------------------------------------------------


async def test_activity_set_and_read(sim: Sim) -> None:
    vm_id = await deploy(sim)

    written = await sim.admin(f"vms/{vm_id}/activity", {"gpu_util_percent": 87.5, "cpu_load": 3})
    read = await sim.http.get(f"/_sim/vms/{vm_id}/activity")

    assert written.status_code == 200
    assert read.json()["activity"] == {
        "cpu_load": 3.0,
        "gpu_memory_mb": 0.0,
        "gpu_util_percent": 87.5,
        "network_kbps": 0.0,
    }
    assert read.json()["status"] == "Running"


async def test_activity_unknown_reading_400(sim: Sim) -> None:
    vm_id = await deploy(sim)

    response = await sim.admin(f"vms/{vm_id}/activity", {"gpu_temp": 80})

    assert response.status_code == 400


async def test_container_lifecycle(sim: Sim) -> None:
    deployed = await sim.api(
        "client/container/deploy",
        display_name="api",
        image_name="nginx:latest",
        registry_type="public",
        gpu_models=f"[{RTX_4090}]",
        gpu_count=1,
        replicas=2,
        vcpus=4,
        ram=16,
        storage=50,
        networking_port=8000,
    )
    assert deployed.json() == {"success": True}
    container_id = next(iter(sim.market.containers))

    scaled = await sim.api("client/container/scale", container_id=container_id, replicas=1)
    replicas = await sim.http.get(f"/api/v0/client/container/{container_id}/replicas", params=AUTH)
    stopped = await sim.api("client/container/stop", container_id=container_id)

    assert scaled.json() == {"success": True}
    result = replicas.json()["result"]
    assert len(result) == 3
    assert result[0]["internal_ports"] == [22, 8000]
    assert stopped.json() == {"success": True}
    assert sim.market.containers[container_id].replicas == []


async def test_container_replicas_unknown_404(sim: Sim) -> None:
    response = await sim.http.get("/api/v0/client/container/nope/replicas", params=AUTH)

    assert response.status_code == 404


async def test_admin_state_lists_vms(sim: Sim) -> None:
    vm_id = await deploy(sim, price_type="spot", price="0.30")

    state = (await sim.http.get("/_sim/state")).json()

    assert state["vms"][vm_id]["bid"] == 0.3
    assert state["vms"][vm_id]["spot_minimum"] == pytest.approx(0.273)
    assert state["spot_prices"][LV_4090][RTX_4090] == 0.185
    assert state["now"] == "2024-11-04T12:00:00+00:00"


async def test_seed_example_vms_take_stock(sim: Sim) -> None:
    seeded = sim.market.seed_example_vms()

    listed = (await sim.api("client/list")).json()["virtualmachines"]
    balance = (await sim.api("billing/balance")).json()

    assert {vm["status"] for vm in listed.values()} == {"Running", "Stopped"}
    assert len(listed) == len(seeded) == 3
    assert sim.market.hostnodes[LV_4090].gpus[RTX_4090].amount == 5
    assert balance["hourly_cost"] == pytest.approx(0.468 + 0.3075 + 0.219)


async def test_multipart_form_accepted(sim: Sim) -> None:
    files = {name: (None, value) for name, value in AUTH.items()}

    response = await sim.http.post("/api/v0/client/list", files=files)

    assert response.status_code == 200
    assert response.json() == {"success": True, "virtualmachines": {}}


async def test_outbid_vm_cannot_start(sim: Sim) -> None:
    vm_id = await deploy(sim, price_type="spot", price="0.30")
    sim.market.set_spot_price(LV_4090, RTX_4090, 0.3)

    response = await sim.api("client/start/single", server=vm_id)

    assert response.status_code == 500
    assert response.json()["error"] == "Machine is outbid, therefore it cannot be started"
