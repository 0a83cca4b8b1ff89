"""Build the chat replies of the read-only commands as `Message`s.

Everything here is a pure function of its arguments. The Telegram layer renders a
`Message` with `render_chunks`, which HTML-escapes every title and line, so names
from the API or from users are never read as markup, and splits long replies.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from tdbot.actions.spot_bids import SpotCheck, accepted_by_total, spot_check_notes
from tdbot.alerts.messages import format_duration
from tdbot.bot.arguments import DEFAULT_TOP
from tdbot.daemon.engine import TickResult
from tdbot.evaluation.burn import burn_rate, vm_hourly_cost
from tdbot.evaluation.idle import Verdict
from tdbot.evaluation.model import IdleWarningState, MarketSnapshot
from tdbot.evaluation.pricing import Offer
from tdbot.notify.base import Message
from tdbot.rules.schema import HostnodeSpec, RuleBase
from tdbot.rules.schema import format_duration as rule_duration
from tdbot.store.tables import ActionRecord, AlertRecord, DecisionRecord
from tdbot.tensordock.models import Balance, Hostnode, VirtualMachine, VmStatus

# A pause without a duration lasts until /resume; it is stored as this far-off time.
PAUSED_UNTIL_RESUMED = datetime(9999, 1, 1, tzinfo=UTC)


def usd_per_hour(value: float | None) -> str:
    return "unknown" if value is None else f"${value:.4f}/h"


def moment(value: datetime | None) -> str:
    if value is None:
        return "never"
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def error_message(text: str) -> Message:
    """Build a short warning reply for a command that could not be carried out."""
    return Message(title=text, severity="warning")


# --- /status -------------------------------------------------------------------------


@dataclass(frozen=True)
class RuleStatus:
    """The data /status shows for one rule."""

    rule: RuleBase
    last_tick_at: datetime | None
    last_result: TickResult | None
    next_run_at: datetime | None
    paused_until: datetime | None


def status_message(
    *,
    now: datetime,
    started_at: datetime | None,
    dry_run: bool,
    rules: Sequence[RuleStatus],
    snapshot: MarketSnapshot | None,
    snapshot_error: str | None,
    rejected_updates: int,
) -> Message:
    """Describe daemon health: uptime, dry run, each rule's last and next tick, API health."""
    uptime = "unknown" if started_at is None else format_duration(now - started_at)
    lines = [
        f"Up for {uptime}, since {moment(started_at)}.",
        f"Dry run: {'on, nothing is sent to the API' if dry_run else 'off'}.",
        f"Rules: {len(rules)}.",
    ]
    lines.extend(_rule_status_line(status, now) for status in rules)
    lines.append(_api_health(snapshot, snapshot_error))
    lines.append(f"Rejected updates from users or chats not on the allowlist: {rejected_updates}.")
    return Message(title="tdbot status", lines=tuple(lines))


def _rule_status_line(status: RuleStatus, now: datetime) -> str:
    parts = [f"• {status.rule.name}:"]
    if status.paused_until is not None and status.paused_until > now:
        parts.append(f"paused {_until(status.paused_until)};")
    parts.append(f"last tick {moment(status.last_tick_at)}, {_result_text(status.last_result)};")
    next_run = moment(status.next_run_at) if status.next_run_at else "not scheduled"
    parts.append(f"next run {next_run}.")
    return " ".join(parts)


def _result_text(result: TickResult | None) -> str:
    if result is None:
        return "no result yet"
    if result.error is not None:
        return f"failed: {result.error}"
    if result.skipped is not None:
        return f"skipped: {result.skipped}"
    actions = ", ".join(f"{o.status.value}" for o in result.outcomes) or "no actions"
    return f"ok, {len(result.decisions)} decisions, {actions}"


def _api_health(snapshot: MarketSnapshot | None, error: str | None) -> str:
    if snapshot is None:
        return f"API: no snapshot ({error or 'not loaded'})."
    loaded = [
        name
        for name, part in (
            ("hostnodes", snapshot.hostnodes),
            ("VMs", snapshot.vms),
            ("balance", snapshot.balance),
        )
        if part is not None
    ]
    text = f"API: snapshot of {moment(snapshot.taken_at)} loaded {', '.join(loaded) or 'nothing'}"
    if snapshot.errors:
        failures = "; ".join(f"{part} failed: {reason}" for part, reason in snapshot.errors.items())
        return f"{text}; {failures}."
    return f"{text}, no errors."


def _until(until: datetime) -> str:
    return "until /resume" if until >= PAUSED_UNTIL_RESUMED else f"until {moment(until)}"


# --- /vms and /vm --------------------------------------------------------------------


