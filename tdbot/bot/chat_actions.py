"""Ask before each stop, start or deploy, and carry it out once it is confirmed.

A question records the state it describes (the VM's status, the deploy's price). When
the user confirms, a fresh snapshot is taken and the state is checked again. If it
changed, the reply names the change and nothing is done. Stops and deploys then go through the
daemon's `ActionExecutor` with `confirmed=True`, so the caps, the dry run, the journal
and the read-back apply as for a rule's own decisions; starts go through `VmStarter`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

from tdbot.actions.executor import ActionExecutor
from tdbot.actions.guards import max_deploy_cost_usd_per_hour
from tdbot.actions.outcome import ActionOutcome, OutcomeStatus
from tdbot.bot.confirmations import Question
from tdbot.bot.starting import StartVm, VmStarter, start_cost_usd_per_hour
from tdbot.bot.views import usd_per_hour
from tdbot.clock import Clock
from tdbot.daemon.snapshot import ALL_PARTS, SnapshotProvider
from tdbot.evaluation.burn import storage_cost, vm_hourly_cost
from tdbot.evaluation.cheapest import spot_fallback_clause
from tdbot.evaluation.model import Decision, Deploy, MarketSnapshot, Stop
from tdbot.evaluation.pricing import PRICE_DECIMALS, make_offer
from tdbot.evaluation.spot import redeploy_spec
from tdbot.rules.schema import CheapestHostnodeRule, HostnodeSpec, RuleBase, SpotRebidRule
from tdbot.store.db import Store
from tdbot.store.tables import ActionKind, ConfirmationRecord
from tdbot.tensordock.client import TensorDockClient
from tdbot.tensordock.models import VirtualMachine, VmStatus

logger = logging.getLogger("tdbot.bot.chat_actions")

# The journal and the decision records name this rule for actions asked for in a chat.
CHAT_RULE = RuleBase(name="chat", kind="chat", every=timedelta(hours=1))

STOPPABLE = (VmStatus.RUNNING, VmStatus.OUTBID)
RELEASABLE = (VmStatus.RUNNING, VmStatus.OUTBID, VmStatus.STOPPED)


class NotAllowedNow(Exception):
    """The VM's current status does not allow the action; the message gives the reason."""


async def fresh_snapshot(
    client: TensorDockClient, clock: Clock, parts: frozenset[str]
) -> MarketSnapshot:
    """Fetch a new snapshot of these parts, never one shared with the rules."""
    return await SnapshotProvider(client, clock, timedelta(0), parts).get()


# --- questions -----------------------------------------------------------------------


def ask_stop(vm: VirtualMachine, *, release: bool, snapshot: MarketSnapshot) -> Question:
    """Describe the stop of `vm`, or raise NotAllowedNow when its status allows none."""
    allowed = RELEASABLE if release else STOPPABLE
    if vm.status not in allowed:
        hint = "" if release or vm.status is not VmStatus.STOPPED else "; add --release to free it"
        raise NotAllowedNow(f"VM {vm.name} is {vm.status.value}, so it cannot be stopped{hint}.")

    cost, _ = vm_hourly_cost(vm, snapshot.hostnodes)
    storage, _ = storage_cost(vm, snapshot.hostnodes)
    verb = "Stop VM {name} and release its GPU, vCPUs and RAM" if release else "Stop VM {name}"
    title = f"{verb.format(name=vm.name)} ({vm.status.value}, {usd_per_hour(cost)})"
    if release:
        after = usd_per_hour(storage)
        lines = (
            f"Afterwards only its storage is billed, {after}. Another user may take the "
            "GPU before you start the VM again.",
        )
    else:
        lines = (
            f"A plain stop keeps billing the GPU at the same rate, {usd_per_hour(cost)}; "
            "--release frees it.",
        )
    saves = round(cost - (storage or 0.0), PRICE_DECIMALS) if release else 0.0
    params = {"status": vm.status.value, "release": release, "saves_usd_per_hour": saves}
    return Question(ActionKind.STOP.value, vm.id, title, lines, params)


def ask_start(vm: VirtualMachine, *, snapshot: MarketSnapshot) -> Question:
    """Describe the start of `vm`, or raise NotAllowedNow unless it is stopped."""
    if vm.status not in (VmStatus.STOPPED, VmStatus.STOPPED_DISASSOCIATED):
        raise NotAllowedNow(f"VM {vm.name} is {vm.status.value}; only a stopped VM can be started.")

    cost, added = start_cost_usd_per_hour(vm, snapshot)
    title = f"Start VM {vm.name} ({vm.status.value}, {usd_per_hour(cost)})"
    if vm.status is VmStatus.STOPPED:
        lines: tuple[str, ...] = (
            f"Running, it is billed the same {usd_per_hour(cost)}, because a plain stop "
            "kept its GPU reserved.",
        )
    else:
        lines = (
            f"Running, it costs {usd_per_hour(cost + added)}, {usd_per_hour(added)} more than "
            f"now. Its GPU may no longer be free on hostnode {vm.hostnode}.",
        )
    params = {"status": vm.status.value, "added_usd_per_hour": round(added, PRICE_DECIMALS)}
    return Question(ActionKind.START.value, vm.id, title, lines, params)


