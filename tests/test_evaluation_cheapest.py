"""Cheapest-hostnode rules over the fixture marketplace: alerts, new best and deploys."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tdbot.evaluation import evaluate
from tdbot.evaluation.cheapest import updated_best_price
from tdbot.evaluation.model import (
    Decision,
    Deploy,
    FireAlert,
    MarketSnapshot,
    Report,
    ResolveAlert,
    RuleState,
    Severity,
)
from tdbot.rules.schema import CheapestHostnodeRule
from tdbot.tensordock.models import Balance, Hostnode, VirtualMachine

DecisionT = TypeVar("DecisionT", bound=Decision)

FIXTURES = Path(__file__).parent / "fixtures" / "tensordock-v0"
NOW = datetime(2024, 11, 4, 12, 0, tzinfo=UTC)
TOKYO_4090 = "58ab3969-87c2-4228-a9ca-0c9fe191f0ef"
EYGELSHOVEN_4090 = "b9ee75b9-b341-4482-a250-86597475ffae"


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
BALANCE = Balance.model_validate(load("billing_balance.ok.json"))
SNAPSHOT = MarketSnapshot(taken_at=NOW, hostnodes=HOSTNODES, vms=VMS, balance=BALANCE)


def make_rule(**fields: Any) -> CheapestHostnodeRule:
    values: dict[str, Any] = {
        "name": "cheap-4090",
        "kind": "cheapest_hostnode",
        "every": "10m",
        "match": {
            "gpu": ["geforcertx4090-pcie-24gb"],
            "vcpus": 8,
            "ram_gb": 32,
            "storage_gb": 200,
        },
        "alert": {"below_usd_per_hour": 0.45, "on_new_best": True},
    }
    values.update(fields)
    return CheapestHostnodeRule.model_validate(values)


def deploy_policy(**fields: Any) -> dict[str, Any]:
    values: dict[str, Any] = {"enabled": True, "max_vms": 2, "max_usd_per_hour": 0.5}
    values.update(fields)
    return values


def of_type(decisions: list[Decision], kind: type[DecisionT]) -> list[DecisionT]:
    return [decision for decision in decisions if isinstance(decision, kind)]


def test_unknown_market_reports_only() -> None:
    snapshot = replace(SNAPSHOT, hostnodes=None, errors={"hostnodes": "timed out after 30 s"})
    state = RuleState(open_alerts=frozenset({"best", "new-best"}), best_price_usd=0.5)
    rule = make_rule(deploy=deploy_policy())

    decisions = evaluate(rule, snapshot, state, NOW)

    assert len(decisions) == 1
    assert isinstance(decisions[0], Report)
    assert decisions[0].evidence["reason"] == "hostnodes_unknown"
    assert "timed out after 30 s" in decisions[0].summary


def test_fires_under_threshold() -> None:
    decisions = evaluate(make_rule(top=2), SNAPSHOT, RuleState(), NOW)

    alerts = of_type(decisions, FireAlert)
    assert [alert.subject for alert in alerts] == ["best"]
    evidence = alerts[0].evidence
    assert evidence["hostnode_id"] == TOKYO_4090
    assert "Tokyo" in evidence["location"]
    assert evidence["price_usd_per_hour"] == 0.428
    assert evidence["price"]["gpu_usd_per_hour"] == 0.33
    assert evidence["price"]["storage_usd_per_hour"] == 0.01
    assert [offer["hostnode_id"] for offer in evidence["top"]] == [TOKYO_4090, EYGELSHOVEN_4090]
    assert evidence["threshold_usd_per_hour"] == 0.45


def test_equal_price_does_not_fire() -> None:
    rule = make_rule(alert={"below_usd_per_hour": 0.428, "on_new_best": False})

    assert evaluate(rule, SNAPSHOT, RuleState(), NOW) == []


def test_resolves_at_threshold() -> None:
    rule = make_rule(alert={"below_usd_per_hour": 0.428, "on_new_best": False})
    state = RuleState(open_alerts=frozenset({"best"}))

    decisions = evaluate(rule, SNAPSHOT, state, NOW)

    assert [type(d) for d in decisions] == [ResolveAlert]
    assert decisions[0].subject == "best"


def test_open_alert_kept_while_cheap() -> None:
    state = RuleState(open_alerts=frozenset({"best"}), best_price_usd=0.428)

    decisions = evaluate(make_rule(), SNAPSHOT, state, NOW)

    assert [(type(d), d.subject) for d in decisions] == [(FireAlert, "best")]


def test_new_best_fires_info() -> None:
    state = RuleState(best_price_usd=0.45)
    rule = make_rule(alert={"on_new_best": True})

    decisions = evaluate(rule, SNAPSHOT, state, NOW)

    alerts = of_type(decisions, FireAlert)
    assert [alert.subject for alert in alerts] == ["new-best"]
    assert alerts[0].severity is Severity.INFO
    assert alerts[0].evidence["best_price_usd"] == 0.428
    assert alerts[0].evidence["previous_best_usd"] == 0.45


@pytest.mark.parametrize(
    ("stored_best", "on_new_best"),
    [(None, True), (0.428, True), (0.40, True), (0.45, False)],
)
def test_new_best_not_fired(stored_best: float | None, on_new_best: bool) -> None:
    rule = make_rule(alert={"on_new_best": on_new_best})
    state = RuleState(best_price_usd=stored_best)

    assert evaluate(rule, SNAPSHOT, state, NOW) == []


def test_new_best_resolves_when_price_rises() -> None:
    rule = make_rule(alert={"on_new_best": True})
    state = RuleState(open_alerts=frozenset({"new-best"}), best_price_usd=0.40)

    decisions = evaluate(rule, SNAPSHOT, state, NOW)

    assert [(type(d), d.subject) for d in decisions] == [(ResolveAlert, "new-best")]


def test_no_offers_reports_and_resolves() -> None:
    rule = make_rule(match={"gpu": ["l40-pcie-48gb"]})
    state = RuleState(open_alerts=frozenset({"best"}), best_price_usd=1.0)

    decisions = evaluate(rule, SNAPSHOT, state, NOW)

    reports = of_type(decisions, Report)
    assert len(reports) == 1
    assert reports[0].evidence["reason"] == "no_offers"
    assert reports[0].evidence["rejections"]["reserved"] == 1
    assert [d.subject for d in of_type(decisions, ResolveAlert)] == ["best"]


def test_deploy_name_skips_listed_names() -> None:
    rule = make_rule(deploy=deploy_policy(name_template="{rule}-box-{n}", confirm=False))
    listed = {
        f"vm-{number}": VirtualMachine(id=f"vm-{number}", name=f"cheap-4090-box-{number}")
        for number in (1, 2, 4)
    }
    snapshot = replace(SNAPSHOT, vms={**VMS, **listed})

    deploys = of_type(evaluate(rule, snapshot, RuleState(), NOW), Deploy)

    assert [deploy.vm_name for deploy in deploys] == ["cheap-4090-box-3"]


def test_deploy_fills_policy() -> None:
    rule = make_rule(
        deploy=deploy_policy(
            name_template="{rule}-box-{n}",
            internal_ports=[22, 8888],
            ssh_public_key="ssh-ed25519 AAAA test",
            confirm=False,
        )
    )
    state = RuleState(deployed_vm_ids=frozenset({"vm-1"}))

    deploys = of_type(evaluate(rule, SNAPSHOT, state, NOW), Deploy)

    assert len(deploys) == 1
    deploy = deploys[0]
    assert deploy.hostnode_id == TOKYO_4090
    assert deploy.subject == TOKYO_4090
    assert deploy.gpu_model == "geforcertx4090-pcie-24gb"
    assert (deploy.gpu_count, deploy.vcpus, deploy.ram_gb, deploy.storage_gb) == (1, 8, 32, 200)
    assert deploy.price_usd_per_hour == 0.428
    assert deploy.vm_name == "cheap-4090-box-1"
    assert deploy.internal_ports == (22, 8888)
    assert deploy.ssh_public_key == "ssh-ed25519 AAAA test"
    assert deploy.max_usd_per_hour == 0.5
    assert deploy.max_vms == 2
    assert deploy.confirm is False


def test_deploy_rounds_odd_vcpus() -> None:
    rule = make_rule(
        match={"gpu": ["geforcertx4090-pcie-24gb"], "vcpus": 7, "ram_gb": 32, "storage_gb": 200},
        deploy=deploy_policy(),
    )

    deploys = of_type(evaluate(rule, SNAPSHOT, RuleState(), NOW), Deploy)

    assert deploys[0].vcpus == 8


def test_deploy_needs_port_per_forward() -> None:
    # Tokyo has 9 free ports; Eygelshoven, the next cheapest at 0.464, has 10.
    rule = make_rule(deploy=deploy_policy(internal_ports=list(range(22, 32))))

    deploys = of_type(evaluate(rule, SNAPSHOT, RuleState(), NOW), Deploy)

    assert deploys[0].hostnode_id == EYGELSHOVEN_4090
    assert deploys[0].price_usd_per_hour == 0.464


@pytest.mark.parametrize(
    ("deployed", "max_vms", "cap", "expected"),
    [
        (0, 1, 0.5, 1),
        (1, 1, 0.5, 0),
        (1, 2, 0.5, 1),
        (3, 2, 0.5, 0),
        (0, 1, 0.428, 1),
        (0, 1, 0.427, 0),
    ],
)
def test_deploy_gated_by_count_and_cap(
    deployed: int, max_vms: int, cap: float, expected: int
) -> None:
    rule = make_rule(deploy=deploy_policy(max_vms=max_vms, max_usd_per_hour=cap))
    state = RuleState(deployed_vm_ids=frozenset(f"vm-{i}" for i in range(deployed)))

    deploys = of_type(evaluate(rule, SNAPSHOT, state, NOW), Deploy)

    assert len(deploys) == expected


def test_disabled_deploy_never_deploys() -> None:
    rule = make_rule(deploy=deploy_policy(enabled=False))

    assert of_type(evaluate(rule, SNAPSHOT, RuleState(), NOW), Deploy) == []


@pytest.mark.parametrize(
    ("snapshot", "reason"),
    [
        (replace(SNAPSHOT, vms=None), "vms_unknown"),
        (replace(SNAPSHOT, balance=None), "balance_unknown"),
    ],
    ids=["vms", "balance"],
)
def test_unknown_parts_block_deploy(snapshot: MarketSnapshot, reason: str) -> None:
    rule = make_rule(deploy=deploy_policy())

    decisions = evaluate(rule, snapshot, RuleState(), NOW)

    assert not any(decision.spends_or_destroys for decision in decisions)
    reports = of_type(decisions, Report)
    assert [report.evidence["reason"] for report in reports] == [reason]
    assert [alert.subject for alert in of_type(decisions, FireAlert)] == ["best"]


def test_naive_now_rejected() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        evaluate(make_rule(), SNAPSHOT, RuleState(), datetime(2024, 11, 4, 12, 0))


@pytest.mark.parametrize(
    ("stored_best", "expected"),
    [(None, 0.428), (0.45, 0.428), (0.428, None), (0.40, None)],
)
def test_updated_best_price(stored_best: float | None, expected: float | None) -> None:
    state = RuleState(best_price_usd=stored_best)

    assert updated_best_price(make_rule(), SNAPSHOT, state) == expected


def test_updated_best_price_unknown_market() -> None:
    snapshot = replace(SNAPSHOT, hostnodes=None)

    assert updated_best_price(make_rule(), snapshot, RuleState(best_price_usd=0.5)) is None
