"""Idle-stop rules: verdicts from activity samples, warnings, stops and cancellations."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tdbot.evaluation import evaluate
from tdbot.evaluation.idle import judge_vm, running_since_updates
from tdbot.evaluation.model import (
    CancelIdleWarning,
    Decision,
    IdleSample,
    IdleWarningState,
    MarketSnapshot,
    Report,
    RuleState,
    Stop,
    WarnIdle,
)
from tdbot.rules.schema import IdleStopRule
from tdbot.tensordock.models import Balance, Hostnode, VirtualMachine

FIXTURES = Path(__file__).parent / "fixtures" / "tensordock-v0"
NOW = datetime(2024, 11, 4, 3, 0, tzinfo=UTC)
H100_VM = "7dcd9ad2-3390-4258-adac-6c4cd8138325"  # Running, 2.86 compute + 0.025 storage
STOPPED_VM = "6607d135-8d46-4d09-8894-5b4a54ee2b31"  # dev-box-a4000, Stopped


def load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURES / name).read_text())
    return data


VMS = {
    key: VirtualMachine.model_validate({"id": key, **value})
    for key, value in load("client_list.ok.json")["virtualmachines"].items()
}
SNAPSHOT = MarketSnapshot(
    taken_at=NOW,
    hostnodes={
        key: Hostnode.model_validate({"id": key, **value})
        for key, value in load("marketplace.json")["hostnodes"].items()
    },
    vms=VMS,
    balance=Balance.model_validate(load("billing_balance.ok.json")),
)


def make_rule(**fields: Any) -> IdleStopRule:
    values: dict[str, Any] = {
        "name": "idle-h100",
        "kind": "idle_stop",
        "every": "1m",
        "select": {"ids": [H100_VM]},
        "window": "30m",
        "min_samples": 3,
        "max_sample_age": "5m",
        "grace_after_start": "15m",
        "warning": "15m",
        "signals": {"gpu_util_below_percent": 5, "cpu_load_below": 0.5},
    }
    values.update(fields)
    return IdleStopRule.model_validate(values)


def sample(minutes_ago: float, **fields: Any) -> IdleSample:
    values: dict[str, Any] = {"gpu_util_percent": 1.0, "cpu_load": 0.1}
    values.update(fields)
    return IdleSample(vm_id=H100_VM, at=NOW - timedelta(minutes=minutes_ago), **values)


QUIET = [sample(minutes) for minutes in (28, 20, 12, 4, 1)]


def state_with(
    samples: list[IdleSample] | None = None,
    warning_due_in: timedelta | None = None,
    running_for: timedelta | None = timedelta(hours=2),
) -> RuleState:
    warnings = {}
    if warning_due_in is not None:
        due_at = NOW + warning_due_in
        warnings[H100_VM] = IdleWarningState(
            warned_at=due_at - timedelta(minutes=15), due_at=due_at
        )
    running_since = {} if running_for is None else {H100_VM: NOW - running_for}
    return RuleState(
        idle_samples={H100_VM: QUIET if samples is None else samples},
        idle_warnings=warnings,
        running_since=running_since,
    )


def only(decisions: list[Decision]) -> Decision:
    assert len(decisions) == 1, decisions
    return decisions[0]


def test_unknown_vms_report_only() -> None:
    snapshot = replace(SNAPSHOT, vms=None, errors={"vms": "HTTP 502"})
    state = state_with(warning_due_in=-timedelta(minutes=5))

    decision = only(evaluate(make_rule(), snapshot, state, NOW))

    assert isinstance(decision, Report)
    assert decision.evidence["reason"] == "vms_unknown"


def test_idle_vm_warned() -> None:
    decision = only(evaluate(make_rule(), SNAPSHOT, state_with(), NOW))

    assert isinstance(decision, WarnIdle)
    assert decision.subject == H100_VM
    assert decision.due_at == NOW + timedelta(minutes=15)
    assert decision.evidence["samples"] == 5
    assert decision.evidence["signals"]["gpu_util_percent"] == {"max": 1.0, "threshold": 5.0}
    assert decision.evidence["signals"]["cpu_load"] == {"max": 0.1, "threshold": 0.5}


def test_busy_vm_never_warned() -> None:
    samples = [sample(minutes, gpu_util_percent=85.0) for minutes in (28, 20, 12, 4, 1)]

    assert evaluate(make_rule(), SNAPSHOT, state_with(samples), NOW) == []


def test_warning_due_stops() -> None:
    decision = only(evaluate(make_rule(), SNAPSHOT, state_with(warning_due_in=timedelta()), NOW))

    assert isinstance(decision, Stop)
    assert decision.release is False
    # A plain stop keeps the GPU reserved and billed, so it saves nothing.
    assert decision.saves_usd_per_hour == 0.0


def test_warning_due_stops_and_releases() -> None:
    rule = make_rule(action="stop_release")

    decision = only(evaluate(rule, SNAPSHOT, state_with(warning_due_in=-timedelta(minutes=1)), NOW))

    assert isinstance(decision, Stop)
    assert decision.release is True
    # Full price 2.885 minus storage 0.025 = compute 2.86.
    assert decision.saves_usd_per_hour == pytest.approx(2.86)


def test_warning_not_yet_due() -> None:
    state = state_with(warning_due_in=timedelta(minutes=5))

    assert evaluate(make_rule(), SNAPSHOT, state, NOW) == []


def test_burst_in_window_cancels_warning() -> None:
    samples = [*QUIET, sample(10, gpu_util_percent=60.0)]
    state = state_with(samples, warning_due_in=-timedelta(minutes=1))

    decision = only(evaluate(make_rule(), SNAPSHOT, state, NOW))

    assert isinstance(decision, CancelIdleWarning)
    assert decision.evidence["reason"] == "busy"


def test_burst_before_window_ignored() -> None:
    samples = [sample(31, gpu_util_percent=99.0, cpu_load=8.0), *QUIET]

    decision = only(evaluate(make_rule(), SNAPSHOT, state_with(samples), NOW))

    assert isinstance(decision, WarnIdle)


def test_value_at_threshold_is_busy() -> None:
    samples = [*QUIET, sample(2, gpu_util_percent=5.0)]

    assert judge_vm(make_rule(), H100_VM, state_with(samples), NOW).kind == "busy"


@pytest.mark.parametrize(
    ("samples", "reason"),
    [
        ([], "no_samples"),
        ([sample(28), sample(20), sample(12), sample(6)], "stale_samples"),
        ([sample(4), sample(1)], "too_few_samples"),
        ([*QUIET, sample(2, error="ssh: connection refused")], "sample_error"),
        ([*QUIET, sample(2, cpu_load=None)], "missing_signal"),
        ([sample(2, gpu_util_percent=None, cpu_load=None, error="timed out")], "sample_error"),
    ],
)
def test_unknown_data_never_stops(samples: list[IdleSample], reason: str) -> None:
    state = state_with(samples, warning_due_in=-timedelta(minutes=30))

    decision = only(evaluate(make_rule(), SNAPSHOT, state, NOW))

    assert isinstance(decision, Report)
    assert decision.subject == H100_VM
    assert decision.evidence["reason"] == reason


def test_missing_signal_names_it() -> None:
    samples = [*QUIET, sample(2, cpu_load=None)]

    verdict = judge_vm(make_rule(), H100_VM, state_with(samples), NOW)

    assert verdict.evidence["missing_signals"] == ["cpu_load"]


def test_unconfigured_signal_may_be_missing() -> None:
    # network_kbps is None in every sample, but the rule does not watch the network.
    assert judge_vm(make_rule(), H100_VM, state_with(), NOW).kind == "idle"


def test_busy_sample_beats_failed_probe() -> None:
    samples = [*QUIET, sample(3, error="timed out"), sample(2, cpu_load=3.0)]

    assert judge_vm(make_rule(), H100_VM, state_with(samples), NOW).kind == "busy"


@pytest.mark.parametrize(
    "running_for",
    [timedelta(minutes=10), timedelta(minutes=20), None],
    ids=["in-grace", "shorter-than-window", "start-unknown"],
)
def test_recent_start_not_warned(running_for: timedelta | None) -> None:
    state = state_with(running_for=running_for)

    assert evaluate(make_rule(), SNAPSHOT, state, NOW) == []
    assert judge_vm(make_rule(), H100_VM, state, NOW).kind == "starting"


def test_restart_cancels_warning() -> None:
    state = state_with(warning_due_in=-timedelta(minutes=1), running_for=timedelta(minutes=3))

    decision = only(evaluate(make_rule(), SNAPSHOT, state, NOW))

    assert isinstance(decision, CancelIdleWarning)
    assert decision.evidence["reason"] == "restarted"


def test_stopped_vm_warning_cancelled() -> None:
    rule = make_rule(select={"ids": [STOPPED_VM]})
    due_at = NOW - timedelta(minutes=1)
    state = RuleState(
        idle_warnings={
            STOPPED_VM: IdleWarningState(warned_at=NOW - timedelta(minutes=16), due_at=due_at)
        }
    )

    decision = only(evaluate(rule, SNAPSHOT, state, NOW))

    assert isinstance(decision, CancelIdleWarning)
    assert decision.subject == STOPPED_VM
    assert decision.evidence["reason"] == "not_running"


def test_gone_vm_warning_cancelled() -> None:
    vms = dict(VMS)
    del vms[H100_VM]

    decision = only(
        evaluate(
            make_rule(), replace(SNAPSHOT, vms=vms), state_with(warning_due_in=timedelta()), NOW
        )
    )

    assert isinstance(decision, CancelIdleWarning)
    assert decision.evidence["reason"] == "vm_gone"


def test_future_samples_ignored() -> None:
    samples = [*QUIET, sample(-5, gpu_util_percent=90.0)]

    assert judge_vm(make_rule(), H100_VM, state_with(samples), NOW).kind == "idle"


def test_other_running_vms_reported() -> None:
    # Every VM is selected and every Running one started long ago, but only the H100 VM
    # has samples: the other Running VMs get a "no_samples" report and nothing else.
    rule = make_rule(select={})
    running = [vm_id for vm_id, vm in VMS.items() if vm.status.value == "Running"]
    state = replace(state_with(), running_since=dict.fromkeys(running, NOW - timedelta(hours=2)))

    decisions = evaluate(rule, SNAPSHOT, state, NOW)

    assert [type(d) for d in decisions if d.subject == H100_VM] == [WarnIdle]
    others = [d for d in decisions if d.subject != H100_VM]
    assert all(isinstance(d, Report) for d in others)
    assert sorted(d.subject for d in others) == sorted(set(running) - {H100_VM})
    assert {d.evidence["reason"] for d in others if isinstance(d, Report)} == {"no_samples"}
    assert not any(d.spends_or_destroys for d in decisions)


def test_running_since_recorded_and_forgotten() -> None:
    rule = make_rule(select={"ids": [H100_VM, STOPPED_VM]})
    state = RuleState(running_since={STOPPED_VM: NOW - timedelta(days=1), "gone-vm": NOW})

    updates = running_since_updates(rule, SNAPSHOT, state, NOW)

    assert updates == {H100_VM: NOW, STOPPED_VM: None, "gone-vm": None}


def test_running_since_kept_when_unknown() -> None:
    snapshot = replace(SNAPSHOT, vms=None)
    state = RuleState(running_since={H100_VM: NOW - timedelta(hours=1)})

    assert running_since_updates(make_rule(), snapshot, state, NOW) == {}


def test_running_since_kept_while_running() -> None:
    state = RuleState(running_since={H100_VM: NOW - timedelta(hours=1)})

    assert running_since_updates(make_rule(), SNAPSHOT, state, NOW) == {}


# --- process allowlist ---------------------------------------------------------------

TRAINING = "/usr/bin/python3 train.py --epochs 10"
SHELL_ONLY = ("/sbin/init", "sshd: root@pts/0", "-bash", "tmux")


def with_processes(*processes: str) -> list[IdleSample]:
    return [sample(minutes, processes=processes) for minutes in (28, 20, 12, 4, 1)]


def test_matching_process_makes_busy() -> None:
    rule = make_rule(busy_processes=["*python*train.py*"])
    samples = with_processes(*SHELL_ONLY)
    samples[2] = replace(samples[2], processes=(*SHELL_ONLY, TRAINING))

    verdict = judge_vm(rule, H100_VM, state_with(samples), NOW)

    assert verdict.kind == "busy"
    [matched] = verdict.evidence["matched_processes"]
    assert matched["process"] == TRAINING
    assert matched["pattern"] == "*python*train.py*"
    assert matched["at"] == samples[2].at.isoformat()


def test_no_matching_process_stays_idle() -> None:
    rule = make_rule(busy_processes=["*python*train.py*", "jupyter-lab*"])

    verdict = judge_vm(rule, H100_VM, state_with(with_processes(*SHELL_ONLY)), NOW)

    assert verdict.kind == "idle"
    assert verdict.evidence["busy_processes"] == ["*python*train.py*", "jupyter-lab*"]


def test_process_pattern_case_sensitive() -> None:
    rule = make_rule(busy_processes=["*Train.py*"])

    verdict = judge_vm(rule, H100_VM, state_with(with_processes(TRAINING)), NOW)

    assert verdict.kind == "idle"


def test_process_pattern_matches_whole_line() -> None:
    # Without wildcards a pattern must equal the whole command line.
    exact = make_rule(busy_processes=["train.py"])
    whole = make_rule(busy_processes=[TRAINING])

    assert judge_vm(exact, H100_VM, state_with(with_processes(TRAINING)), NOW).kind == "idle"
    assert judge_vm(whole, H100_VM, state_with(with_processes(TRAINING)), NOW).kind == "busy"


def test_missing_process_list_unknown() -> None:
    rule = make_rule(busy_processes=["*train.py*"])
    samples = with_processes(*SHELL_ONLY)
    samples[3] = replace(samples[3], processes=None)
    state = state_with(samples, warning_due_in=-timedelta(minutes=5))

    decision = only(evaluate(rule, SNAPSHOT, state, NOW))

    assert isinstance(decision, Report)
    assert decision.evidence["reason"] == "missing_signal"
    assert decision.evidence["missing_signals"] == ["processes"]
    assert "samples without a configured signal (processes)" in decision.summary
    assert "will not be stopped" in decision.summary


def test_process_list_optional_without_patterns() -> None:
    # QUIET samples carry no process list, and the rule lists no busy processes.
    assert judge_vm(make_rule(), H100_VM, state_with(), NOW).kind == "idle"


def test_matching_process_beats_missing_list() -> None:
    rule = make_rule(busy_processes=["*train.py*"])
    samples = [*QUIET[:4], sample(1, processes=(TRAINING,))]

    assert judge_vm(rule, H100_VM, state_with(samples), NOW).kind == "busy"


def test_matching_process_cancels_warning() -> None:
    rule = make_rule(busy_processes=["*train.py*"])
    samples = with_processes(*SHELL_ONLY)
    samples[-1] = replace(samples[-1], processes=(TRAINING,))
    state = state_with(samples, warning_due_in=timedelta(minutes=5))

    decision = only(evaluate(rule, SNAPSHOT, state, NOW))

    assert isinstance(decision, CancelIdleWarning)
    assert decision.evidence["reason"] == "busy"
    assert TRAINING in decision.summary


def test_matched_processes_listed_at_most_five() -> None:
    rule = make_rule(busy_processes=["worker *"])
    workers = tuple(f"worker {index}" for index in range(8))

    verdict = judge_vm(rule, H100_VM, state_with(with_processes(*workers, workers[0])), NOW)

    assert len(verdict.evidence["matched_processes"]) == 5


# --- GPU memory, bursts and sources ----------------------------------------------------


def test_gpu_memory_held_is_busy() -> None:
    # A model loaded in GPU memory but not computing right now still counts as busy.
    rule = make_rule(signals={"gpu_util_below_percent": 5, "gpu_memory_below_mb": 1000})
    samples = [sample(minutes, gpu_memory_mb=500.0) for minutes in (28, 20, 12, 4)]
    samples.append(sample(1, gpu_util_percent=0.0, gpu_memory_mb=22000.0))

    verdict = judge_vm(rule, H100_VM, state_with(samples), NOW)

    assert verdict.kind == "busy"
    assert verdict.evidence["signals"]["gpu_memory_mb"] == {"max": 22000.0, "threshold": 1000.0}


def test_gpu_memory_released_is_idle() -> None:
    rule = make_rule(signals={"gpu_util_below_percent": 5, "gpu_memory_below_mb": 1000})
    samples = [sample(minutes, gpu_memory_mb=300.0) for minutes in (28, 20, 12, 4, 1)]

    assert judge_vm(rule, H100_VM, state_with(samples), NOW).kind == "idle"


def test_burst_restarts_idle_window() -> None:
    # One busy sample 10 minutes ago keeps the VM busy until it leaves the 30 m window.
    history = [sample(minutes) for minutes in range(60, 0, -4)]
    history.append(sample(10, gpu_util_percent=70.0))
    state = state_with(history)

    verdicts = {
        offset: judge_vm(make_rule(), H100_VM, state, NOW + timedelta(minutes=offset)).kind
        for offset in (0, 19)
    }
    later = [*history, *(sample(-minutes) for minutes in range(2, 24, 4))]
    after = judge_vm(make_rule(), H100_VM, state_with(later), NOW + timedelta(minutes=21))

    assert verdicts == {0: "busy", 19: "busy"}
    assert after.kind == "idle"


def test_other_source_samples_ignored() -> None:
    samples = [replace(s, source="ssh") for s in QUIET]

    verdict = judge_vm(make_rule(), H100_VM, state_with(samples), NOW)

    assert verdict.kind == "unknown"
    assert verdict.reason == "no_samples"
    assert verdict.evidence["sources"] == ["heartbeat"]


def test_both_sources_counted() -> None:
    rule = make_rule(sources=["heartbeat", "ssh"])
    samples = [replace(s, source="ssh") if i % 2 else s for i, s in enumerate(QUIET)]
    busy_ssh = [*samples, sample(2, gpu_util_percent=90.0, source="ssh")]

    assert judge_vm(rule, H100_VM, state_with(samples), NOW).kind == "idle"
    assert judge_vm(rule, H100_VM, state_with(busy_ssh), NOW).kind == "busy"


def test_grace_after_start_blocks_warning() -> None:
    rule = make_rule(window="10m", grace_after_start="1h")
    state = state_with(running_for=timedelta(minutes=45))

    assert evaluate(rule, SNAPSHOT, state, NOW) == []
    assert judge_vm(rule, H100_VM, state, NOW).evidence["running_seconds"] == 45 * 60