def ask_deploy(rule: RuleBase, decision: Deploy) -> Question:
    """Describe a deploy that a rule wants to make and that waits for a confirmation."""
    fallback = spot_fallback_clause(len(decision.fallback_hostnode_ids))
    title = (
        f"Deploy {decision.vm_name} on hostnode {decision.hostnode_id}{fallback} "
        f"({_deploy_price(decision)})"
    )
    setting = (
        "redeploy_confirm: true" if isinstance(rule, SpotRebidRule) else "deploy.confirm: true"
    )
    lines = (
        decision.summary,
        f"Rule {rule.name} asks first because it sets {setting}. "
        "The VM is billed from the moment it runs until it is stopped and released or deleted.",
    )
    params = dataclasses.asdict(decision)
    params["internal_ports"] = list(decision.internal_ports)
    params["fallback_hostnode_ids"] = list(decision.fallback_hostnode_ids)
    return Question(ActionKind.DEPLOY.value, decision.vm_name, title, lines, params)


def _deploy_price(decision: Deploy) -> str:
    """Describe what the deploy pays: its full price, or for a spot VM the bid it may place."""
    if not decision.spot:
        return usd_per_hour(decision.price_usd_per_hour)
    # The bid is found just before the deploy is sent, so the question shows its limit.
    # Each fallback hostnode has its own storage price, and so its own highest bid, so
    # with fallbacks the question gives the limit that holds for all of them.
    if decision.fallback_hostnode_ids:
        limit = max_deploy_cost_usd_per_hour(decision)
        return f"spot, at most {usd_per_hour(limit)} with storage"
    max_bid = decision.evidence.get("max_bid_usd_per_hour")
    if max_bid is None:
        return f"spot, at most {usd_per_hour(decision.max_usd_per_hour)} with storage"
    return f"spot, bid up to {usd_per_hour(max_bid)}"


# --- carrying out ----------------------------------------------------------------------


class ChatActions:
    """Carry out confirmed actions with a fresh snapshot and the daemon's executor."""

    def __init__(
        self,
        *,
        client: TensorDockClient,
        store: Store,
        clock: Clock,
        executor: ActionExecutor,
        rules: Callable[[], Sequence[RuleBase]],
    ) -> None:
        self._client = client
        self._store = store
        self._clock = clock
        self._executor = executor
        self._starter = VmStarter(executor)
        # Read at each use, since a reload of the rule files replaces the daemon's list.
        self._rules = rules

    async def carry_out(self, record: ConfirmationRecord, user_id: int) -> str:
        """Check the state again, act, and return what happened as one sentence."""
        if record.action == ActionKind.STOP.value:
            return await self._stop(record, user_id)
        if record.action == ActionKind.START.value:
            return await self._start(record, user_id)
        if record.action == ActionKind.DEPLOY.value:
            return await self._deploy(record)
        return f"Nothing was done: {record.action} is not an action this bot carries out."

    async def _stop(self, record: ConfirmationRecord, user_id: int) -> str:
        snapshot = await fresh_snapshot(self._client, self._clock, frozenset({"vms"}))
        vm, changed = _check_vm_state(record, snapshot)
        if vm is None:
            return changed
        stop = Stop(
            rule=CHAT_RULE.name,
            subject=vm.id,
            summary=record.summary,
            evidence=_chat_evidence(record, user_id, vm),
            release=bool(record.params.get("release")),
            saves_usd_per_hour=record.params.get("saves_usd_per_hour"),
        )
        now = self._clock.now()
        run_id = await self._store.start_run(CHAT_RULE.name)
        (outcome,) = await self._executor.execute(CHAT_RULE, [stop], snapshot, now, confirmed=True)
        await self._store.finish_run(run_id, outcome.status is OutcomeStatus.DONE, None, [stop])
        return _result_text(outcome.status, outcome.message, outcome.action_id)

    async def _start(self, record: ConfirmationRecord, user_id: int) -> str:
        snapshot = await fresh_snapshot(self._client, self._clock, ALL_PARTS)
        vm, changed = _check_vm_state(record, snapshot)
        if vm is None:
            return changed
        _, added = start_cost_usd_per_hour(vm, snapshot)
        start = StartVm(
            rule=CHAT_RULE.name,
            subject=vm.id,
            summary=record.summary,
            evidence=_chat_evidence(record, user_id, vm),
            added_usd_per_hour=round(added, PRICE_DECIMALS),
        )
        run_id = await self._store.start_run(CHAT_RULE.name)
        outcome = await self._starter.start(start, snapshot, self._clock.now())
        await self._store.finish_run(run_id, outcome.status is OutcomeStatus.DONE, None, [start])
        return _result_text(outcome.status, outcome.message, outcome.action_id)

    async def _deploy(self, record: ConfirmationRecord) -> str:
        rule = next((r for r in self._rules() if r.name == record.origin), None)
        if rule is None:
            return f"Nothing was done: rule {record.origin} no longer exists."
        decision = _deploy_from_params(record.params)
        snapshot = await fresh_snapshot(self._client, self._clock, ALL_PARTS)
        spec = _deploy_spec(rule, decision, snapshot)
        if isinstance(spec, str):
            return f"Nothing was done: {spec}."
        changed = _deploy_price_changed(spec, decision, snapshot)
        if changed is not None:
            return f"Nothing was done: {changed}. The rule asks again at its next tick."
        now = self._clock.now()
        (outcome,) = await self._executor.execute(rule, [decision], snapshot, now, confirmed=True)
        return _result_text(outcome.status, outcome.message, outcome.action_id)


