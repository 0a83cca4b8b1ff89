"""Idle stop: decide from activity samples whether a running VM is idle, warn, then stop it.

A Running VM is idle only when all of these hold:

1. it has been running for at least `grace_after_start` and for at least `window`, so
   the whole window lies after its start. A VM with no stored start time counts as
   started now, so its clock starts at the first tick that observes it running;
2. the window [now - window, now] contains at least `min_samples` samples, the newest no
   older than `max_sample_age`, and none of them reports an error;
3. every configured signal is present in every sample and strictly below its threshold;
4. when the rule lists `busy_processes`, every sample lists the VM's processes and no
   command line matches a pattern (shell wildcards, case-sensitive, whole command line).

Only samples from the rule's `sources` count. A sample with a configured signal at or
above its threshold, or with a matching process, makes the VM busy, even if other samples
are missing or failed, because busy is the safe verdict. When the verdict is neither idle
nor busy it is unknown, and the user gets a report with a stable `reason` key instead of
a stop. An idle VM is warned first, and stopped once the warning is due.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from fnmatch import fnmatchcase
from typing import Any, Literal

from tdbot.evaluation.common import unknown_data_report
from tdbot.evaluation.model import (
    CancelIdleWarning,
    Decision,
    IdleSample,
    MarketSnapshot,
    Report,
    RuleState,
    Stop,
    WarnIdle,
)
from tdbot.rules.schema import IdleSignals, IdleStopRule
from tdbot.tensordock.models import VirtualMachine, VmStatus

SUBJECT_VMS = "vms"

# Each threshold in the rule and the sample field it applies to.
SIGNAL_FIELDS: dict[str, str] = {
    "gpu_util_below_percent": "gpu_util_percent",
    "gpu_memory_below_mb": "gpu_memory_mb",
    "cpu_load_below": "cpu_load",
    "network_below_kbps": "network_kbps",
}

# The pseudo-signal name of the process list in `missing_signals` evidence.
PROCESSES_SIGNAL = "processes"
# Matched processes listed in a verdict's evidence, and the characters kept of each.
MAX_EVIDENCE_PROCESSES = 5
MAX_EVIDENCE_COMMAND_CHARS = 200

VerdictKind = Literal["idle", "busy", "unknown", "starting"]


@dataclass(frozen=True)
class Verdict:
    """Whether a VM is idle over the window, with the reason when it is unknown."""

    kind: VerdictKind
    reason: str | None = None
    evidence: dict[str, Any] = field(default_factory=dict)


def evaluate_idle(
    rule: IdleStopRule, snapshot: MarketSnapshot, state: RuleState, now: datetime
) -> list[Decision]:
    """Decide warnings, cancellations and stops for one idle-stop rule."""
    # No VM is idle when the VM list is unknown, and a pending warning is left alone:
    # it is neither carried out nor cancelled until the list loads again.
    if snapshot.vms is None:
        return [
            unknown_data_report(
                rule.name,
                "vms",
                snapshot,
                SUBJECT_VMS,
                "no VM was found idle and nothing was stopped",
            )
        ]

    decisions: list[Decision] = []
    watched: set[str] = set()
    for vm_id in sorted(snapshot.vms):
        vm = snapshot.vms[vm_id]
        if not rule.select.matches(vm.id, vm.name):
            continue
        watched.add(vm_id)
        decisions.extend(_decide_vm(rule, vm, state, now))

    for vm_id in sorted(set(state.idle_warnings) - watched):
        decisions.append(
            _cancel(
                rule,
                vm_id,
                f"VM {vm_id} is no longer in the VM list or not watched by this rule.",
                "vm_gone",
            )
        )
    return decisions


def running_since_updates(
    rule: IdleStopRule, snapshot: MarketSnapshot, state: RuleState, now: datetime
) -> dict[str, datetime | None]:
    """Return the start times to store: `now` for a VM newly seen Running, None to forget one.

    A watched VM that is Running with no stored start gets `now`, which starts its grace
    period. A stored start is forgotten once its VM is not Running or not listed. Nothing
    changes while the VM list is unknown.
    """
    if snapshot.vms is None:
        return {}
    updates: dict[str, datetime | None] = {}
    for vm_id, vm in snapshot.vms.items():
        running = vm.status is VmStatus.RUNNING and rule.select.matches(vm.id, vm.name)
        if running and vm_id not in state.running_since:
            updates[vm_id] = now
        elif not running and vm_id in state.running_since:
            updates[vm_id] = None
    for vm_id in state.running_since:
        if vm_id not in snapshot.vms:
            updates[vm_id] = None
    return updates


def judge_vm(rule: IdleStopRule, vm_id: str, state: RuleState, now: datetime) -> Verdict:
    """Judge whether a Running VM has been idle over the rule's window."""
    started_at = state.running_since.get(vm_id, now)
    running_for = now - started_at
    base: dict[str, Any] = {
        "running_since": started_at.isoformat(),
        "start_time_known": vm_id in state.running_since,
        "window_seconds": rule.window.total_seconds(),
    }
    if running_for < rule.grace_after_start or running_for < rule.window:
        return Verdict(
            "starting", "starting", base | {"running_seconds": running_for.total_seconds()}
        )

    stored = state.idle_samples.get(vm_id, [])
    in_window = samples_in_window(stored, now - rule.window, now)
    samples = [sample for sample in in_window if sample.source in rule.sources]
    evidence = base | _window_evidence(rule, samples, now)
    if not samples:
        return Verdict("unknown", "no_samples", evidence)
    matched = matched_processes(rule.busy_processes, samples)
    if matched:
        return Verdict("busy", None, evidence | {"matched_processes": matched})
    if _any_busy(rule.signals, samples):
        return Verdict("busy", None, evidence)

    reason, detail = _unknown_reason(rule, samples, now)
    if reason is not None:
        return Verdict("unknown", reason, evidence | detail)
    return Verdict("idle", None, evidence)