def vm_line(vm: VirtualMachine, hostnodes: Mapping[str, Hostnode] | None = None) -> str:
    """Describe a VM in one line: name, status, type, GPUs, spot bid and its cost now."""
    cost, estimated = vm_hourly_cost(vm, hostnodes)
    kind = f"spot, bid {usd_per_hour(vm.spot_bid)}" if vm.is_spot else "on-demand"
    gpu = f"{vm.specs.gpu.amount}x {vm.specs.gpu.type or 'no GPU'}"
    cost_text = usd_per_hour(cost) + (" (estimated)" if estimated else "")
    return (
        f"• {vm.name or '(no name)'} [{vm.id[:8]}]: {vm.status.value}, {kind}, {gpu}, {cost_text}"
    )


def vms_message(snapshot: MarketSnapshot) -> Message:
    vms = snapshot.vms or {}
    ordered = sorted(vms.values(), key=lambda vm: (vm.name, vm.id))
    lines = [vm_line(vm, snapshot.hostnodes) for vm in ordered] or ["The account has no VMs."]
    total, estimated = burn_rate(vms, snapshot.hostnodes)
    lines.append(f"Total: {usd_per_hour(total)}{' (estimated)' if estimated else ''}.")
    return Message(title=f"{len(vms)} VMs", lines=tuple(lines))


@dataclass(frozen=True)
class IdleView:
    """The verdict of one idle_stop rule on a VM, with its pending warning."""

    rule: str
    verdict: Verdict | None
    warning: IdleWarningState | None
    note: str | None = None


def vm_message(vm: VirtualMachine, idle: Sequence[IdleView]) -> Message:
    """Describe a VM: details, price, and idle verdict with the evidence behind it."""
    cost, estimated = vm_hourly_cost(vm, None)
    specs = vm.specs
    lines = [
        f"Id: {vm.id}",
        f"Status: {vm.status.value}",
        f"Type: {'spot' if vm.is_spot else 'on-demand'}",
        f"Spot bid: {usd_per_hour(vm.spot_bid) if vm.is_spot else 'none (on-demand)'}",
        f"Costs now: {usd_per_hour(cost)}{' (estimated)' if estimated else ''}",
        f"Full price (Running or Stopped): {usd_per_hour(vm.full_price)}",
        f"Storage price: {usd_per_hour(vm.storage_price)}",
        f"Specs: {specs.gpu.amount}x {specs.gpu.type or 'no GPU'}, {specs.vcpus} vCPUs, "
        f"{specs.ram} GB RAM, {specs.storage} GB storage",
        f"Hostnode: {vm.hostnode or 'unknown'} ({vm.location or _place(vm)})",
    ]
    if vm.ssh_host and vm.ssh_port:
        lines.append(f"SSH: {vm.default_user}@{vm.ssh_host} -p {vm.ssh_port}")
    if not idle:
        lines.append("Idle: no idle_stop rule watches this VM.")
    lines.extend(_idle_lines(view) for view in idle)
    return Message(title=f"VM {vm.name or vm.id}", lines=tuple(lines))


def _place(vm: VirtualMachine) -> str:
    return ", ".join(part for part in (vm.city, vm.state, vm.country) if part) or "unknown place"


def _idle_lines(view: IdleView) -> str:
    head = f"Idle ({view.rule}): "
    if view.verdict is None:
        return head + (view.note or "not judged")
    verdict = view.verdict
    text = head + verdict.kind + (f" ({verdict.reason})" if verdict.reason else "")
    text += "; " + describe_idle_evidence(verdict.evidence)
    if view.warning is not None:
        text += f"; warned {moment(view.warning.warned_at)}, stop due {moment(view.warning.due_at)}"
    return text


def describe_idle_evidence(evidence: Mapping[str, Any]) -> str:
    """Summarise idle evidence: samples, newest sample age, each signal's max and threshold."""
    parts = []
    if "samples" in evidence:
        parts.append(f"{evidence['samples']} samples (at least {evidence.get('min_samples')})")
    age = evidence.get("newest_sample_age_seconds")
    if age is not None:
        parts.append(f"newest {format_duration(timedelta(seconds=age))} old")
    for name, signal in (evidence.get("signals") or {}).items():
        parts.append(f"{name} max {_number(signal.get('max'))} (idle below {signal['threshold']})")
    if "running_seconds" in evidence:
        parts.append(
            f"running for {format_duration(timedelta(seconds=evidence['running_seconds']))}"
        )
    if "error" in evidence:
        parts.append(f"probe error: {evidence['error']}")
    if "missing_signals" in evidence:
        parts.append(f"missing signals: {', '.join(evidence['missing_signals'])}")
    return ", ".join(parts) or "no evidence"


