"""Low-balance rules with fire and clear levels, and the account's burn rate."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tdbot.evaluation import burn_rate, evaluate
from tdbot.evaluation.model import (
    Decision,
    FireAlert,
    MarketSnapshot,
    Report,
    ResolveAlert,
    RuleState,
    Severity,
)
from tdbot.rules.schema import LowBalanceRule
from tdbot.tensordock.models import Balance, Hostnode, VirtualMachine

FIXTURES = Path(__file__).parent / "fixtures" / "tensordock-v0"
NOW = datetime(2024, 11, 4, 12, 0, tzinfo=UTC)
OPEN = RuleState(open_alerts=frozenset({"account"}))


def load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURES / name).read_text())
    return data


HOSTNODES = {
    key: Hostnode.model_validate({"id": key, **value})
    for key, value in load("marketplace.json")["hostnodes"].items()
}
VMS = {
    key: VirtualMachine.model_validate({"id": key, **value})
    for key, value in load("client_list.ok.json")["virtualmachines"].items()
}
SNAPSHOT = MarketSnapshot(
    taken_at=NOW,
    hostnodes=HOSTNODES,
    vms=VMS,
    balance=Balance.model_validate(load("billing_balance.ok.json")),
)


def make_rule(**fields: Any) -> LowBalanceRule:
    values: dict[str, Any] = {
        "name": "low-balance",
        "kind": "low_balance",
        "every": "15m",
        "fire_below_runway_hours": 24,
        "clear_above_runway_hours": 36,
        "fire_below_balance_usd": 20,
        "clear_above_balance_usd": 30,
    }
    values.update(fields)
    return LowBalanceRule.model_validate(values)


def with_balance(balance: float, hourly_cost: float) -> MarketSnapshot:
    return replace(SNAPSHOT, balance=Balance(balance=balance, hourly_cost=hourly_cost))


def only(decisions: list[Decision]) -> Decision:
    assert len(decisions) == 1, decisions
    return decisions[0]


def test_unknown_balance_reports_only() -> None:
    snapshot = replace(SNAPSHOT, balance=None, errors={"balance": "HTTP 500"})

    decision = only(evaluate(make_rule(), snapshot, OPEN, NOW))

    assert isinstance(decision, Report)
    assert decision.subject == "account"
    assert decision.evidence["reason"] == "balance_unknown"


def test_healthy_balance_quiet() -> None:
    # 412.3871 / 4.096 = 100.68 h, above every level.
    assert evaluate(make_rule(), SNAPSHOT, RuleState(), NOW) == []


def test_short_runway_fires() -> None:
    # 50 USD at 2.5 USD/h lasts 20 h, under the 24 h fire level.
    decision = only(evaluate(make_rule(), with_balance(50.0, 2.5), RuleState(), NOW))

    assert isinstance(decision, FireAlert)
    assert decision.subject == "account"
    assert decision.severity is Severity.WARNING
    assert decision.evidence["balance_usd"] == 50.0
    assert decision.evidence["hourly_cost_usd"] == 2.5
    assert decision.evidence["runway_hours"] == 20.0
    assert decision.evidence["runs_out_at"] == (NOW + timedelta(hours=20)).isoformat()
    assert decision.evidence["fire_below_runway_hours"] == 24
    assert decision.evidence["clear_above_runway_hours"] == 36


def test_low_balance_fires() -> None:
    # 15 USD at 0.1 USD/h lasts 150 h, but 15 USD is under the 20 USD fire level.
    decision = only(evaluate(make_rule(), with_balance(15.0, 0.1), RuleState(), NOW))

    assert isinstance(decision, FireAlert)


def test_hovering_value_does_not_flap() -> None:
    # (balance USD, hourly cost USD) -> runway: 100 h, 23 h, 30 h, 35 h, 37 h, 30 h, 23 h.
    ticks = [(1000.0, 10.0), (230.0, 10.0), (300.0, 10.0), (350.0, 10.0), (370.0, 10.0),
             (300.0, 10.0), (230.0, 10.0)]  # fmt: skip
    state = RuleState()
    transitions: list[str] = []
    for balance, hourly in ticks:
        decisions = evaluate(make_rule(), with_balance(balance, hourly), state, NOW)
        is_open = "account" in state.open_alerts
        if any(isinstance(d, FireAlert) for d in decisions):
            transitions.append("open" if is_open else "fire")
            state = OPEN
        elif any(isinstance(d, ResolveAlert) for d in decisions):
            transitions.append("resolve")
            state = RuleState()
        else:
            transitions.append("-")

    assert transitions == ["-", "fire", "open", "open", "resolve", "-", "fire"]


def test_clear_needs_both_levels() -> None:
    # Runway 40 h is above 36 h, but 25 USD is not above the 30 USD clear level.
    decision = only(evaluate(make_rule(), with_balance(25.0, 0.625), OPEN, NOW))

    assert isinstance(decision, FireAlert)


def test_clear_resolves_with_recovery() -> None:
    decision = only(evaluate(make_rule(), SNAPSHOT, OPEN, NOW))

    assert isinstance(decision, ResolveAlert)
    assert decision.subject == "account"
    assert "recovered" in decision.summary


def test_clear_defaults_to_fire_level() -> None:
    rule = LowBalanceRule.model_validate(
        {"name": "lb", "kind": "low_balance", "every": "15m", "fire_below_runway_hours": 24}
    )

    # Exactly 24 h is not above the clear level, 24.5 h is.
    at_level = evaluate(rule, with_balance(240.0, 10.0), OPEN, NOW)
    above = evaluate(rule, with_balance(245.0, 10.0), OPEN, NOW)

    assert [type(d) for d in at_level] == [FireAlert]
    assert [type(d) for d in above] == [ResolveAlert]


@pytest.mark.parametrize(
    ("balance", "hourly", "severity"),
    [
        (50.0, 2.5, Severity.WARNING),  # 20 h
        (50.0, 10.0, Severity.CRITICAL),  # 5 h
        (0.9, 0.01, Severity.CRITICAL),  # 90 h, but under 1 USD
        (0.6412, 4.096, Severity.CRITICAL),  # the low-balance fixture: 0.16 h
    ],
)
def test_severity_by_runway_and_balance(balance: float, hourly: float, severity: Severity) -> None:
    decision = only(evaluate(make_rule(), with_balance(balance, hourly), RuleState(), NOW))

    assert isinstance(decision, FireAlert)
    assert decision.severity is severity


def test_nothing_billed_infinite_runway() -> None:
    decision = only(evaluate(make_rule(), with_balance(10.0, 0.0), RuleState(), NOW))

    assert isinstance(decision, FireAlert)
    assert decision.evidence["runway_hours"] is None
    assert decision.evidence["runs_out_at"] is None


def test_nothing_billed_runway_clears() -> None:
    decision = only(evaluate(make_rule(), with_balance(100.0, 0.0), OPEN, NOW))

    assert isinstance(decision, ResolveAlert)


def test_evidence_has_vm_burn_rate() -> None:
    decision = only(evaluate(make_rule(), with_balance(50.0, 2.5), RuleState(), NOW))

    assert decision.evidence["vms_hourly_cost_usd"] == 4.096
    assert decision.evidence["vms_hourly_cost_estimated"] is True


def test_burn_rate_matches_fixture_bill() -> None:
    # Running 2.885 + 0.1885 + 0.3075 + 0.468 = 3.849, Stopped 0.219, storage only
    # 0.018 + 0.008 + 0.002 = 0.028, where the 0.002 of the 2023 VM is estimated from
    # its host's 0.00005 USD per GB-hour times 40 GB.
    usd_per_hour, estimated = burn_rate(VMS, HOSTNODES)

    assert usd_per_hour == 4.096
    assert estimated is True


def test_burn_rate_without_hostnodes() -> None:
    usd_per_hour, estimated = burn_rate(VMS, None)

    assert usd_per_hour == 4.094
    assert estimated is True


def test_burn_rate_all_reported() -> None:
    priced = {key: vm for key, vm in VMS.items() if vm.storage_price is not None}

    usd_per_hour, estimated = burn_rate(priced, HOSTNODES)

    assert usd_per_hour == 4.094
    assert estimated is False


def test_burn_rate_estimates_compute() -> None:
    # A Running 2023-shaped VM with no prices at all, on the 3080 host of Winnipeg:
    # 0.13 + 4*0.003 + 16*0.002 = 0.174 compute, plus 40*0.00005 = 0.002 storage.
    raw = load("client_list.ok.json")["virtualmachines"]["eed8505c-05d5-4da1-a82f-4ce6870fff5e"]
    fields = {key: value for key, value in raw.items() if key != "cost"}
    vm = VirtualMachine.model_validate({"id": "eed8505c", **fields, "status": "Running"})

    usd_per_hour, estimated = burn_rate({vm.id: vm}, HOSTNODES)

    assert usd_per_hour == pytest.approx(0.176)
    assert estimated is True
