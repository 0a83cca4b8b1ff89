"""Deploying a VM: fresh ports and price, one deploy call, and a search by name when the
response is lost.

The deploy endpoint has no idempotency key, so a deploy whose response was lost is
never sent again. The VM is looked for by its intended name instead; if it does not
show up, the action stays `unknown` for a person or the next reconciliation to settle.

A spot deploy first finds the lowest bid the hostnode accepts with
`tdbot.actions.spot_bids.lowest_spot_bid`. Bid plus storage stays within the rule's cap
and the on-demand full price the decision was made at, which is what the guards counted
(`tdbot.actions.guards.max_deploy_cost_usd_per_hour`). When the hostnode rejects the
highest such bid, the decision's fallback hostnodes are tried in order under the same
limit, and the VM goes to the first that accepts a bid. Each validation call is noted
in the journal with its hostnode, and the journal result names the hostnode used and
why each one before it was skipped. When every hostnode rejects every bid, nothing is
deployed and the action is recorded as blocked, not failed, because the market is the
reason and the rule tries again at its next tick.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from dataclasses import dataclass

from tdbot.actions.guards import max_deploy_cost_usd_per_hour
from tdbot.actions.journal import JournalEntry
from tdbot.actions.outcome import ActionOutcome, OutcomeStatus
from tdbot.actions.readback import read_back
from tdbot.actions.spot_bids import VALIDATE_ENDPOINT, lowest_spot_bid
from tdbot.evaluation.cheapest import spot_bid_ceiling
from tdbot.evaluation.model import Deploy
from tdbot.evaluation.pricing import (
    PRICE_DECIMALS,
    Offer,
    PriceBreakdown,
    Sizing,
    full_price,
    round_up_to_even,
)
from tdbot.store.db import Store
from tdbot.store.tables import ActionState
from tdbot.tensordock.client import TensorDockClient
from tdbot.tensordock.errors import (
    AuthenticationError,
    MalformedResponseError,
    TensorDockError,
    TransportError,
)
from tdbot.tensordock.models import Hostnode, VirtualMachine, VmStatus
from tdbot.tensordock.requests import DeployRequest

logger = logging.getLogger("tdbot.actions.deploying")

HOSTNODE_ENDPOINT = "client/deploy/hostnodes"
DEPLOY_ENDPOINT = "client/deploy/single"
LIST_ENDPOINT = "client/list"
# Ends every reason that stops a deploy before it is sent.
NOTHING_DEPLOYED = "; nothing was deployed"


def pick_ports(free_ports: list[int], count: int) -> list[int] | None:
    """Pick `count` free external ports, highest first, or None when too few are free.

    High ports are taken because they are the least likely to be reserved for
    well-known services on the host's public address.
    """
    distinct = sorted(set(free_ports), reverse=True)
    if count < 1 or len(distinct) < count:
        return None
    return distinct[:count]


def find_by_name(vms: dict[str, VirtualMachine], name: str) -> VirtualMachine | None:
    """Return the newest non-terminated VM with this name, if any."""
    matches = [
        vm for vm in vms.values() if vm.name == name and vm.status is not VmStatus.TERMINATED
    ]
    return matches[-1] if matches else None


class DeployRunner:
    """Carry out one Deploy whose intent row is already committed."""

    def __init__(
        self,
        client: TensorDockClient,
        store: Store,
        *,
        verify_attempts: int,
        verify_interval_seconds: float,
    ) -> None:
        self.client = client
        self.store = store
        self.verify_attempts = verify_attempts
        self.verify_interval_seconds = verify_interval_seconds

    async def run(self, rule: str, decision: Deploy, entry: JournalEntry) -> ActionOutcome:
        """Read the hostnode, deploy once, and verify the VM; see the module docstring."""
        # 1. Build the request from fresh hostnode data, or stop before anything is sent.
        # A spot deploy also finds its bid here, on the first hostnode that accepts one.
        skipped: list[_Skipped] = []
        if decision.spot:
            chosen = await self._spot_request(decision, entry)
            if isinstance(chosen, ActionOutcome):
                return chosen
            request, skipped = chosen
        else:
            request_or_outcome = await self._on_demand_request(decision, entry)
            if isinstance(request_or_outcome, ActionOutcome):
                return request_or_outcome
            request = request_or_outcome

        # 2. Send the deploy once: neither this runner nor the client resends it.
        sent: dict[str, object] = {
            "hostnode_id": request.hostnode_id,
            "external_ports": request.external_ports,
            "vcpus": request.vcpus,
        }
        if request.spot_bid_usd_per_hour is not None:
            sent["spot_bid_usd_per_hour"] = request.spot_bid_usd_per_hour
        if skipped:
            sent |= _skipped_result(skipped)
        await entry.mark(ActionState.SENT, result=sent)
        try:
            result = await self.client.deploy_vm(request)
        except (TransportError, MalformedResponseError) as error:
            # The VM may exist even though no readable response came back.
            entry.note(DEPLOY_ENDPOINT, None, f"response lost: {type(error).__name__}: {error}")
            await entry.mark(ActionState.UNKNOWN, error=f"deploy response lost: {error}")
            return await self._find_lost_deploy(rule, decision, entry)
        except TensorDockError as error:
            entry.note(DEPLOY_ENDPOINT, None, f"{type(error).__name__}: {error}")
            return await self._fail(
                decision,
                entry,
                f"deploy of {decision.vm_name}{_spot_note(request)} failed: {error}",
            )
        entry.note(DEPLOY_ENDPOINT, result.server, "ok")

        # 3. Count the VM against the rule's cap at once, then read it back.
        vm_id = result.server
        await self.store.add_deployed_vm(rule, vm_id)
        deployed = {"vm_id": vm_id, "ip": result.ip, "port_forwards": result.port_forwards}
        await entry.mark(ActionState.SENT, vm_id=vm_id, result=deployed)
        return await self._verify(decision, request, entry, vm_id)

    async def _on_demand_request(
        self, decision: Deploy, entry: JournalEntry
    ) -> DeployRequest | ActionOutcome:
        # Ports and prices change by the minute, so the hostnode is read right before.
        hostnode_id = decision.hostnode_id
        try:
            hostnode = await self.client.get_hostnode(hostnode_id)
        except TensorDockError as error:
            entry.note(HOSTNODE_ENDPOINT, None, f"{type(error).__name__}: {error}")
            return await self._fail(
                decision, entry, f"hostnode {hostnode_id} could not be read: {error}"
            )
        entry.note(HOSTNODE_ENDPOINT, None, "ok")

        request_or_reason = self._build_request(decision, hostnode)
        if isinstance(request_or_reason, str):
            return await self._fail(decision, entry, request_or_reason)
        return request_or_reason

    async def _spot_request(
        self, decision: Deploy, entry: JournalEntry
    ) -> tuple[DeployRequest, list[_Skipped]] | ActionOutcome:
        """Return the request on the first hostnode that accepts a bid, and those skipped.

        The request carries the lowest bid that hostnode accepted. The decided hostnode
        is tried first, then each fallback in order, all with the same limit on bid plus
        storage. When none accepts a bid and no API call failed, the market is the
        reason, so the action is BLOCKED rather than FAILED and the rule tries again at
        its next tick.
        """
        limit = max_deploy_cost_usd_per_hour(decision)
        skipped: list[_Skipped] = []
        for hostnode_id in (decision.hostnode_id, *decision.fallback_hostnode_ids):
            try:
                attempt = await self._try_spot_hostnode(decision, hostnode_id, limit, entry)
            except AuthenticationError as error:
                # Every other hostnode would be rejected the same way, so none is tried.
                reason = f"spot bids on hostnode {hostnode_id} could not be checked: {error}"
                skipped.append(_Skipped(hostnode_id, reason, error=True))
                break
            if isinstance(attempt, DeployRequest):
                if skipped:
                    logger.info(
                        "action %d: spot deploy on hostnode %s after: %s",
                        entry.action_id,
                        hostnode_id,
                        "; ".join(item.reason for item in skipped),
                    )
                return attempt, skipped
            skipped.append(attempt)
        return await self._no_spot_deploy(decision, entry, limit, skipped)

    async def _try_spot_hostnode(
        self, decision: Deploy, hostnode_id: str, limit: float, entry: JournalEntry
    ) -> DeployRequest | _Skipped:
        """Read one hostnode and return the request at its lowest accepted bid, or why not.

        Raises AuthenticationError, after noting the call, when the credentials are rejected.
        """
        try:
            hostnode = await self.client.get_hostnode(hostnode_id)
        except TensorDockError as error:
            entry.note(HOSTNODE_ENDPOINT, None, f"{hostnode_id}: {type(error).__name__}: {error}")
            if isinstance(error, AuthenticationError):
                raise
            reason = f"hostnode {hostnode_id} could not be read: {error}"
            return _Skipped(hostnode_id, reason, error=True)
        entry.note(HOSTNODE_ENDPOINT, None, f"{hostnode_id}: ok")

        request_or_reason = self._build_request(decision, hostnode)
        if isinstance(request_or_reason, str):
            return _Skipped(hostnode_id, request_or_reason.removesuffix(NOTHING_DEPLOYED))
        bid_or_skip = await self._find_spot_bid(hostnode, request_or_reason, limit, entry)
        if isinstance(bid_or_skip, _Skipped):
            return bid_or_skip
        return request_or_reason.model_copy(update={"spot_bid_usd_per_hour": bid_or_skip})

    def _build_request(self, decision: Deploy, hostnode: Hostnode) -> DeployRequest | str:
        """Return the deploy request for the hostnode, or the reason it must not be sent."""
        needed = len(decision.internal_ports)
        ports = pick_ports(hostnode.networking.ports, needed)
        if ports is None:
            return (
                f"no free ports: hostnode {hostnode.id} has {len(set(hostnode.networking.ports))} "
                f"free external ports and the deploy needs {needed}{NOTHING_DEPLOYED}"
            )

        # The API rejects odd vCPU counts.
        vcpus = max(2, round_up_to_even(decision.vcpus))
        sizing = Sizing(
            gpu_model=decision.gpu_model,
            gpu_count=decision.gpu_count,
            vcpus=vcpus,
            ram_gb=decision.ram_gb,
            storage_gb=decision.storage_gb,
        )
        if decision.gpu_model not in hostnode.specs.gpu:
            return f"hostnode {hostnode.id} no longer offers {decision.gpu_model}{NOTHING_DEPLOYED}"
        price = full_price(hostnode, sizing).total_usd
        # A spot VM pays its bid plus storage, and the bid search keeps that sum within
        # the cap, so only an on-demand VM is checked against the on-demand price.
        if not decision.spot and price > decision.max_usd_per_hour:
            return (
                f"the price on hostnode {hostnode.id} is now ${price:.4f}/h, above the cap "
                f"${decision.max_usd_per_hour:.4f}/h{NOTHING_DEPLOYED}"
            )

        return DeployRequest(
            name=decision.vm_name,
            hostnode_id=hostnode.id,
            gpu_model=decision.gpu_model,
            gpu_count=decision.gpu_count,
            vcpus=vcpus,
            ram_gb=decision.ram_gb,
            storage_gb=decision.storage_gb,
            operating_system=decision.operating_system,
            external_ports=ports,
            internal_ports=list(decision.internal_ports),
            # The API requires a password; this one is random, never stored or logged,
            # and log-in is meant to go through the SSH key.
            password=secrets.token_urlsafe(24),
            ssh_public_key=decision.ssh_public_key,
            cloudinit_script=decision.cloudinit_script,
        )

    async def _find_spot_bid(
        self, hostnode: Hostnode, request: DeployRequest, limit: float, entry: JournalEntry
    ) -> float | _Skipped:
        """Return the lowest bid the hostnode accepts for the request, or why there is none.

        `limit` caps the bid plus this hostnode's storage. The request's size is priced
        on this hostnode, so a fallback's own storage price counts.
        """
        sizing = Sizing(
            gpu_model=request.gpu_model,
            gpu_count=request.gpu_count,
            vcpus=request.vcpus,
            ram_gb=request.ram_gb,
            storage_gb=request.storage_gb,
        )
        price = full_price(hostnode, sizing)
        offer = Offer(
            hostnode_id=hostnode.id,
            sizing=sizing,
            price=price,
            location=hostnode.location.describe() or "unknown location",
        )

        def note(bid: float, accepted: bool) -> None:
            outcome = "accepted" if accepted else "rejected"
            entry.note(VALIDATE_ENDPOINT, None, f"{hostnode.id}: spot bid ${bid:.6f}/h {outcome}")

        try:
            quote = await lowest_spot_bid(
                self.client, offer, ceiling_usd_per_hour=limit, on_probe=note
            )
        except TensorDockError as error:
            entry.note(VALIDATE_ENDPOINT, None, f"{hostnode.id}: {type(error).__name__}: {error}")
            if isinstance(error, AuthenticationError):
                raise
            reason = f"spot bids on hostnode {hostnode.id} could not be checked: {error}"
            return _Skipped(hostnode.id, reason, error=True)

        if quote is None:
            return _Skipped(hostnode.id, _rejection_reason(hostnode.id, price, limit))
        # The ceiling already keeps bid plus storage within the limit. This check makes
        # sure that the VM sent never costs more than the guards counted.
        total = round(quote.bid_usd_per_hour + price.storage_usd, PRICE_DECIMALS)
        if total > round(limit, PRICE_DECIMALS):
            reason = (
                f"the accepted bid on hostnode {hostnode.id} plus storage comes to "
                f"${total:.4f}/h, above the limit ${limit:.4f}/h"
            )
            return _Skipped(hostnode.id, reason, error=True)
        return quote.bid_usd_per_hour

    async def _no_spot_deploy(
        self, decision: Deploy, entry: JournalEntry, limit: float, skipped: list[_Skipped]
    ) -> ActionOutcome:
        """Settle a spot deploy that no hostnode accepted: FAILED after an error, else BLOCKED."""
        if any(item.error for item in skipped):
            reasons = "; ".join(item.reason for item in skipped)
            return await self._fail(
                decision, entry, f"{reasons}{NOTHING_DEPLOYED}", result=_skipped_result(skipped)
            )

        tried = ", ".join(item.hostnode_id for item in skipped)
        message = (
            f"no hostnode accepted a spot bid up to ${limit:.4f}/h with storage "
            f"(tried {tried}); will try again"
        )
        await entry.mark(ActionState.BLOCKED, error=message, result=_skipped_result(skipped))
        logger.info("action %d: %s", entry.action_id, message)
        return ActionOutcome(decision, entry.action_id, OutcomeStatus.BLOCKED, message)

    async def _verify(
        self, decision: Deploy, request: DeployRequest, entry: JournalEntry, vm_id: str
    ) -> ActionOutcome:
        checked = await read_back(
            self.client,
            entry,
            vm_id,
            (VmStatus.RUNNING,),
            attempts=self.verify_attempts,
            interval_seconds=self.verify_interval_seconds,
        )
        if checked.reached:
            await entry.mark(ActionState.VERIFIED, result={"status": VmStatus.RUNNING.value})
            message = f"deployed {decision.vm_name}{_spot_note(request)} as VM {vm_id}, Running"
            return ActionOutcome(decision, entry.action_id, OutcomeStatus.DONE, message)

        message = (
            f"deployed {decision.vm_name}{_spot_note(request)}, but "
            f"{checked.describe(vm_id, (VmStatus.RUNNING,))}"
        )
        if checked.vm is None:
            await entry.mark(ActionState.UNKNOWN, error=message)
            return ActionOutcome(decision, entry.action_id, OutcomeStatus.UNKNOWN, message)
        return await self._fail(decision, entry, message)

    async def _find_lost_deploy(
        self, rule: str, decision: Deploy, entry: JournalEntry
    ) -> ActionOutcome:
        """Look for the VM by its intended name, polling as the read-back does."""
        last_error = "no VM of that name is listed"
        for check in range(1, self.verify_attempts + 1):
            try:
                vms = await self.client.list_vms()
            except TensorDockError as error:
                entry.note(LIST_ENDPOINT, None, f"{type(error).__name__}: {error}")
                last_error = f"the VM list failed to load: {error}"
            else:
                found = find_by_name(vms, decision.vm_name)
                entry.note(
                    LIST_ENDPOINT, found.id if found else None, "found" if found else "absent"
                )
                if found is not None:
                    return await self._found(rule, decision, entry, found)
            if check < self.verify_attempts:
                await asyncio.sleep(self.verify_interval_seconds)

        message = (
            f"the deploy response was lost and {last_error} for {decision.vm_name}; the deploy "
            "is not sent again, so check the account before deploying by hand"
        )
        await entry.mark(ActionState.UNKNOWN, error=message)
        logger.warning("action %d has an unknown outcome: %s", entry.action_id, message)
        return ActionOutcome(decision, entry.action_id, OutcomeStatus.UNKNOWN, message)

    async def _found(
        self, rule: str, decision: Deploy, entry: JournalEntry, vm: VirtualMachine
    ) -> ActionOutcome:
        await self.store.add_deployed_vm(rule, vm.id)
        await entry.mark(
            ActionState.VERIFIED, vm_id=vm.id, result={"vm_id": vm.id, "status": vm.status.value}
        )
        message = (
            f"the deploy response was lost, but VM {decision.vm_name} exists as {vm.id} "
            f"({vm.status.value})"
        )
        return ActionOutcome(decision, entry.action_id, OutcomeStatus.DONE, message)

    async def _fail(
        self,
        decision: Deploy,
        entry: JournalEntry,
        message: str,
        *,
        result: dict[str, object] | None = None,
    ) -> ActionOutcome:
        await entry.mark(ActionState.FAILED, error=message, result=result)
        logger.warning("action %d failed: %s", entry.action_id, message)
        return ActionOutcome(decision, entry.action_id, OutcomeStatus.FAILED, message)


@dataclass(frozen=True)
class _Skipped:
    """The reason a spot deploy skipped a hostnode; `error` marks a failed check, not the market."""

    hostnode_id: str
    reason: str
    error: bool = False


def _skipped_result(skipped: list[_Skipped]) -> dict[str, object]:
    """Return the journal result that records why each hostnode was skipped, in order."""
    return {"skipped_hostnodes": {item.hostnode_id: item.reason for item in skipped}}


def _rejection_reason(hostnode_id: str, price: PriceBreakdown, limit: float) -> str:
    ceiling = spot_bid_ceiling(price, limit)
    if ceiling <= 0:
        return (
            f"storage on hostnode {hostnode_id} costs ${price.storage_usd:.4f}/h, which "
            f"leaves no room for a spot bid within ${limit:.4f}/h"
        )
    return f"hostnode {hostnode_id} rejected spot bids up to ${ceiling:.4f}/h"


def _spot_note(request: DeployRequest) -> str:
    """Return " (spot, bid $X/h) on hostnode ID" for a spot request, or "" for an on-demand one."""
    if request.spot_bid_usd_per_hour is None:
        return ""
    return f" (spot, bid ${request.spot_bid_usd_per_hour:.4f}/h) on hostnode {request.hostnode_id}"
