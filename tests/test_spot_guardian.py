"""Spot guardian over the simulator's auction: the re-bid ladder, its limits and the
redeploy fallback, evaluated and carried out by the executor against 127.0.0.1."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from tdbot.actions import ActionExecutor, OutcomeStatus
from tdbot.actions.outcome import ActionOutcome
from tdbot.evaluation import evaluate
from tdbot.evaluation.model import Decision, Deploy, FireAlert, MarketSnapshot, Rebid
from tdbot.evaluation.pricing import rank_hostnodes
from tdbot.evaluation.spot import redeploy_spec
from tdbot.rules.schema import CheapestHostnodeRule, SpotRebidRule
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
from tdbot.store.tables import ActionKind, ActionState
from tdbot.tensordock.client import TensorDockClient
from tdbot.tensordock.models import VmStatus

GPU_3090 = "geforcertx3090-pcie-24gb"
# With this spot price per GPU, the 2x 3090 spot VM needs a bid of 0.408 USD/h.
OUTBID_SPOT_PRICE = 0.16


@dataclass
class Guardian:
    market: SimulatedMarket
    client: TensorDockClient
    store: Store
    spot: SimVm  # whisper-2x3090, outbid at a bid of 0.30
    fleet_max_usd_per_hour: float = 50.0

    async def snapshot(self) -> MarketSnapshot:
        return MarketSnapshot(
            taken_at=self.market.now(),
            hostnodes=await self.client.list_hostnodes(),
            vms=await self.client.list_vms(),
            balance=await self.client.get_balance(),
        )

    async def tick(self, rule: SpotRebidRule) -> tuple[list[Decision], list[ActionOutcome]]:
        """Evaluate the rule on fresh data and carry out its decisions, as the daemon does."""
        snapshot = await self.snapshot()
        now = self.market.now()
        state = await self.store.load_rule_state(rule.name)
        decisions = evaluate(rule, snapshot, state, now)
        executor = ActionExecutor(
            self.client,
            self.store,
            dry_run=False,
            fleet_max_usd_per_hour=self.fleet_max_usd_per_hour,
            verify_attempts=2,
            verify_interval_seconds=0.01,
        )
        return decisions, await executor.execute(rule, decisions, snapshot, now)

    async def rebid_rows(self, rule: SpotRebidRule) -> list[Any]:
        rows = await self.store.recent_actions(rule=rule.name, limit=100)
        return [row for row in rows if row.kind == ActionKind.REBID]

    def vms_named(self, name: str) -> list[SimVm]:
        return [vm for vm in self.market.vms.values() if vm.name == name]


@pytest.fixture
async def guardian(tmp_path: Path) -> AsyncIterator[Guardian]:
    market = make_test_market()
    _on_demand, spot, _stopped = market.seed_example_vms()
    market.set_spot_price(spot.hostnode_id, GPU_3090, OUTBID_SPOT_PRICE)
    assert market.vms[spot.id].status is VmStatus.OUTBID
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
            yield Guardian(market, client, store, spot)
        finally:
            await store.close()
            await client.aclose()


def make_rule(**changes: Any) -> SpotRebidRule:
    fields: dict[str, Any] = {
        "name": "guard-spot",
        "kind": "spot_rebid",
        "every": "10m",
        "bid": {"step_usd": 0.05, "max_usd_per_hour": 0.6, "max_steps": 5},
    }
    bid = changes.pop("bid", {})
    fields.update(changes)
    fields["bid"] = {**fields["bid"], **bid}
    return SpotRebidRule.model_validate(fields)


def redeploy_rule(*, confirm: bool = False) -> SpotRebidRule:
    return make_rule(
        bid={"max_usd_per_hour": 0.35},
        on_exhausted="redeploy",
        redeploy_max_usd_per_hour=5.0,
        redeploy_confirm=confirm,
    )


async def test_rejected_steps_then_won(guardian: Guardian) -> None:
    rule = make_rule()
    statuses: list[OutcomeStatus] = []
    for _ in range(3):
        _decisions, outcomes = await guardian.tick(rule)
        statuses.extend(outcome.status for outcome in outcomes)

    # 0.35 and 0.40 are below the 0.408 minimum, so 0.45 is the first to win.
    assert statuses == [OutcomeStatus.FAILED, OutcomeStatus.FAILED, OutcomeStatus.DONE]
    vm = guardian.market.vms[guardian.spot.id]
    assert vm.status is VmStatus.RUNNING
    assert vm.compute_price == pytest.approx(0.45)
    bids = [row.params["bid_usd_per_hour"] for row in await guardian.rebid_rows(rule)]
    assert sorted(bids) == [0.35, 0.4, 0.45]
    assert (await guardian.store.load_rule_state(rule.name)).ladders == {}


async def test_cap_reached_alerts_exhausted(guardian: Guardian) -> None:
    rule = make_rule(bid={"max_usd_per_hour": 0.4})
    for _ in range(2):
        await guardian.tick(rule)

    decisions, outcomes = await guardian.tick(rule)

    [alert] = decisions
    assert isinstance(alert, FireAlert)
    assert alert.evidence["exhausted"] is True
    assert "storage still costs" in alert.summary
    assert outcomes == []
    assert guardian.market.vms[guardian.spot.id].status is VmStatus.OUTBID


async def test_fleet_ceiling_blocks_rebid(guardian: Guardian) -> None:
    guardian.fleet_max_usd_per_hour = 0.1
    rule = make_rule(bid={"start_usd_per_hour": 0.45})

    _decisions, [outcome] = await guardian.tick(rule)

    assert outcome.status is OutcomeStatus.BLOCKED
    assert "fleet ceiling" in outcome.message
    assert guardian.market.vms[guardian.spot.id].status is VmStatus.OUTBID
    assert guardian.market.vms[guardian.spot.id].compute_price == pytest.approx(0.30)


async def test_start_bid_wins_first_step(guardian: Guardian) -> None:
    rule = make_rule(bid={"start_usd_per_hour": 0.45})

    _decisions, [outcome] = await guardian.tick(rule)

    assert outcome.status is OutcomeStatus.DONE
    assert guardian.market.vms[guardian.spot.id].compute_price == pytest.approx(0.45)


async def test_step_limit_per_hour(guardian: Guardian) -> None:
    rule = make_rule(bid={"step_usd": 0.01, "max_steps": 20, "max_steps_per_hour": 2})
    for _ in range(6):
        await guardian.tick(rule)
        guardian.market.advance(timedelta(minutes=10))

    assert len(await guardian.rebid_rows(rule)) == 2

    guardian.market.advance(timedelta(minutes=5))
    _decisions, [outcome] = await guardian.tick(rule)
    assert isinstance(outcome.decision, Rebid)
    assert outcome.decision.step == 3


async def test_not_running_after_bid_fails(
    guardian: Guardian, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Another bidder takes the GPUs right after the bid was accepted.
    market = guardian.market
    accept = market.validate_spot_existing

    def accept_then_outbid(vm_id: str, bid: float) -> None:
        accept(vm_id, bid)
        market.set_spot_price(guardian.spot.hostnode_id, GPU_3090, 1.0)

    monkeypatch.setattr(market, "validate_spot_existing", accept_then_outbid)
    rule = make_rule(bid={"start_usd_per_hour": 0.45})

    _decisions, [outcome] = await guardian.tick(rule)

    assert outcome.status is OutcomeStatus.FAILED
    assert "accepted, but" in outcome.message
    [row] = await guardian.rebid_rows(rule)
    assert row.state == ActionState.FAILED
    ladder = (await guardian.store.load_rule_state(rule.name)).ladders[guardian.spot.id]
    assert ladder.steps_taken == 1


async def test_redeploy_on_cheapest_once(guardian: Guardian) -> None:
    rule = redeploy_rule()
    await guardian.tick(rule)  # 0.35 is rejected, and the ladder is at its cap
    snapshot = await guardian.snapshot()
    spec = redeploy_spec(snapshot.vms[guardian.spot.id])  # type: ignore[index]
    assert spec is not None
    cheapest = rank_hostnodes(snapshot.hostnodes or {}, spec)[0]

    decisions, outcomes = await guardian.tick(rule)

    deploy = next(decision for decision in decisions if isinstance(decision, Deploy))
    assert deploy.hostnode_id == cheapest.hostnode_id
    assert deploy.price_usd_per_hour <= 5.0
    [outcome] = outcomes
    assert outcome.status is OutcomeStatus.DONE, outcome.message
    [replacement] = guardian.vms_named("whisper-2x3090-redeploy")
    assert replacement.hostnode_id == cheapest.hostnode_id
    assert not replacement.is_spot
    assert guardian.market.vms[guardian.spot.id].status is VmStatus.OUTBID

    for _ in range(2):
        decisions, outcomes = await guardian.tick(rule)
        assert not any(isinstance(decision, Deploy) for decision in decisions)
    assert len(guardian.vms_named("whisper-2x3090-redeploy")) == 1


async def test_redeploy_lost_response_once(guardian: Guardian) -> None:
    rule = redeploy_rule()
    await guardian.tick(rule)
    guardian.market.inject_fault("client/deploy/single", FaultMode.DROP_RESPONSE)

    _decisions, [outcome] = await guardian.tick(rule)
    for _ in range(2):
        await guardian.tick(rule)

    assert outcome.status is OutcomeStatus.DONE, outcome.message
    assert "response was lost" in outcome.message
    assert len(guardian.vms_named("whisper-2x3090-redeploy")) == 1


async def test_redeploy_awaits_confirmation(guardian: Guardian) -> None:
    rule = redeploy_rule(confirm=True)
    await guardian.tick(rule)

    _decisions, [outcome] = await guardian.tick(rule)

    assert outcome.status is OutcomeStatus.AWAITING_CONFIRMATION
    assert guardian.vms_named("whisper-2x3090-redeploy") == []


# --- deploy options ------------------------------------------------------------------


async def test_deploy_sends_cloudinit_script(guardian: Guardian) -> None:
    script = "#cloud-config\nruncmd:\n  - echo ready > /tmp/ready\n"
    rule = CheapestHostnodeRule.model_validate(
        {
            "name": "cheap-3090",
            "kind": "cheapest_hostnode",
            "every": "10m",
            "match": {"gpu": [GPU_3090], "vcpus": 4, "ram_gb": 16, "storage_gb": 40},
            "deploy": {
                "enabled": True,
                "max_usd_per_hour": 5.0,
                "confirm": False,
                "cloudinit_script": script,
            },
        }
    )
    snapshot = await guardian.snapshot()
    now = guardian.market.now()
    state = await guardian.store.load_rule_state(rule.name)
    decisions = evaluate(rule, snapshot, state, now)
    deploy = next(decision for decision in decisions if isinstance(decision, Deploy))
    executor = ActionExecutor(
        guardian.client,
        guardian.store,
        dry_run=False,
        fleet_max_usd_per_hour=50.0,
        verify_attempts=2,
        verify_interval_seconds=0.01,
    )

    [outcome] = await executor.execute(rule, [deploy], snapshot, now)

    assert outcome.status is OutcomeStatus.DONE, outcome.message
    [vm] = guardian.vms_named(deploy.vm_name)
    # The form carries the script with escaped line breaks, as the API expects.
    assert vm.cloudinit_script == script.replace("\n", "\\n")
    row = await guardian.store.get_action(outcome.action_id or 0)
    assert row is not None
    assert row.params["cloudinit_script"] is True
