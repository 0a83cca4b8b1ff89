"""Action executor tests: the real client against the simulator on 127.0.0.1, state in SQLite."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from tdbot.actions import ActionExecutor, OutcomeStatus, guards, reconcile
from tdbot.actions.deploying import pick_ports
from tdbot.actions.reconcile import DEPLOY_SETTLE_WINDOW
from tdbot.evaluation.model import (
    CancelIdleWarning,
    Deploy,
    FireAlert,
    MarketSnapshot,
    Rebid,
    Report,
    Stop,
    WarnIdle,
)
from tdbot.rules.schema import RuleBase
from tdbot.simulator.faults import FaultMode
from tdbot.simulator.market import SimulatedMarket
from tdbot.simulator.testing import (
    TEST_API_KEY,
    TEST_API_TOKEN,
    make_test_market,
    running_simulator,
)
from tdbot.simulator.vms import SimVm
from tdbot.store.db import Store
from tdbot.store.tables import ActionKind, ActionRecord, ActionState
from tdbot.tensordock.client import TensorDockClient
from tdbot.tensordock.models import Balance, VirtualMachine, VmStatus

HOST_4090 = "0b60f80c-e16a-4cda-a8cd-dbc01cc0512c"
HOST_NO_PORTS = "e5d7e9c6-63db-4713-9ca4-100b77c5ba5b"
GPU_4090 = "geforcertx4090-pcie-24gb"
GPU_3090 = "geforcertx3090-pcie-24gb"
RULE = RuleBase(name="test-rule", kind="idle_stop", every="10m")
DRY_RULE = RuleBase(name="test-rule", kind="idle_stop", every="10m", dry_run=True)


@dataclass
class Env:
    market: SimulatedMarket
    client: TensorDockClient
    store: Store
    on_demand: SimVm  # api-server-4090, Running
    spot: SimVm  # whisper-2x3090, Running at a bid of 0.30
    stopped: SimVm  # dev-box-a4000, Stopped

    def executor(self, **options: object) -> ActionExecutor:
        settings: dict[str, object] = {
            "dry_run": False,
            "fleet_max_usd_per_hour": 50.0,
            "verify_attempts": 3,
            "verify_interval_seconds": 0.01,
        }
        settings.update(options)
        return ActionExecutor(self.client, self.store, **settings)  # type: ignore[arg-type]

    async def snapshot(self) -> MarketSnapshot:
        return MarketSnapshot(
            taken_at=self.market.now(),
            hostnodes=None,
            vms=await self.client.list_vms(),
            balance=await self.client.get_balance(),
        )

    @property
    def now(self) -> datetime:
        return self.market.now()


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    market = make_test_market()
    on_demand, spot, stopped = market.seed_example_vms()
    async with running_simulator(market) as server:
        client = TensorDockClient(
            TEST_API_KEY,
            TEST_API_TOKEN,
            base_url=server.api_url,
            timeout_seconds=5.0,
            read_retries=1,
            backoff_seconds=0.01,
        )
        store = await Store.open(tmp_path / "tdbot.db", clock=market.clock.now)
        try:
            yield Env(market, client, store, on_demand, spot, stopped)
        finally:
            await store.close()
            await client.aclose()


def stop(vm_id: str, *, release: bool = False) -> Stop:
    return Stop(rule=RULE.name, subject=vm_id, summary="idle", release=release)


def deploy(**changes: object) -> Deploy:
    decision = Deploy(
        rule=RULE.name,
        subject=HOST_4090,
        summary="cheapest 4090",
        hostnode_id=HOST_4090,
        gpu_model=GPU_4090,
        gpu_count=1,
        vcpus=7,
        ram_gb=16,
        storage_gb=40,
        price_usd_per_hour=0.45,
        vm_name="test-rule-1",
        internal_ports=(22, 8888),
        ssh_public_key="ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAItest test@example",
        max_usd_per_hour=0.60,
        max_vms=2,
        confirm=False,
    )
    return replace(decision, **changes)  # type: ignore[arg-type]


def rebid(vm_id: str, bid: float, *, cap: float = 1.0, step: int = 1) -> Rebid:
    return Rebid(
        rule=RULE.name,
        subject=vm_id,
        summary="outbid",
        bid_usd_per_hour=bid,
        previous_bid_usd_per_hour=0.30,
        step=step,
        max_usd_per_hour=cap,
    )


def vms_named(market: SimulatedMarket, name: str) -> list[SimVm]:
    return [vm for vm in market.vms.values() if vm.name == name]


async def journal_row(store: Store, action_id: int | None) -> ActionRecord:
    assert action_id is not None
    row = await store.get_action(action_id)
    assert row is not None
    return row


def outbid(env: Env) -> None:
    """Raise the 3090 spot price so the spot VM's bid of 0.30 is beaten; 0.408 USD/h wins."""
    env.market.set_spot_price(env.spot.hostnode_id, GPU_3090, 0.16)
    assert env.market.vms[env.spot.id].status is VmStatus.OUTBID


