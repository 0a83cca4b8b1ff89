"""Async client of the TensorDock v0 marketplace API.

All of tdbot's traffic to TensorDock goes through `TensorDockClient`. It sends the
credentials as form fields, parses the JSON envelope on any HTTP status, and turns
every failure into one class of `tdbot.tensordock.errors`. `classify_failure` maps
the failures the API reports, and the client's error builders map network failures
and unreadable bodies. Reads, deletes and `client/spot/validate/new` (which
creates nothing) are retried with exponential backoff. Calls that spend money or
change a VM (deploy, start, stop, modify, `client/spot/validate/existing`,
containers) are sent exactly once, because the API offers no idempotency key.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, Self, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel, ValidationError

from tdbot.logsafe import is_redactable
from tdbot.tensordock.errors import (
    ApiTimeoutError,
    AuthenticationError,
    BidTooLowError,
    InvalidRequestError,
    MalformedResponseError,
    NoCapacityError,
    NotFoundError,
    TensorDockError,
    TransportError,
    WrongStateError,
)
from tdbot.tensordock.models import (
    Authorization,
    Balance,
    BillingSummary,
    ContainerReplica,
    DeployResult,
    Hostnode,
    HostnodeRevenue,
    VirtualMachine,
)
from tdbot.tensordock.requests import (
    ContainerDeployRequest,
    DeployRequest,
    format_bool,
    format_decimal,
    vcpu_problems,
)

logger = logging.getLogger("tdbot.tensordock.client")

# httpx logs every request URL at INFO, and hostnode queries with reserved hostnodes
# carry the API key and token in the URL.
logging.getLogger("httpx").setLevel(logging.WARNING)
logging.getLogger("httpcore").setLevel(logging.WARNING)

DEFAULT_BASE_URL = "https://marketplace.tensordock.com/api/v0"
MAX_BACKOFF_SECONDS = 30.0
SPOT_REJECTED_MESSAGE = "bid too low or no capacity"
SNIPPET_CHARS = 120
SERVER_MESSAGE_CHARS = 300

_AUTH_TEXT = re.compile(
    r"invalid authori[sz]ation|unauthori[sz]ed|not authori[sz]ed|authentication"
    r"|invalid api|api[ _]?(key|token)",
    re.IGNORECASE,
)
_WRONG_STATE_TEXT = re.compile(
    r"already (running|stopped|terminated)|cannot be (started|stopped|modified)"
    r"|stoppeddisassociated",
    re.IGNORECASE,
)
_VM_STATE_TEXT = re.compile(r"machine is (\w+), therefore", re.IGNORECASE)
_NOT_FOUND_TEXT = re.compile(r"not found|does not exist|no such", re.IGNORECASE)
_CAPACITY_TEXT = re.compile(
    r"\bports?\b|capacity|not enough|not available|unavailable|insufficient|out of stock",
    re.IGNORECASE,
)
_PERIOD_FORMAT = re.compile(r"\d{4}-(0[1-9]|1[0-2])")

# Endpoints whose failures may mean the hostnode lacks free ports, GPUs or resources.
_CAPACITY_ENDPOINTS = frozenset(
    {
        "client/deploy/single",
        "client/start/single",
        "client/modify/single",
        "client/container/deploy",
        "client/container/scale",
    }
)
_SPOT_ENDPOINTS = frozenset({"client/spot/validate/new", "client/spot/validate/existing"})

ModelT = TypeVar("ModelT", bound=BaseModel)


@dataclass(frozen=True)
class SpotValidation:
    """Outcome of a spot bid validation, with the API's reason in `message` when rejected."""

    accepted: bool
    message: str | None = None


@dataclass(frozen=True)
class ApiCall:
    """One endpoint call: where it goes, what it concerns and whether it may be resent."""

    endpoint: str
    method: Literal["GET", "POST"] = "POST"
    subject_kind: str | None = None
    subject_id: str | None = None
    fields: dict[str, str] = field(default_factory=dict)
    authenticated: bool = True
    retry: bool = False
    path: str | None = None

    @property
    def subject(self) -> str:
        """The subject for messages, such as "VM 7dcd9ad2-…", or "" when there is none."""
        if self.subject_id is None:
            return ""
        return f"{self.subject_kind or 'id'} {self.subject_id}"

    @property
    def label(self) -> str:
        """The endpoint and subject for messages, such as "client/get/single for VM …"."""
        if not self.subject:
            return self.endpoint
        return f"{self.endpoint} for {self.subject}"


