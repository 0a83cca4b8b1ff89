"""Spot bid search and spot deploys: the real client against the simulator on 127.0.0.1.

The simulator accepts a spot bid at or above the GPU clearing price times the GPU
count plus the on-demand vCPU and RAM prices. A test that sets the clearing price with
`set_spot_price` can therefore compute the lowest bid the hostnode accepts.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from tdbot.actions import ActionExecutor, OutcomeStatus
from tdbot.actions.guards import added_cost_usd_per_hour, check_deploy_caps
from tdbot.actions.spot_bids import (
    VALIDATE_ENDPOINT,
    SpotCheck,
    SpotQuote,
    accepted_by_total,
    lowest_spot_bid,
    quote_spot_offers,
    spot_check_notes,
)
from tdbot.alerts.manager import AlertManager
from tdbot.daemon.engine import RuleEngine
from tdbot.daemon.snapshot import SnapshotProvider
from tdbot.evaluation.cheapest import evaluate_cheapest, spot_bid_ceiling
from tdbot.evaluation.model import Deploy, MarketSnapshot, Report, RuleState, Severity
from tdbot.evaluation.pricing import Offer, PriceBreakdown, make_offer, rank_hostnodes
from tdbot.rules.schema import CheapestHostnodeRule, HostnodeSpec
from tdbot.simulator.faults import FaultMode
from tdbot.simulator.market import SimulatedMarket
from tdbot.simulator.testing import (
    TEST_API_KEY,
    TEST_API_TOKEN,
    TEST_START,
    make_test_market,
    running_simulator,
)
from tdbot.store.db import Store
from tdbot.store.tables import ActionRecord, ActionState, AlertState
from tdbot.tensordock.client import SpotValidation, TensorDockClient
from tdbot.tensordock.errors import AuthenticationError
from tdbot.tensordock.models import VmStatus
from tests.alerting import RecordingNotifier

GPU_4090 = "geforcertx4090-pcie-24gb"
# United States, 4090 at $0.37, vCPU $0.003, RAM $0.002/GB, storage $0.00005/GB.
HOST_US = "0b60f80c-e16a-4cda-a8cd-dbc01cc0512c"
# The two 4090 hostnodes cheaper on demand: Tokyo at $0.423/h and Eygelshoven at $0.459/h.
HOST_JP = "58ab3969-87c2-4228-a9ca-0c9fe191f0ef"
HOST_NL = "b9ee75b9-b341-4482-a250-86597475ffae"
SPEC = HostnodeSpec(gpu=[GPU_4090], vcpus=8, ram_gb=32, storage_gb=100)
# On HOST_US, SPEC's compute costs 0.37 + 8 x 0.003 + 32 x 0.002 on demand.
COMPUTE_US = 0.458
STORAGE_US = 0.005
VCPU_AND_RAM_US = 0.088
SSH_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAItest test@example"


@dataclass
class Env:
    market: SimulatedMarket
    client: TensorDockClient
    store: Store
    api_url: str

    async def offer(self, hostnode_id: str = HOST_US, spec: HostnodeSpec = SPEC) -> Offer:
        hostnode = await self.client.get_hostnode(hostnode_id)
        offer = make_offer(hostnode, GPU_4090, spec)
        assert offer is not None
        return offer

    async def bid(self, **options: Any) -> tuple[SpotQuote | None, list[tuple[float, bool]]]:
        """Find the lowest bid on the US offer, returning it and each (bid, accepted) probe."""
        probes: list[tuple[float, bool]] = []
        quote = await lowest_spot_bid(
            self.client,
            await self.offer(),
            on_probe=lambda bid, accepted: probes.append((bid, accepted)),
            **options,
        )
        return quote, probes

    async def snapshot(self) -> MarketSnapshot:
        return MarketSnapshot(
            taken_at=self.market.now(),
            hostnodes=await self.client.list_hostnodes(),
            vms=await self.client.list_vms(),
            balance=await self.client.get_balance(),
        )

    def executor(self, fleet_max_usd_per_hour: float = 50.0) -> ActionExecutor:
        return ActionExecutor(
            self.client,
            self.store,
            dry_run=False,
            fleet_max_usd_per_hour=fleet_max_usd_per_hour,
            verify_attempts=3,
            verify_interval_seconds=0.01,
        )


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    market = make_test_market()
    async with running_simulator(market) as server:
        client = TensorDockClient(
            TEST_API_KEY,
            TEST_API_TOKEN,
            base_url=server.api_url,
            timeout_seconds=5.0,
            read_retries=0,
        )
        store = await Store.open(tmp_path / "tdbot.db", clock=market.clock.now)
        try:
            yield Env(market, client, store, server.api_url)
        finally:
            await store.close()
            await client.aclose()


def set_minimum_bid(market: SimulatedMarket, gpu_usd_per_hour: float) -> float:
    """Set the 4090 clearing price on HOST_US and return the lowest bid SPEC gets there."""
    market.set_spot_price(HOST_US, GPU_4090, gpu_usd_per_hour)
    return round(gpu_usd_per_hour + VCPU_AND_RAM_US, 6)


def spot_rule(max_usd_per_hour: float, countries: list[str] | None = None) -> CheapestHostnodeRule:
    return CheapestHostnodeRule.model_validate(
        {
            "name": "spot-4090",
            "kind": "cheapest_hostnode",
            "every": "10m",
            "match": {
                "gpu": [GPU_4090],
                "vcpus": 8,
                "ram_gb": 32,
                "storage_gb": 100,
                "countries": ["United States"] if countries is None else countries,
                "spot": True,
            },
            "deploy": {
                "enabled": True,
                "max_usd_per_hour": max_usd_per_hour,
                "confirm": False,
                "ssh_public_key": SSH_KEY,
            },
        }
    )


async def spot_deploy(env: Env, rule: CheapestHostnodeRule) -> tuple[Deploy, MarketSnapshot]:
    snapshot = await env.snapshot()
    decisions = evaluate_cheapest(rule, snapshot, RuleState(), env.market.now())
    deploys = [decision for decision in decisions if isinstance(decision, Deploy)]
    assert len(deploys) == 1, decisions
    return deploys[0], snapshot


# --- bid ceiling -----------------------------------------------------------------------


def test_ceiling_is_on_demand_compute() -> None:
    price = PriceBreakdown(gpu_usd=0.37, cpu_usd=0.024, ram_usd=0.064, storage_usd=0.005)

    assert spot_bid_ceiling(price, None) == COMPUTE_US
    assert spot_bid_ceiling(price, 1.0) == COMPUTE_US


def test_ceiling_leaves_room_for_storage() -> None:
    price = PriceBreakdown(gpu_usd=0.37, cpu_usd=0.024, ram_usd=0.064, storage_usd=0.005)

    assert spot_bid_ceiling(price, 0.3) == 0.295
    assert spot_bid_ceiling(price, 0.005) == 0.0
    assert spot_bid_ceiling(price, 0.001) == 0.0


# --- lowest_spot_bid -------------------------------------------------------------------


async def test_bisection_finds_clearing_bid(env: Env) -> None:
    minimum = set_minimum_bid(env.market, 0.15)
    quote, probes = await env.bid(
        ceiling_usd_per_hour=None, bisection_probes=40, precision_usd=0.0001
    )

    assert quote is not None
    assert minimum <= quote.bid_usd_per_hour < minimum + 0.0001
    assert probes[0] == (COMPUTE_US, True)
    assert (quote.bid_usd_per_hour, True) in probes
    assert quote.probes == len(probes)
    assert quote.storage_usd_per_hour == pytest.approx(STORAGE_US)
    assert quote.total_usd_per_hour == round(quote.bid_usd_per_hour + STORAGE_US, 6)


async def test_default_bisection_bounded(env: Env) -> None:
    minimum = set_minimum_bid(env.market, 0.15)
    offer = await env.offer()

    quote = await lowest_spot_bid(env.client, offer, ceiling_usd_per_hour=None)

    assert quote is not None
    # Six halvings of the interval from 0 to the ceiling.
    assert minimum <= quote.bid_usd_per_hour <= minimum + COMPUTE_US / 64
    assert quote.probes == 7


async def test_bisection_stops_at_probe_bound(env: Env) -> None:
    set_minimum_bid(env.market, 0.15)
    quote, probes = await env.bid(ceiling_usd_per_hour=None, bisection_probes=2)

    assert quote is not None
    assert quote.probes == 3
    assert len(probes) == 3
    # 0.458 accepted, 0.229 rejected (minimum 0.238), 0.3435 accepted.
    assert probes == [(0.458, True), (0.229, False), (0.3435, True)]
    assert quote.bid_usd_per_hour == 0.3435


async def test_bisection_stops_at_precision(env: Env) -> None:
    set_minimum_bid(env.market, 0.15)
    offer = await env.offer()

    quote = await lowest_spot_bid(
        env.client, offer, ceiling_usd_per_hour=None, bisection_probes=50, precision_usd=0.05
    )

    assert quote is not None
    # 0.458 / 2**4 is the first interval under 0.05, so four probes follow the first.
    assert quote.probes == 5


async def test_rejected_at_ceiling(env: Env) -> None:
    set_minimum_bid(env.market, 0.40)
    quote, probes = await env.bid(ceiling_usd_per_hour=None)

    assert quote is None
    assert probes == [(COMPUTE_US, False)]


async def test_cap_lowers_first_probe(env: Env) -> None:
    minimum = set_minimum_bid(env.market, 0.15)
    quote, probes = await env.bid(ceiling_usd_per_hour=0.30)

    assert quote is not None
    assert probes[0] == (0.295, True)
    assert minimum <= quote.bid_usd_per_hour <= 0.295
    assert quote.total_usd_per_hour <= 0.30


async def test_storage_over_cap_not_probed(env: Env) -> None:
    quote, probes = await env.bid(ceiling_usd_per_hour=0.004)

    assert quote is None
    assert probes == []


# --- quote_spot_offers -----------------------------------------------------------------


class CountingClient(TensorDockClient):
    """The real client, counting validation calls sent, and those in flight at the same time."""

    calls = 0
    in_flight = 0
    max_in_flight = 0

    async def validate_spot_new(self, **fields: Any) -> SpotValidation:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            # A short pause lets the other checks start while this call is open.
            await asyncio.sleep(0.01)
            self.calls += 1
            return await super().validate_spot_new(**fields)
        finally:
            self.in_flight -= 1


async def test_quotes_bounded_concurrency(env: Env) -> None:
    spec = SPEC.model_copy(update={"gpu": ["a100", "4090", "3090", "a6000", "l40s"]})
    offers = rank_hostnodes(await env.client.list_hostnodes(), spec)[:8]
    client = CountingClient(TEST_API_KEY, TEST_API_TOKEN, base_url=env.api_url)
    async with client:
        checks = await quote_spot_offers(client, offers, ceiling_usd_per_hour=None, concurrency=3)

    assert len(offers) == 8
    assert [check.offer for check in checks] == offers
    assert client.max_in_flight == 3
    assert all(check.quote is not None for check in checks)


async def test_quote_error_marks_unchecked(env: Env) -> None:
    offers = rank_hostnodes(await env.client.list_hostnodes(), SPEC)[:2]
    env.market.inject_fault(VALIDATE_ENDPOINT, FaultMode.HTTP_500)

    checks = await quote_spot_offers(env.client, offers, ceiling_usd_per_hour=None, concurrency=1)

    assert checks[0].quote is None
    assert checks[0].error is not None
    assert "client/spot/validate/new" in checks[0].error
    assert not checks[0].rejected
    assert checks[1].quote is not None


async def test_quote_auth_error_stops_search(env: Env) -> None:
    offers = rank_hostnodes(await env.client.list_hostnodes(), SPEC)
    client = CountingClient(TEST_API_KEY, "wrong-token-7d3e9b84", base_url=env.api_url)

    async with client:
        with pytest.raises(AuthenticationError) as caught:
            await quote_spot_offers(client, offers, ceiling_usd_per_hour=None, concurrency=2)

    assert len(offers) > 2
    assert caught.value.status_code == 401
    # The first 401 cancels the checks in flight, so no offer past the first two is sent.
    assert 1 <= client.calls <= 2


async def test_notes_all_offers_checked(env: Env) -> None:
    offers = rank_hostnodes(await env.client.list_hostnodes(), SPEC)

    checks = await quote_spot_offers(env.client, offers, ceiling_usd_per_hour=None)
    notes = spot_check_notes(checks, None, check_limit=len(checks) + 1)

    assert notes == [f"All {len(checks)} offers that can host the spec were checked for spot bids."]


async def test_notes_unchecked_not_all_checked(env: Env) -> None:
    offers = rank_hostnodes(await env.client.list_hostnodes(), SPEC)
    env.market.inject_fault(VALIDATE_ENDPOINT, FaultMode.HTTP_500)

    checks = await quote_spot_offers(env.client, offers, ceiling_usd_per_hour=None, concurrency=1)
    notes = spot_check_notes(checks, None, check_limit=len(checks) + 1)

    assert not [note for note in notes if note.startswith("All ")]
    assert notes[0] == (
        f"Of the {len(checks)} offers that can host the spec, {len(checks) - 1} were checked "
        "for spot bids and 1 could not be checked."
    )
    assert notes[1].startswith(f"Not checked: {offers[0].hostnode_id} ({GPU_4090}): ")


async def test_notes_none_checked(env: Env) -> None:
    offers = rank_hostnodes(await env.client.list_hostnodes(), SPEC)[:2]
    env.market.inject_fault(VALIDATE_ENDPOINT, FaultMode.HTTP_500, count=2)

    checks = await quote_spot_offers(env.client, offers, ceiling_usd_per_hour=None, concurrency=1)
    notes = spot_check_notes(checks, 0.5, check_limit=2)

    # No validation call succeeded, so no note may claim that a hostnode rejected a bid.
    assert not [note for note in notes if "accepted" in note]
    assert notes[0] == (
        "Of the 2 cheapest on-demand offers, 0 were checked for spot bids and 2 could not "
        "be checked."
    )
    assert len(notes) == 3


def test_notes_without_offers() -> None:
    assert spot_check_notes([], 0.5, check_limit=10) == [
        "No offer can host the spec, so no spot bid was checked."
    ]


async def test_rejected_offer_dropped(env: Env) -> None:
    set_minimum_bid(env.market, 0.40)
    offers = rank_hostnodes(await env.client.list_hostnodes(), SPEC)

    checks = await quote_spot_offers(env.client, offers, ceiling_usd_per_hour=None)
    accepted = accepted_by_total(checks)

    rejected = [check for check in checks if check.rejected]
    assert [check.offer.hostnode_id for check in rejected] == [HOST_US]
    assert HOST_US not in {check.offer.hostnode_id for check in accepted}
    totals = [check.quote.total_usd_per_hour for check in accepted if check.quote]
    assert totals == sorted(totals)
    assert all(isinstance(check, SpotCheck) for check in accepted)


async def test_notes_count_each_outcome(env: Env) -> None:
    set_minimum_bid(env.market, 0.40)
    offers = rank_hostnodes(await env.client.list_hostnodes(), SPEC)
    env.market.inject_fault(VALIDATE_ENDPOINT, FaultMode.HTTP_500)

    # The first validation call fails, and the hostnode in the United States rejects
    # every bid under the minimum.
    checks = await quote_spot_offers(env.client, offers, ceiling_usd_per_hour=None, concurrency=1)
    # A cap under the storage price leaves no room for any bid.
    checks += await quote_spot_offers(env.client, offers[:1], ceiling_usd_per_hour=0.001)
    notes = spot_check_notes(checks, 0.5, check_limit=len(checks))

    assert notes[0] == (
        f"Of the {len(checks)} cheapest on-demand offers, {len(checks) - 1} were checked "
        "for spot bids and 1 could not be checked."
    )
    assert "1 of them rejected every bid up to the on-demand compute price" in notes[1]
    assert "or $0.5000/h minus storage, if lower" in notes[1]
    assert notes[2] == "1 of them cost more in storage alone than the cap."
    assert notes[3].startswith(f"Not checked: {offers[0].hostnode_id} ")


# --- spot deploys ----------------------------------------------------------------------


async def test_spot_rule_decides_spot_deploy(env: Env) -> None:
    decision, _ = await spot_deploy(env, spot_rule(0.50))

    assert decision.spot is True
    assert decision.hostnode_id == HOST_US
    assert decision.price_usd_per_hour == 0.463
    assert decision.evidence["max_bid_usd_per_hour"] == COMPUTE_US
    assert "as a spot VM, bid up to $0.4580/h" in decision.summary


async def test_spot_deploy_at_lowest_bid(env: Env) -> None:
    minimum = set_minimum_bid(env.market, 0.15)
    rule = spot_rule(0.50)
    decision, snapshot = await spot_deploy(env, rule)

    [outcome] = await env.executor().execute(rule, [decision], snapshot, env.market.now())

    assert outcome.status is OutcomeStatus.DONE, outcome.message
    [vm] = [vm for vm in env.market.vms.values() if vm.name == decision.vm_name]
    assert vm.is_spot
    assert vm.status is VmStatus.RUNNING
    assert minimum <= vm.compute_price <= minimum + COMPUTE_US / 64
    assert f"(spot, bid ${vm.compute_price:.4f}/h)" in outcome.message
    assert outcome.action_id is not None
    row = await env.store.get_action(outcome.action_id)
    assert row is not None
    assert row.state == ActionState.VERIFIED
    assert row.result is not None
    assert row.result["spot_bid_usd_per_hour"] == vm.compute_price
    endpoints = [call["endpoint"] for call in row.api_calls]
    assert endpoints.count(VALIDATE_ENDPOINT) == 7
    assert endpoints.index(VALIDATE_ENDPOINT) < endpoints.index("client/deploy/single")


async def test_spot_deploy_rejected_blocked(env: Env) -> None:
    set_minimum_bid(env.market, 0.40)
    rule = spot_rule(0.50)
    decision, snapshot = await spot_deploy(env, rule)
    vms_before = len(env.market.vms)

    [outcome] = await env.executor().execute(rule, [decision], snapshot, env.market.now())

    # Only one hostnode in the United States can host the spec, so there is no fallback.
    assert decision.fallback_hostnode_ids == ()
    assert outcome.status is OutcomeStatus.BLOCKED
    assert outcome.message == (
        f"no hostnode accepted a spot bid up to $0.4630/h with storage (tried {HOST_US}); "
        "will try again"
    )
    assert len(env.market.vms) == vms_before
    assert outcome.action_id is not None
    row = await env.store.get_action(outcome.action_id)
    assert row is not None
    assert row.state == ActionState.BLOCKED
    assert row.error == outcome.message
    assert row.result == {
        "skipped_hostnodes": {HOST_US: f"hostnode {HOST_US} rejected spot bids up to $0.4580/h"}
    }
    assert [call["endpoint"] for call in row.api_calls].count(VALIDATE_ENDPOINT) == 1


async def test_spot_deploy_validation_error_fails(env: Env) -> None:
    rule = spot_rule(0.50)
    decision, snapshot = await spot_deploy(env, rule)
    env.market.inject_fault(VALIDATE_ENDPOINT, FaultMode.HTTP_500)

    [outcome] = await env.executor().execute(rule, [decision], snapshot, env.market.now())

    assert outcome.status is OutcomeStatus.FAILED
    assert outcome.message.startswith(f"spot bids on hostnode {HOST_US} could not be checked")
    assert outcome.message.endswith("nothing was deployed")
    assert not [vm for vm in env.market.vms.values() if vm.name == decision.vm_name]


async def test_spot_deploy_cap_under_on_demand(env: Env) -> None:
    # The lowest bid is 0.238, so bid plus storage fits a cap far under the on-demand 0.463.
    minimum = set_minimum_bid(env.market, 0.15)
    rule = spot_rule(0.30)
    decision, snapshot = await spot_deploy(env, rule)

    [outcome] = await env.executor().execute(rule, [decision], snapshot, env.market.now())

    assert decision.price_usd_per_hour == 0.463
    assert decision.evidence["max_bid_usd_per_hour"] == 0.295
    assert "bid up to $0.2950/h" in decision.summary
    assert outcome.status is OutcomeStatus.DONE, outcome.message
    [vm] = [vm for vm in env.market.vms.values() if vm.name == decision.vm_name]
    assert vm.is_spot
    assert minimum <= vm.compute_price <= 0.295
    assert vm.compute_price + STORAGE_US <= 0.30


async def test_spot_deploy_under_cap_rejected(env: Env) -> None:
    set_minimum_bid(env.market, 0.30)
    rule = spot_rule(0.30)
    decision, snapshot = await spot_deploy(env, rule)

    [outcome] = await env.executor().execute(rule, [decision], snapshot, env.market.now())

    assert outcome.status is OutcomeStatus.BLOCKED
    assert outcome.message == (
        f"no hostnode accepted a spot bid up to $0.3000/h with storage (tried {HOST_US}); "
        "will try again"
    )
    assert outcome.action_id is not None
    row = await env.store.get_action(outcome.action_id)
    assert row is not None
    assert row.result is not None
    assert row.result["skipped_hostnodes"] == {
        HOST_US: f"hostnode {HOST_US} rejected spot bids up to $0.2950/h"
    }
    # The probe at the ceiling is rejected, so no bisection follows.
    assert [call["endpoint"] for call in row.api_calls].count(VALIDATE_ENDPOINT) == 1


async def test_spot_storage_over_cap_reports(env: Env) -> None:
    rule = spot_rule(0.004)
    snapshot = await env.snapshot()

    decisions = evaluate_cheapest(rule, snapshot, RuleState(), env.market.now())

    assert not [decision for decision in decisions if isinstance(decision, Deploy)]
    [report] = [decision for decision in decisions if isinstance(decision, Report)]
    assert report.subject == "deploy"
    assert report.evidence["reason"] == "storage_over_cap"
    assert report.evidence["min_storage_usd_per_hour"] == STORAGE_US
    assert "which leaves no room for a spot bid under the cap $0.0040/h" in report.summary


async def test_storage_report_quiet_at_vm_limit(env: Env) -> None:
    rule = spot_rule(0.004)
    state = RuleState(deployed_vm_ids=frozenset({"vm-1"}))
    snapshot = await env.snapshot()

    decisions = evaluate_cheapest(rule, snapshot, state, env.market.now())

    assert rule.deploy is not None
    assert rule.deploy.max_vms == 1
    assert not [decision for decision in decisions if isinstance(decision, Report | Deploy)]


async def test_spot_deploy_skips_storage_over_cap(env: Env) -> None:
    # Tokyo stays the cheapest on demand ($0.418/h compute + $0.035/h storage), but its
    # storage alone is above the cap, so the spot deploy goes to the Dutch hostnode.
    env.market.hostnode(HOST_JP).storage_price = 0.00035
    rule = spot_rule(0.03, countries=[])
    snapshot = await env.snapshot()

    decisions = evaluate_cheapest(rule, snapshot, RuleState(), env.market.now())

    ranking = rank_hostnodes(snapshot.hostnodes or {}, rule.match)
    assert ranking[0].hostnode_id == HOST_JP
    [deploy] = [decision for decision in decisions if isinstance(decision, Deploy)]
    assert deploy.hostnode_id == HOST_NL
    assert deploy.evidence["max_bid_usd_per_hour"] == 0.025


def test_spot_cost_counted_at_cap() -> None:
    decision = Deploy(
        rule="spot-4090",
        subject=HOST_US,
        summary="",
        price_usd_per_hour=0.463,
        max_usd_per_hour=0.30,
        spot=True,
    )
    on_demand = Deploy(
        rule="cheapest-4090",
        subject=HOST_US,
        summary="",
        price_usd_per_hour=0.463,
        max_usd_per_hour=0.30,
    )
    empty = MarketSnapshot(taken_at=TEST_START, hostnodes={}, vms={}, balance=None)

    assert added_cost_usd_per_hour(decision, empty) == 0.30
    assert check_deploy_caps(decision, live_vm_count=0) is None
    assert added_cost_usd_per_hour(on_demand, empty) == 0.463
    assert check_deploy_caps(on_demand, live_vm_count=0) is not None


def test_spot_cost_counted_at_on_demand() -> None:
    decision = Deploy(
        rule="spot-4090",
        subject=HOST_US,
        summary="",
        price_usd_per_hour=0.463,
        max_usd_per_hour=1.0,
        spot=True,
    )
    empty = MarketSnapshot(taken_at=TEST_START, hostnodes={}, vms={}, balance=None)

    assert added_cost_usd_per_hour(decision, empty) == 0.463


@pytest.mark.parametrize(("fleet_max", "expected"), [(0.29, "blocked"), (0.31, "done")])
async def test_fleet_ceiling_counts_spot_cap(env: Env, fleet_max: float, expected: str) -> None:
    # The bid found would be about 0.24 plus storage, but the guard counts the cap 0.30.
    set_minimum_bid(env.market, 0.15)
    rule = spot_rule(0.30)
    decision, snapshot = await spot_deploy(env, rule)

    [outcome] = await env.executor(fleet_max).execute(rule, [decision], snapshot, env.market.now())

    assert outcome.status == expected, outcome.message
    if expected == "blocked":
        assert "the fleet would cost $0.3000/h" in outcome.message
        assert not [vm for vm in env.market.vms.values() if vm.name == decision.vm_name]


async def test_spot_bid_within_decided_price(env: Env) -> None:
    # Decided at the on-demand $0.463/h with a cap of $1/h.
    rule = spot_rule(1.0)
    decision, snapshot = await spot_deploy(env, rule)
    # Then vCPUs cost $0.01 each: compute is $0.514/h on demand, and the lowest bid
    # 0.35 + 8 x 0.01 + 32 x 0.002 = $0.494/h is above the decided 0.463 minus storage.
    env.market.hostnode(HOST_US).cpu_price = 0.01
    env.market.set_spot_price(HOST_US, GPU_4090, 0.35)

    [outcome] = await env.executor().execute(rule, [decision], snapshot, env.market.now())

    assert outcome.status is OutcomeStatus.BLOCKED
    assert outcome.message == (
        f"no hostnode accepted a spot bid up to $0.4630/h with storage (tried {HOST_US}); "
        "will try again"
    )


# --- fallback hostnodes ----------------------------------------------------------------

# With the cap at $0.30/h every 4090 hostnode leaves $0.295/h for the bid, and by
# on-demand price Tokyo comes first, then Eygelshoven, then the United States. Their
# lowest bids for SPEC are 0.253, 0.269 and 0.273 at the packaged spot prices.
FALLBACK_CAP = 0.30
# A cap of $0.25/h leaves $0.245/h for a bid, under each of those three lowest bids.
ALL_REJECT_CAP = 0.25


def validate_notes(row: ActionRecord) -> list[str]:
    return [call["outcome"] for call in row.api_calls if call["endpoint"] == VALIDATE_ENDPOINT]


async def test_spot_rule_picks_fallbacks(env: Env) -> None:
    decision, _ = await spot_deploy(env, spot_rule(FALLBACK_CAP, countries=[]))

    assert decision.hostnode_id == HOST_JP
    assert decision.fallback_hostnode_ids == (HOST_NL, HOST_US)
    fallback_evidence = decision.evidence["fallback_offers"]
    assert [offer["hostnode_id"] for offer in fallback_evidence] == [HOST_NL, HOST_US]
    assert (
        f"on {HOST_JP} (Tokyo, Tokyo, Japan) as a spot VM, bid up to $0.2950/h plus "
        "$0.0050/h storage (on-demand $0.4230/h), or on the next of 2 other hostnodes if it "
        "rejects the bid (cap $0.3000/h, VM 1 of 1)."
    ) in decision.summary


async def test_fallbacks_skip_storage_over_limit(env: Env) -> None:
    # Storage on the Dutch hostnode ($0.035/h) alone is above the cap of $0.03/h, so
    # the hostnodes in the United States and Finland follow Tokyo.
    env.market.hostnode(HOST_NL).storage_price = 0.00035
    decision, _ = await spot_deploy(env, spot_rule(0.03, countries=[]))

    assert decision.hostnode_id == HOST_JP
    assert HOST_NL not in decision.fallback_hostnode_ids
    assert decision.fallback_hostnode_ids[0] == HOST_US
    assert len(decision.fallback_hostnode_ids) == 2


async def test_fallback_accepts_after_rejection(env: Env) -> None:
    # Tokyo's lowest bid becomes 0.40 + 0.088 = 0.488, above the $0.295/h ceiling.
    env.market.set_spot_price(HOST_JP, GPU_4090, 0.40)
    rule = spot_rule(FALLBACK_CAP, countries=[])
    decision, snapshot = await spot_deploy(env, rule)

    [outcome] = await env.executor().execute(rule, [decision], snapshot, env.market.now())

    assert outcome.status is OutcomeStatus.DONE, outcome.message
    [vm] = [vm for vm in env.market.vms.values() if vm.name == decision.vm_name]
    assert vm.hostnode_id == HOST_NL
    assert vm.is_spot
    assert 0.269 <= vm.compute_price <= 0.295
    assert vm.compute_price + STORAGE_US <= FALLBACK_CAP
    assert f"(spot, bid ${vm.compute_price:.4f}/h) on hostnode {HOST_NL}" in outcome.message
    assert outcome.action_id is not None
    row = await env.store.get_action(outcome.action_id)
    assert row is not None
    assert row.state == ActionState.VERIFIED
    assert row.result is not None
    assert row.result["hostnode_id"] == HOST_NL
    assert row.result["skipped_hostnodes"] == {
        HOST_JP: f"hostnode {HOST_JP} rejected spot bids up to $0.2950/h"
    }
    notes = validate_notes(row)
    # One rejected probe on Tokyo, then the ceiling and six bisection probes on NL.
    assert notes[0] == f"{HOST_JP}: spot bid $0.295000/h rejected"
    assert len(notes) == 8
    assert all(note.startswith(f"{HOST_NL}: ") for note in notes[1:])


async def test_fallbacks_all_reject_blocked(env: Env) -> None:
    rule = spot_rule(ALL_REJECT_CAP, countries=[])
    decision, snapshot = await spot_deploy(env, rule)
    vms_before = len(env.market.vms)

    [outcome] = await env.executor().execute(rule, [decision], snapshot, env.market.now())

    assert outcome.status is OutcomeStatus.BLOCKED
    assert outcome.message == (
        "no hostnode accepted a spot bid up to $0.2500/h with storage "
        f"(tried {HOST_JP}, {HOST_NL}, {HOST_US}); will try again"
    )
    assert len(env.market.vms) == vms_before
    assert outcome.action_id is not None
    row = await env.store.get_action(outcome.action_id)
    assert row is not None
    assert row.state == ActionState.BLOCKED
    # Each hostnode rejects the probe at its ceiling, so a tick costs three probes.
    assert validate_notes(row) == [
        f"{host}: spot bid $0.245000/h rejected" for host in (HOST_JP, HOST_NL, HOST_US)
    ]
    assert row.result is not None
    assert list(row.result["skipped_hostnodes"]) == [HOST_JP, HOST_NL, HOST_US]


async def test_fallback_read_error_tries_next(env: Env) -> None:
    # The first hostnode read fails, so Tokyo is unchecked and Eygelshoven takes the VM.
    rule = spot_rule(FALLBACK_CAP, countries=[])
    decision, snapshot = await spot_deploy(env, rule)
    env.market.inject_fault("client/deploy/hostnodes/{hostnode_id}", FaultMode.HTTP_500)

    [outcome] = await env.executor().execute(rule, [decision], snapshot, env.market.now())

    assert outcome.status is OutcomeStatus.DONE, outcome.message
    [vm] = [vm for vm in env.market.vms.values() if vm.name == decision.vm_name]
    assert vm.hostnode_id == HOST_NL
    assert outcome.action_id is not None
    row = await env.store.get_action(outcome.action_id)
    assert row is not None
    assert row.result is not None
    skipped = row.result["skipped_hostnodes"]
    assert list(skipped) == [HOST_JP]
    assert skipped[HOST_JP].startswith(f"hostnode {HOST_JP} could not be read: ")


async def test_fallback_errors_fail(env: Env) -> None:
    # Every validation call fails, so no hostnode could be checked. That is an error,
    # not the market.
    rule = spot_rule(FALLBACK_CAP, countries=[])
    decision, snapshot = await spot_deploy(env, rule)
    env.market.inject_fault(VALIDATE_ENDPOINT, FaultMode.HTTP_500, count=3)

    [outcome] = await env.executor().execute(rule, [decision], snapshot, env.market.now())

    assert outcome.status is OutcomeStatus.FAILED
    assert outcome.message.startswith(f"spot bids on hostnode {HOST_JP} could not be checked")
    assert f"spot bids on hostnode {HOST_US} could not be checked" in outcome.message
    assert outcome.message.endswith("; nothing was deployed")
    assert not [vm for vm in env.market.vms.values() if vm.name == decision.vm_name]


async def test_fallback_auth_error_stops(env: Env) -> None:
    rule = spot_rule(FALLBACK_CAP, countries=[])
    decision, snapshot = await spot_deploy(env, rule)
    env.market.api_token = "rotated-token-5b2d0c19"

    [outcome] = await env.executor().execute(rule, [decision], snapshot, env.market.now())

    assert outcome.status is OutcomeStatus.FAILED
    assert outcome.message.startswith(f"spot bids on hostnode {HOST_JP} could not be checked")
    # Rejected credentials would fail every other hostnode the same way.
    assert HOST_NL not in outcome.message
    assert outcome.action_id is not None
    row = await env.store.get_action(outcome.action_id)
    assert row is not None
    assert len(validate_notes(row)) == 1


async def test_all_reject_one_info_report(env: Env) -> None:
    notifier = RecordingNotifier()
    engine = RuleEngine(
        store=env.store,
        snapshots=SnapshotProvider(env.client, env.market.clock, timedelta(0)),
        executor=env.executor(),
        alerts=AlertManager(env.store, notifier, repeat_interval=timedelta(minutes=5)),
        clock=env.market.clock,
    )
    rule = spot_rule(ALL_REJECT_CAP, countries=[])

    # Two ticks in which every hostnode rejects every bid within the cap.
    for _ in range(2):
        result = await engine.run_rule(rule)
        assert result.error is None
        [outcome] = result.outcomes
        assert outcome.status is OutcomeStatus.BLOCKED
        env.market.advance(timedelta(minutes=10))

    assert not [vm for vm in env.market.vms.values() if vm.name == "spot-4090-1"]
    assert [message.severity for message in notifier.messages] == ["info"]
    [message] = notifier.messages
    text = "\n".join(message.lines)
    assert (
        "no hostnode accepted a spot bid up to $0.2500/h with storage "
        f"(tried {HOST_JP}, {HOST_NL}, {HOST_US}); will try again"
    ) in text
    firing = await env.store.list_alerts(state=AlertState.FIRING)
    assert not [alert for alert in firing if alert.severity == Severity.CRITICAL.value]
    [report] = [alert for alert in firing if alert.rule == "spot-4090:report"]

    # Tokyo lowers its spot price, so the next tick deploys and the report resolves.
    env.market.set_spot_price(HOST_JP, GPU_4090, 0.10)
    result = await engine.run_rule(rule)

    [outcome] = result.outcomes
    assert outcome.status is OutcomeStatus.DONE, outcome.message
    resolved = await env.store.list_alerts(state=AlertState.RESOLVED, rule="spot-4090:report")
    assert report.subject in [alert.subject for alert in resolved]
    assert not [message for message in notifier.messages if message.severity == "critical"]