# --- stop ------------------------------------------------------------------------------


async def test_stop_verified(env: Env) -> None:
    [outcome] = await env.executor().execute(
        RULE, [stop(env.on_demand.id)], await env.snapshot(), env.now
    )

    assert outcome.status is OutcomeStatus.DONE
    assert env.market.vms[env.on_demand.id].status is VmStatus.STOPPED
    row = await journal_row(env.store, outcome.action_id)
    assert row.state == ActionState.VERIFIED
    assert row.kind == ActionKind.STOP
    endpoints = [call["endpoint"] for call in row.api_calls]
    assert endpoints[0] == "client/stop/single"
    assert "client/get/single" in endpoints


async def test_stop_release_verified(env: Env) -> None:
    [outcome] = await env.executor().execute(
        RULE, [stop(env.on_demand.id, release=True)], await env.snapshot(), env.now
    )

    assert outcome.status is OutcomeStatus.DONE
    assert env.market.vms[env.on_demand.id].status is VmStatus.STOPPED_DISASSOCIATED
    row = await journal_row(env.store, outcome.action_id)
    assert row.result == {"status": "StoppedDisassociated"}


async def test_stop_already_stopped_done(env: Env) -> None:
    [outcome] = await env.executor().execute(
        RULE, [stop(env.stopped.id)], await env.snapshot(), env.now
    )

    assert outcome.status is OutcomeStatus.DONE
    assert "already stopped" in outcome.message
    row = await journal_row(env.store, outcome.action_id)
    assert row.state == ActionState.VERIFIED


async def test_stop_clears_idle_warning(env: Env) -> None:
    warn = WarnIdle(rule=RULE.name, subject=env.on_demand.id, summary="idle", due_at=env.now)
    await env.executor().execute(RULE, [warn], await env.snapshot(), env.now)

    await env.executor().execute(RULE, [stop(env.on_demand.id)], await env.snapshot(), env.now)

    state = await env.store.load_rule_state(RULE.name)
    assert state.idle_warnings == {}


async def test_stop_failed_call_journaled(env: Env) -> None:
    env.market.inject_fault("client/stop/single", FaultMode.HTTP_500)

    [outcome] = await env.executor().execute(
        RULE, [stop(env.on_demand.id)], await env.snapshot(), env.now
    )

    assert outcome.status is OutcomeStatus.FAILED
    assert "Running" in outcome.message
    assert env.market.vms[env.on_demand.id].status is VmStatus.RUNNING
    row = await journal_row(env.store, outcome.action_id)
    assert row.state == ActionState.FAILED
    assert row.api_calls[0]["endpoint"] == "client/stop/single"
    assert row.api_calls[0]["outcome"] != "ok"


