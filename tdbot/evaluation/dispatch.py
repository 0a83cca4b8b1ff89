"""Evaluate any rule by dispatching on its kind."""

from __future__ import annotations

from datetime import datetime

from tdbot.evaluation.balance import evaluate_balance
from tdbot.evaluation.cheapest import evaluate_cheapest
from tdbot.evaluation.idle import evaluate_idle
from tdbot.evaluation.model import Decision, MarketSnapshot, RuleState
from tdbot.evaluation.spot import evaluate_spot
from tdbot.rules.schema import (
    CheapestHostnodeRule,
    IdleStopRule,
    LowBalanceRule,
    RuleBase,
    SpotRebidRule,
)


def evaluate(
    rule: RuleBase, snapshot: MarketSnapshot, state: RuleState, now: datetime
) -> list[Decision]:
    """Return the decisions of one rule for this tick; reads no clock and does no I/O.

    Raises ValueError when `now` is naive, and TypeError for a rule class with no evaluator.
    """
    if now.tzinfo is None:
        raise ValueError("now must be a timezone-aware datetime, such as datetime.now(UTC)")
    if isinstance(rule, CheapestHostnodeRule):
        return evaluate_cheapest(rule, snapshot, state, now)
    if isinstance(rule, SpotRebidRule):
        return evaluate_spot(rule, snapshot, state, now)
    if isinstance(rule, IdleStopRule):
        return evaluate_idle(rule, snapshot, state, now)
    if isinstance(rule, LowBalanceRule):
        return evaluate_balance(rule, snapshot, state, now)
    raise TypeError(
        f"no evaluator for rule {rule.name!r} of kind {rule.kind!r}; known kinds: "
        "cheapest_hostnode, spot_rebid, idle_stop, low_balance"
    )