def samples_in_window(
    samples: Sequence[IdleSample], start: datetime, end: datetime
) -> list[IdleSample]:
    """Return the samples taken in [start, end], oldest first."""
    return sorted((sample for sample in samples if start <= sample.at <= end), key=lambda s: s.at)


def configured_signals(signals: IdleSignals) -> dict[str, float]:
    """Return the configured thresholds keyed by the sample field they apply to."""
    thresholds = signals.model_dump()
    return {
        sample_field: float(thresholds[name])
        for name, sample_field in SIGNAL_FIELDS.items()
        if thresholds[name] is not None
    }


def matched_processes(
    patterns: Sequence[str], samples: Sequence[IdleSample]
) -> list[dict[str, str]]:
    """Return the distinct command lines in `samples` that match a pattern, newest first.

    Each entry names the command line (cut to MAX_EVIDENCE_COMMAND_CHARS), the pattern
    it matched and when it was seen; at most MAX_EVIDENCE_PROCESSES entries are returned.
    """
    found: dict[str, dict[str, str]] = {}
    for sample in reversed(samples):
        for command in sample.processes or ():
            pattern = _first_match(patterns, command)
            if pattern is None or command in found:
                continue
            found[command] = {
                "process": command[:MAX_EVIDENCE_COMMAND_CHARS],
                "pattern": pattern,
                "at": sample.at.isoformat(),
            }
            if len(found) == MAX_EVIDENCE_PROCESSES:
                return list(found.values())
    return list(found.values())


def _first_match(patterns: Sequence[str], command: str) -> str | None:
    for pattern in patterns:
        if fnmatchcase(command, pattern):
            return pattern
    return None


def _decide_vm(
    rule: IdleStopRule, vm: VirtualMachine, state: RuleState, now: datetime
) -> list[Decision]:
    warning = state.idle_warnings.get(vm.id)
    if vm.status is not VmStatus.RUNNING:
        if warning is None:
            return []
        summary = f"VM {vm.name} is {vm.status.value}, so its idle stop is cancelled."
        return [_cancel(rule, vm.id, summary, "not_running")]

    verdict = judge_vm(rule, vm.id, state, now)
    if verdict.kind == "unknown":
        return [_unknown_report(rule, vm, verdict)]
    if verdict.kind in ("busy", "starting"):
        if warning is None:
            return []
        if verdict.kind == "busy":
            summary = (
                f"VM {vm.name} is busy again{_busy_cause(verdict)}, so its idle stop is cancelled."
            )
            return [_cancel(rule, vm.id, summary, "busy", verdict.evidence)]
        summary = f"VM {vm.name} was started again, so its idle stop is cancelled."
        return [_cancel(rule, vm.id, summary, "restarted", verdict.evidence)]

    if warning is None:
        return [_warn(rule, vm, verdict, now)]
    if now >= warning.due_at:
        return [_stop(rule, vm, verdict, warning.warned_at)]
    return []


def _busy_cause(verdict: Verdict) -> str:
    matched = verdict.evidence.get("matched_processes")
    if not matched:
        return ""
    return f" (process {matched[0]['process']!r} is running)"


def _any_busy(signals: IdleSignals, samples: list[IdleSample]) -> bool:
    thresholds = configured_signals(signals)
    for sample in samples:
        for sample_field, threshold in thresholds.items():
            value = getattr(sample, sample_field)
            if value is not None and value >= threshold:
                return True
    return False