async def test_stop_lost_response_verified(env: Env) -> None:
    # Carried out, but the connection closes before the response body.
    env.market.inject_fault("client/stop/single", FaultMode.DROP_RESPONSE)

    [outcome] = await env.executor().execute(
        RULE, [stop(env.on_demand.id)], await env.snapshot(), env.now
    )

    assert outcome.status is OutcomeStatus.DONE
    assert "response was lost" in outcome.message
    assert env.market.vms[env.on_demand.id].status is VmStatus.STOPPED


async def test_intent_committed_before_call(env: Env) -> None:
    # The stop response is held back for a moment, so the journal can be read mid-call.
    env.market.inject_fault("client/stop/single", FaultMode.DELAY, delay_seconds=0.5)
    snapshot = await env.snapshot()
    task = asyncio.create_task(
        env.executor().execute(RULE, [stop(env.on_demand.id)], snapshot, env.now)
    )

    rows: list[ActionRecord] = []
    for _ in range(100):
        rows = await env.store.recent_actions()
        if rows:
            break
        await asyncio.sleep(0.01)
    vm_status_during_call = env.market.vms[env.on_demand.id].status
    [outcome] = await task

    assert len(rows) == 1
    assert rows[0].state == ActionState.SENT
    assert vm_status_during_call is VmStatus.RUNNING
    assert outcome.status is OutcomeStatus.DONE


# --- dry run and guards ------------------------------------------------------------------


async def test_global_dry_run_sends_nothing(env: Env) -> None:
    events_before = len(env.market.events)

    [outcome] = await env.executor(dry_run=True).execute(
        RULE, [stop(env.on_demand.id)], await env.snapshot(), env.now
    )

    assert outcome.status is OutcomeStatus.DRY_RUN
    assert f"would stop VM {env.on_demand.id}" in outcome.message
    assert env.market.vms[env.on_demand.id].status is VmStatus.RUNNING
    assert len(env.market.events) == events_before
    row = await journal_row(env.store, outcome.action_id)
    assert row.state == ActionState.DRY_RUN
    assert row.api_calls == []


async def test_rule_dry_run_sends_nothing(env: Env) -> None:
    vm_count = len(env.market.vms)

    [outcome] = await env.executor().execute(DRY_RULE, [deploy()], await env.snapshot(), env.now)

    assert outcome.status is OutcomeStatus.DRY_RUN
    assert "would deploy test-rule-1" in outcome.message
    assert len(env.market.vms) == vm_count


async def test_deploy_price_cap_blocks(env: Env) -> None:
    [outcome] = await env.executor().execute(
        RULE, [deploy(price_usd_per_hour=0.70)], await env.snapshot(), env.now
    )

    assert outcome.status is OutcomeStatus.BLOCKED
    assert "$0.7000/h is above the rule's cap $0.6000/h" in outcome.message
    assert vms_named(env.market, "test-rule-1") == []
    row = await journal_row(env.store, outcome.action_id)
    assert row.state == ActionState.BLOCKED


async def test_deploy_vm_count_cap_blocks(env: Env) -> None:
    await env.store.add_deployed_vm(RULE.name, env.on_demand.id)

    [outcome] = await env.executor().execute(
        RULE, [deploy(max_vms=1)], await env.snapshot(), env.now
    )

    assert outcome.status is OutcomeStatus.BLOCKED
    assert "1 live or pending VMs" in outcome.message
    assert vms_named(env.market, "test-rule-1") == []


async def test_deploys_in_one_call_counted(env: Env) -> None:
    decisions = [deploy(max_vms=1), deploy(max_vms=1, vm_name="test-rule-2")]

    first, second = await env.executor().execute(RULE, decisions, await env.snapshot(), env.now)

    assert first.status is OutcomeStatus.DONE
    assert second.status is OutcomeStatus.BLOCKED
    assert vms_named(env.market, "test-rule-2") == []