def _number(value: float | None) -> str:
    return "none" if value is None else f"{value:g}"


# --- /balance ------------------------------------------------------------------------


def balance_message(balance: Balance, snapshot: MarketSnapshot, now: datetime) -> Message:
    """Describe the balance, the burn rate from the API and the VM list, and the runway.

    The runway uses the larger of the two rates, so it errs toward running out sooner.
    """
    vms = snapshot.vms
    lines = [
        f"Balance: ${balance.balance:.2f}",
        f"Burn rate billed by the API: {usd_per_hour(balance.hourly_cost)}",
    ]
    rate = balance.hourly_cost
    if vms is None:
        lines.append(
            f"The VM list failed to load ({snapshot.errors.get('vms', 'no error recorded')})."
        )
    else:
        total, estimated = burn_rate(vms, snapshot.hostnodes)
        lines.append(
            f"Burn rate of the VM list: {usd_per_hour(total)}"
            + (" (estimated, a lower bound)" if estimated else "")
        )
        lines.extend(_burn_parts(vms, snapshot.hostnodes))
        rate = max(rate, total)
    if rate <= 0:
        lines.append("Runway: unlimited, nothing is billed.")
    else:
        hours = balance.balance / rate
        lines.append(f"Runway: {hours:.1f} h at {usd_per_hour(rate)}.")
        lines.append(f"The money runs out at {moment(now + timedelta(hours=hours))}.")
    return Message(title="Balance", lines=tuple(lines))


def _burn_parts(
    vms: Mapping[str, VirtualMachine], hostnodes: Mapping[str, Hostnode] | None
) -> list[str]:
    groups = {
        "Running": (VmStatus.RUNNING,),
        "Stopped, billed in full": (VmStatus.STOPPED,),
        "Released or outbid, storage only": (VmStatus.STOPPED_DISASSOCIATED, VmStatus.OUTBID),
    }
    lines = []
    for label, statuses in groups.items():
        members = [vm for vm in vms.values() if vm.status in statuses]
        if members:
            cost = sum(vm_hourly_cost(vm, hostnodes)[0] for vm in members)
            lines.append(f"• {label}: {len(members)} VMs, {usd_per_hour(cost)}")
    return lines


# --- /cheapest -----------------------------------------------------------------------


def cheapest_message(
    spec: HostnodeSpec,
    offers: Sequence[Offer],
    rejections: Mapping[str, int],
    *,
    spot_checks: Sequence[SpotCheck] | None = None,
    spot_check_limit: int = 0,
    top: int = DEFAULT_TOP,
) -> Message:
    """List the cheapest offers with their price split, or why no hostnode fits.

    With `spot_checks`, the reply lists the `top` offers whose hostnode accepted a spot
    bid, cheapest spot price first, and names the offers that were rejected or unchecked.
    `spot_check_limit` is how many offers the search would have checked at most.
    """
    title = f"Cheapest hostnodes for {spec.gpu_count}x {', '.join(spec.gpu)}"
    if spot_checks:
        title = f"Cheapest spot hostnodes for {spec.gpu_count}x {', '.join(spec.gpu)}"
    if not offers and not spot_checks:
        reasons = ", ".join(f"{reason}: {count}" for reason, count in rejections.items())
        return Message(
            title=title, lines=(f"No hostnode can host this spec ({reasons or 'none listed'}).",)
        )
    lines = [
        f"{spec.vcpus} vCPUs, {spec.ram_gb} GB RAM, {spec.storage_gb} GB storage"
        + (f", in {', '.join(spec.countries)}" if spec.countries else "")
    ]
    if spot_checks:
        lines.extend(_spot_lines(spec, spot_checks, spot_check_limit, top))
    for rank, offer in enumerate(offers, start=1):
        lines.extend(_offer_lines(rank, offer))
    return Message(title=title, lines=tuple(lines))


def _spot_lines(
    spec: HostnodeSpec, checks: Sequence[SpotCheck], check_limit: int, top: int
) -> list[str]:
    accepted = accepted_by_total(checks)[:top]
    lines: list[str] = []
    for rank, check in enumerate(accepted, start=1):
        offer, quote = check.offer, check.quote
        assert quote is not None
        uptime = "unknown" if offer.uptime_percent is None else f"{offer.uptime_percent:.2f}%"
        lines.append(
            f"{rank}. {usd_per_hour(quote.total_usd_per_hour)} spot on {offer.hostnode_id} "
            f"({offer.location}, uptime {uptime})"
        )
        lines.append(
            f"   {offer.sizing.gpu_count}x {offer.sizing.gpu_model}: bid "
            f"{usd_per_hour(quote.bid_usd_per_hour)} + {offer.sizing.storage_gb} GB storage "
            f"${quote.storage_usd_per_hour:.4f}; on-demand {usd_per_hour(offer.price.total_usd)}"
        )

    lines.extend(spot_check_notes(checks, spec.max_usd_per_hour, check_limit))
    return lines


