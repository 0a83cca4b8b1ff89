"""The daily digest: the last 24 hours of the account in one message.

Every money figure in it is an estimate, computed from what tdbot stored:

- Spend: for each VM, the hourly cost stored with each observation (the cost in the
  status it then had) times how long that observation held, summed over the 24 hours.
  An observation is written only when a VM's status, name or cost changes, so each
  one applies until the VM's next one. Time at an unknown cost is counted apart, which
  makes the spend a lower bound.
- Saved: a verified stop that released the VM's resources saves the price recorded
  with the action (full price minus storage) for every hour from the stop until the
  VM is next observed Running, counted inside the 24 hours. A plain stop saves
  nothing, because TensorDock keeps the GPU reserved and bills it in full. A re-bid
  that brought a VM back to Running saves nothing either; it keeps the VM working, so
  it is counted but not priced.

NOTE: a VM deleted from the account gets no observation that marks it gone, so its
last cost is counted until the end of the window. The spend is then too high, until
the VM list stores deletions.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from apscheduler.triggers.cron import CronTrigger

from tdbot.alerts.manager import REPORT_RULE_SUFFIX
from tdbot.clock import Clock
from tdbot.notify.base import Message, Notifier, NotifyError
from tdbot.store.db import Store
from tdbot.store.tables import ActionKind, ActionRecord, ActionState, AlertState, VmObservation
from tdbot.tensordock.models import VmStatus

logger = logging.getLogger("tdbot.alerts.digest")

DIGEST_SPAN = timedelta(hours=24)

# Firing alerts counted for the digest; far more than are open at once.
_MAX_FIRING_ALERTS = 1000

_HOUR_SECONDS = 3600.0


@dataclass(frozen=True)
class DigestFigures:
    """Figures of the digest for the span [since, until)."""

    since: datetime
    until: datetime
    spend_usd: float = 0.0
    unknown_cost_vm_hours: float = 0.0
    # Journal rows created in the span: state -> action kind -> count.
    actions: dict[str, dict[str, int]] = field(default_factory=dict)
    alerts_opened: int = 0
    alerts_resolved: int = 0
    alerts_firing: int = 0
    saved_usd: float = 0.0
    release_stops_counted: int = 0
    release_stops_unknown_price: int = 0
    plain_stops: int = 0
    rebids_back: int = 0


async def build_digest(store: Store, now: datetime) -> Message:
    """Build the digest of the 24 hours before `now`."""
    figures = await collect_figures(store, now)
    return digest_message(figures)


async def collect_figures(store: Store, now: datetime) -> DigestFigures:
    """Compute every figure of the digest of the 24 hours before `now`."""
    since = now - DIGEST_SPAN
    history = await store.vm_observation_history(since=since, until=now)
    spend, unknown_hours = estimate_spend(history, since, now)

    created = await store.actions_created_between(since, now)
    saved, counted, unknown_price = await _estimate_stop_savings(store, since, now)
    opened, resolved, firing = await _count_alerts(store, since, now)
    return DigestFigures(
        since=since,
        until=now,
        spend_usd=spend,
        unknown_cost_vm_hours=unknown_hours,
        actions=count_actions(created),
        alerts_opened=opened,
        alerts_resolved=resolved,
        alerts_firing=firing,
        saved_usd=saved,
        release_stops_counted=counted,
        release_stops_unknown_price=unknown_price,
        plain_stops=_count_verified(created, ActionKind.STOP, release=False),
        rebids_back=_count_verified(created, ActionKind.REBID),
    )


def estimate_spend(
    history: dict[str, list[VmObservation]], since: datetime, until: datetime
) -> tuple[float, float]:
    """Return (estimated spend in USD, VM-hours at an unknown cost) over [since, until).

    Each VM's observations must be oldest first, and each one applies until the next.
    """
    spend = 0.0
    unknown_hours = 0.0
    for observations in history.values():
        for index, observation in enumerate(observations):
            start = max(observation.observed_at, since)
            later = observations[index + 1 :]
            end = min(later[0].observed_at, until) if later else until
            if end <= start:
                continue
            hours = (end - start).total_seconds() / _HOUR_SECONDS
            if observation.hourly_cost_usd is None:
                unknown_hours += hours
            else:
                spend += observation.hourly_cost_usd * hours
    return spend, unknown_hours


def count_actions(actions: Sequence[ActionRecord]) -> dict[str, dict[str, int]]:
    """Count journal rows by state, then by action kind."""
    counts: dict[str, Counter[str]] = {}
    for action in actions:
        counts.setdefault(action.state, Counter())[action.kind] += 1
    return {state: dict(kinds) for state, kinds in counts.items()}


async def _estimate_stop_savings(
    store: Store, since: datetime, until: datetime
) -> tuple[float, int, int]:
    """Return (USD saved, stops counted, stops with an unknown price) by releasing stops."""
    stops = await store.actions_in_state(
        ActionKind.STOP.value, ActionState.VERIFIED, updated_before=until
    )
    saved = 0.0
    counted = 0
    unknown_price = 0
    for stop in stops:
        if not stop.params.get("release"):
            continue
        hours = await _hours_released(store, stop, since, until)
        if hours <= 0:
            continue
        rate = stop.params.get("saves_usd_per_hour")
        if not isinstance(rate, int | float):
            unknown_price += 1
            continue
        saved += float(rate) * hours
        counted += 1
    return saved, counted, unknown_price


async def _hours_released(
    store: Store, stop: ActionRecord, since: datetime, until: datetime
) -> float:
    """Hours inside [since, until) from the verified stop until the VM next ran."""
    # The row's last change is the read-back that verified the stop.
    stopped_at = stop.updated_at
    vm_id = stop.vm_id or stop.subject
    running = await store.first_vm_observation(
        vm_id, statuses=[VmStatus.RUNNING.value], after=stopped_at, until=until
    )
    end = running.observed_at if running is not None else until
    start = max(stopped_at, since)
    return max((end - start).total_seconds(), 0.0) / _HOUR_SECONDS


async def _count_alerts(store: Store, since: datetime, until: datetime) -> tuple[int, int, int]:
    """Return alerts (not reports) opened and resolved in the span, and firing now."""
    changed = [
        alert
        for alert in await store.alerts_changed_between(since, until)
        if not alert.rule.endswith(REPORT_RULE_SUFFIX)
    ]
    opened = sum(1 for alert in changed if since <= alert.first_fired_at < until)
    resolved = sum(
        1
        for alert in changed
        if alert.resolved_at is not None and since <= alert.resolved_at < until
    )
    firing = await store.list_alerts(state=AlertState.FIRING, limit=_MAX_FIRING_ALERTS)
    still = sum(1 for alert in firing if not alert.rule.endswith(REPORT_RULE_SUFFIX))
    return opened, resolved, still


def _count_verified(
    actions: Sequence[ActionRecord], kind: ActionKind, *, release: bool | None = None
) -> int:
    return sum(
        1
        for action in actions
        if action.kind == kind.value
        and action.state == ActionState.VERIFIED.value
        and (release is None or bool(action.params.get("release")) == release)
    )


# --- the message -------------------------------------------------------------------


def digest_message(figures: DigestFigures) -> Message:
    """Format the digest figures as one info message."""
    lines = [
        f"The 24 h to {_format_time(figures.until)}. Money figures are estimates.",
        _spend_line(figures),
        _actions_line(figures.actions),
        (
            f"Alerts: {figures.alerts_opened} opened, {figures.alerts_resolved} resolved, "
            f"{figures.alerts_firing} firing now."
        ),
        _savings_line(figures),
    ]
    if figures.plain_stops:
        lines.append(
            f"Plain stops: {figures.plain_stops}. They save nothing, because the GPU "
            "stays reserved and billed."
        )
    if figures.rebids_back:
        lines.append(
            f"Re-bids: {_count(figures.rebids_back, 'VM')} running again. A re-bid saves "
            "nothing but keeps the VM working."
        )
    return Message(title="Daily digest", lines=tuple(lines), severity="info")


def _spend_line(figures: DigestFigures) -> str:
    line = (
        f"Spend: about ${figures.spend_usd:.2f}, from each VM's hourly cost over the time "
        "it had it."
    )
    if figures.unknown_cost_vm_hours > 0:
        line += f" It leaves out {figures.unknown_cost_vm_hours:.1f} VM-hours at an unknown cost."
    return line


def _actions_line(actions: dict[str, dict[str, int]]) -> str:
    if not actions:
        return "Actions: none."
    parts = []
    # Most frequent state first; equal counts in alphabetical order.
    for state in sorted(actions, key=lambda name: (-sum(actions[name].values()), name)):
        kinds = actions[state]
        detail = ", ".join(f"{count} {kind}" for kind, count in sorted(kinds.items()))
        parts.append(f"{sum(kinds.values())} {state.replace('_', ' ')} ({detail})")
    return "Actions: " + "; ".join(parts) + "."


def _savings_line(figures: DigestFigures) -> str:
    stops = _count(figures.release_stops_counted, "idle stop")
    line = f"Saved: about ${figures.saved_usd:.2f} by {stops} that released resources."
    if figures.release_stops_unknown_price:
        unknown = _count(figures.release_stops_unknown_price, "stop")
        line += f" {unknown} with an unknown price not counted."
    return line


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def _format_time(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


# --- scheduling ----------------------------------------------------------------------


def digest_trigger(digest_time: str | None, timezone: str) -> CronTrigger | None:
    """Return a daily trigger at `digest_time` ("HH:MM") in `timezone`; None when unset."""
    if digest_time is None:
        return None
    hour, minute = (int(part) for part in digest_time.split(":"))
    return CronTrigger(hour=hour, minute=minute, timezone=ZoneInfo(timezone))


async def send_digest(store: Store, notifier: Notifier, clock: Clock) -> Message:
    """Build the digest for the clock's current time and send it; return it."""
    message = await build_digest(store, clock.now())
    try:
        await notifier.send(message)
    except NotifyError as error:
        logger.error("sending the daily digest failed: %s", error)
    else:
        logger.info("daily digest sent")
    return message