def classify_failure(
    call: ApiCall, status_code: int, server_message: str | None
) -> type[TensorDockError]:
    """Return the error class for a failure the API reported (`success: false` or 4xx/5xx).

    The API's texts are matched loosely, because the same failure has been seen with
    HTTP 200, 400, 404 and 500 and most texts are undocumented. Capacity failures are
    recognised on any status, because every capacity endpoint is sent once and so
    whether the class is retryable makes no difference there.
    """
    text = server_message or ""
    if status_code in (401, 403) or _AUTH_TEXT.search(text):
        return AuthenticationError
    if _WRONG_STATE_TEXT.search(text):
        return WrongStateError
    if status_code == 404 or _NOT_FOUND_TEXT.search(text):
        return NotFoundError
    if call.endpoint in _CAPACITY_ENDPOINTS and _CAPACITY_TEXT.search(text):
        return NoCapacityError
    # A rate limit (429) is no verdict on the bid, so it is classed as a transport error below.
    if call.endpoint in _SPOT_ENDPOINTS and status_code < 500 and status_code != 429:
        return BidTooLowError
    if status_code >= 500 or status_code == 429:
        return TransportError
    return InvalidRequestError


def _describe_failure(
    error_class: type[TensorDockError], call: ApiCall, server_message: str | None
) -> str:
    """Return the reason and next step for an API-reported failure, for the message."""
    if error_class is AuthenticationError:
        return "the API key and token were rejected, so check TDBOT_API_KEY and TDBOT_API_TOKEN"
    if error_class is WrongStateError:
        state = _VM_STATE_TEXT.search(server_message or "")
        if state:
            return f"the VM is already {state.group(1).lower()}"
        return "the VM is not in a state that allows this call"
    if error_class is NotFoundError:
        return f"{call.subject or 'the requested object'} not found"
    if error_class is NoCapacityError:
        return "the hostnode has no free ports, GPUs or resources for it, so try another one"
    if error_class is BidTooLowError:
        return "the bid was not accepted"
    if error_class is TransportError:
        return "the API reported a server error"
    return "the API rejected the request"


def _is_false(value: object) -> bool:
    return value is False or (isinstance(value, str) and value.strip().lower() == "false")


def _server_message(body: dict[str, Any]) -> str | None:
    message = body.get("error") or body.get("message")
    if message is None:
        return None
    return str(message)[:SERVER_MESSAGE_CHARS]


def _snippet(response: httpx.Response) -> str:
    """Return the start of a non-JSON body as plain text, with markup and styles removed."""
    text = re.sub(r"<(style|script)\b.*?</\1>", " ", response.text, flags=re.S | re.I)
    text = re.sub(r"<[^>]*>", " ", text)
    text = " ".join(text.split())
    if len(text) > SNIPPET_CHARS:
        return text[:SNIPPET_CHARS].rstrip() + "..."
    return text


def _validation_summary(error: ValidationError) -> str:
    """Describe the first validation problem without echoing any input value."""
    first = error.errors(include_input=False, include_url=False)[0]
    location = ".".join(str(part) for part in first["loc"]) or "body"
    return f"{error.error_count()} invalid field(s), first {location}: {first['msg']}"