async def test_fleet_ceiling_blocks_deploy(env: Env) -> None:
    # The seeded VMs burn 0.9945 USD/h; a 0.45 USD/h deploy would pass 1.20.
    [outcome] = await env.executor(fleet_max_usd_per_hour=1.20).execute(
        RULE, [deploy()], await env.snapshot(), env.now
    )

    assert outcome.status is OutcomeStatus.BLOCKED
    assert "fleet would cost $1.4445/h" in outcome.message
    assert "ceiling $1.2000/h" in outcome.message
    assert vms_named(env.market, "test-rule-1") == []


async def test_fleet_ceiling_counts_rebid(env: Env) -> None:
    outbid(env)
    snapshot = await env.snapshot()
    burn = guards.current_burn_usd_per_hour(snapshot)

    [outcome] = await env.executor(fleet_max_usd_per_hour=burn + 0.40).execute(
        RULE, [rebid(env.spot.id, 0.45)], snapshot, env.now
    )

    assert outcome.status is OutcomeStatus.BLOCKED
    assert "plus $0.4500/h" in outcome.message
    assert env.market.vms[env.spot.id].status is VmStatus.OUTBID


async def test_unknown_vm_list_blocks(env: Env) -> None:
    snapshot = MarketSnapshot(
        taken_at=env.now,
        hostnodes=None,
        vms=None,
        balance=await env.client.get_balance(),
        errors={"vms": "client/list timed out"},
    )

    [outcome] = await env.executor().execute(RULE, [stop(env.on_demand.id)], snapshot, env.now)

    assert outcome.status is OutcomeStatus.BLOCKED
    assert "VM list failed to load (client/list timed out)" in outcome.message
    assert env.market.vms[env.on_demand.id].status is VmStatus.RUNNING


async def test_missing_balance_blocks_deploy(env: Env) -> None:
    snapshot = replace(await env.snapshot(), balance=None, errors={"balance": "HTTP 502"})

    [outcome] = await env.executor().execute(RULE, [deploy()], snapshot, env.now)

    assert outcome.status is OutcomeStatus.BLOCKED
    assert "balance failed to load (HTTP 502)" in outcome.message


async def test_stale_snapshot_blocks(env: Env) -> None:
    snapshot = await env.snapshot()
    later = env.now + timedelta(minutes=30)

    [outcome] = await env.executor().execute(RULE, [stop(env.on_demand.id)], snapshot, later)

    assert outcome.status is OutcomeStatus.BLOCKED
    assert "1800 s old" in outcome.message
    assert env.market.vms[env.on_demand.id].status is VmStatus.RUNNING


async def test_unlisted_vm_not_stopped(env: Env) -> None:
    [outcome] = await env.executor().execute(
        RULE, [stop("00000000-0000-4000-8000-000000000000")], await env.snapshot(), env.now
    )

    assert outcome.status is OutcomeStatus.BLOCKED
    assert "not in the VM list" in outcome.message


async def test_deploy_awaits_confirmation(env: Env) -> None:
    [outcome] = await env.executor().execute(
        RULE, [deploy(confirm=True)], await env.snapshot(), env.now
    )

    assert outcome.status is OutcomeStatus.AWAITING_CONFIRMATION
    assert outcome.action_id is None
    assert vms_named(env.market, "test-rule-1") == []


async def test_alerts_and_reports_skipped(env: Env) -> None:
    decisions = [
        FireAlert(rule=RULE.name, subject="vm", summary="a"),
        Report(rule=RULE.name, subject="vm", summary="b"),
    ]

    outcomes = await env.executor().execute(RULE, decisions, await env.snapshot(), env.now)

    assert outcomes == []
    assert await env.store.recent_actions() == []


