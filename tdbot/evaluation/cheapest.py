"""Cheapest hostnode: rank the market for a spec, alert on good prices, optionally deploy.

Alert subjects of this rule kind:

- "best": the best full price is under `alert.below_usd_per_hour`. It resolves when
  the best price is at or above the threshold again, or no hostnode can host the spec.
- "new-best": the best price dropped below the lowest one stored for the rule
  (`RuleState.best_price_usd`, which the caller updates from the evidence). It resolves
  when the best price rises above that stored low again, so the next drop fires anew.
- "deal": the best offer's full hourly price is under `alert.deal_below_percentile`
  of the stored history of the best full price of the rule's size on that GPU model,
  which the caller passes in `RuleState.price_percentiles`. It resolves when the price
  is at or above that percentile again. Without a stored percentile nothing is decided.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from tdbot.evaluation.common import unknown_data_report
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
from tdbot.evaluation.pricing import (
    PRICE_DECIMALS,
    Offer,
    PriceBreakdown,
    count_rejections,
    rank_hostnodes,
)
from tdbot.rules.schema import CheapestHostnodeRule, DeployPolicy, format_duration
from tdbot.tensordock.models import VirtualMachine

SUBJECT_BEST = "best"
SUBJECT_NEW_BEST = "new-best"
SUBJECT_MARKET = "market"
SUBJECT_DEPLOY = "deploy"
SUBJECT_DEAL = "deal"

# Hostnodes a spot deploy tries after the first when it rejects every bid, so a deploy
# step sends at most 1 + MAX_SPOT_FALLBACKS rejected validation calls.
MAX_SPOT_FALLBACKS = 2


def evaluate_cheapest(
    rule: CheapestHostnodeRule, snapshot: MarketSnapshot, state: RuleState, now: datetime
) -> list[Decision]:
    """Decide price alerts and deploys for one cheapest-hostnode rule."""
    if snapshot.hostnodes is None:
        return [
            unknown_data_report(
                rule.name,
                "hostnodes",
                snapshot,
                SUBJECT_MARKET,
                "the market is unknown and nothing was decided",
            )
        ]

    offers = ranked_offers(rule, snapshot)
    if not offers:
        return _no_offers(rule, snapshot, state)

    decisions: list[Decision] = []
    decisions.extend(_threshold_alert(rule, state, offers))
    decisions.extend(_new_best_alert(rule, state, offers))
    decisions.extend(_deal_alert(rule, state, offers))
    decisions.extend(_deploy(rule, snapshot, state, offers))
    return decisions


def updated_best_price(
    rule: CheapestHostnodeRule, snapshot: MarketSnapshot, state: RuleState
) -> float | None:
    """Return the best price to store after this tick, or None to keep the stored one.

    The stored best is the lowest best price seen so far. The first ranking sets it
    without an alert, and each lower one replaces it (and fires "new-best").
    """
    if snapshot.hostnodes is None:
        return None
    offers = ranked_offers(rule, snapshot)
    if not offers:
        return None
    price = round(offers[0].price_usd_per_hour, PRICE_DECIMALS)
    if state.best_price_usd is not None and price >= round(state.best_price_usd, PRICE_DECIMALS):
        return None
    return price


def ranked_offers(rule: CheapestHostnodeRule, snapshot: MarketSnapshot) -> list[Offer]:
    """Rank the snapshot's hostnodes for the rule's spec, once per snapshot and spec.

    Rules with the same spec, and the state update after the tick, reuse the ranking,
    which is the costly part of evaluating a market of thousands of hostnodes.
    """
    assert snapshot.hostnodes is not None
    key = ("ranking", rule.match.model_dump_json(), ports_needed(rule))
    offers: list[Offer] | None = snapshot.derived.get(key)
    if offers is None:
        offers = rank_hostnodes(snapshot.hostnodes, rule.match, ports_needed(rule))
        snapshot.derived[key] = offers
    return offers


def ports_needed(rule: CheapestHostnodeRule) -> int:
    """Free external ports a hostnode needs: one per forwarded port when deploying, else one."""
    if rule.deploy is not None and rule.deploy.enabled:
        return max(1, len(rule.deploy.internal_ports))
    return 1


def spot_bid_ceiling(price: PriceBreakdown, max_usd_per_hour: float | None) -> float:
    """Return the highest spot bid worth placing for a deployment, in USD per hour.

    A bid covers compute only (GPUs, vCPUs and RAM) and storage is billed on top, so the
    bid stays under the on-demand compute price and under the cap minus storage. It is
    rounded down to PRICE_DECIMALS so that the bid plus storage never exceeds the cap,
    and is 0 when storage alone reaches the cap.
    """
    compute = price.gpu_usd + price.cpu_usd + price.ram_usd
    if max_usd_per_hour is not None:
        compute = min(compute, max_usd_per_hour - price.storage_usd)
    # The small addend keeps a float such as 0.458 (0.45799999...) from losing a unit.
    scale = 10.0**PRICE_DECIMALS
    return max(math.floor(compute * scale + 1e-6) / scale, 0.0)


def _no_offers(
    rule: CheapestHostnodeRule, snapshot: MarketSnapshot, state: RuleState
) -> list[Decision]:
    assert snapshot.hostnodes is not None
    rejections = count_rejections(snapshot.hostnodes, rule.match, ports_needed(rule))
    decisions: list[Decision] = [
        Report(
            rule=rule.name,
            subject=SUBJECT_MARKET,
            summary=(
                f"No hostnode can host {_describe_spec(rule)} "
                f"({len(snapshot.hostnodes)} hostnodes checked)."
            ),
            evidence={
                "reason": "no_offers",
                "hostnodes_checked": len(snapshot.hostnodes),
                "rejections": rejections,
            },
        )
    ]
    for subject in (SUBJECT_BEST, SUBJECT_NEW_BEST):
        if subject in state.open_alerts:
            decisions.append(
                ResolveAlert(
                    rule=rule.name,
                    subject=subject,
                    summary="No hostnode can host the spec any more.",
                    evidence={"reason": "no_offers"},
                )
            )
    return decisions


def _threshold_alert(
    rule: CheapestHostnodeRule, state: RuleState, offers: list[Offer]
) -> list[Decision]:
    threshold = rule.alert.below_usd_per_hour
    if threshold is None:
        return []

    best = offers[0]
    evidence = _offer_evidence(rule, offers) | {"threshold_usd_per_hour": threshold}
    if best.price_usd_per_hour < threshold:
        return [
            FireAlert(
                rule=rule.name,
                subject=SUBJECT_BEST,
                summary=(
                    f"{_describe_spec(rule)} costs ${best.price_usd_per_hour:.4f}/h on "
                    f"{best.hostnode_id} ({best.location}), under ${threshold:.4f}/h."
                ),
                evidence=evidence,
            )
        ]
    if SUBJECT_BEST in state.open_alerts:
        return [
            ResolveAlert(
                rule=rule.name,
                subject=SUBJECT_BEST,
                summary=(
                    f"The best price for {_describe_spec(rule)} is "
                    f"${best.price_usd_per_hour:.4f}/h, no longer under ${threshold:.4f}/h."
                ),
                evidence=evidence,
            )
        ]
    return []


def _new_best_alert(
    rule: CheapestHostnodeRule, state: RuleState, offers: list[Offer]
) -> list[Decision]:
    best = offers[0]
    price = round(best.price_usd_per_hour, PRICE_DECIMALS)
    previous = state.best_price_usd
    # The first ranking only sets the reference; there is nothing to compare it to.
    if previous is None:
        return []

    previous = round(previous, PRICE_DECIMALS)
    if rule.alert.on_new_best and price < previous:
        return [
            FireAlert(
                rule=rule.name,
                subject=SUBJECT_NEW_BEST,
                severity=Severity.INFO,
                summary=(
                    f"New best price for {_describe_spec(rule)}: ${price:.4f}/h on "
                    f"{best.hostnode_id} ({best.location}), down from ${previous:.4f}/h."
                ),
                evidence=_offer_evidence(rule, offers)
                | {"best_price_usd": price, "previous_best_usd": previous},
            )
        ]
    if SUBJECT_NEW_BEST in state.open_alerts and price > previous:
        return [
            ResolveAlert(
                rule=rule.name,
                subject=SUBJECT_NEW_BEST,
                summary=(
                    f"The best price rose to ${price:.4f}/h, above the low of ${previous:.4f}/h."
                ),
                evidence={"best_price_usd": price, "previous_best_usd": previous},
            )
        ]
    return []


def _deal_alert(
    rule: CheapestHostnodeRule, state: RuleState, offers: list[Offer]
) -> list[Decision]:
    percent = rule.alert.deal_below_percentile
    best = offers[0]
    percentile = state.price_percentiles.get(best.gpu_model)
    if percent is None or percentile is None:
        return []

    price = best.price_usd_per_hour
    window = format_duration(rule.alert.deal_window)
    evidence = _offer_evidence(rule, offers) | {
        "percentile": percent,
        "percentile_usd_per_hour": percentile,
    }
    if price < percentile:
        return [
            FireAlert(
                rule=rule.name,
                subject=SUBJECT_DEAL,
                severity=Severity.INFO,
                summary=(
                    f"Deal on {best.gpu_model}: ${price:.4f}/h on {best.hostnode_id} "
                    f"({best.location}), under the p{percent:g} of ${percentile:.4f}/h "
                    f"over the last {window}."
                ),
                evidence=evidence,
            )
        ]
    if SUBJECT_DEAL in state.open_alerts:
        return [
            ResolveAlert(
                rule=rule.name,
                subject=SUBJECT_DEAL,
                summary=(
                    f"{best.gpu_model} costs ${price:.4f}/h, no longer under the "
                    f"p{percent:g} of ${percentile:.4f}/h."
                ),
                evidence=evidence,
            )
        ]
    return []


def _deploy(
    rule: CheapestHostnodeRule, snapshot: MarketSnapshot, state: RuleState, offers: list[Offer]
) -> list[Decision]:
    policy = rule.deploy
    if policy is None or not policy.enabled:
        return []
    targets = _spot_targets(rule, policy, offers) if rule.match.spot else [offers[0]]
    if isinstance(targets, Report):
        # A rule at its VM count would deploy nothing anyway, so the price is no news.
        return [targets] if len(state.deployed_vm_ids) < policy.max_vms else []
    best, *fallbacks = targets
    if not rule.match.spot and best.price_usd_per_hour > policy.max_usd_per_hour:
        return []

    # Without the VM list the live VMs cannot be counted against max_vms, and without the
    # balance the deploy could be the one that runs the account dry.
    if snapshot.vms is None:
        return [
            unknown_data_report(rule.name, "vms", snapshot, SUBJECT_DEPLOY, "no VM was deployed")
        ]
    if snapshot.balance is None:
        return [
            unknown_data_report(
                rule.name, "balance", snapshot, SUBJECT_DEPLOY, "no VM was deployed"
            )
        ]

    # Every stored id counts, even one missing from this tick's VM list: a VM deployed a
    # moment ago may not be listed yet, and counting it too often only defers a deploy.
    deployed = len(state.deployed_vm_ids)
    if deployed >= policy.max_vms:
        return []
    vm_name = free_vm_name(rule, policy, snapshot.vms)
    return [_make_deploy(rule, policy, best, deployed, vm_name, fallbacks)]


def _spot_targets(
    rule: CheapestHostnodeRule, policy: DeployPolicy, offers: list[Offer]
) -> list[Offer] | Report:
    """Return the offers a spot deploy tries, in order, or a Report when none fits the cap.

    The first is the cheapest offer on demand that leaves room for a spot bid under the
    cap. Its on-demand price may be above the cap, because a spot VM pays its bid plus
    storage. Up to MAX_SPOT_FALLBACKS more follow: the next cheapest offers on demand of
    the same size that leave room for a bid under the limit the guards count for the
    first offer, the lower of its on-demand price and the cap. Whether a hostnode
    accepts a bid that low is only known when the deploy step probes it.
    """
    cap = policy.max_usd_per_hour
    fitting = (i for i, offer in enumerate(offers) if spot_bid_ceiling(offer.price, cap) > 0)
    start = next(fitting, None)
    if start is None:
        return _storage_over_cap(rule, cap, offers)
    first = offers[start]

    # The same limit as tdbot.actions.guards.max_deploy_cost_usd_per_hour for the first.
    limit = min(first.price_usd_per_hour, cap)
    targets = [first]
    for offer in offers[start + 1 :]:
        if len(targets) > MAX_SPOT_FALLBACKS:
            break
        # The Deploy carries one size, so a hostnode that sizes the spec differently,
        # or another GPU model of the spec, is not a fallback.
        if _size_key(offer) == _size_key(first) and spot_bid_ceiling(offer.price, limit) > 0:
            targets.append(offer)
    return targets


def _size_key(offer: Offer) -> tuple[str, int, int, int, int]:
    sizing = offer.sizing
    return (sizing.gpu_model, sizing.gpu_count, sizing.vcpus, sizing.ram_gb, sizing.storage_gb)


def _storage_over_cap(rule: CheapestHostnodeRule, cap: float, offers: list[Offer]) -> Report:
    storage = min(offer.price.storage_usd for offer in offers)
    return Report(
        rule=rule.name,
        subject=SUBJECT_DEPLOY,
        summary=(
            f"No spot VM was deployed: storage for {_describe_spec(rule)} costs at least "
            f"${storage:.4f}/h on the {len(offers)} hostnodes that can host it, which leaves "
            f"no room for a spot bid under the cap ${cap:.4f}/h."
        ),
        evidence={
            "reason": "storage_over_cap",
            "max_usd_per_hour": cap,
            "min_storage_usd_per_hour": round(storage, PRICE_DECIMALS),
            "offers": len(offers),
        },
    )


def free_vm_name(
    rule: CheapestHostnodeRule, policy: DeployPolicy, vms: Mapping[str, VirtualMachine]
) -> str:
    """Return the name template with the lowest {n} that no listed VM has.

    A name is how a deploy whose response was lost is found again, so it must not be
    one a live VM already has; a number freed by a deleted VM is used again.
    """
    template = policy.name_template.replace("{rule}", rule.name)
    taken = {vm.name for vm in vms.values()}
    number = 1
    # A template without {n} gives one name; the executor blocks it while it is taken.
    while "{n}" in template and template.replace("{n}", str(number)) in taken:
        number += 1
    return template.replace("{n}", str(number))


def _make_deploy(
    rule: CheapestHostnodeRule,
    policy: DeployPolicy,
    best: Offer,
    deployed: int,
    vm_name: str,
    fallbacks: Sequence[Offer] = (),
) -> Deploy:
    sizing = best.sizing
    evidence: dict[str, Any] = {
        "offer": best.to_evidence(),
        "deployed_vms": deployed,
        "max_vms": policy.max_vms,
        "max_usd_per_hour": policy.max_usd_per_hour,
    }
    if rule.match.spot:
        evidence["spot"] = True
        evidence["max_bid_usd_per_hour"] = spot_bid_ceiling(best.price, policy.max_usd_per_hour)
        evidence["fallback_offers"] = [offer.to_evidence() for offer in fallbacks]
    fallback = spot_fallback_clause(len(fallbacks))
    return Deploy(
        rule=rule.name,
        subject=best.hostnode_id,
        summary=(
            f"Deploy {vm_name}: {sizing.gpu_count}x {sizing.gpu_model}, {sizing.vcpus} vCPUs, "
            f"{sizing.ram_gb} GB RAM, {sizing.storage_gb} GB storage on {best.hostnode_id} "
            f"({best.location}) {_deploy_price(rule, policy, best)}{fallback} "
            f"(cap ${policy.max_usd_per_hour:.4f}/h, VM {deployed + 1} of {policy.max_vms})."
        ),
        evidence=evidence,
        **best.deploy_fields(),
        vm_name=vm_name,
        operating_system=policy.operating_system,
        internal_ports=tuple(policy.internal_ports),
        ssh_public_key=policy.ssh_public_key,
        cloudinit_script=policy.cloudinit_script,
        max_usd_per_hour=policy.max_usd_per_hour,
        max_vms=policy.max_vms,
        confirm=policy.confirm,
        spot=rule.match.spot,
        fallback_hostnode_ids=tuple(offer.hostnode_id for offer in fallbacks),
    )


def spot_fallback_clause(fallbacks: int) -> str:
    """Return ", or on the next of N other hostnodes if it rejects the bid", or "" for none."""
    if fallbacks < 1:
        return ""
    others = "one other hostnode" if fallbacks == 1 else f"the next of {fallbacks} other hostnodes"
    return f", or on {others} if it rejects the bid"


def _deploy_price(rule: CheapestHostnodeRule, policy: DeployPolicy, best: Offer) -> str:
    if not rule.match.spot:
        return f"at ${best.price_usd_per_hour:.4f}/h"
    # The bid is found when the deploy is sent, so the summary gives its upper bound.
    bid = spot_bid_ceiling(best.price, policy.max_usd_per_hour)
    return (
        f"as a spot VM, bid up to ${bid:.4f}/h plus ${best.price.storage_usd:.4f}/h storage "
        f"(on-demand ${best.price_usd_per_hour:.4f}/h)"
    )


def _offer_evidence(rule: CheapestHostnodeRule, offers: list[Offer]) -> dict[str, Any]:
    best = offers[0]
    return {
        "hostnode_id": best.hostnode_id,
        "location": best.location,
        "gpu_model": best.gpu_model,
        "price_usd_per_hour": best.price_usd_per_hour,
        "price": best.price.to_evidence(),
        "top": [offer.to_evidence() for offer in offers[: rule.top]],
        "offers": len(offers),
    }


def _describe_spec(rule: CheapestHostnodeRule) -> str:
    spec = rule.match
    models = " or ".join(spec.gpu)
    return (
        f"{spec.gpu_count}x {models} with {spec.vcpus} vCPUs, {spec.ram_gb} GB RAM "
        f"and {spec.storage_gb} GB storage"
    )
