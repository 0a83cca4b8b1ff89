"""TensorDockClient against the simulator over real HTTP on 127.0.0.1.

Each test starts its own simulated market with a frozen clock, calls the client, and
checks both the parsed return value and the state the call left in the market.
Injected faults make the simulator fail the way the real API has been seen to fail.

Prices on the Las Vegas hostnode (USD per hour): RTX 4090 0.37 per GPU, vCPU 0.003,
RAM 0.002 per GB, storage 0.00005 per GB. The standard VM below (1 GPU, 8 vCPUs,
32 GB RAM, 200 GB disk) therefore costs 0.458 compute + 0.01 storage = 0.468, and its
spot minimum is half the GPU price plus vCPUs and RAM: 0.185 + 0.088 = 0.273.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest

from tdbot.simulator.faults import FaultMode
from tdbot.simulator.market import SimulatedMarket
from tdbot.simulator.server import SimulatorServer
from tdbot.simulator.testing import (
    TEST_API_KEY,
    TEST_API_TOKEN,
    TEST_START,
    make_test_market,
    running_simulator,
)
from tdbot.simulator.vms import SimVm
from tdbot.tensordock import (
    ApiTimeoutError,
    AuthenticationError,
    ContainerDeployRequest,
    DeployRequest,
    InvalidRequestError,
    MalformedResponseError,
    NoCapacityError,
    NotFoundError,
    TensorDockClient,
    TransportError,
    WrongStateError,
)
from tdbot.tensordock.client import SPOT_REJECTED_MESSAGE
from tdbot.tensordock.models import VmStatus

LV_4090 = "0b60f80c-e16a-4cda-a8cd-dbc01cc0512c"
RTX_4090 = "geforcertx4090-pcie-24gb"
CHI_H100 = "f1ce2515-54fd-4dd3-83a1-cadbddccd3b5"
# The packaged marketplace stores this hostnode's numbers as numeric strings. The simulator
# sends them as JSON numbers, so the string coercion itself is covered by the fixture tests.
PRG_STRINGS = "9cd81ba3-dd17-4a09-81a7-4f0625eb3351"

VM_COMPUTE_USD = 0.458
VM_STORAGE_USD = 0.01
VM_TOTAL_USD = 0.468
SPOT_MINIMUM_USD = 0.273

BAD_API_KEY = "wrong-key-0f6c2a51"
BAD_API_TOKEN = "wrong-token-7d3e9b84"


@pytest.fixture
def market() -> SimulatedMarket:
    return make_test_market()


@pytest.fixture
async def server(market: SimulatedMarket) -> AsyncIterator[SimulatorServer]:
    async with running_simulator(market) as running:
        yield running


@pytest.fixture
async def client(server: SimulatorServer) -> AsyncIterator[TensorDockClient]:
    async with make_client(server) as td:
        yield td


def make_client(
    server: SimulatorServer,
    *,
    api_key: str = TEST_API_KEY,
    api_token: str = TEST_API_TOKEN,
    timeout_seconds: float = 5.0,
    read_retries: int = 0,
) -> TensorDockClient:
    """Build a client of the simulator that sends each call once unless `read_retries` is set."""
    return TensorDockClient(
        api_key,
        api_token,
        base_url=server.api_url,
        timeout_seconds=timeout_seconds,
        read_retries=read_retries,
        backoff_seconds=0.0,
    )


def lv_request(**changes: Any) -> DeployRequest:
    """Build a valid on-demand deploy of the standard VM on the Las Vegas hostnode."""
    values: dict[str, Any] = {
        "name": "test-4090",
        "hostnode_id": LV_4090,
        "gpu_model": RTX_4090,
        "gpu_count": 1,
        "vcpus": 8,
        "ram_gb": 32,
        "storage_gb": 200,
        "external_ports": [51116, 51129],
        "internal_ports": [22, 8888],
        "password": "correct-horse-battery",
    }
    values.update(changes)
    return DeployRequest.model_validate(values)


async def deploy_lv(client: TensorDockClient, **changes: Any) -> str:
    result = await client.deploy_vm(lv_request(**changes))
    return result.server


def seed_stopped_vm(market: SimulatedMarket) -> SimVm:
    return market.add_vm(
        hostnode_id=LV_4090, gpu_model=RTX_4090, name="stopped-4090", status=VmStatus.STOPPED
    )


def container_request() -> ContainerDeployRequest:
    return ContainerDeployRequest(
        display_name="api",
        project_id="api-project",
        image_name="nginx:latest",
        gpu_count=1,
        gpu_models=[RTX_4090],
        replicas=2,
        ram_gb=16,
        vcpus=4,
        storage_gb=50,
        networking_port=8000,
        environment_variables={"MODE": "test"},
        max_vm_rate_hourly=1.0,
    )


# --- authorization ----------------------------------------------------------------------


async def test_authorization_valid_returns_true(client: TensorDockClient) -> None:
    assert await client.test_authorization() is True


async def test_authorization_bad_returns_false(server: SimulatorServer) -> None:
    async with make_client(server, api_key=BAD_API_KEY, api_token=BAD_API_TOKEN) as td:
        assert await td.test_authorization() is False


async def test_bad_credentials_raise_without_secrets(server: SimulatorServer) -> None:
    async with make_client(server, api_key=BAD_API_KEY, api_token=BAD_API_TOKEN) as td:
        with pytest.raises(AuthenticationError) as caught:
            await td.list_vms()

    error = caught.value
    assert error.status_code == 401
    assert error.endpoint == "client/list"
    assert error.server_message == "Invalid authorization"
    assert "TDBOT_API_KEY" in str(error)
    assert BAD_API_KEY not in str(error)
    assert BAD_API_TOKEN not in str(error)


async def test_list_authorizations_simulator_pair(client: TensorDockClient) -> None:
    authorizations = await client.list_authorizations()

    assert len(authorizations) == 1
    assert authorizations[0].name == "simulator"
    assert authorizations[0].permissions == "All"
    assert authorizations[0].timestamp_creation == "2024-11-04 12:00:00.000000"


# --- hostnodes --------------------------------------------------------------------------


async def test_list_hostnodes_whole_market_typed(
    client: TensorDockClient, market: SimulatedMarket
) -> None:
    hostnodes = await client.list_hostnodes()

    assert len(hostnodes) == 41
    assert set(hostnodes) == set(market.hostnodes)
    prague = hostnodes[PRG_STRINGS]
    assert prague.id == PRG_STRINGS
    assert prague.specs.gpu[RTX_4090].price == 0.45
    assert prague.specs.gpu[RTX_4090].amount == 2
    assert prague.specs.gpu[RTX_4090].vram == 24
    assert prague.specs.cpu.amount == 30
    assert prague.specs.storage.price == 0.00005
    assert prague.networking.ports[0] == 61840
    assert prague.status.uptime == 0.9987
    assert prague.specs.restrictions is not None
    assert prague.specs.restrictions[1].cpu is not None
    assert prague.specs.restrictions[1].cpu.max == 14
    assert prague.available


async def test_list_hostnodes_filters_on_server(
    client: TensorDockClient, market: SimulatedMarket
) -> None:
    hostnodes = await client.list_hostnodes(min_gpu_count=7, min_vcpus=150, requires_rtx=False)

    wire_filters = {"minGPUCount": "7", "minvCPUs": "150", "requiresRTX": "false"}
    expected = {host_id for host_id, host in market.hostnodes.items() if host.matches(wire_filters)}
    assert set(hostnodes) == expected
    assert CHI_H100 in hostnodes
    assert LV_4090 not in hostnodes
    assert len(hostnodes) < 41


async def test_list_hostnodes_rtx_filter(client: TensorDockClient) -> None:
    hostnodes = await client.list_hostnodes(requires_rtx=True, include_reserved=True)

    assert LV_4090 in hostnodes
    assert CHI_H100 not in hostnodes
    for hostnode in hostnodes.values():
        assert any(gpu.rtx for gpu in hostnode.specs.gpu.values()), hostnode.id


async def test_get_hostnode_equals_list_entry(client: TensorDockClient) -> None:
    listed = await client.list_hostnodes()

    hostnode = await client.get_hostnode(CHI_H100)

    assert hostnode == listed[CHI_H100]


async def test_get_hostnode_unknown_not_found(client: TensorDockClient) -> None:
    with pytest.raises(NotFoundError) as caught:
        await client.get_hostnode("no-such-hostnode")

    assert caught.value.status_code == 404
    assert caught.value.subject_id == "no-such-hostnode"
    assert "hostnode no-such-hostnode not found" in str(caught.value)


# --- deploy -----------------------------------------------------------------------------


async def test_deploy_vm_runs_in_market(client: TensorDockClient, market: SimulatedMarket) -> None:
    result = await client.deploy_vm(lv_request())

    vm = market.vms[result.server]
    host = market.hostnodes[LV_4090]
    assert vm.status is VmStatus.RUNNING
    assert vm.name == "test-4090"
    assert vm.port_forwards == {51116: 22, 51129: 8888}
    assert 51116 not in host.ports
    assert 51129 not in host.ports
    assert host.gpus[RTX_4090].amount == 5
    assert result.port_forwards == {51116: 22, 51129: 8888}
    assert result.ssh_port == 51116
    assert result.ip == host.ip_address
    assert result.cost is not None
    assert result.cost.compute_price == pytest.approx(VM_COMPUTE_USD)
    assert result.cost.total_price == pytest.approx(VM_TOTAL_USD)


async def test_deploy_odd_vcpus_rejected_locally(
    client: TensorDockClient, market: SimulatedMarket
) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        await client.deploy_vm(lv_request(vcpus=7))

    assert "vcpus is 7" in str(caught.value)
    assert caught.value.status_code is None
    assert market.vms == {}
    assert market.events == []


async def test_deploy_port_outside_pool_rejected(
    client: TensorDockClient, market: SimulatedMarket
) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        await client.deploy_vm(lv_request(external_ports=[1234, 51129]))

    error = caught.value
    assert isinstance(error, NoCapacityError)
    assert error.status_code == 400
    assert error.server_message == "External port 1234 is not available on this hostnode"
    assert "External port 1234 is not available" in str(error)
    assert market.vms == {}
    assert 51129 in market.hostnodes[LV_4090].ports


async def test_deploy_spot_vm_with_bid(client: TensorDockClient, market: SimulatedMarket) -> None:
    result = await client.deploy_vm(lv_request(spot_bid_usd_per_hour=0.30))

    vm = market.vms[result.server]
    assert vm.is_spot
    assert vm.bid == pytest.approx(0.30)
    assert vm.status is VmStatus.RUNNING
    assert result.cost is not None
    assert result.cost.compute_price == pytest.approx(0.30)
    assert result.cost.total_price == pytest.approx(0.30 + VM_STORAGE_USD)
    read = await client.get_vm(result.server)
    assert read.is_spot
    assert read.spot_bid == pytest.approx(0.30)


# --- spot validation --------------------------------------------------------------------

# The deployment every spot validation below checks, on the Las Vegas 4090 hostnode.
LV_SPOT_SHAPE: dict[str, Any] = {
    "hostnode_id": LV_4090,
    "gpu_model": RTX_4090,
    "gpu_count": 1,
    "vcpus": 8,
    "ram_gb": 32,
    "storage_gb": 200,
}


async def test_validate_spot_new_accepts_bid(
    client: TensorDockClient, market: SimulatedMarket
) -> None:
    validation = await client.validate_spot_new(
        **LV_SPOT_SHAPE, price_usd_per_hour=SPOT_MINIMUM_USD + 0.01
    )

    assert validation.accepted is True
    assert validation.message is None
    assert market.vms == {}


async def test_validate_spot_new_low_bid(client: TensorDockClient) -> None:
    validation = await client.validate_spot_new(
        **LV_SPOT_SHAPE, price_usd_per_hour=SPOT_MINIMUM_USD - 0.01
    )

    assert validation.accepted is False
    assert validation.message == SPOT_REJECTED_MESSAGE


async def test_validate_spot_existing_rebids_outbid_vm(
    client: TensorDockClient, market: SimulatedMarket
) -> None:
    vm_id = await deploy_lv(client, spot_bid_usd_per_hour=0.30)
    # A GPU clearing price of 0.30 raises the VM's minimum to 0.30 + 0.088 = 0.388.
    market.set_spot_price(LV_4090, RTX_4090, 0.30)
    assert (await client.get_vm(vm_id)).status is VmStatus.OUTBID

    too_low = await client.validate_spot_existing(vm_id, 0.35)

    assert too_low.accepted is False
    assert too_low.message == "Your bid is too low to be scheduled on this hostnode"
    assert market.vms[vm_id].status is VmStatus.OUTBID
    assert market.vms[vm_id].bid == pytest.approx(0.30)

    higher = await client.validate_spot_existing(vm_id, 0.40)

    assert higher.accepted is True
    assert market.vms[vm_id].bid == pytest.approx(0.40)
    read = await client.get_vm(vm_id)
    assert read.status is VmStatus.RUNNING
    assert read.spot_bid == pytest.approx(0.40)


# --- reading VMs ------------------------------------------------------------------------


async def test_list_vms_parses_every_vm(client: TensorDockClient, market: SimulatedMarket) -> None:
    deployed_id = await deploy_lv(client)
    stopped = seed_stopped_vm(market)

    vms = await client.list_vms()

    assert set(vms) == {deployed_id, stopped.id}
    deployed = vms[deployed_id]
    assert deployed.id == deployed_id
    assert deployed.name == "test-4090"
    assert deployed.status is VmStatus.RUNNING
    assert deployed.hostnode == LV_4090
    assert deployed.is_spot is False
    # The simulator sends the port map with string keys and values, as 2024 data has them.
    assert deployed.port_forwards == {51116: 22, 51129: 8888}
    assert deployed.ssh_port == 51116
    assert deployed.specs.vcpus == 8
    assert deployed.specs.gpu.type == RTX_4090
    assert deployed.timestamp_creation == TEST_START
    assert deployed.hourly_cost == pytest.approx(VM_TOTAL_USD)
    assert deployed.deployment is not None
    assert deployed.deployment.status == "Pending"
    assert vms[stopped.id].status is VmStatus.STOPPED


async def test_list_vms_deployment_completes(
    client: TensorDockClient, market: SimulatedMarket
) -> None:
    vm_id = await deploy_lv(client)
    market.advance(timedelta(minutes=1))

    deployment = (await client.list_vms())[vm_id].deployment

    assert deployment is not None
    assert deployment.status == "Completed"
    assert deployment.timestamp_completion == TEST_START + timedelta(seconds=30)


async def test_get_vm_reads_plural_key(client: TensorDockClient) -> None:
    vm_id = await deploy_lv(client)
    listed = await client.list_vms()

    vm = await client.get_vm(vm_id)

    assert vm == listed[vm_id]
    assert vm.ssh_port == 51116


async def test_get_vm_unknown_not_found(client: TensorDockClient) -> None:
    with pytest.raises(NotFoundError) as caught:
        await client.get_vm("no-such-vm")

    assert caught.value.status_code == 404
    assert "VM no-such-vm not found" in str(caught.value)


# --- VM lifecycle -----------------------------------------------------------------------


async def test_start_vm_stopped_runs(client: TensorDockClient, market: SimulatedMarket) -> None:
    vm = seed_stopped_vm(market)

    await client.start_vm(vm.id)

    assert market.vms[vm.id].status is VmStatus.RUNNING
    assert (await client.get_vm(vm.id)).status is VmStatus.RUNNING


async def test_start_vm_running_wrong_state(
    client: TensorDockClient, market: SimulatedMarket
) -> None:
    vm_id = await deploy_lv(client)

    with pytest.raises(WrongStateError) as caught:
        await client.start_vm(vm_id)

    assert caught.value.subject_id == vm_id
    assert caught.value.status_code == 500
    assert f"VM {vm_id}" in str(caught.value)
    assert "already running" in str(caught.value)
    assert market.vms[vm_id].status is VmStatus.RUNNING


async def test_stop_vm_keeps_resources(client: TensorDockClient, market: SimulatedMarket) -> None:
    vm_id = await deploy_lv(client)

    await client.stop_vm(vm_id)

    vm = market.vms[vm_id]
    assert vm.status is VmStatus.STOPPED
    assert vm.holds_compute is True
    assert market.hostnodes[LV_4090].gpus[RTX_4090].amount == 5
    read = await client.get_vm(vm_id)
    assert read.status is VmStatus.STOPPED
    assert read.hourly_cost == pytest.approx(VM_TOTAL_USD)


async def test_stop_vm_release_returns_stock(
    client: TensorDockClient, market: SimulatedMarket
) -> None:
    vm_id = await deploy_lv(client)

    await client.stop_vm(vm_id, release=True)

    host = market.hostnodes[LV_4090]
    assert market.vms[vm_id].status is VmStatus.STOPPED_DISASSOCIATED
    assert market.vms[vm_id].holds_compute is False
    assert host.gpus[RTX_4090].amount == 6
    assert host.cpu_amount == 100
    assert host.ram_amount == 470
    read = await client.get_vm(vm_id)
    assert read.status is VmStatus.STOPPED_DISASSOCIATED
    assert read.hourly_cost == pytest.approx(VM_STORAGE_USD)


async def test_stop_released_vm_wrong_state(
    client: TensorDockClient, market: SimulatedMarket
) -> None:
    vm_id = await deploy_lv(client)
    await client.stop_vm(vm_id, release=True)

    with pytest.raises(WrongStateError) as caught:
        await client.stop_vm(vm_id, release=True)

    assert caught.value.subject_id == vm_id
    assert f"VM {vm_id}" in str(caught.value)
    assert "already stoppeddisassociated" in str(caught.value)
    assert market.vms[vm_id].status is VmStatus.STOPPED_DISASSOCIATED


async def test_modify_vm_resizes_stopped_vm(
    client: TensorDockClient, market: SimulatedMarket
) -> None:
    vm_id = await deploy_lv(client)
    await client.stop_vm(vm_id)

    server_id = await client.modify_vm(vm_id, vcpus=4, ram_gb=16, storage_gb=300)

    vm = market.vms[vm_id]
    assert server_id == vm_id
    assert (vm.vcpus, vm.ram, vm.storage) == (4, 16, 300)
    assert vm.compute_price == pytest.approx(0.37 + 4 * 0.003 + 16 * 0.002)
    assert market.hostnodes[LV_4090].cpu_amount == 96
    read = await client.get_vm(vm_id)
    assert read.specs.vcpus == 4
    assert read.specs.ram == 16
    assert read.specs.storage == 300


async def test_modify_running_vm_wrong_state(
    client: TensorDockClient, market: SimulatedMarket
) -> None:
    vm_id = await deploy_lv(client)

    with pytest.raises(WrongStateError) as caught:
        await client.modify_vm(vm_id, vcpus=4)

    assert caught.value.server_message == "Machine is running, therefore it cannot be modified"
    assert market.vms[vm_id].vcpus == 8


async def test_delete_vm_twice_succeeds(client: TensorDockClient, market: SimulatedMarket) -> None:
    vm_id = await deploy_lv(client)

    await client.delete_vm(vm_id)
    await client.delete_vm(vm_id)

    host = market.hostnodes[LV_4090]
    assert vm_id not in await client.list_vms()
    assert vm_id in market.terminated
    assert len(list(market.events_of("deleted"))) == 1
    assert host.gpus[RTX_4090].amount == 6
    assert {51116, 51129} <= set(host.ports)


# --- billing ----------------------------------------------------------------------------


async def test_balance_drains_over_two_hours(
    client: TensorDockClient, market: SimulatedMarket
) -> None:
    await deploy_lv(client)
    before = await client.get_balance()

    market.advance(timedelta(hours=2))
    after = await client.get_balance()

    assert before.balance == pytest.approx(100.0)
    assert before.hourly_cost == pytest.approx(VM_TOTAL_USD)
    assert after.balance == pytest.approx(100.0 - 2 * VM_TOTAL_USD)
    assert after.hourly_cost == pytest.approx(VM_TOTAL_USD)
    assert after.runway_hours == pytest.approx((100.0 - 2 * VM_TOTAL_USD) / VM_TOTAL_USD)
    assert market.account.balance_usd == pytest.approx(after.balance)


async def test_revenue_reports_vm_spend(client: TensorDockClient, market: SimulatedMarket) -> None:
    vm_id = await deploy_lv(client)
    market.advance(timedelta(hours=1))

    rows = await client.get_revenue()
    other_host = await client.get_revenue(hostnode_id=CHI_H100)

    assert len(rows) == 1
    row = rows[0]
    assert row.hostnode_id == LV_4090
    assert row.revenue_compute == pytest.approx(VM_COMPUTE_USD)
    assert row.revenue_storage == pytest.approx(VM_STORAGE_USD)
    assert row.used_gpus == 1
    assert row.available_gpus == 5
    assert [vm.id for vm in row.virtual_machines] == [vm_id]
    assert other_host == []


async def test_billing_summary_month_expenses(
    client: TensorDockClient, market: SimulatedMarket
) -> None:
    vm_id = await deploy_lv(client)
    market.advance(timedelta(hours=2))

    summary = await client.get_billing_summary("2024-11")

    assert summary.bill_period == {"startY": "2024", "startM": "11", "endY": "2024", "endM": "12"}
    assert summary.previous_balance == 100.0
    assert summary.final_balance == round(100.0 - 2 * VM_TOTAL_USD, 2)
    assert summary.changes["expenses"] == round(2 * VM_TOTAL_USD, 2)
    expenses = summary.transactions["vm_expenses"]
    assert [line["virtual_machine_id"] for line in expenses] == [vm_id]
    assert expenses[0]["total_amount"] == pytest.approx(2 * VM_COMPUTE_USD)


# --- containers -------------------------------------------------------------------------


async def test_container_deploy_scale_stop(
    client: TensorDockClient, market: SimulatedMarket
) -> None:
    await client.deploy_container(container_request())

    assert len(market.containers) == 1
    container_id, container = next(iter(market.containers.items()))
    assert container.spec.gpu_models == [RTX_4090]
    assert container.spec.networking_port == 8000
    assert len(container.replicas) == 2

    await client.scale_container(container_id, 1)
    replicas = await client.get_container_replicas(container_id)

    assert len(market.containers[container_id].replicas) == 3
    assert [replica.vm_uuid for replica in replicas] == [
        replica.vm_uuid for replica in container.replicas
    ]
    assert replicas[0].internal_ports == [22, 8000]
    assert replicas[0].rate_hourly is not None
    assert replicas[0].rate_hourly <= 1.0

    await client.stop_container(container_id)

    assert market.containers[container_id].stopped is True
    assert await client.get_container_replicas(container_id) == []


# --- faults -----------------------------------------------------------------------------


async def test_delay_fault_times_out(server: SimulatorServer, market: SimulatedMarket) -> None:
    market.inject_fault("billing/balance", FaultMode.DELAY, delay_seconds=2.0)
    started = time.monotonic()

    async with make_client(server, timeout_seconds=0.3) as td:
        with pytest.raises(ApiTimeoutError) as caught:
            await td.get_balance()

    assert time.monotonic() - started < 1.5
    assert caught.value.endpoint == "billing/balance"
    assert "timed out after 0.3 s" in str(caught.value)


async def test_http_500_read_retried(server: SimulatorServer, market: SimulatedMarket) -> None:
    market.inject_fault("client/list", FaultMode.HTTP_500)
    vm = seed_stopped_vm(market)

    async with make_client(server, read_retries=1) as td:
        vms = await td.list_vms()

    assert set(vms) == {vm.id}
    assert market.faults.pending() == []


async def test_http_500_stop_not_retried(server: SimulatorServer, market: SimulatedMarket) -> None:
    vm = market.add_vm(hostnode_id=LV_4090, gpu_model=RTX_4090)
    market.inject_fault("client/stop/single", FaultMode.HTTP_500, count=2)

    async with make_client(server, read_retries=3) as td:
        with pytest.raises(TransportError) as caught:
            await td.stop_vm(vm.id)

    assert caught.value.status_code == 500
    assert "read the VM list" in str(caught.value)
    # One of the two injected failures is left, so the stop was sent exactly once.
    assert [rule.remaining for rule in market.faults.pending()] == [1]
    assert list(market.events_of("stopped")) == []
    assert market.vms[vm.id].status is VmStatus.RUNNING


async def test_bad_gateway_spot_new_retried(
    server: SimulatorServer, market: SimulatedMarket
) -> None:
    market.inject_fault("client/spot/validate/new", FaultMode.HTML_502, count=2)

    async with make_client(server, read_retries=2) as td:
        validation = await td.validate_spot_new(
            **LV_SPOT_SHAPE, price_usd_per_hour=SPOT_MINIMUM_USD + 0.01
        )

    assert validation.accepted is True
    assert market.faults.pending() == []
    assert market.vms == {}


async def test_spot_new_error_without_check_advice(
    server: SimulatorServer, market: SimulatedMarket
) -> None:
    market.inject_fault("client/spot/validate/new", FaultMode.HTTP_500, count=2)

    async with make_client(server, read_retries=1) as td:
        with pytest.raises(TransportError) as caught:
            await td.validate_spot_new(**LV_SPOT_SHAPE, price_usd_per_hour=SPOT_MINIMUM_USD + 0.01)

    assert caught.value.status_code == 500
    assert market.faults.pending() == []
    # A validation creates nothing, so there is nothing to look for before resending it.
    assert "read the VM list" not in str(caught.value)


async def test_html_502_transport_error(client: TensorDockClient, market: SimulatedMarket) -> None:
    market.inject_fault("client/list", FaultMode.HTML_502)

    with pytest.raises(TransportError) as caught:
        await client.list_vms()

    assert caught.value.status_code == 502
    assert "502 Bad Gateway" in str(caught.value)
    assert "<h1>" not in str(caught.value)


async def test_truncated_json_malformed(client: TensorDockClient, market: SimulatedMarket) -> None:
    market.inject_fault("billing/balance", FaultMode.TRUNCATED_JSON)

    with pytest.raises(MalformedResponseError) as caught:
        await client.get_balance()

    assert caught.value.status_code == 200
    assert "not valid JSON" in str(caught.value)


async def test_dropped_deploy_vm_exists(client: TensorDockClient, market: SimulatedMarket) -> None:
    market.inject_fault("client/deploy/single", FaultMode.DROP_RESPONSE)

    with pytest.raises(TransportError) as caught:
        await client.deploy_vm(lv_request(name="lost-response"))

    assert "read the VM list" in str(caught.value)
    # The deploy went through, so the caller finds the VM by its name.
    found = [vm for vm in (await client.list_vms()).values() if vm.name == "lost-response"]
    assert len(found) == 1
    assert found[0].status is VmStatus.RUNNING
    assert found[0].id in market.vms