async def test_idle_warning_saved_and_cancelled(env: Env) -> None:
    due = env.now + timedelta(minutes=15)
    warn = WarnIdle(rule=RULE.name, subject=env.on_demand.id, summary="idle", due_at=due)
    cancel = CancelIdleWarning(rule=RULE.name, subject=env.on_demand.id, summary="busy")

    [warned] = await env.executor().execute(RULE, [warn], await env.snapshot(), env.now)
    saved = (await env.store.load_rule_state(RULE.name)).idle_warnings
    [cancelled] = await env.executor().execute(RULE, [cancel], await env.snapshot(), env.now)
    after = (await env.store.load_rule_state(RULE.name)).idle_warnings

    assert warned.status is OutcomeStatus.DONE
    assert saved[env.on_demand.id].due_at == due
    assert saved[env.on_demand.id].warned_at == env.now
    assert cancelled.status is OutcomeStatus.DONE
    assert after == {}


# --- re-bid ------------------------------------------------------------------------------


async def test_rebid_back_to_running(env: Env) -> None:
    outbid(env)

    [outcome] = await env.executor().execute(
        RULE, [rebid(env.spot.id, 0.45)], await env.snapshot(), env.now
    )

    assert outcome.status is OutcomeStatus.DONE
    vm = env.market.vms[env.spot.id]
    assert vm.status is VmStatus.RUNNING
    assert vm.compute_price == 0.45
    row = await journal_row(env.store, outcome.action_id)
    assert row.state == ActionState.VERIFIED
    assert row.api_calls[0]["endpoint"] == "client/spot/validate/existing"
    assert (await env.store.load_rule_state(RULE.name)).ladders == {}


async def test_rebid_too_low_fails(env: Env) -> None:
    outbid(env)

    [outcome] = await env.executor().execute(
        RULE, [rebid(env.spot.id, 0.32, step=2)], await env.snapshot(), env.now
    )

    assert outcome.status is OutcomeStatus.FAILED
    assert "$0.3200/h" in outcome.message
    assert "rejected" in outcome.message
    assert env.market.vms[env.spot.id].status is VmStatus.OUTBID
    ladder = (await env.store.load_rule_state(RULE.name)).ladders[env.spot.id]
    assert ladder.steps_taken == 2
    assert ladder.last_bid_usd == 0.32


async def test_rebid_above_cap_blocked(env: Env) -> None:
    outbid(env)

    [outcome] = await env.executor().execute(
        RULE, [rebid(env.spot.id, 0.45, cap=0.40)], await env.snapshot(), env.now
    )

    assert outcome.status is OutcomeStatus.BLOCKED
    assert "above the rule's cap $0.4000/h" in outcome.message
    assert env.market.vms[env.spot.id].status is VmStatus.OUTBID


# --- deploy ------------------------------------------------------------------------------


async def test_deploy_ok_with_free_ports(env: Env) -> None:
    free_before = list(env.market.hostnodes[HOST_4090].ports)

    [outcome] = await env.executor().execute(RULE, [deploy()], await env.snapshot(), env.now)

    assert outcome.status is OutcomeStatus.DONE
    [vm] = vms_named(env.market, "test-rule-1")
    assert sorted(vm.port_forwards.values()) == [22, 8888]
    assert sorted(vm.port_forwards) == sorted(free_before)[-2:]
    assert vm.vcpus == 8
    assert await env.store.deployed_vm_ids(RULE.name) == frozenset({vm.id})
    row = await journal_row(env.store, outcome.action_id)
    assert row.state == ActionState.VERIFIED
    assert row.vm_id == vm.id
    assert "password" not in str(row.params) + str(row.result) + str(row.api_calls)


async def test_deploy_without_free_ports_fails(env: Env) -> None:
    decision = deploy(hostnode_id=HOST_NO_PORTS, subject=HOST_NO_PORTS, gpu_model=GPU_3090)

    [outcome] = await env.executor().execute(RULE, [decision], await env.snapshot(), env.now)

    assert outcome.status is OutcomeStatus.FAILED
    assert outcome.message.startswith("no free ports")
    row = await journal_row(env.store, outcome.action_id)
    assert [call["endpoint"] for call in row.api_calls] == ["client/deploy/hostnodes"]