class TensorDockClient:
    """Async client of the TensorDock v0 marketplace API.

    Use it as an async context manager or call `aclose()`. `transport` replaces the
    network, for example with `httpx.MockTransport` in tests. Reads, deletes and
    `client/spot/validate/new` are sent up to `1 + read_retries` times, waiting
    `backoff_seconds`, then twice that, and so on up to 30 seconds.
    """

    def __init__(
        self,
        api_key: str,
        api_token: str,
        *,
        base_url: str = DEFAULT_BASE_URL,
        timeout_seconds: float = 30.0,
        read_retries: int = 3,
        backoff_seconds: float = 1.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if timeout_seconds <= 0:
            raise ValueError(f"timeout_seconds is {timeout_seconds}, but it must be positive")
        if read_retries < 0 or backoff_seconds < 0:
            raise ValueError(
                f"read_retries is {read_retries} and backoff_seconds is {backoff_seconds}, "
                "but neither may be negative"
            )

        self._api_key = api_key
        self._api_token = api_token
        # Secrets are removed from every error message. Values shorter than
        # MIN_REDACTED_CHARS are left alone, as the log filter does, because replacing
        # them would mangle ordinary words. Real keys and tokens are UUIDs.
        self._secrets = tuple(secret for secret in (api_key, api_token) if is_redactable(secret))
        self._timeout_seconds = timeout_seconds
        self._read_retries = read_retries
        self._backoff_seconds = backoff_seconds
        self._http = httpx.AsyncClient(
            base_url=base_url,
            timeout=httpx.Timeout(timeout_seconds),
            transport=transport,
            headers={"Accept": "application/json", "User-Agent": "tdbot"},
        )

    def __repr__(self) -> str:
        return f"TensorDockClient(base_url={str(self._http.base_url)!r})"

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool. The client cannot be used afterwards."""
        await self._http.aclose()

    # --- authorization -----------------------------------------------------------

    async def test_authorization(self) -> bool:
        """Check the key and token: False when the API rejects them.

        Network failures and server errors raise instead, because they do not show
        whether the credentials are valid.
        """
        try:
            await self._request(ApiCall("auth/test", retry=True))
        except (AuthenticationError, InvalidRequestError) as error:
            logger.debug("auth/test rejected the credentials: %s", error)
            return False
        return True

    async def list_authorizations(self) -> list[Authorization]:
        """List the organisation's API authorizations, which the API keys by name."""
        call = ApiCall("auth/list", retry=True)
        body = await self._request(call)
        raw = self._require(call, body, "authorizations")

        if isinstance(raw, list):
            return [self._parse(call, Authorization, entry) for entry in raw]
        entries = self._require_map(call, raw, "authorizations")
        return [
            self._parse(call, Authorization, {**entry, "name": name}) for name, entry in entries
        ]

    # --- hostnodes ---------------------------------------------------------------

    async def list_hostnodes(
        self,
        *,
        min_gpu_count: int | None = None,
        min_vcpus: int | None = None,
        min_ram_gb: int | None = None,
        min_storage_gb: int | None = None,
        min_vram_gb: int | None = None,
        requires_rtx: bool | None = None,
        requires_gtx: bool | None = None,
        include_reserved: bool = False,
    ) -> dict[str, Hostnode]:
        """List marketplace hostnodes by UUID, filtered on the server.

        The API applies the filters per hostnode, not per GPU model, so a hostnode may
        still offer GPUs below `min_vram_gb`. `include_reserved` authenticates the
        request, which adds the hostnodes reserved for the organisation. A hostnode
        entry that cannot be parsed is logged and skipped, so one odd host does not
        hide the rest of the market.
        """
        filters = {
            "minGPUCount": min_gpu_count,
            "minvCPUs": min_vcpus,
            "minRAM": min_ram_gb,
            "minStorage": min_storage_gb,
            "minVRAM": min_vram_gb,
        }
        params = {name: str(value) for name, value in filters.items() if value is not None}
        if requires_rtx is not None:
            params["requiresRTX"] = format_bool(requires_rtx)
        if requires_gtx is not None:
            params["requiresGTX"] = format_bool(requires_gtx)

        call = ApiCall(
            "client/deploy/hostnodes",
            method="GET",
            fields=params,
            authenticated=include_reserved,
            retry=True,
        )
        body = await self._request(call)
        entries = self._require_map(call, self._require(call, body, "hostnodes"), "hostnodes")
        return self._parse_hostnodes(call, entries)

    def _parse_hostnodes(
        self, call: ApiCall, entries: list[tuple[str, dict[str, Any]]]
    ) -> dict[str, Hostnode]:
        hostnodes: dict[str, Hostnode] = {}
        for hostnode_id, entry in entries:
            try:
                hostnodes[hostnode_id] = Hostnode.model_validate({**entry, "id": hostnode_id})
            except ValidationError as error:
                logger.warning(
                    "%s: skipped hostnode %s: %s",
                    call.endpoint,
                    hostnode_id,
                    _validation_summary(error),
                )
        return hostnodes

    async def get_hostnode(self, hostnode_id: str) -> Hostnode:
        """Read one hostnode, which the API sends under `hostnode` or under its UUID."""
        call = ApiCall(
            "client/deploy/hostnodes",
            method="GET",
            subject_kind="hostnode",
            subject_id=hostnode_id,
            authenticated=False,
            retry=True,
            path=f"client/deploy/hostnodes/{quote(hostnode_id, safe='')}",
        )
        body = await self._request(call)
        raw = body.get("hostnode", body.get(hostnode_id))
        if not isinstance(raw, dict):
            raise self._malformed(call, "the response has no 'hostnode' object")
        return self._parse(call, Hostnode, {**raw, "id": hostnode_id})

    # --- virtual machines ----------------------------------------------------------

    async def deploy_vm(self, request: DeployRequest) -> DeployResult:
        """Deploy a VM. The request is sent once, so after a lost response check `list_vms`."""
        call = ApiCall(
            "client/deploy/single",
            subject_kind="hostnode",
            subject_id=request.hostnode_id,
            fields=request.to_form(),
        )
        self._reject_problems(call, request.problems())

        body = await self._request(call)
        return self._parse(call, DeployResult, body)

    async def validate_spot_new(
        self,
        *,
        hostnode_id: str,
        gpu_model: str,
        gpu_count: int,
        vcpus: int,
        ram_gb: int,
        storage_gb: int,
        price_usd_per_hour: float,
    ) -> SpotValidation:
        """Ask whether a spot deploy with this bid for the VM's compute would succeed.

        The call creates and bills nothing, so it is resent like a read after a
        transport error, a 5xx response or a timeout.
        """
        call = ApiCall(
            "client/spot/validate/new",
            subject_kind="hostnode",
            subject_id=hostnode_id,
            retry=True,
            fields={
                "hostnode": hostnode_id,
                "gpu_model": gpu_model,
                "gpu_count": str(gpu_count),
                "vcpus": str(vcpus),
                "ram": str(ram_gb),
                "storage": str(storage_gb),
                "price": format_decimal(price_usd_per_hour),
            },
        )
        self._reject_problems(call, vcpu_problems(vcpus) + _price_problems(price_usd_per_hour))
        return await self._validate_spot(call)

    async def validate_spot_existing(self, vm_id: str, price_usd_per_hour: float) -> SpotValidation:
        """Re-bid a spot VM. When accepted, the VM runs (or keeps running) at the new price."""
        call = ApiCall(
            "client/spot/validate/existing",
            subject_kind="VM",
            subject_id=vm_id,
            fields={"server": vm_id, "price": format_decimal(price_usd_per_hour)},
        )
        self._reject_problems(call, _price_problems(price_usd_per_hour))
        return await self._validate_spot(call)

    async def _validate_spot(self, call: ApiCall) -> SpotValidation:
        try:
            await self._request(call)
        except BidTooLowError as error:
            return SpotValidation(
                accepted=False, message=error.server_message or SPOT_REJECTED_MESSAGE
            )
        return SpotValidation(accepted=True)

    async def list_vms(self) -> dict[str, VirtualMachine]:
        """List the organisation's VMs by UUID."""
        call = ApiCall("client/list", retry=True)
        body = await self._request(call)
        entries = self._require_map(
            call, self._require(call, body, "virtualmachines"), "virtualmachines"
        )
        return {
            vm_id: self._parse(call, VirtualMachine, {**entry, "id": vm_id})
            for vm_id, entry in entries
        }

    async def get_vm(self, vm_id: str) -> VirtualMachine:
        """Read one VM.

        The API sends the single VM object under the plural key `virtualmachines`, but
        older documentation shows the singular `virtualmachine`. Both are accepted, and
        so is a map keyed by the VM's UUID.
        """
        call = ApiCall(
            "client/get/single",
            subject_kind="VM",
            subject_id=vm_id,
            fields={"server": vm_id},
            retry=True,
        )
        body = await self._request(call)
        raw = body.get("virtualmachines", body.get("virtualmachine"))
        if isinstance(raw, dict) and isinstance(raw.get(vm_id), dict):
            raw = raw[vm_id]
        if not isinstance(raw, dict):
            raise self._malformed(call, "the response has no 'virtualmachines' object")
        return self._parse(call, VirtualMachine, {**raw, "id": vm_id})

    async def start_vm(self, vm_id: str) -> None:
        """Start a stopped VM, or raise WrongStateError when it is already running."""
        await self._request(self._vm_call("client/start/single", vm_id))

    async def stop_vm(self, vm_id: str, *, release: bool = False) -> None:
        """Stop a VM. `release` frees its GPUs, CPUs and RAM so that only storage is billed.

        A plain stop keeps the resources reserved, and the VM is billed at its full
        rate. Raises WrongStateError when the VM is already stopped that way.
        """
        fields = {"disassociate_resources": format_bool(release)}
        await self._request(self._vm_call("client/stop/single", vm_id, fields))

    async def modify_vm(
        self,
        vm_id: str,
        *,
        gpu_model: str | None = None,
        gpu_count: int | None = None,
        vcpus: int | None = None,
        ram_gb: int | None = None,
        storage_gb: int | None = None,
    ) -> str:
        """Change a stopped VM's resources and return the VM's UUID as the API sends it."""
        changes = {
            "gpu_model": gpu_model,
            "gpu_count": gpu_count,
            "vcpus": vcpus,
            "ram": ram_gb,
            "storage": storage_gb,
        }
        fields = {name: str(value) for name, value in changes.items() if value is not None}
        call = ApiCall(
            "client/modify/single",
            subject_kind="VM",
            subject_id=vm_id,
            # This endpoint names the VM `server_id`, unlike every other VM endpoint.
            fields={"server_id": vm_id, **fields},
        )
        problems = vcpu_problems(vcpus) if vcpus is not None else []
        if not fields:
            problems.append("no resource to change was given")
        self._reject_problems(call, problems)

        body = await self._request(call)
        # `server` only echoes the UUID, because success:true is what confirms the change.
        server = body.get("server")
        return server if isinstance(server, str) and server else vm_id

    async def delete_vm(self, vm_id: str) -> None:
        """Delete a VM. Deleting one that is already terminated counts as success.

        Deletes are retried on server errors, because the API often fails them with
        HTTP 500 and a repeated delete is harmless.
        """
        call = self._vm_call("client/delete/single", vm_id, retry=True)
        try:
            await self._request(call)
        except WrongStateError as error:
            if "already terminated" not in (error.server_message or "").lower():
                raise
            logger.info("client/delete/single: VM %s was already terminated", vm_id)

    def _vm_call(
        self,
        endpoint: str,
        vm_id: str,
        fields: dict[str, str] | None = None,
        *,
        retry: bool = False,
    ) -> ApiCall:
        return ApiCall(
            endpoint,
            subject_kind="VM",
            subject_id=vm_id,
            fields={"server": vm_id, **(fields or {})},
            retry=retry,
        )

    # --- billing -------------------------------------------------------------------

    async def get_balance(self) -> Balance:
        """Read the balance in USD and the organisation's spend in USD per hour."""
        call = ApiCall("billing/balance", retry=True)
        body = await self._request(call)
        return self._parse(call, Balance, body)

    async def get_revenue(
        self,
        *,
        start_timestamp: str | None = None,
        end_timestamp: str | None = None,
        hostnode_id: str | None = None,
    ) -> list[HostnodeRevenue]:
        """List a host's revenue per hostnode, optionally for one hostnode and time range."""
        filters = {
            "start_timestamp": start_timestamp,
            "end_timestamp": end_timestamp,
            "hostnode_id": hostnode_id,
        }
        call = ApiCall(
            "billing/revenue",
            subject_kind="hostnode" if hostnode_id else None,
            subject_id=hostnode_id,
            fields={name: value for name, value in filters.items() if value is not None},
            retry=True,
        )
        body = await self._request(call)
        rows = self._require(call, body, "data")
        if not isinstance(rows, list):
            raise self._malformed(call, "'data' is not a list")
        return [self._parse(call, HostnodeRevenue, row) for row in rows]

    async def get_billing_summary(self, period: str) -> BillingSummary:
        """Read the monthly statement for `period`, a month written as YYYY-MM."""
        call = ApiCall(
            "billing/summary",
            subject_kind="period",
            subject_id=period,
            fields={"period": period},
            retry=True,
        )
        if not _PERIOD_FORMAT.fullmatch(period):
            self._reject_problems(call, ["the period must be a month written as YYYY-MM"])

        body = await self._request(call)
        return self._parse(call, BillingSummary, body)

    # --- containers ------------------------------------------------------------------

    async def deploy_container(self, request: ContainerDeployRequest) -> None:
        """Deploy a container with its replicas. The request is sent once, never retried."""
        call = ApiCall(
            "client/container/deploy",
            subject_kind="project",
            subject_id=request.project_id,
            fields=request.to_form(),
        )
        await self._request(call)

    async def scale_container(self, container_id: str, replicas: int) -> None:
        """Add replicas to a container, or remove them with a negative `replicas`."""
        fields = {"replicas": str(replicas)}
        await self._request(self._container_call("client/container/scale", container_id, fields))

    async def stop_container(self, container_id: str) -> None:
        """Stop a container and its replicas."""
        await self._request(self._container_call("client/container/stop", container_id))

    async def get_container_replicas(self, container_id: str) -> list[ContainerReplica]:
        """List a container's replicas with their VMs, addresses and ports."""
        call = ApiCall(
            "client/container/replicas",
            method="GET",
            subject_kind="container",
            subject_id=container_id,
            retry=True,
            path=f"client/container/{quote(container_id, safe='')}/replicas",
        )
        body = await self._request(call)
        rows = self._require(call, body, "result")
        if not isinstance(rows, list):
            raise self._malformed(call, "'result' is not a list")
        return [self._parse(call, ContainerReplica, row) for row in rows]

    def _container_call(
        self, endpoint: str, container_id: str, fields: dict[str, str] | None = None
    ) -> ApiCall:
        return ApiCall(
            endpoint,
            subject_kind="container",
            subject_id=container_id,
            fields={"container_id": container_id, **(fields or {})},
        )

    # --- sending ---------------------------------------------------------------------

    async def _request(self, call: ApiCall) -> dict[str, Any]:
        """Send the call, resending retryable failures of retryable calls, and return the body."""
        attempt = 1
        while True:
            try:
                return await self._attempt(call)
            except TensorDockError as error:
                if not call.retry or not error.retryable or attempt > self._read_retries:
                    raise
                delay = min(self._backoff_seconds * 2 ** (attempt - 1), MAX_BACKOFF_SECONDS)
                logger.warning(
                    "retry %d of %d in %.1f s after %s: %s",
                    attempt,
                    self._read_retries,
                    delay,
                    type(error).__name__,
                    error,
                )
                await asyncio.sleep(delay)
                attempt += 1

    async def _attempt(self, call: ApiCall) -> dict[str, Any]:
        started = time.monotonic()
        try:
            response = await self._send(call)
        # The httpx exception is not chained: its text is already in the message with
        # the secrets removed, and a chained cause would print unredacted.
        except httpx.TimeoutException as exc:
            self._log_call(call, "timeout", started)
            raise self._timeout_error(call, exc) from None
        except httpx.RequestError as exc:
            self._log_call(call, type(exc).__name__, started)
            raise self._connection_error(call, exc) from None

        self._log_call(call, f"HTTP {response.status_code}", started)
        return self._read_envelope(call, response)

    async def _send(self, call: ApiCall) -> httpx.Response:
        fields = dict(call.fields)
        if call.authenticated:
            fields["api_key"] = self._api_key
            fields["api_token"] = self._api_token

        path = call.path or call.endpoint
        if call.method == "GET":
            return await self._http.get(path, params=fields)
        return await self._http.post(path, data=fields)

    def _log_call(self, call: ApiCall, outcome: str, started: float) -> None:
        elapsed_ms = (time.monotonic() - started) * 1000
        logger.debug("%s %s: %s in %.0f ms", call.method, call.label, outcome, elapsed_ms)

    def _read_envelope(self, call: ApiCall, response: httpx.Response) -> dict[str, Any]:
        """Return the JSON body, or raise the error for a failure or an unreadable body."""
        status = response.status_code
        try:
            body = response.json()
        except ValueError:
            raise self._unreadable_body_error(call, response) from None

        if not isinstance(body, dict):
            if status >= 400:
                raise self._unreadable_body_error(call, response)
            raise self._malformed(
                call, f"the response is a JSON {type(body).__name__}, not an object"
            )

        if status >= 400 or _is_false(body.get("success")):
            raise self._api_failure(call, status, _server_message(body))
        return body

    # --- errors ------------------------------------------------------------------------

    def _error(
        self,
        error_class: type[TensorDockError],
        call: ApiCall,
        reason: str,
        *,
        status_code: int | None = None,
        server_message: str | None = None,
        outcome_unknown: bool = False,
    ) -> TensorDockError:
        """Build an error whose message names the endpoint and subject, with secrets removed.

        `outcome_unknown` marks a failure after the request may have reached the API. For
        a call that is sent only once, the message then tells the reader to check first.
        """
        message = f"{call.label} failed: {reason}"
        if status_code is not None and server_message:
            message += f" (HTTP {status_code}, server message: {server_message!r})"
        elif status_code is not None:
            message += f" (HTTP {status_code})"
        if outcome_unknown and not call.retry:
            message += (
                ". The API may still have carried out the call, so read the VM list "
                "before sending it again"
            )
        return error_class(
            self._redact(message),
            endpoint=call.endpoint,
            subject_id=call.subject_id,
            status_code=status_code,
            server_message=self._redact(server_message) if server_message else None,
        )

    def _redact(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def _api_failure(
        self, call: ApiCall, status_code: int, server_message: str | None
    ) -> TensorDockError:
        error_class = classify_failure(call, status_code, server_message)
        return self._error(
            error_class,
            call,
            _describe_failure(error_class, call, server_message),
            status_code=status_code,
            server_message=server_message,
            outcome_unknown=error_class is TransportError,
        )

    def _unreadable_body_error(self, call: ApiCall, response: httpx.Response) -> TensorDockError:
        content_type = response.headers.get("content-type", "no content type").split(";")[0]
        if response.status_code >= 400:
            reason = f"the API sent a non-JSON {content_type} page {_snippet(response)!r}"
            error_class: type[TensorDockError] = TransportError
        else:
            reason = f"the body is not valid JSON ({len(response.content)} bytes of {content_type})"
            error_class = MalformedResponseError
        return self._error(
            error_class, call, reason, status_code=response.status_code, outcome_unknown=True
        )

    def _timeout_error(self, call: ApiCall, exc: httpx.TimeoutException) -> TensorDockError:
        # A connect timeout means the request never left, so it cannot have taken effect.
        return self._error(
            ApiTimeoutError,
            call,
            f"timed out after {self._timeout_seconds:g} s",
            outcome_unknown=not isinstance(exc, httpx.ConnectTimeout),
        )

    def _connection_error(self, call: ApiCall, exc: httpx.RequestError) -> TensorDockError:
        detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        return self._error(
            TransportError,
            call,
            f"could not reach the API ({detail})",
            outcome_unknown=not isinstance(exc, httpx.ConnectError),
        )

    def _malformed(self, call: ApiCall, reason: str) -> TensorDockError:
        return self._error(MalformedResponseError, call, reason, outcome_unknown=True)

    def _reject_problems(self, call: ApiCall, problems: list[str]) -> None:
        """Raise InvalidRequestError for problems found before sending, so nothing is sent."""
        if problems:
            reason = "the request was not sent because " + ". ".join(problems)
            raise self._error(InvalidRequestError, call, reason)

    # --- parsing -------------------------------------------------------------------------

    def _require(self, call: ApiCall, body: dict[str, Any], key: str) -> Any:
        if key not in body:
            raise self._malformed(call, f"the response has no {key!r} key")
        return body[key]

    def _require_map(self, call: ApiCall, raw: Any, key: str) -> list[tuple[str, dict[str, Any]]]:
        """Return the entries of an object keyed by id, where an empty list counts as empty."""
        if raw == []:
            return []
        if not isinstance(raw, dict):
            raise self._malformed(call, f"{key!r} is not an object keyed by id")
        entries = list(raw.items())
        for entry_id, entry in entries:
            if not isinstance(entry, dict):
                raise self._malformed(call, f"{key!r} entry {entry_id} is not an object")
        return entries

    def _parse(self, call: ApiCall, model: type[ModelT], data: Any) -> ModelT:
        try:
            return model.model_validate(data)
        except ValidationError as error:
            reason = f"the {model.__name__} is invalid: {_validation_summary(error)}"
            raise self._malformed(call, reason) from None


def _price_problems(price_usd_per_hour: float) -> list[str]:
    if price_usd_per_hour > 0:
        return []
    return [f"the price is {price_usd_per_hour} USD per hour, but it must be positive"]
