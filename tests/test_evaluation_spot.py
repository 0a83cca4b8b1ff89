"""Spot re-bid rules over the fixture VM list: ladder steps, cap, exhaustion, recovery."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest

from tdbot.evaluation import evaluate
from tdbot.evaluation.model import (
    Decision,
    Deploy,
    FireAlert,
    LadderState,
    MarketSnapshot,
    Rebid,
    Report,
    ResolveAlert,
    RuleState,
    Severity,
)
from tdbot.evaluation.spot import next_bid
from tdbot.rules.schema import SpotRebidRule
from tdbot.tensordock.models import Balance, Hostnode, VirtualMachine, VmStatus

FIXTURES = Path(__file__).parent / "fixtures" / "tensordock-v0"
NOW = datetime(2024, 11, 4, 12, 0, tzinfo=UTC)
OUTBID_VM = "d65cb439-32df-4280-9774-917cc2f8a3c5"  # 8x V100, bid 0.80, storage 0.008/h
RUNNING_SPOT_VM = "4e2f02b7-d378-4713-adcb-f2c7825e877c"  # 1x L4, bid 0.181
OUTBID_HOST = "df888cd2-15f7-4955-9bb3-08d10aa983fc"


def load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURES / name).read_text())
    return data


RAW_VMS: dict[str, Any] = load("client_list.ok.json")["virtualmachines"]
HOSTNODES = {
    key: Hostnode.model_validate({"id": key, **value})
    for key, value in load("marketplace.json")["hostnodes"].items()
}


def load_vms(overrides: dict[str, dict[str, Any]] | None = None) -> dict[str, VirtualMachine]:
    vms = {}
    for key, value in RAW_VMS.items():
        fields = {"id": key, **value, **(overrides or {}).get(key, {})}
        vms[key] = VirtualMachine.model_validate(fields)
    return vms


SNAPSHOT = MarketSnapshot(
    taken_at=NOW,
    hostnodes=HOSTNODES,
    vms=load_vms(),
    balance=Balance.model_validate(load("billing_balance.ok.json")),
)


def make_rule(**bid: Any) -> SpotRebidRule:
    ladder: dict[str, Any] = {"step_usd": 0.05, "max_usd_per_hour": 1.0, "max_steps": 5}
    ladder.update(bid)
    return SpotRebidRule.model_validate(
        {"name": "rebid", "kind": "spot_rebid", "every": "1m", "bid": ladder}
    )


def only(decisions: list[Decision]) -> Decision:
    assert len(decisions) == 1, decisions
    return decisions[0]


def test_unknown_vms_report_only() -> None:
    snapshot = replace(SNAPSHOT, vms=None, errors={"vms": "HTTP 502"})
    state = RuleState(ladders={OUTBID_VM: LadderState(steps_taken=2, last_bid_usd=0.9)})

    decision = only(evaluate(make_rule(), snapshot, state, NOW))

    assert isinstance(decision, Report)
    assert decision.evidence["reason"] == "vms_unknown"


def test_first_step_from_vm_bid() -> None:
    decision = only(evaluate(make_rule(), SNAPSHOT, RuleState(), NOW))

    assert isinstance(decision, Rebid)
    assert decision.subject == OUTBID_VM
    assert decision.previous_bid_usd_per_hour == 0.8
    assert decision.bid_usd_per_hour == 0.85
    assert decision.step == 1
    assert decision.max_usd_per_hour == 1.0
    assert decision.evidence["old_bid_usd_per_hour"] == 0.8
    assert decision.evidence["new_bid_usd_per_hour"] == 0.85
    assert decision.evidence["max_usd_per_hour"] == 1.0
    assert decision.evidence["hostnode_id"] == OUTBID_HOST
    assert decision.evidence["storage_usd_per_hour"] == 0.008


def test_next_step_from_ladder() -> None:
    state = RuleState(ladders={OUTBID_VM: LadderState(steps_taken=1, last_bid_usd=0.85)})

    decision = only(evaluate(make_rule(), SNAPSHOT, state, NOW))

    assert isinstance(decision, Rebid)
    assert decision.bid_usd_per_hour == 0.9
    assert decision.step == 2


def test_step_clamped_to_cap() -> None:
    state = RuleState(ladders={OUTBID_VM: LadderState(steps_taken=3, last_bid_usd=0.98)})

    decision = only(evaluate(make_rule(), SNAPSHOT, state, NOW))

    assert isinstance(decision, Rebid)
    assert decision.bid_usd_per_hour == 1.0


def test_at_cap_fires_critical() -> None:
    state = RuleState(ladders={OUTBID_VM: LadderState(steps_taken=4, last_bid_usd=1.0)})

    decision = only(evaluate(make_rule(), SNAPSHOT, state, NOW))

    assert isinstance(decision, FireAlert)
    assert decision.severity is Severity.CRITICAL
    assert decision.subject == OUTBID_VM
    assert "still outbid" in decision.summary
    assert "$0.0080/h" in decision.summary
    assert "cap $1.0000/h" in decision.summary
    assert decision.evidence["exhausted"] is True


def test_max_steps_exhausts_below_cap() -> None:
    state = RuleState(ladders={OUTBID_VM: LadderState(steps_taken=5, last_bid_usd=0.9)})

    decision = only(evaluate(make_rule(), SNAPSHOT, state, NOW))

    assert isinstance(decision, FireAlert)
    assert decision.evidence["steps_taken"] == 5


def test_stored_exhausted_ladder_alerts() -> None:
    state = RuleState(
        ladders={OUTBID_VM: LadderState(steps_taken=1, last_bid_usd=0.85, exhausted=True)}
    )

    assert isinstance(only(evaluate(make_rule(), SNAPSHOT, state, NOW)), FireAlert)


def test_zero_step_exhausts() -> None:
    decision = only(evaluate(make_rule(step_usd=0.0), SNAPSHOT, RuleState(), NOW))

    assert isinstance(decision, FireAlert)
    assert decision.evidence["reason"] == "step_too_small"


def test_vm_bid_above_cap_exhausts() -> None:
    decision = only(evaluate(make_rule(max_usd_per_hour=0.7), SNAPSHOT, RuleState(), NOW))

    assert isinstance(decision, FireAlert)


def climb(rule: SpotRebidRule) -> tuple[list[float], Decision]:
    """Apply each Rebid to the ladder, as the caller would, until something else comes back."""
    ladder = LadderState()
    bids: list[float] = []
    for _ in range(60):
        decision = only(evaluate(rule, SNAPSHOT, RuleState(ladders={OUTBID_VM: ladder}), NOW))
        if not isinstance(decision, Rebid):
            return bids, decision
        bids.append(decision.bid_usd_per_hour)
        ladder = LadderState(steps_taken=decision.step, last_bid_usd=decision.bid_usd_per_hour)
    raise AssertionError("the ladder never ended")


@pytest.mark.parametrize(
    ("bid", "expected"),
    [
        ({"step_usd": 0.05}, [0.85, 0.9, 0.95, 1.0]),
        ({"step_usd": 0.03, "max_usd_per_hour": 0.9}, [0.83, 0.86, 0.89, 0.9]),
        ({"step_usd": 0.01, "max_steps": 3}, [0.81, 0.82, 0.83]),
        # 0.8 * 1.1 = 0.88, 0.88 * 1.1 = 0.968, then the cap.
        ({"step_usd": None, "step_percent": 10.0}, [0.88, 0.968, 1.0]),
        # 0.8 * 1.07 = 0.856, 0.856 * 1.07 = 0.91592 -> 0.9159, 0.9159 * 1.07 = 0.980013 -> 0.98
        ({"step_usd": None, "step_percent": 7.0}, [0.856, 0.9159, 0.98, 1.0]),
    ],
)
def test_ladder_sequence(bid: dict[str, Any], expected: list[float]) -> None:
    bids, last = climb(make_rule(**bid))

    assert bids == expected
    assert isinstance(last, FireAlert)
    assert all(later > earlier for earlier, later in pairwise(bids))
    assert max(bids) <= make_rule(**bid).bid.max_usd_per_hour


def test_step_percent_rounds_to_four_decimals() -> None:
    rule = make_rule(step_usd=None, step_percent=7.0)

    assert next_bid(0.123, rule) == 0.1316


def test_running_again_resolves() -> None:
    state = RuleState(
        open_alerts=frozenset({RUNNING_SPOT_VM}),
        ladders={RUNNING_SPOT_VM: LadderState(steps_taken=2, last_bid_usd=0.2)},
    )
    rule = SpotRebidRule.model_validate(
        {
            "name": "rebid",
            "kind": "spot_rebid",
            "every": "1m",
            "select": {"ids": [RUNNING_SPOT_VM]},
            "bid": {"step_usd": 0.05, "max_usd_per_hour": 1.0},
        }
    )

    decision = only(evaluate(rule, SNAPSHOT, state, NOW))

    assert isinstance(decision, ResolveAlert)
    assert decision.subject == RUNNING_SPOT_VM
    assert "running again" in decision.summary


def test_running_vm_without_ladder_ignored() -> None:
    rule = SpotRebidRule.model_validate(
        {
            "name": "rebid",
            "kind": "spot_rebid",
            "every": "1m",
            "select": {"names": ["comfyui-*", "whisper-*"]},
            "bid": {"step_usd": 0.05, "max_usd_per_hour": 1.0},
        }
    )

    assert evaluate(rule, SNAPSHOT, RuleState(), NOW) == []


def test_selector_excludes_outbid_vm() -> None:
    rule = SpotRebidRule.model_validate(
        {
            "name": "rebid",
            "kind": "spot_rebid",
            "every": "1m",
            "select": {"exclude_names": ["batch-*"]},
            "bid": {"step_usd": 0.05, "max_usd_per_hour": 1.0},
        }
    )

    assert evaluate(rule, SNAPSHOT, RuleState(), NOW) == []


def test_outbid_on_demand_vm_ignored() -> None:
    vms = load_vms({OUTBID_VM: {"type": "ondemand"}})

    assert evaluate(make_rule(), replace(SNAPSHOT, vms=vms), RuleState(), NOW) == []


def test_gone_vm_resolves() -> None:
    vms = load_vms()
    del vms[OUTBID_VM]
    state = RuleState(
        open_alerts=frozenset({OUTBID_VM}),
        ladders={OUTBID_VM: LadderState(steps_taken=5, last_bid_usd=1.0, exhausted=True)},
    )

    decision = only(evaluate(make_rule(), replace(SNAPSHOT, vms=vms), state, NOW))

    assert isinstance(decision, ResolveAlert)
    assert decision.subject == OUTBID_VM


def test_stopped_vm_resolves() -> None:
    vms = load_vms({OUTBID_VM: {"status": "StoppedDisassociated"}})
    state = RuleState(open_alerts=frozenset({OUTBID_VM}))

    decision = only(evaluate(make_rule(), replace(SNAPSHOT, vms=vms), state, NOW))

    assert isinstance(decision, ResolveAlert)
    assert vms[OUTBID_VM].status is VmStatus.STOPPED_DISASSOCIATED


def test_storage_cost_estimated_from_host() -> None:
    # Without a storage price: the host's 0.00004 USD per GB-hour times 200 GB = 0.008.
    raw = dict(RAW_VMS[OUTBID_VM])
    del raw["storage_price"]
    vms = load_vms()
    vms[OUTBID_VM] = VirtualMachine.model_validate({"id": OUTBID_VM, **raw})
    state = RuleState(ladders={OUTBID_VM: LadderState(steps_taken=5, last_bid_usd=1.0)})

    decision = only(evaluate(make_rule(), replace(SNAPSHOT, vms=vms), state, NOW))

    assert decision.evidence["storage_usd_per_hour"] == pytest.approx(0.008)
    assert decision.evidence["storage_cost_estimated"] is True
    assert "about $0.0080/h" in decision.summary


def test_unknown_bid_reports() -> None:
    raw = {
        key: value
        for key, value in RAW_VMS[OUTBID_VM].items()
        if key not in ("cost", "compute_price")
    }
    vms = load_vms()
    vms[OUTBID_VM] = VirtualMachine.model_validate({"id": OUTBID_VM, **raw})

    decision = only(evaluate(make_rule(), replace(SNAPSHOT, vms=vms), RuleState(), NOW))

    assert isinstance(decision, Report)
    assert decision.evidence["reason"] == "bid_unknown"


def test_ladder_below_vm_bid_uses_vm_bid() -> None:
    # A bid raised outside the rule to 0.80 is never undercut by an older ladder at 0.50.
    state = RuleState(ladders={OUTBID_VM: LadderState(steps_taken=1, last_bid_usd=0.5)})

    decision = only(evaluate(make_rule(), SNAPSHOT, state, NOW))

    assert isinstance(decision, Rebid)
    assert decision.previous_bid_usd_per_hour == 0.8
    assert decision.bid_usd_per_hour == 0.85
    assert decision.step == 2


# --- start bid, step limit and redeploy ---------------------------------------------


def redeploy_rule(cap: float = 50.0, **changes: Any) -> SpotRebidRule:
    fields: dict[str, Any] = {
        "name": "rebid",
        "kind": "spot_rebid",
        "every": "1m",
        "bid": {"step_usd": 0.05, "max_usd_per_hour": 0.8},
        "on_exhausted": "redeploy",
        "redeploy_max_usd_per_hour": cap,
    }
    fields.update(changes)
    return SpotRebidRule.model_validate(fields)


def test_start_bid_above_vm_bid() -> None:
    decision = only(evaluate(make_rule(start_usd_per_hour=0.92), SNAPSHOT, RuleState(), NOW))

    assert isinstance(decision, Rebid)
    assert decision.bid_usd_per_hour == 0.92
    assert decision.step == 1


def test_start_bid_below_vm_bid_steps() -> None:
    decision = only(evaluate(make_rule(start_usd_per_hour=0.5), SNAPSHOT, RuleState(), NOW))

    assert isinstance(decision, Rebid)
    assert decision.bid_usd_per_hour == 0.85


def test_start_bid_clamped_to_cap() -> None:
    decision = only(evaluate(make_rule(start_usd_per_hour=3.0), SNAPSHOT, RuleState(), NOW))

    assert isinstance(decision, Rebid)
    assert decision.bid_usd_per_hour == 1.0


def test_start_bid_only_first_step() -> None:
    rule = make_rule(start_usd_per_hour=0.92)
    state = RuleState(ladders={OUTBID_VM: LadderState(steps_taken=1, last_bid_usd=0.92)})

    decision = only(evaluate(rule, SNAPSHOT, state, NOW))

    assert isinstance(decision, Rebid)
    assert decision.bid_usd_per_hour == 0.97


def test_step_limit_waits_then_resumes() -> None:
    rule = make_rule(max_steps_per_hour=2)
    times = (NOW - timedelta(minutes=50), NOW - timedelta(minutes=10))
    ladder = LadderState(steps_taken=2, last_bid_usd=0.9, step_times=times)
    state = RuleState(ladders={OUTBID_VM: ladder})

    assert evaluate(rule, SNAPSHOT, state, NOW) == []
    later = evaluate(rule, SNAPSHOT, state, NOW + timedelta(minutes=10))
    assert isinstance(only(later), Rebid)


def test_rebid_summary_names_storage() -> None:
    decision = only(evaluate(make_rule(), SNAPSHOT, RuleState(), NOW))

    assert "storage still costs $0.0080/h" in decision.summary


def test_redeploy_needs_price_cap() -> None:
    with pytest.raises(ValueError, match="redeploy_max_usd_per_hour"):
        SpotRebidRule.model_validate(
            {
                "name": "rebid",
                "kind": "spot_rebid",
                "every": "1m",
                "bid": {"step_usd": 0.05, "max_usd_per_hour": 1.0},
                "on_exhausted": "redeploy",
            }
        )


def test_redeploy_after_exhausted_ladder() -> None:
    decisions = evaluate(redeploy_rule(), SNAPSHOT, RuleState(), NOW)

    alert, deploy = decisions
    assert isinstance(alert, FireAlert)
    assert "$0.0080/h" in alert.summary
    assert isinstance(deploy, Deploy)
    vm = SNAPSHOT.vms[OUTBID_VM]  # type: ignore[index]
    assert deploy.vm_name == f"{vm.name}-redeploy"
    assert deploy.replaces_vm_id == OUTBID_VM
    assert deploy.gpu_count == vm.specs.gpu.amount
    assert deploy.price_usd_per_hour <= 50.0
    assert deploy.confirm is True


def test_redeploy_only_once() -> None:
    ladder = LadderState(steps_taken=1, last_bid_usd=0.8, exhausted=True, redeployed=True)

    decision = only(
        evaluate(redeploy_rule(), SNAPSHOT, RuleState(ladders={OUTBID_VM: ladder}), NOW)
    )

    assert isinstance(decision, FireAlert)
    assert "already deployed" in decision.summary


def test_redeploy_above_cap_alerts_only() -> None:
    decision = only(evaluate(redeploy_rule(cap=0.01), SNAPSHOT, RuleState(), NOW))

    assert isinstance(decision, FireAlert)
    assert "No replacement was deployed" in decision.summary


def test_redeploy_without_hostnodes_alerts_only() -> None:
    snapshot = replace(SNAPSHOT, hostnodes=None)

    decision = only(evaluate(redeploy_rule(), snapshot, RuleState(), NOW))

    assert isinstance(decision, FireAlert)
    assert "hostnode list failed to load" in decision.summary