def _check_vm_state(
    record: ConfirmationRecord, snapshot: MarketSnapshot
) -> tuple[VirtualMachine | None, str]:
    """Return the VM if it is still in the status the question described, else why not."""
    if snapshot.vms is None:
        error = snapshot.errors.get("vms", "no error recorded")
        return None, f"Nothing was done: the VM list failed to load ({error})."
    vm = snapshot.vms.get(record.subject)
    if vm is None:
        return None, f"Nothing was done: VM {record.subject} is no longer listed."
    expected = record.params.get("status")
    if vm.status.value != expected:
        return None, (
            f"Nothing was done: VM {vm.name} is now {vm.status.value}, not {expected} "
            "as when you asked."
        )
    return vm, ""


def _chat_evidence(record: ConfirmationRecord, user_id: int, vm: VirtualMachine) -> dict[str, Any]:
    return {
        "requested_in_chat": record.chat_id,
        "confirmed_by_user": user_id,
        "confirmation": record.id,
        "vm_name": vm.name,
        "status_when_asked": record.params.get("status"),
        "asked_at": record.created_at.isoformat(),
    }


def _deploy_from_params(params: dict[str, Any]) -> Deploy:
    known = {item.name for item in dataclasses.fields(Deploy)}
    values = {key: value for key, value in params.items() if key in known}
    values["internal_ports"] = tuple(values.get("internal_ports", (22,)))
    values["fallback_hostnode_ids"] = tuple(values.get("fallback_hostnode_ids", ()))
    return Deploy(**values)


def _deploy_spec(rule: RuleBase, decision: Deploy, snapshot: MarketSnapshot) -> HostnodeSpec | str:
    """Return the spec the deploy must still fit, or why the rule no longer deploys it.

    A cheapest-hostnode rule deploys its `match`; a spot rule's redeploy copies the
    size of the outbid VM it replaces.
    """
    if isinstance(rule, CheapestHostnodeRule) and rule.deploy is not None:
        return rule.match
    if isinstance(rule, SpotRebidRule) and rule.on_exhausted == "redeploy":
        replaced = (snapshot.vms or {}).get(decision.replaces_vm_id or "")
        if replaced is None:
            return f"the VM {decision.replaces_vm_id} it replaces is no longer listed"
        return redeploy_spec(replaced) or f"VM {replaced.name} has no GPU size to copy"
    return f"rule {rule.name} no longer deploys"


def _deploy_price_changed(
    spec: HostnodeSpec, decision: Deploy, snapshot: MarketSnapshot
) -> str | None:
    """Say why the deploy no longer matches the question, or None when it still does."""
    hostnode = (snapshot.hostnodes or {}).get(decision.hostnode_id)
    if hostnode is None:
        return f"hostnode {decision.hostnode_id} is no longer listed"
    offer = make_offer(hostnode, decision.gpu_model, spec)
    if offer is None:
        return f"hostnode {decision.hostnode_id} can no longer host the spec"
    if offer.price_usd_per_hour > round(decision.price_usd_per_hour, PRICE_DECIMALS):
        return (
            f"the price rose from {usd_per_hour(decision.price_usd_per_hour)} to "
            f"{usd_per_hour(offer.price_usd_per_hour)}"
        )
    return None


def _result_text(status: OutcomeStatus, message: str, action_id: int | None) -> str:
    label = {
        OutcomeStatus.DONE: "Done",
        OutcomeStatus.DRY_RUN: "Dry run",
        OutcomeStatus.BLOCKED: "Blocked",
        OutcomeStatus.FAILED: "Failed",
        OutcomeStatus.UNKNOWN: "Outcome unknown",
        OutcomeStatus.AWAITING_CONFIRMATION: "Still waiting",
    }[status]
    where = f" (action {action_id}: /why {action_id})" if action_id is not None else ""
    return f"{label}: {message}{where}."


def deploy_decisions_awaiting(outcomes: Sequence[ActionOutcome]) -> list[Deploy]:
    """Return the deploys the executor held back until a user confirms them."""
    return [
        outcome.decision
        for outcome in outcomes
        if outcome.status is OutcomeStatus.AWAITING_CONFIRMATION
        and isinstance(outcome.decision, Deploy)
    ]


def decision_kind(action_kind: str) -> str:
    """Return the decision class name recorded for a journal kind."""
    return {
        ActionKind.STOP.value: Stop.__name__,
        ActionKind.DEPLOY.value: Deploy.__name__,
        ActionKind.START.value: StartVm.__name__,
        ActionKind.REBID.value: "Rebid",
    }.get(action_kind, Decision.__name__)