async def test_deploy_lost_response_found_by_name(env: Env) -> None:
    env.market.inject_fault("client/deploy/single", FaultMode.DROP_RESPONSE)

    [outcome] = await env.executor().execute(RULE, [deploy()], await env.snapshot(), env.now)

    [vm] = vms_named(env.market, "test-rule-1")
    assert outcome.status is OutcomeStatus.DONE
    assert "response was lost" in outcome.message
    row = await journal_row(env.store, outcome.action_id)
    assert row.state == ActionState.VERIFIED
    assert row.vm_id == vm.id
    assert await env.store.deployed_vm_ids(RULE.name) == frozenset({vm.id})
    deploy_calls = [call for call in row.api_calls if call["endpoint"] == "client/deploy/single"]
    assert len(deploy_calls) == 1


async def test_deploy_lost_response_never_resent(env: Env) -> None:
    # Not carried out and no response: the VM cannot be found, so the outcome stays open.
    env.market.inject_fault("client/deploy/single", FaultMode.HTTP_500)

    [first] = await env.executor().execute(RULE, [deploy()], await env.snapshot(), env.now)
    [second] = await env.executor().execute(RULE, [deploy()], await env.snapshot(), env.now)

    assert first.status is OutcomeStatus.UNKNOWN
    assert "not sent again" in first.message
    assert second.status is OutcomeStatus.BLOCKED
    assert "no settled outcome" in second.message
    assert vms_named(env.market, "test-rule-1") == []
    assert sum(1 for event in env.market.events if event.kind == "deployed") == 3


# --- reconcile ---------------------------------------------------------------------------


async def test_reconcile_after_crash(env: Env) -> None:
    store = env.store
    # A stop that went through before the crash, with its row left in `sent`.
    stop_id = await store.record_intent(RULE.name, ActionKind.STOP, env.on_demand.id, {})
    await store.mark_action(stop_id, ActionState.SENT)
    env.market.stop(env.on_demand.id)
    # A deploy that created its VM, and one whose request never arrived.
    found_id = await store.record_intent(RULE.name, ActionKind.DEPLOY, "test-rule-1", {})
    await store.mark_action(found_id, ActionState.SENT)
    created = env.market.add_vm(hostnode_id=HOST_4090, gpu_model=GPU_4090, name="test-rule-1")
    lost_id = await store.record_intent(RULE.name, ActionKind.DEPLOY, "test-rule-2", {})
    await store.mark_action(lost_id, ActionState.SENT)
    # A re-bid that did not take effect.
    outbid(env)
    rebid_id = await store.record_intent(RULE.name, ActionKind.REBID, env.spot.id, {})
    await store.mark_action(rebid_id, ActionState.SENT)
    vm_count = len(env.market.vms)

    lines = await reconcile(env.client, store)

    assert len(lines) == 4
    assert (await journal_row(store, stop_id)).state == ActionState.VERIFIED
    found = await journal_row(store, found_id)
    assert found.state == ActionState.VERIFIED
    assert found.vm_id == created.id
    assert (await journal_row(store, lost_id)).state == ActionState.UNKNOWN
    assert (await journal_row(store, rebid_id)).state == ActionState.FAILED
    assert len(env.market.vms) == vm_count
    assert await store.deployed_vm_ids(RULE.name) == frozenset({created.id})

    # The lost deploy stays open until its window has passed with no VM of that name.
    env.market.advance(DEPLOY_SETTLE_WINDOW + timedelta(minutes=1))
    await reconcile(env.client, store)

    lost = await journal_row(store, lost_id)
    assert lost.state == ActionState.FAILED
    assert "response lost, not re-sent" in (lost.error or "")
    assert await store.unfinished_actions() == []
    assert len(env.market.vms) == vm_count


