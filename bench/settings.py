"""Daemon settings, secrets and rules the benchmark stages share."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from bench.simprocess import SimulatorProcess
from bench.synthetic import gpu_models
from tdbot.config import (
    DaemonSettings,
    HeartbeatSettings,
    SafetySettings,
    Secrets,
    Settings,
    TensorDockSettings,
)
from tdbot.rules.schema import (
    BidLadder,
    CheapestHostnodeRule,
    HostnodeSpec,
    IdleSignals,
    IdleStopRule,
    LowBalanceRule,
    PriceAlert,
    RuleBase,
    SpotRebidRule,
    VmSelector,
)
from tdbot.simulator.hostnodes import load_packaged_marketplace

# The synthetic account burns about 265 USD per hour. No re-bid reaches this ceiling,
# so the fleet guard never blocks the re-bid that the reaction-time measure waits for.
UNLIMITED_FLEET_USD_PER_HOUR = 1_000_000.0
# Generous, because one list of 5,000 hostnodes takes over a second on a slow machine.
API_TIMEOUT_SECONDS = 60.0


def bench_settings(
    sim: SimulatorProcess,
    folder: Path,
    database: str,
    *,
    dry_run: bool,
    snapshot_max_age: timedelta | None = None,
) -> Settings:
    """Settings for a daemon in this process against the benchmark simulator."""
    daemon = DaemonSettings(rules_dir=folder / "no-rules", database=str(folder / database))
    if snapshot_max_age is not None:
        daemon = daemon.model_copy(update={"snapshot_max_age": snapshot_max_age})
    return Settings(
        tensordock=TensorDockSettings(base_url=sim.api_url, timeout_seconds=API_TIMEOUT_SECONDS),
        safety=SafetySettings(dry_run=dry_run, fleet_max_usd_per_hour=UNLIMITED_FLEET_USD_PER_HOUR),
        daemon=daemon.model_copy(update={"log_level": "WARNING"}),
        heartbeat=HeartbeatSettings(enabled=False),
    )


def bench_secrets(sim: SimulatorProcess) -> Secrets:
    return Secrets(api_key=sim.api_key, api_token=sim.api_token)


def twenty_rules() -> list[RuleBase]:
    """8 cheapest-hostnode, 4 spot re-bid, 4 idle-stop and 4 low-balance rules."""
    return [*_cheapest_rules(), *_spot_rules(), *_idle_rules(), *_balance_rules()]


def _cheapest_rules() -> list[RuleBase]:
    models = [info.model for info in gpu_models(load_packaged_marketplace())]
    specs = [
        HostnodeSpec(gpu=[models[0]], gpu_count=1, vcpus=8, ram_gb=32, storage_gb=200),
        HostnodeSpec(gpu=[models[1], models[2]], gpu_count=2, vcpus=16, ram_gb=64),
        HostnodeSpec(gpu=[models[3]], countries=["United States", "Canada"]),
        HostnodeSpec(gpu=[models[4]], gpu_count=4, vcpus=32, ram_gb=128, storage_gb=500),
        HostnodeSpec(gpu=[models[5]], min_uptime_percent=99.5),
        HostnodeSpec(gpu=models[6:10], gpu_count=1, vcpus=4, ram_gb=16),
        HostnodeSpec(gpu=[models[10]], cities=["Chicago", "Dallas", "Frankfurt"]),
        HostnodeSpec(gpu=models[11:], gpu_count=8, vcpus=64, ram_gb=256, storage_gb=1000),
    ]
    return [
        CheapestHostnodeRule(
            name=f"cheapest-{index}",
            kind="cheapest_hostnode",
            every=timedelta(minutes=10),
            match=spec,
            alert=PriceAlert(below_usd_per_hour=0.5 + index / 10),
        )
        for index, spec in enumerate(specs)
    ]


def _spot_rules() -> list[RuleBase]:
    selectors = [
        VmSelector(),
        VmSelector(names=["bench-09*"]),
        VmSelector(exclude_names=["bench-00*"]),
        VmSelector(names=["bench-spot-*", "bench-098*"]),
    ]
    return [
        SpotRebidRule(
            name=f"spot-{index}",
            kind="spot_rebid",
            every=timedelta(minutes=1),
            select=selector,
            bid=BidLadder(step_usd=0.03, max_usd_per_hour=3.0, max_steps=4),
        )
        for index, selector in enumerate(selectors)
    ]


def _idle_rules() -> list[RuleBase]:
    return [
        IdleStopRule(
            name=f"idle-{index}",
            kind="idle_stop",
            every=timedelta(minutes=2),
            select=VmSelector(names=[f"bench-0{index}*"]),
            window=timedelta(minutes=30 + 10 * index),
            signals=IdleSignals(gpu_util_below_percent=5, cpu_load_below=0.5),
        )
        for index in range(4)
    ]


def _balance_rules() -> list[RuleBase]:
    return [
        LowBalanceRule(
            name=f"balance-{index}",
            kind="low_balance",
            every=timedelta(minutes=15),
            fire_below_runway_hours=24.0 * (index + 1),
            clear_above_runway_hours=36.0 * (index + 1),
            fire_below_balance_usd=20.0 * (index + 1),
        )
        for index in range(4)
    ]