def _offer_lines(rank: int, offer: Offer) -> list[str]:
    price, sizing = offer.price, offer.sizing
    uptime = "unknown" if offer.uptime_percent is None else f"{offer.uptime_percent:.2f}%"
    lines = [
        f"{rank}. {usd_per_hour(price.total_usd)} on {offer.hostnode_id} ({offer.location}, "
        f"uptime {uptime})",
        f"   {sizing.gpu_count}x {sizing.gpu_model} ${price.gpu_usd:.4f} + {sizing.vcpus} vCPUs "
        f"${price.cpu_usd:.4f} + {sizing.ram_gb} GB RAM ${price.ram_usd:.4f} + "
        f"{sizing.storage_gb} GB storage ${price.storage_usd:.4f}",
    ]
    if sizing.adjustments:
        lines.append(f"   adjusted: {'; '.join(sizing.adjustments)}")
    return lines


# --- /rules and /alerts --------------------------------------------------------------


def rules_message(
    rules: Sequence[RuleBase], paused: Mapping[str, datetime], global_dry_run: bool, now: datetime
) -> Message:
    lines = [_rule_line(rule, paused.get(rule.name), global_dry_run, now) for rule in rules]
    return Message(title=f"{len(rules)} rules", lines=tuple(lines or ["No rules are loaded."]))


def _rule_line(
    rule: RuleBase, paused_until: datetime | None, global_dry_run: bool, now: datetime
) -> str:
    if rule.every is not None:
        schedule = f"every {rule_duration(rule.every)}"
    else:
        schedule = f"cron '{rule.cron}' ({rule.timezone})"
    states = []
    if not rule.enabled:
        states.append("disabled")
    if paused_until is not None and paused_until > now:
        states.append(f"paused {_until(paused_until)}")
    if rule.dry_run:
        states.append("dry run")
    elif global_dry_run:
        states.append("dry run (global)")
    return f"• {rule.name}: {rule.kind}, {schedule}; {', '.join(states) or 'active'}"


def alerts_message(alerts: Iterable[AlertRecord], now: datetime) -> Message:
    lines = []
    for alert in alerts:
        silenced = ""
        if alert.silenced_until is not None and alert.silenced_until > now:
            silenced = f", silenced until {moment(alert.silenced_until)}"
        lines.append(
            f"• #{alert.id} {alert.rule}/{alert.subject} ({alert.severity}, since "
            f"{moment(alert.first_fired_at)}{silenced}): {alert.message}"
        )
    return Message(title=f"{len(lines)} open alerts", lines=tuple(lines or ["No alert is open."]))


# --- /why ----------------------------------------------------------------------------


def why_message(action: ActionRecord, decisions: Sequence[DecisionRecord]) -> Message:
    """Describe a journal row with its API calls, and the decision behind it."""
    lines = [
        f"Rule: {action.rule}",
        f"Kind: {action.kind} of {action.subject}"
        + (f" (VM {action.vm_id})" if action.vm_id else ""),
        f"State: {action.state}",
        f"Recorded {moment(action.created_at)}, updated {moment(action.updated_at)}",
        "Parameters: " + (_pairs(action.params) or "none"),
    ]
    if action.error:
        lines.append(f"Error: {action.error}")
    if action.result:
        lines.append("Result: " + _pairs(action.result))
    lines.append(f"API calls: {len(action.api_calls)}")
    lines.extend(_call_line(call) for call in action.api_calls)
    if not decisions:
        lines.append("No stored decision matches this action.")
    for decision in decisions:
        lines.append(
            f"Decision ({decision.kind}, {moment(decision.created_at)}): {decision.summary}"
        )
        lines.append("Evidence: " + (_pairs(decision.evidence) or "none"))
    return Message(title=f"Action {action.id}", lines=tuple(lines))


def _call_line(call: Mapping[str, Any]) -> str:
    vm = f" {call['vm_id']}" if call.get("vm_id") else ""
    return f"• {call.get('at', '?')} {call.get('endpoint')}{vm}: {call.get('outcome')}"


def _pairs(values: Mapping[str, Any]) -> str:
    return ", ".join(f"{key}={value}" for key, value in values.items())