async def test_late_deploy_found_by_recheck(env: Env) -> None:
    store = env.store
    action_id = await store.record_intent(RULE.name, ActionKind.DEPLOY, "test-rule-1", {})
    await store.mark_action(action_id, ActionState.SENT)

    first = await reconcile(env.client, store)
    # The slow API carries the deploy out after the first check.
    created = env.market.add_vm(hostnode_id=HOST_4090, gpu_model=GPU_4090, name="test-rule-1")
    env.market.advance(timedelta(minutes=3))
    second = await reconcile(env.client, store, min_age=timedelta(minutes=2))

    assert "stays open" in first[0]
    assert "exists as" in second[0]
    row = await journal_row(store, action_id)
    assert row.state == ActionState.VERIFIED
    assert row.vm_id == created.id
    assert await store.deployed_vm_ids(RULE.name) == frozenset({created.id})


async def test_recheck_skips_fresh_actions(env: Env) -> None:
    action_id = await env.store.record_intent(RULE.name, ActionKind.STOP, env.on_demand.id, {})
    await env.store.mark_action(action_id, ActionState.SENT)

    lines = await reconcile(env.client, env.store, min_age=timedelta(minutes=2))

    assert lines == []
    assert (await journal_row(env.store, action_id)).state == ActionState.SENT


async def test_reconcile_keeps_unreachable_open(env: Env) -> None:
    action_id = await env.store.record_intent(RULE.name, ActionKind.STOP, env.on_demand.id, {})
    await env.store.mark_action(action_id, ActionState.SENT)
    env.market.inject_fault("client/get/single", FaultMode.HTML_502, count=5)

    [line] = await reconcile(env.client, env.store)

    assert "could not be checked" in line
    assert (await journal_row(env.store, action_id)).state == ActionState.SENT


# --- guards without the network ------------------------------------------------------------


def _snapshot_with(vms: dict[str, VirtualMachine], hourly_cost: float) -> MarketSnapshot:
    balance = Balance(balance=100.0, hourly_cost=hourly_cost)
    return MarketSnapshot(
        taken_at=datetime.now().astimezone(), hostnodes=None, vms=vms, balance=balance
    )


def test_fleet_ceiling_allows_exact_total() -> None:
    assert guards.check_fleet_ceiling(1.0, 0.5, 1.5) is None


def test_fleet_ceiling_rejects_above() -> None:
    reason = guards.check_fleet_ceiling(1.0, 0.6, 1.5)

    assert reason is not None
    assert "$1.6000/h" in reason


def test_burn_uses_larger_figure() -> None:
    vm = VirtualMachine(id="a", status="Running", total_price=0.5)

    assert guards.current_burn_usd_per_hour(_snapshot_with({"a": vm}, 0.2)) == 0.5
    assert guards.current_burn_usd_per_hour(_snapshot_with({"a": vm}, 0.9)) == 0.9


def test_rebid_cost_of_running_vm() -> None:
    vm = VirtualMachine(id="a", status="Running", type="spot", compute_price=0.3)
    decision = rebid("a", 0.45)

    added = guards.added_cost_usd_per_hour(decision, _snapshot_with({"a": vm}, 0.3))

    assert added == pytest.approx(0.15)


def test_deploy_caps_limits() -> None:
    assert guards.check_deploy_caps(deploy(), live_vm_count=1) is None
    assert guards.check_deploy_caps(deploy(), live_vm_count=2) is not None
    assert guards.check_deploy_caps(deploy(price_usd_per_hour=0.61), live_vm_count=0) is not None


def test_deploy_name_taken_blocks() -> None:
    vm = VirtualMachine(id="a", name="test-rule-1", status="Stopped")

    reason = guards.check_deploy_name_free(deploy(), _snapshot_with({"a": vm}, 0.0), [])

    assert reason == "a VM named test-rule-1 already exists (a)"


def test_pick_ports_highest_first() -> None:
    assert pick_ports([20001, 20005, 20003], 2) == [20005, 20003]
    assert pick_ports([20001], 2) is None
    assert pick_ports([], 1) is None
