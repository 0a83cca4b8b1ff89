"""Low balance: alert before the account's money runs out, with separate fire and clear levels.

The alert (subject "account") fires when the runway (balance / hourly cost) or the
balance falls below its fire level. Once open it resolves only when both are above
their clear levels, so a value that hovers between the two levels keeps the alert open
instead of flapping. While the alert is open, every tick re-fires it with fresh
evidence and a severity that can rise or fall.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from tdbot.evaluation.burn import burn_rate
from tdbot.evaluation.common import unknown_data_report
from tdbot.evaluation.model import (
    Decision,
    FireAlert,
    MarketSnapshot,
    ResolveAlert,
    RuleState,
    Severity,
)
from tdbot.rules.schema import LowBalanceRule
from tdbot.tensordock.models import Balance

SUBJECT_ACCOUNT = "account"

# When the balance runs out, TensorDock stops the account's servers and later deletes
# them with their data. Below either level the alert is critical rather than a warning,
# since only a few hours remain to top up. TensorDock is also reported to need at least
# 1 USD of balance to deploy.
CRITICAL_RUNWAY_HOURS = 6.0
CRITICAL_BALANCE_USD = 1.0


def evaluate_balance(
    rule: LowBalanceRule, snapshot: MarketSnapshot, state: RuleState, now: datetime
) -> list[Decision]:
    """Decide whether the low-balance alert fires, stays open or resolves."""
    balance = snapshot.balance
    if balance is None:
        return [
            unknown_data_report(
                rule.name,
                "balance",
                snapshot,
                SUBJECT_ACCOUNT,
                "the runway is unknown and no alert changed",
            )
        ]

    evidence = _evidence(rule, snapshot, balance, now)
    is_open = SUBJECT_ACCOUNT in state.open_alerts
    if is_open and _above_clear_levels(rule, balance):
        return [
            ResolveAlert(
                rule=rule.name,
                subject=SUBJECT_ACCOUNT,
                summary=f"The balance recovered: {_describe(balance, now)}.",
                evidence=evidence,
            )
        ]
    if is_open or _below_fire_levels(rule, balance):
        return [
            FireAlert(
                rule=rule.name,
                subject=SUBJECT_ACCOUNT,
                severity=severity(balance),
                summary=f"Low balance: {_describe(balance, now)}.",
                evidence=evidence,
            )
        ]
    return []


def severity(balance: Balance) -> Severity:
    """Return critical when the money runs out within hours or is nearly gone, else warning."""
    runway = balance.runway_hours
    if runway is not None and runway < CRITICAL_RUNWAY_HOURS:
        return Severity.CRITICAL
    if balance.balance < CRITICAL_BALANCE_USD:
        return Severity.CRITICAL
    return Severity.WARNING


def _below_fire_levels(rule: LowBalanceRule, balance: Balance) -> bool:
    runway = balance.runway_hours
    runway_low = (
        rule.fire_below_runway_hours is not None
        and runway is not None
        and runway < rule.fire_below_runway_hours
    )
    balance_low = (
        rule.fire_below_balance_usd is not None and balance.balance < rule.fire_below_balance_usd
    )
    return runway_low or balance_low


def _above_clear_levels(rule: LowBalanceRule, balance: Balance) -> bool:
    runway = balance.runway_hours
    clear_runway = rule.clear_runway_hours
    clear_balance = rule.clear_balance_usd
    # No hourly cost means an infinite runway, which is above every level.
    runway_ok = clear_runway is None or runway is None or runway > clear_runway
    balance_ok = clear_balance is None or balance.balance > clear_balance
    return runway_ok and balance_ok


def _evidence(
    rule: LowBalanceRule, snapshot: MarketSnapshot, balance: Balance, now: datetime
) -> dict[str, Any]:
    runway = balance.runway_hours
    runs_out_at = now + timedelta(hours=runway) if runway is not None else None
    evidence: dict[str, Any] = {
        "balance_usd": balance.balance,
        "hourly_cost_usd": balance.hourly_cost,
        "runway_hours": round(runway, 2) if runway is not None else None,
        "runs_out_at": runs_out_at.isoformat() if runs_out_at is not None else None,
        "fire_below_runway_hours": rule.fire_below_runway_hours,
        "clear_above_runway_hours": rule.clear_runway_hours,
        "fire_below_balance_usd": rule.fire_below_balance_usd,
        "clear_above_balance_usd": rule.clear_balance_usd,
        "severity_reason": _severity_reason(balance),
    }
    if snapshot.vms is not None:
        vms_cost, estimated = burn_rate(snapshot.vms, snapshot.hostnodes)
        evidence["vms_hourly_cost_usd"] = vms_cost
        evidence["vms_hourly_cost_estimated"] = estimated
    return evidence


def _severity_reason(balance: Balance) -> str | None:
    runway = balance.runway_hours
    if runway is not None and runway < CRITICAL_RUNWAY_HOURS:
        return f"runway under {CRITICAL_RUNWAY_HOURS:g} h"
    if balance.balance < CRITICAL_BALANCE_USD:
        return f"balance under {CRITICAL_BALANCE_USD:g} USD"
    return None


def _describe(balance: Balance, now: datetime) -> str:
    runway = balance.runway_hours
    if runway is None:
        return f"${balance.balance:.2f} left and nothing is billed"
    runs_out_at = now + timedelta(hours=runway)
    return (
        f"${balance.balance:.2f} left at ${balance.hourly_cost:.4f}/h lasts {runway:.1f} h, "
        f"until {runs_out_at.astimezone(UTC):%Y-%m-%d %H:%M} UTC"
    )
