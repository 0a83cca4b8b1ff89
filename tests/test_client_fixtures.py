"""TensorDockClient against canned API responses from tests/fixtures/tensordock-v0.

The fixtures contain responses the simulator cannot produce on demand (HTML error pages,
truncated bodies, both historical shapes of a response), so they are served by an
in-process `httpx.MockTransport` that also records every request for checks of
the wire encoding.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from urllib.parse import parse_qsl

import httpx
import pytest

from tdbot.tensordock import (
    ApiTimeoutError,
    AuthenticationError,
    ContainerDeployRequest,
    DeployRequest,
    InvalidRequestError,
    MalformedResponseError,
    NoCapacityError,
    NotFoundError,
    SpotValidation,
    TensorDockClient,
    TensorDockError,
    TransportError,
    WrongStateError,
)
from tdbot.tensordock.models import VmStatus

FIXTURES = Path(__file__).parent / "fixtures" / "tensordock-v0"
API_KEY = "key-5e1f0c3a-RECOGNISABLE"
API_TOKEN = "token-9b7d2e44-RECOGNISABLE"
READ_RETRIES = 2

CHI_H100 = "f1ce2515-54fd-4dd3-83a1-cadbddccd3b5"
ORL_NO_PORTS = "e5d7e9c6-63db-4713-9ca4-100b77c5ba5b"
JOP_3090 = "3eed78e7-25ea-41a4-b111-186a9f980de9"
VM_H100 = "7dcd9ad2-3390-4258-adac-6c4cd8138325"
VM_A4000 = "6607d135-8d46-4d09-8894-5b4a54ee2b31"
VM_A6000 = "3fc1ceea-b848-4234-9f1b-afec0c8784fa"
VM_V100 = "d65cb439-32df-4280-9774-917cc2f8a3c5"
VM_3090 = "056bcd72-36a5-4c25-8a28-8f7c75793960"
VM_3080 = "eed8505c-05d5-4da1-a82f-4ce6870fff5e"
CONTAINER = "866bbda1-584c-47ce-afe9-490691e7cb59"

Reply = httpx.Response | Exception


def fixture(name: str, status: int = 200) -> httpx.Response:
    """Build a response from a fixture file, as HTML or JSON by its extension."""
    content = (FIXTURES / name).read_bytes()
    content_type = "text/html; charset=utf-8" if name.endswith(".html") else "application/json"
    return httpx.Response(status, content=content, headers={"content-type": content_type})


def json_reply(body: object, status: int = 200) -> httpx.Response:
    return httpx.Response(status, json=body)


class FakeApi:
    """Serves queued replies per API path and records every request.

    The last reply queued for a path is repeated, so a retried call gets it again.
    """

    def __init__(self) -> None:
        self.replies: dict[str, list[Reply]] = {}
        self.requests: list[httpx.Request] = []

    def add(self, path: str, *replies: Reply) -> None:
        self.replies.setdefault(path, []).extend(replies)

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        path = request.url.path.removeprefix("/api/v0/")
        queue = self.replies.get(path)
        if not queue:
            return json_reply({"success": False, "error": f"no reply queued for {path}"}, 599)

        reply = queue.pop(0) if len(queue) > 1 else queue[0]
        if isinstance(reply, Exception):
            raise reply
        return reply

    def form(self, index: int = -1) -> dict[str, str]:
        return dict(parse_qsl(self.requests[index].content.decode(), keep_blank_values=True))

    def query(self, index: int = -1) -> dict[str, str]:
        return dict(self.requests[index].url.params)

    def paths(self) -> list[str]:
        return [request.url.path for request in self.requests]


@pytest.fixture
def api() -> FakeApi:
    return FakeApi()


@pytest.fixture
async def client(api: FakeApi) -> AsyncIterator[TensorDockClient]:
    async with TensorDockClient(
        API_KEY,
        API_TOKEN,
        read_retries=READ_RETRIES,
        backoff_seconds=0,
        transport=httpx.MockTransport(api.handle),
    ) as td:
        yield td


def raising(error_class: type[httpx.RequestError]) -> Callable[[httpx.Request], None]:
    def raise_error(request: httpx.Request) -> None:
        raise error_class("simulated failure", request=request)

    return raise_error


def h100_request(**changes: object) -> DeployRequest:
    values: dict[str, object] = {
        "name": "llm-finetune-h100-01",
        "hostnode_id": CHI_H100,
        "gpu_model": "h100-sxm5-80gb",
        "gpu_count": 1,
        "vcpus": 24,
        "ram_gb": 96,
        "storage_gb": 500,
        "operating_system": "Ubuntu 22.04 LTS",
        "external_ports": [64460, 64478],
        "internal_ports": [22, 8888],
        "password": "hunter2-password-RECOGNISABLE",
    }
    values.update(changes)
    return DeployRequest.model_validate(values)


def whisper_container() -> ContainerDeployRequest:
    return ContainerDeployRequest(
        display_name="whisper-api",
        project_id="whisper-prod",
        image_name="example/whisper:latest",
        gpu_count=1,
        gpu_models=["geforcertx3090-pcie-24gb", "rtxa4000-pcie-16gb"],
        replicas=3,
        ram_gb=16,
        vcpus=4,
        storage_gb=100,
        networking_port=5000,
        environment_variables={"MODEL": "large-v3"},
        volumes=["/data"],
        arguments=["--port", "5000"],
        max_vm_rate_hourly=0.25,
    )


def market_entry(hostnode_id: str) -> dict[str, object]:
    market = json.loads((FIXTURES / "marketplace.json").read_text())
    entry: dict[str, object] = market["hostnodes"][hostnode_id]
    return entry


# --- fixture coverage ------------------------------------------------------------------


def test_every_fixture_file_is_used() -> None:
    source = Path(__file__).read_text()
    names = sorted(path.name for path in FIXTURES.iterdir() if path.name != "INDEX.md")

    unused = [name for name in names if f'"{name}"' not in source]

    assert unused == []


# --- authorization ---------------------------------------------------------------------


async def test_auth_test_valid_returns_true(api: FakeApi, client: TensorDockClient) -> None:
    api.add("auth/test", fixture("auth_test.ok.json"))

    assert await client.test_authorization() is True
    assert api.requests[0].method == "POST"
    assert api.requests[0].headers["content-type"] == "application/x-www-form-urlencoded"
    assert api.form() == {"api_key": API_KEY, "api_token": API_TOKEN}


@pytest.mark.parametrize("status", [200, 401])
async def test_auth_test_rejected_returns_false(
    api: FakeApi, client: TensorDockClient, status: int
) -> None:
    api.add("auth/test", fixture("auth_test.bad_credentials.json", status))

    assert await client.test_authorization() is False
    assert len(api.requests) == 1


async def test_auth_test_server_error_raises(api: FakeApi, client: TensorDockClient) -> None:
    api.add("auth/test", fixture("delete_single.internal_error.json", 500))

    with pytest.raises(TransportError):
        await client.test_authorization()
    assert len(api.requests) == 1 + READ_RETRIES


async def test_auth_list_keyed_by_name(api: FakeApi, client: TensorDockClient) -> None:
    api.add("auth/list", fixture("auth_list.ok.json"))

    authorizations = await client.list_authorizations()

    by_name = {entry.name: entry for entry in authorizations}
    assert sorted(by_name) == ["ci-pipeline", "dstack-prod", "laptop"]
    assert by_name["laptop"].note == ""
    assert by_name["dstack-prod"].permissions == "All"


# --- hostnodes -------------------------------------------------------------------------


async def test_marketplace_parses_all_hostnodes(api: FakeApi, client: TensorDockClient) -> None:
    api.add("client/deploy/hostnodes", fixture("marketplace.json"))

    hostnodes = await client.list_hostnodes()

    assert len(hostnodes) == 41
    assert all(hostnode.id == hostnode_id for hostnode_id, hostnode in hostnodes.items())
    prague = hostnodes["9cd81ba3-dd17-4a09-81a7-4f0625eb3351"]
    gpu = prague.specs.gpu["geforcertx4090-pcie-24gb"]
    assert gpu.price == 0.45
    assert gpu.vram == 24
    assert prague.status.uptime == 0.9987
    assert 61840 in prague.networking.ports
    assert prague.specs.restrictions is not None
    assert prague.specs.restrictions[2].cpu is not None
    assert prague.specs.restrictions[2].cpu.max == 28


async def test_marketplace_keeps_missing_fields_unknown(
    api: FakeApi, client: TensorDockClient
) -> None:
    api.add("client/deploy/hostnodes", fixture("marketplace.json"))

    hostnodes = await client.list_hostnodes()

    old_host = hostnodes["40730580-35d7-404d-be34-493f36436e6c"]
    assert old_host.specs.restrictions is None
    assert old_host.status.reserved is None
    assert all(gpu.vram is None for gpu in old_host.specs.gpu.values())
    assert hostnodes["efcbd58f-a28c-4f49-8696-5e4d3688c7ff"].specs.gpu == {}
    assert hostnodes[ORL_NO_PORTS].networking.ports == []
    assert hostnodes["0c64ff1c-5b38-42ff-a641-e8db5f976178"].available is False


async def test_marketplace_request_is_unauthenticated(
    api: FakeApi, client: TensorDockClient
) -> None:
    api.add("client/deploy/hostnodes", fixture("marketplace.json"))

    await client.list_hostnodes()

    request = api.requests[0]
    assert request.method == "GET"
    assert request.url.path == "/api/v0/client/deploy/hostnodes"
    assert api.query() == {}
    assert request.content == b""


async def test_marketplace_filters_sent_as_query(api: FakeApi, client: TensorDockClient) -> None:
    api.add("client/deploy/hostnodes", fixture("marketplace.json"))

    await client.list_hostnodes(
        min_gpu_count=2,
        min_vcpus=8,
        min_ram_gb=32,
        min_storage_gb=200,
        min_vram_gb=24,
        requires_rtx=True,
        requires_gtx=False,
    )

    assert api.query() == {
        "minGPUCount": "2",
        "minvCPUs": "8",
        "minRAM": "32",
        "minStorage": "200",
        "minVRAM": "24",
        "requiresRTX": "true",
        "requiresGTX": "false",
    }


async def test_marketplace_reserved_sends_credentials(
    api: FakeApi, client: TensorDockClient
) -> None:
    api.add("client/deploy/hostnodes", fixture("marketplace.json"))

    await client.list_hostnodes(include_reserved=True)

    assert api.query() == {"api_key": API_KEY, "api_token": API_TOKEN}


async def test_marketplace_skips_invalid_hostnode(api: FakeApi, client: TensorDockClient) -> None:
    entry = market_entry(CHI_H100)
    broken = {**entry, "networking": {"ports": ["not-a-port"]}}
    api.add(
        "client/deploy/hostnodes",
        json_reply({"success": True, "hostnodes": {CHI_H100: entry, ORL_NO_PORTS: broken}}),
    )

    hostnodes = await client.list_hostnodes()

    assert list(hostnodes) == [CHI_H100]


@pytest.mark.parametrize("name", ["hostnode_details.ok.json", "hostnode_details.uuid_keyed.json"])
async def test_hostnode_details_equal_marketplace_entry(
    api: FakeApi, client: TensorDockClient, name: str
) -> None:
    api.add("client/deploy/hostnodes", fixture("marketplace.json"))
    api.add(f"client/deploy/hostnodes/{CHI_H100}", fixture(name))

    market = await client.list_hostnodes()
    hostnode = await client.get_hostnode(CHI_H100)

    assert hostnode == market[CHI_H100]
    assert api.requests[-1].method == "GET"
    assert api.query() == {}


async def test_hostnode_not_found_names_uuid(api: FakeApi, client: TensorDockClient) -> None:
    unknown = "00000000-1111-2222-3333-444444444444"
    api.add(f"client/deploy/hostnodes/{unknown}", fixture("hostnode_details.not_found.json", 404))

    with pytest.raises(NotFoundError) as caught:
        await client.get_hostnode(unknown)

    assert unknown in str(caught.value)
    assert caught.value.subject_id == unknown
    assert caught.value.status_code == 404
    assert len(api.requests) == 1


# --- deploy ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "server", "ports"),
    [
        ("deploy_single.ok.json", VM_H100, {64460: 22, 64478: 8888}),
        ("deploy_single.ok_string_ports.json", VM_3080, {30403: 22, 30426: 80}),
    ],
)
async def test_deploy_normalises_port_forwards(
    api: FakeApi, client: TensorDockClient, name: str, server: str, ports: dict[int, int]
) -> None:
    api.add("client/deploy/single", fixture(name))

    result = await client.deploy_vm(h100_request())

    assert result.server == server
    assert result.port_forwards == ports
    assert result.ssh_port == min(ports)


async def test_deploy_result_keeps_ip_and_cost(api: FakeApi, client: TensorDockClient) -> None:
    api.add("client/deploy/single", fixture("deploy_single.ok_string_ports.json"))

    result = await client.deploy_vm(h100_request())

    assert result.ip == "wpg-b.tensordockmarketplace.com"
    assert result.cost is not None
    assert result.cost.total_price == 0.176
    assert result.execution_id == 20517


async def test_deploy_encodes_form_fields(api: FakeApi, client: TensorDockClient) -> None:
    api.add("client/deploy/single", fixture("deploy_single.ok.json"))
    request = h100_request(
        ssh_public_key="ssh-ed25519 AAAAC3Nza user@laptop",
        cloudinit_script="#cloud-config\nruncmd:\r\n  - nvidia-smi\n",
        spot_bid_usd_per_hour=2.5,
    )

    await client.deploy_vm(request)

    assert api.requests[0].method == "POST"
    assert api.requests[0].url.path == "/api/v0/client/deploy/single"
    assert api.form() == {
        "api_key": API_KEY,
        "api_token": API_TOKEN,
        "name": "llm-finetune-h100-01",
        "hostnode": CHI_H100,
        "gpu_model": "h100-sxm5-80gb",
        "gpu_count": "1",
        "vcpus": "24",
        "ram": "96",
        "storage": "500",
        "operating_system": "Ubuntu 22.04 LTS",
        "external_ports": "{64460, 64478}",
        "internal_ports": "{22, 8888}",
        "password": "hunter2-password-RECOGNISABLE",
        "ssh_key": "ssh-ed25519 AAAAC3Nza user@laptop",
        "cloudinit_script": "#cloud-config\\nruncmd:\\n  - nvidia-smi\\n",
        "price_type": "spot",
        "price": "2.5",
    }


async def test_deploy_on_demand_omits_price(api: FakeApi, client: TensorDockClient) -> None:
    api.add("client/deploy/single", fixture("deploy_single.ok.json"))

    await client.deploy_vm(h100_request())

    form = api.form()
    assert "price_type" not in form
    assert "price" not in form
    assert "cloudinit_script" not in form


async def test_deploy_server_odd_vcpus_not_retried(api: FakeApi, client: TensorDockClient) -> None:
    api.add("client/deploy/single", fixture("deploy_single.odd_vcpus.json", 400))

    with pytest.raises(InvalidRequestError) as caught:
        await client.deploy_vm(h100_request())

    assert type(caught.value) is InvalidRequestError
    assert caught.value.server_message == "The number of vCPUs must be an even number"
    assert caught.value.status_code == 400
    assert len(api.requests) == 1


async def test_deploy_odd_vcpus_rejected_locally(api: FakeApi, client: TensorDockClient) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        await client.deploy_vm(h100_request(vcpus=5))

    message = str(caught.value)
    assert "even" in message
    assert "use 6" in message
    assert "hunter2" not in message
    assert api.requests == []


async def test_deploy_unequal_ports_rejected_locally(
    api: FakeApi, client: TensorDockClient
) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        await client.deploy_vm(h100_request(internal_ports=[22]))

    assert "internal port" in str(caught.value)
    assert api.requests == []


async def test_deploy_without_login_rejected_locally(
    api: FakeApi, client: TensorDockClient
) -> None:
    with pytest.raises(InvalidRequestError):
        await client.deploy_vm(h100_request(password=None))

    assert api.requests == []


async def test_deploy_no_ports_raises_no_capacity(api: FakeApi, client: TensorDockClient) -> None:
    api.add("client/deploy/single", fixture("deploy_single.no_ports.json", 400))

    with pytest.raises(NoCapacityError) as caught:
        await client.deploy_vm(h100_request(hostnode_id=ORL_NO_PORTS))

    assert ORL_NO_PORTS in str(caught.value)
    assert isinstance(caught.value, InvalidRequestError)
    assert len(api.requests) == 1


async def test_deploy_server_error_not_retried(api: FakeApi, client: TensorDockClient) -> None:
    api.add("client/deploy/single", fixture("delete_single.internal_error.json", 500))

    with pytest.raises(TransportError) as caught:
        await client.deploy_vm(h100_request())

    assert "may still have carried out the call" in str(caught.value)
    assert len(api.requests) == 1


async def test_deploy_timeout_not_retried(api: FakeApi, client: TensorDockClient) -> None:
    api.add("client/deploy/single", httpx.ReadTimeout("simulated read timeout"))

    with pytest.raises(ApiTimeoutError) as caught:
        await client.deploy_vm(h100_request())

    assert "client/deploy/single" in str(caught.value)
    assert "may still have carried out the call" in str(caught.value)
    assert len(api.requests) == 1


async def test_deploy_html_page_not_retried(api: FakeApi, client: TensorDockClient) -> None:
    api.add("client/deploy/single", fixture("html_error_page.html", 502))

    with pytest.raises(TransportError):
        await client.deploy_vm(h100_request())

    assert len(api.requests) == 1


# --- spot validation -------------------------------------------------------------------


async def test_spot_new_accepted(api: FakeApi, client: TensorDockClient) -> None:
    api.add("client/spot/validate/new", fixture("spot_validate_new.ok.json"))

    result = await client.validate_spot_new(
        hostnode_id=JOP_3090,
        gpu_model="geforcertx3090-pcie-24gb",
        gpu_count=2,
        vcpus=8,
        ram_gb=32,
        storage_gb=150,
        price_usd_per_hour=0.30,
    )

    assert result == SpotValidation(accepted=True, message=None)
    assert api.form() == {
        "api_key": API_KEY,
        "api_token": API_TOKEN,
        "hostnode": JOP_3090,
        "gpu_model": "geforcertx3090-pcie-24gb",
        "gpu_count": "2",
        "vcpus": "8",
        "ram": "32",
        "storage": "150",
        "price": "0.3",
    }


async def test_spot_new_too_low_without_error(api: FakeApi, client: TensorDockClient) -> None:
    api.add("client/spot/validate/new", fixture("spot_validate_new.too_low.json"))

    result = await client.validate_spot_new(
        hostnode_id=JOP_3090,
        gpu_model="geforcertx3090-pcie-24gb",
        gpu_count=2,
        vcpus=8,
        ram_gb=32,
        storage_gb=150,
        price_usd_per_hour=0.12,
    )

    assert result.accepted is False
    assert result.message == "bid too low or no capacity"
    assert len(api.requests) == 1


async def test_spot_new_odd_vcpus_rejected_locally(api: FakeApi, client: TensorDockClient) -> None:
    with pytest.raises(InvalidRequestError):
        await client.validate_spot_new(
            hostnode_id=JOP_3090,
            gpu_model="geforcertx3090-pcie-24gb",
            gpu_count=2,
            vcpus=7,
            ram_gb=32,
            storage_gb=150,
            price_usd_per_hour=0.3,
        )

    assert api.requests == []


async def validate_3090(td: TensorDockClient, bid: float) -> SpotValidation:
    return await td.validate_spot_new(
        hostnode_id=JOP_3090,
        gpu_model="geforcertx3090-pcie-24gb",
        gpu_count=2,
        vcpus=8,
        ram_gb=32,
        storage_gb=150,
        price_usd_per_hour=bid,
    )


async def test_spot_new_retried_after_server_error(api: FakeApi, client: TensorDockClient) -> None:
    api.add(
        "client/spot/validate/new",
        fixture("delete_single.internal_error.json", 500),
        fixture("spot_validate_new.ok.json"),
    )

    result = await validate_3090(client, 0.3)

    assert result.accepted is True
    assert len(api.requests) == 2


async def test_spot_new_timeout_retried(api: FakeApi, client: TensorDockClient) -> None:
    api.add("client/spot/validate/new", httpx.ReadTimeout("simulated read timeout"))

    with pytest.raises(ApiTimeoutError) as caught:
        await validate_3090(client, 0.3)

    assert len(api.requests) == 1 + READ_RETRIES
    assert "client/spot/validate/new" in str(caught.value)
    assert "may still have carried out the call" not in str(caught.value)


async def test_spot_new_rate_limit_not_rejection(api: FakeApi, client: TensorDockClient) -> None:
    api.add(
        "client/spot/validate/new",
        json_reply({"success": False, "error": "Too many requests"}, 429),
        fixture("spot_validate_new.too_low.json"),
    )

    result = await validate_3090(client, 0.3)

    # The 429 is resent, and only the response after it decides whether the bid is accepted.
    assert result.accepted is False
    assert len(api.requests) == 2


async def test_spot_new_auth_failure_not_retried(api: FakeApi, client: TensorDockClient) -> None:
    api.add("client/spot/validate/new", fixture("auth_test.bad_credentials.json", 401))

    with pytest.raises(AuthenticationError):
        await validate_3090(client, 0.3)

    assert len(api.requests) == 1


async def test_spot_existing_accepted(api: FakeApi, client: TensorDockClient) -> None:
    api.add("client/spot/validate/existing", fixture("spot_validate_existing.ok.json"))

    result = await client.validate_spot_existing(VM_3090, 0.32)

    assert result.accepted is True
    assert api.form() == {
        "api_key": API_KEY,
        "api_token": API_TOKEN,
        "server": VM_3090,
        "price": "0.32",
    }


async def test_spot_existing_too_low_keeps_text(api: FakeApi, client: TensorDockClient) -> None:
    api.add("client/spot/validate/existing", fixture("spot_validate_existing.too_low.json"))

    result = await client.validate_spot_existing(VM_V100, 0.80)

    assert result.accepted is False
    assert result.message == "Your bid is too low to be scheduled on this hostnode"
    assert len(api.requests) == 1


async def test_spot_existing_auth_failure_raises(api: FakeApi, client: TensorDockClient) -> None:
    api.add("client/spot/validate/existing", fixture("auth_test.bad_credentials.json"))

    with pytest.raises(AuthenticationError):
        await client.validate_spot_existing(VM_V100, 0.80)


async def test_spot_existing_server_error_raises(api: FakeApi, client: TensorDockClient) -> None:
    api.add("client/spot/validate/existing", fixture("delete_single.internal_error.json", 500))

    with pytest.raises(TransportError) as caught:
        await client.validate_spot_existing(VM_V100, 0.80)

    assert len(api.requests) == 1
    # A re-bid may have changed the VM's price, so the message requests a check first.
    assert "may still have carried out the call" in str(caught.value)


# --- VM list and details ---------------------------------------------------------------


async def test_client_list_parses_eight_vms(api: FakeApi, client: TensorDockClient) -> None:
    api.add("client/list", fixture("client_list.ok.json"))

    vms = await client.list_vms()

    assert len(vms) == 8
    assert all(vm.id == vm_id for vm_id, vm in vms.items())
    assert vms[VM_H100].status is VmStatus.RUNNING
    assert vms[VM_A4000].status is VmStatus.STOPPED
    assert vms[VM_A6000].status is VmStatus.STOPPED_DISASSOCIATED
    assert vms[VM_V100].status is VmStatus.OUTBID
    assert api.requests[0].method == "POST"
    assert api.form() == {"api_key": API_KEY, "api_token": API_TOKEN}


async def test_client_list_coerces_numeric_strings(api: FakeApi, client: TensorDockClient) -> None:
    api.add("client/list", fixture("client_list.ok.json"))

    whisper = (await client.list_vms())[VM_3090]

    assert whisper.specs.gpu.amount == 2
    assert whisper.specs.vcpus == 8
    assert whisper.compute_price == 0.3
    assert whisper.port_forwards == {40905: 22, 40955: 9000}
    assert whisper.spot_bid == 0.3


async def test_client_list_accepts_2023_vm(api: FakeApi, client: TensorDockClient) -> None:
    api.add("client/list", fixture("client_list.ok.json"))

    old_vm = (await client.list_vms())[VM_3080]

    assert old_vm.type is None
    assert old_vm.deployment is None
    assert old_vm.is_spot is False


async def test_client_list_empty_is_empty(api: FakeApi, client: TensorDockClient) -> None:
    api.add("client/list", fixture("client_list.empty.json"))

    assert await client.list_vms() == {}


async def test_client_list_missing_key_malformed(api: FakeApi, client: TensorDockClient) -> None:
    api.add("client/list", fixture("auth_test.ok.json"))

    with pytest.raises(MalformedResponseError) as caught:
        await client.list_vms()

    assert "virtualmachines" in str(caught.value)


async def test_get_single_plural_key(api: FakeApi, client: TensorDockClient) -> None:
    api.add("client/get/single", fixture("get_single.ok.json"))

    vm = await client.get_vm(VM_H100)

    assert vm.id == VM_H100
    assert vm.name == "llm-finetune-h100-01"
    assert vm.port_forwards == {64460: 22, 64478: 8888}
    assert api.form() == {"api_key": API_KEY, "api_token": API_TOKEN, "server": VM_H100}


async def test_get_single_singular_key(api: FakeApi, client: TensorDockClient) -> None:
    api.add("client/get/single", fixture("get_single.singular_key.json"))

    vm = await client.get_vm(VM_V100)

    assert vm.status is VmStatus.OUTBID
    assert vm.is_spot is True
    assert vm.name == "batch-infer-8xv100"


async def test_get_single_equals_list_entry(api: FakeApi, client: TensorDockClient) -> None:
    api.add("client/list", fixture("client_list.ok.json"))
    api.add("client/get/single", fixture("get_single.ok.json"))

    listed = (await client.list_vms())[VM_H100]
    single = await client.get_vm(VM_H100)

    assert single.name == listed.name
    assert single.port_forwards == listed.port_forwards
    assert single.specs == listed.specs


async def test_get_single_not_found_names_id(api: FakeApi, client: TensorDockClient) -> None:
    unknown = "9f0e1d2c-0000-4000-8000-000000000000"
    api.add("client/get/single", fixture("get_single.not_found.json", 404))

    with pytest.raises(NotFoundError) as caught:
        await client.get_vm(unknown)

    assert unknown in str(caught.value)
    assert caught.value.endpoint == "client/get/single"
    assert len(api.requests) == 1


# --- start, stop, modify, delete -------------------------------------------------------


async def test_start_sends_server(api: FakeApi, client: TensorDockClient) -> None:
    api.add("client/start/single", fixture("start_single.ok.json"))

    await client.start_vm(VM_A4000)

    assert api.form() == {"api_key": API_KEY, "api_token": API_TOKEN, "server": VM_A4000}


async def test_start_already_running_wrong_state(api: FakeApi, client: TensorDockClient) -> None:
    api.add("client/start/single", fixture("start_single.already_running.json", 500))

    with pytest.raises(WrongStateError) as caught:
        await client.start_vm(VM_H100)

    message = str(caught.value)
    assert VM_H100 in message
    assert "already running" in message
    assert caught.value.status_code == 500
    assert len(api.requests) == 1


@pytest.mark.parametrize(("release", "wire_value"), [(False, "false"), (True, "true")])
async def test_stop_sends_disassociate_resources(
    api: FakeApi, client: TensorDockClient, release: bool, wire_value: str
) -> None:
    api.add("client/stop/single", fixture("stop_single.ok.json"))

    await client.stop_vm(VM_H100, release=release)

    assert api.form() == {
        "api_key": API_KEY,
        "api_token": API_TOKEN,
        "server": VM_H100,
        "disassociate_resources": wire_value,
    }


async def test_stop_already_disassociated_wrong_state(
    api: FakeApi, client: TensorDockClient
) -> None:
    api.add("client/stop/single", fixture("stop_single.already_disassociated.json", 500))

    with pytest.raises(WrongStateError) as caught:
        await client.stop_vm(VM_A6000)

    assert VM_A6000 in str(caught.value)
    assert "stoppeddisassociated" in str(caught.value)
    assert len(api.requests) == 1


async def test_modify_sends_server_id(api: FakeApi, client: TensorDockClient) -> None:
    api.add("client/modify/single", fixture("modify_single.ok.json"))

    server = await client.modify_vm(VM_A6000, gpu_count=1, vcpus=8, ram_gb=32)

    assert server == VM_A6000
    assert api.form() == {
        "api_key": API_KEY,
        "api_token": API_TOKEN,
        "server_id": VM_A6000,
        "gpu_count": "1",
        "vcpus": "8",
        "ram": "32",
    }


async def test_modify_without_changes_rejected(api: FakeApi, client: TensorDockClient) -> None:
    with pytest.raises(InvalidRequestError):
        await client.modify_vm(VM_A6000)

    assert api.requests == []


async def test_delete_sends_server(api: FakeApi, client: TensorDockClient) -> None:
    api.add("client/delete/single", fixture("delete_single.ok.json"))

    await client.delete_vm(VM_H100)

    assert api.form() == {"api_key": API_KEY, "api_token": API_TOKEN, "server": VM_H100}


async def test_delete_already_terminated_succeeds(api: FakeApi, client: TensorDockClient) -> None:
    api.add("client/delete/single", fixture("delete_single.already_terminated.json", 500))

    await client.delete_vm(VM_H100)

    assert len(api.requests) == 1


async def test_delete_internal_error_then_succeeds(api: FakeApi, client: TensorDockClient) -> None:
    api.add(
        "client/delete/single",
        fixture("delete_single.internal_error.json", 500),
        fixture("delete_single.ok.json"),
    )

    await client.delete_vm(VM_H100)

    assert len(api.requests) == 2


async def test_delete_retry_then_already_terminated(api: FakeApi, client: TensorDockClient) -> None:
    api.add(
        "client/delete/single",
        fixture("delete_single.internal_error.json", 500),
        fixture("delete_single.already_terminated.json", 500),
    )

    await client.delete_vm(VM_H100)

    assert len(api.requests) == 2


async def test_delete_retries_are_bounded(api: FakeApi, client: TensorDockClient) -> None:
    api.add("client/delete/single", fixture("delete_single.internal_error.json", 500))

    with pytest.raises(TransportError) as caught:
        await client.delete_vm(VM_H100)

    assert VM_H100 in str(caught.value)
    assert len(api.requests) == 1 + READ_RETRIES


async def test_delete_not_found_raises(api: FakeApi, client: TensorDockClient) -> None:
    api.add("client/delete/single", fixture("get_single.not_found.json", 404))

    with pytest.raises(NotFoundError):
        await client.delete_vm(VM_H100)


# --- billing ---------------------------------------------------------------------------


async def test_balance_ok_runway(api: FakeApi, client: TensorDockClient) -> None:
    api.add("billing/balance", fixture("billing_balance.ok.json"))

    balance = await client.get_balance()

    assert balance.balance == 412.3871
    assert balance.hourly_cost == 4.096
    assert balance.runway_hours == pytest.approx(100.68, abs=0.01)


async def test_balance_low_under_one_hour(api: FakeApi, client: TensorDockClient) -> None:
    api.add("billing/balance", fixture("billing_balance.low.json"))

    balance = await client.get_balance()

    assert balance.balance == 0.6412
    assert balance.runway_hours is not None
    assert balance.runway_hours < 1


async def test_balance_missing_field_malformed(api: FakeApi, client: TensorDockClient) -> None:
    api.add("billing/balance", json_reply({"success": True, "balance": 10.0}))

    with pytest.raises(MalformedResponseError) as caught:
        await client.get_balance()

    assert "hourly_cost" in str(caught.value)


async def test_revenue_without_success_key(api: FakeApi, client: TensorDockClient) -> None:
    api.add("billing/revenue", fixture("billing_revenue.ok.json"))

    rows = await client.get_revenue(
        start_timestamp="2024-10-01T00:00:00Z",
        end_timestamp="2024-11-01T00:00:00Z",
        hostnode_id="8d8411cc-5df7-44d4-9424-5a3833689094",
    )

    assert [row.hostnode_id for row in rows] == [
        "8d8411cc-5df7-44d4-9424-5a3833689094",
        "bd4788f2-80c1-4b33-869f-5a8bd6cd25ee",
    ]
    first = rows[0]
    assert first.revenue_compute == pytest.approx(
        sum(vm.revenue_compute or 0 for vm in first.virtual_machines)
    )
    assert api.form()["hostnode_id"] == "8d8411cc-5df7-44d4-9424-5a3833689094"
    assert api.form()["start_timestamp"] == "2024-10-01T00:00:00Z"


async def test_summary_parses_string_balances(api: FakeApi, client: TensorDockClient) -> None:
    api.add("billing/summary", fixture("billing_summary.ok.json"))

    summary = await client.get_billing_summary("2024-10")

    assert summary.previous_balance == 318.44
    assert summary.final_balance == 350.34
    assert summary.changes == {"expenses": 428.78, "payouts": 110.68}
    deposits = sum(entry["amount"] for entry in summary.transactions["deposits"])
    withdrawals = sum(entry["amount"] for entry in summary.transactions["withdrawals"])
    expected_final = (
        summary.previous_balance
        + deposits
        - withdrawals
        + summary.changes["payouts"]
        - summary.changes["expenses"]
    )
    assert summary.final_balance == pytest.approx(expected_final)
    assert api.form()["period"] == "2024-10"


@pytest.mark.parametrize("period", ["2024-13", "2024-1", "24-10", "2024-10-01", "October"])
async def test_summary_invalid_period_rejected(
    api: FakeApi, client: TensorDockClient, period: str
) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        await client.get_billing_summary(period)

    assert "YYYY-MM" in str(caught.value)
    assert api.requests == []


# --- containers ------------------------------------------------------------------------


async def test_container_deploy_encodes_json_fields(api: FakeApi, client: TensorDockClient) -> None:
    api.add("client/container/deploy", fixture("container_deploy.ok.json"))
    request = whisper_container()

    await client.deploy_container(request)

    form = api.form()
    assert json.loads(form["gpu_models"]) == ["geforcertx3090-pcie-24gb", "rtxa4000-pcie-16gb"]
    assert json.loads(form["environment_variables"]) == {"MODEL": "large-v3"}
    assert json.loads(form["arguments"]) == ["--port", "5000"]
    assert form["replicas"] == "3"
    assert form["ram"] == "16"
    assert form["max_vm_rate_hourly"] == "0.25"
    assert form["api_key"] == API_KEY
    assert "large-v3" not in repr(request)


async def test_container_scale_sends_replicas(api: FakeApi, client: TensorDockClient) -> None:
    api.add("client/container/scale", fixture("container_scale.ok.json"))

    await client.scale_container(CONTAINER, -1)

    assert api.form() == {
        "api_key": API_KEY,
        "api_token": API_TOKEN,
        "container_id": CONTAINER,
        "replicas": "-1",
    }


async def test_container_stop_sends_id(api: FakeApi, client: TensorDockClient) -> None:
    api.add("client/container/stop", fixture("container_stop.ok.json"))

    await client.stop_container(CONTAINER)

    assert api.form()["container_id"] == CONTAINER


async def test_container_replicas_get_request(api: FakeApi, client: TensorDockClient) -> None:
    api.add(f"client/container/{CONTAINER}/replicas", fixture("container_replicas.ok.json"))

    replicas = await client.get_container_replicas(CONTAINER)

    assert len(replicas) == 3
    assert replicas[0].external_ports == [30207, 30208, 30210]
    assert replicas[0].internal_ports == [22, 5000, 7000]
    assert replicas[2].hostnode_uptime_url is not None
    assert replicas[2].hostnode_uptime_url.endswith("8e481b8bdc2a9025f5c6dc294a3c2f71")
    assert api.requests[0].method == "GET"
    assert api.query() == {"api_key": API_KEY, "api_token": API_TOKEN}


# --- broken responses and transport failures ---------------------------------------------


async def test_html_error_page_transport_error(api: FakeApi, client: TensorDockClient) -> None:
    api.add("client/list", fixture("html_error_page.html", 502))

    with pytest.raises(TransportError) as caught:
        await client.list_vms()

    assert caught.value.status_code == 502
    assert "502 Bad Gateway" in str(caught.value)
    assert "<" not in str(caught.value)
    assert len(api.requests) == 1 + READ_RETRIES


async def test_truncated_body_malformed_response(api: FakeApi, client: TensorDockClient) -> None:
    api.add("client/list", fixture("truncated.json"))

    with pytest.raises(MalformedResponseError) as caught:
        await client.list_vms()

    assert caught.value.status_code == 200
    assert "client/list" in str(caught.value)
    assert len(api.requests) == 1 + READ_RETRIES


async def test_truncated_then_valid_recovers(api: FakeApi, client: TensorDockClient) -> None:
    api.add("client/list", fixture("truncated.json"), fixture("client_list.ok.json"))

    vms = await client.list_vms()

    assert len(vms) == 8


async def test_json_array_body_malformed(api: FakeApi, client: TensorDockClient) -> None:
    api.add("billing/balance", json_reply([1, 2, 3]))

    with pytest.raises(MalformedResponseError):
        await client.get_balance()


async def test_success_string_false_is_failure(api: FakeApi, client: TensorDockClient) -> None:
    api.add("client/start/single", json_reply({"success": "false", "error": "Bad request"}))

    with pytest.raises(InvalidRequestError) as caught:
        await client.start_vm(VM_A4000)

    assert caught.value.server_message == "Bad request"


async def test_connect_error_retried_for_reads(api: FakeApi, client: TensorDockClient) -> None:
    api.add("client/list", httpx.ConnectError("connection refused"))

    with pytest.raises(TransportError) as caught:
        await client.list_vms()

    assert type(caught.value) is TransportError
    assert len(api.requests) == 1 + READ_RETRIES


async def test_read_timeout_maps_to_api_timeout(api: FakeApi, client: TensorDockClient) -> None:
    api.add("billing/balance", httpx.ReadTimeout("timed out"), fixture("billing_balance.ok.json"))

    balance = await client.get_balance()

    assert balance.balance == 412.3871
    assert len(api.requests) == 2


async def test_start_connect_error_not_retried(api: FakeApi, client: TensorDockClient) -> None:
    api.add("client/start/single", httpx.ConnectError("connection refused"))

    with pytest.raises(TransportError) as caught:
        await client.start_vm(VM_A4000)

    assert VM_A4000 in str(caught.value)
    assert len(api.requests) == 1


async def test_timeout_message_names_seconds() -> None:
    async def never_answer(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("simulated read timeout", request=request)

    async with TensorDockClient(
        API_KEY,
        API_TOKEN,
        read_retries=0,
        timeout_seconds=0.5,
        transport=httpx.MockTransport(never_answer),
    ) as td:
        with pytest.raises(ApiTimeoutError) as caught:
            await td.get_balance()

    assert "0.5 s" in str(caught.value)
    assert caught.value.retryable is True


# --- retry policy ----------------------------------------------------------------------

ClientCall = Callable[[TensorDockClient], Awaitable[object]]

READ_CALLS: list[tuple[str, ClientCall]] = [
    ("auth/test", lambda td: td.test_authorization()),
    ("auth/list", lambda td: td.list_authorizations()),
    ("client/deploy/hostnodes", lambda td: td.list_hostnodes()),
    (f"client/deploy/hostnodes/{CHI_H100}", lambda td: td.get_hostnode(CHI_H100)),
    ("client/list", lambda td: td.list_vms()),
    ("client/get/single", lambda td: td.get_vm(VM_H100)),
    ("billing/balance", lambda td: td.get_balance()),
    ("billing/revenue", lambda td: td.get_revenue()),
    ("billing/summary", lambda td: td.get_billing_summary("2024-10")),
    (f"client/container/{CONTAINER}/replicas", lambda td: td.get_container_replicas(CONTAINER)),
    # A spot validation of a new VM creates and bills nothing, so it is resent like a read.
    ("client/spot/validate/new", lambda td: validate_3090(td, 0.3)),
]

SEND_ONCE_CALLS: list[tuple[str, ClientCall]] = [
    ("client/deploy/single", lambda td: td.deploy_vm(h100_request())),
    ("client/start/single", lambda td: td.start_vm(VM_A4000)),
    ("client/stop/single", lambda td: td.stop_vm(VM_H100)),
    ("client/modify/single", lambda td: td.modify_vm(VM_A6000, vcpus=8)),
    ("client/spot/validate/existing", lambda td: td.validate_spot_existing(VM_3090, 0.3)),
    ("client/container/deploy", lambda td: td.deploy_container(whisper_container())),
    ("client/container/scale", lambda td: td.scale_container(CONTAINER, 1)),
    ("client/container/stop", lambda td: td.stop_container(CONTAINER)),
]


@pytest.mark.parametrize(("path", "call"), READ_CALLS, ids=[path for path, _ in READ_CALLS])
async def test_reads_retried_on_bad_gateway(
    api: FakeApi, client: TensorDockClient, path: str, call: ClientCall
) -> None:
    api.add(path, fixture("html_error_page.html", 502))

    with pytest.raises(TransportError) as caught:
        await call(client)

    assert len(api.requests) == 1 + READ_RETRIES
    assert "may still have carried out the call" not in str(caught.value)


@pytest.mark.parametrize(
    ("path", "call"), SEND_ONCE_CALLS, ids=[path for path, _ in SEND_ONCE_CALLS]
)
async def test_changes_never_retried(
    api: FakeApi, client: TensorDockClient, path: str, call: ClientCall
) -> None:
    api.add(path, fixture("html_error_page.html", 502))

    with pytest.raises(TransportError) as caught:
        await call(client)

    assert len(api.requests) == 1
    assert "may still have carried out the call" in str(caught.value)


# --- secrets and logging ---------------------------------------------------------------


FAILURES = [
    ("client/list", fixture("html_error_page.html", 502)),
    ("client/list", fixture("truncated.json")),
    ("client/list", httpx.ConnectError(f"cannot connect with {API_KEY}")),
    ("client/list", json_reply({"success": False, "error": f"Invalid authorization {API_KEY}"})),
    ("client/list", json_reply({"success": False, "error": f"Token {API_TOKEN} expired"}, 401)),
    ("client/list", json_reply({"success": False, "error": f"Internal error {API_TOKEN}"}, 500)),
]


@pytest.mark.parametrize(("path", "reply"), FAILURES)
async def test_errors_and_logs_hide_credentials(
    api: FakeApi,
    client: TensorDockClient,
    caplog: pytest.LogCaptureFixture,
    path: str,
    reply: Reply,
) -> None:
    caplog.set_level(logging.DEBUG, logger="tdbot")
    api.add(path, reply)

    with pytest.raises(TensorDockError) as caught:
        await client.list_vms()

    assert caught.value.__cause__ is None
    texts = [str(caught.value), repr(caught.value), str(caught.value.server_message)]
    texts.extend(record.getMessage() for record in caplog.records)
    for secret in (API_KEY, API_TOKEN):
        assert not [text for text in texts if secret in text]


async def test_client_repr_hides_credentials(client: TensorDockClient) -> None:
    text = repr(client)

    assert API_KEY not in text
    assert API_TOKEN not in text
    assert "marketplace.tensordock.com" in text


async def test_calls_logged_at_debug(
    api: FakeApi, client: TensorDockClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="tdbot.tensordock.client")
    api.add("client/get/single", fixture("get_single.ok.json"))

    await client.get_vm(VM_H100)

    debug_lines = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert len(debug_lines) == 1
    assert "client/get/single" in debug_lines[0]
    assert VM_H100 in debug_lines[0]
    assert "HTTP 200" in debug_lines[0]
    assert " ms" in debug_lines[0]


async def test_retries_logged_at_warning(
    api: FakeApi, client: TensorDockClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="tdbot.tensordock.client")
    api.add(
        "client/delete/single",
        fixture("delete_single.internal_error.json", 500),
        fixture("delete_single.ok.json"),
    )

    await client.delete_vm(VM_H100)

    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "retry 1 of 2" in warnings[0]
    assert VM_H100 in warnings[0]


def test_httpx_loggers_raised_to_warning() -> None:
    assert logging.getLogger("httpx").level == logging.WARNING
    assert logging.getLogger("httpcore").level == logging.WARNING


def test_deploy_request_repr_hides_password() -> None:
    request = h100_request(cloudinit_script="export HF_TOKEN=hf_secret")

    assert "hunter2" not in repr(request)
    assert "hf_secret" not in repr(request)