def _unknown_reason(
    rule: IdleStopRule, samples: list[IdleSample], now: datetime
) -> tuple[str | None, dict[str, Any]]:
    failed = [sample for sample in samples if sample.error is not None]
    if failed:
        newest = failed[-1]
        return "sample_error", {
            "error": newest.error,
            "error_at": newest.at.isoformat(),
            "source": newest.source,
        }

    newest_at = samples[-1].at
    if now - newest_at > rule.max_sample_age:
        return "stale_samples", {"max_sample_age_seconds": rule.max_sample_age.total_seconds()}
    if len(samples) < rule.min_samples:
        return "too_few_samples", {"min_samples": rule.min_samples}

    missing = sorted(
        sample_field
        for sample_field in configured_signals(rule.signals)
        if any(getattr(sample, sample_field) is None for sample in samples)
    )
    # A sample without a process list cannot show that a listed process was running.
    if rule.busy_processes and any(sample.processes is None for sample in samples):
        missing.append(PROCESSES_SIGNAL)
    if missing:
        return "missing_signal", {"missing_signals": missing}
    return None, {}


def _window_evidence(
    rule: IdleStopRule, samples: list[IdleSample], now: datetime
) -> dict[str, Any]:
    signals: dict[str, dict[str, float | None]] = {}
    for sample_field, threshold in configured_signals(rule.signals).items():
        values = [getattr(s, sample_field) for s in samples if getattr(s, sample_field) is not None]
        signals[sample_field] = {"max": max(values) if values else None, "threshold": threshold}
    newest_age = (now - samples[-1].at).total_seconds() if samples else None
    evidence: dict[str, Any] = {
        "sources": list(rule.sources),
        "samples": len(samples),
        "min_samples": rule.min_samples,
        "newest_sample_age_seconds": newest_age,
        "signals": signals,
    }
    if rule.busy_processes:
        evidence["busy_processes"] = list(rule.busy_processes)
    return evidence


def _unknown_report(rule: IdleStopRule, vm: VirtualMachine, verdict: Verdict) -> Report:
    explanations = {
        "no_samples": "no activity samples in the window",
        "sample_error": "failed activity probes in the window",
        "stale_samples": "no recent activity samples",
        "too_few_samples": "too few activity samples in the window",
        "missing_signal": "samples without a configured signal",
    }
    reason = verdict.reason or "unknown"
    explanation = explanations.get(reason, reason)
    missing = verdict.evidence.get("missing_signals")
    if reason == "missing_signal" and missing:
        explanation += f" ({', '.join(missing)})"
    return Report(
        rule=rule.name,
        subject=vm.id,
        summary=(
            f"Cannot tell whether VM {vm.name} is idle because there are "
            f"{explanation}, so it will not be stopped."
        ),
        evidence=verdict.evidence | {"reason": reason},
    )


def _warn(rule: IdleStopRule, vm: VirtualMachine, verdict: Verdict, now: datetime) -> WarnIdle:
    due_at = now + rule.warning
    return WarnIdle(
        rule=rule.name,
        subject=vm.id,
        summary=(
            f"VM {vm.name} has been idle for {_minutes(rule.window)}, so it will be "
            f"{_action_text(rule)} at {due_at.astimezone(UTC):%Y-%m-%d %H:%M} UTC "
            "unless it becomes busy."
        ),
        evidence=verdict.evidence
        | {"due_at": due_at.isoformat(), "action": rule.action, "vm_name": vm.name},
        due_at=due_at,
    )


def _stop(rule: IdleStopRule, vm: VirtualMachine, verdict: Verdict, warned_at: datetime) -> Stop:
    release = rule.action == "stop_release"
    saves = _savings(vm, release)
    return Stop(
        rule=rule.name,
        subject=vm.id,
        summary=f"VM {vm.name} stayed idle after the warning, so it is {_action_text(rule)}.",
        evidence=verdict.evidence
        | {"warned_at": warned_at.isoformat(), "action": rule.action, "saves_usd_per_hour": saves},
        release=release,
        saves_usd_per_hour=saves,
    )


def _savings(vm: VirtualMachine, release: bool) -> float | None:
    """Return what stopping saves per hour, or None when the VM's price is not reported.

    A plain stop keeps the GPU reserved and TensorDock bills it at the full rate, so it
    saves nothing. A stop that releases the resources saves all but the storage.
    """
    if not release:
        return 0.0
    if vm.full_price is None:
        return None
    return round(vm.full_price - (vm.storage_price or 0.0), 6)


def _cancel(
    rule: IdleStopRule,
    vm_id: str,
    summary: str,
    reason: str,
    evidence: dict[str, Any] | None = None,
) -> CancelIdleWarning:
    return CancelIdleWarning(
        rule=rule.name,
        subject=vm_id,
        summary=summary,
        evidence=(evidence or {}) | {"reason": reason},
    )


def _action_text(rule: IdleStopRule) -> str:
    return "stopped and its resources released" if rule.action == "stop_release" else "stopped"


def _minutes(duration: timedelta) -> str:
    minutes = int(duration.total_seconds() // 60)
    return f"{minutes} min" if minutes < 120 else f"{minutes / 60:g} h"
