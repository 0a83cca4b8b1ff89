"""`tdbot demo`: the real daemon against a simulated account on an accelerated clock.

Nothing here is scripted on tdbot's side: the demo starts the simulator on loopback,
seeds an account, and changes the simulated world (a spot price rises, the user tops
up the balance). The daemon runs the shipped example rules, reads those changes
through the API and the heartbeat endpoint, and acts on them as it would in production.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import sys
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import TextIO

import httpx

from tdbot.config import (
    AlertSettings,
    DaemonSettings,
    HeartbeatSettings,
    Secrets,
    Settings,
    TelegramSettings,
    TensorDockSettings,
)
from tdbot.daemon.heartbeat import agent_token
from tdbot.daemon.runner import Daemon, build_notifier, run_daemon
from tdbot.rules import load_rules
from tdbot.rules.schema import RuleBase
from tdbot.simulator.clock import SimClock
from tdbot.simulator.market import SimulatedMarket
from tdbot.simulator.server import SimulatorServer, serve
from tdbot.simulator.vms import SimVm
from tdbot.store.db import Store
from tdbot.tensordock.models import VmStatus

logger = logging.getLogger("tdbot.demo")

# Hostnodes of the packaged marketplace the demo account rents from.
HOST_4090 = "0b60f80c-e16a-4cda-a8cd-dbc01cc0512c"  # Las Vegas, RTX 4090
HOST_A4000 = "ba48764f-e010-4e89-9172-ddc4b7202787"  # Winnipeg, RTX A4000
HOST_3090 = "3eed78e7-25ea-41a4-b111-186a9f980de9"  # Joplin, RTX 3090, spot
GPU_3090 = "geforcertx3090-pcie-24gb"

START_BALANCE_USD = 15.0
TOP_UP_USD = 100.0
# Simulated minutes after the start at which the demo changes the world.
OUTBID_AT = timedelta(minutes=3)
TOP_UP_AFTER = timedelta(minutes=30)

# Shorter windows than the shipped examples, so every rule acts within about a minute
# at the default speed of 60 simulated seconds per real second.
DEMO_OVERRIDES: dict[str, dict[str, object]] = {
    "idle-stop": {
        "every": timedelta(minutes=1),
        "window": timedelta(minutes=10),
        "grace_after_start": timedelta(minutes=5),
    },
    "low-balance": {"every": timedelta(minutes=5)},
}


@dataclass
class DemoAccount:
    """The simulated VMs the story is about."""

    busy: SimVm
    idle: SimVm
    spot: SimVm


@dataclass
class Progress:
    """Flags for each rule kind seen acting, with the time of each first act."""

    cheapest_alert: bool = False
    spot_rebid: bool = False
    idle_warned: bool = False
    idle_stopped: bool = False
    balance_fired: bool = False
    balance_cleared: bool = False
    events: list[tuple[datetime, str]] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return all(
            (
                self.cheapest_alert,
                self.spot_rebid,
                self.idle_stopped,
                self.balance_fired,
                self.balance_cleared,
            )
        )


def example_rules_dir() -> Path:
    """Return the shipped example rules: packaged in a wheel, or the repository's folder."""
    packaged = Path(str(resources.files("tdbot"))) / "data" / "rules"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "rules"


def demo_rules() -> list[RuleBase]:
    """Load the example rules and shorten their windows for the accelerated clock."""
    rule_set = load_rules(example_rules_dir())
    if rule_set.errors:
        problems = "; ".join(str(error) for error in rule_set.errors)
        raise RuntimeError(f"the shipped example rules are invalid: {problems}")
    rules: list[RuleBase] = []
    for loaded in rule_set.rules:
        overrides = DEMO_OVERRIDES.get(loaded.rule.name, {})
        rules.append(loaded.rule.model_copy(update=overrides))
    return rules


def seed_account(market: SimulatedMarket) -> DemoAccount:
    """Rent a busy training VM, an idle notebook VM and a spot VM on the simulated account."""
    busy = market.add_vm(
        hostnode_id=HOST_4090,
        gpu_model="geforcertx4090-pcie-24gb",
        vcpus=8,
        ram=32,
        storage=200,
        name="train-4090",
    )
    idle = market.add_vm(
        hostnode_id=HOST_A4000,
        gpu_model="rtxa4000-pcie-16gb",
        vcpus=4,
        ram=16,
        storage=100,
        name="notebook-a4000",
    )
    spot = market.add_vm(
        hostnode_id=HOST_3090,
        gpu_model=GPU_3090,
        gpu_count=2,
        vcpus=8,
        ram=32,
        storage=150,
        name="whisper-spot",
        spot_bid=0.30,
    )
    market.set_activity(busy.id, gpu_util_percent=87, gpu_memory_mb=20500, cpu_load=6.5)
    market.set_activity(idle.id, gpu_util_percent=0, gpu_memory_mb=0, cpu_load=0.02)
    market.set_activity(spot.id, gpu_util_percent=64, gpu_memory_mb=18000, cpu_load=3.0)
    return DemoAccount(busy=busy, idle=idle, spot=spot)


def outbid(market: SimulatedMarket, vm: SimVm, above_bid_usd: float = 0.02) -> float:
    """Raise the hostnode's spot clearing price until the VM's bid is short by `above_bid_usd`.

    The minimum bid is linear in the clearing price per GPU, so the price that makes
    the minimum equal bid + `above_bid_usd` follows from the current minimum.
    """
    host = market.hostnode(vm.hostnode_id)
    gpu = host.gpus[GPU_3090]
    rest = market.vm_spot_minimum(vm.id) - gpu.spot_price * vm.gpu_count
    target = vm.compute_price + above_bid_usd
    market.set_spot_price(vm.hostnode_id, GPU_3090, (target - rest) / vm.gpu_count)
    return target


async def push_heartbeats(
    market: SimulatedMarket, url: str, token: str, stop: asyncio.Event
) -> None:
    """Act as the agent on every running VM: push its activity once a simulated minute.

    `token` is the shared heartbeat secret; each VM pushes with its own derived token.
    """
    interval = 60 / max(market.clock.time_scale, 1.0)
    async with httpx.AsyncClient(timeout=5) as client:
        while not stop.is_set():
            for vm in list(market.vms.values()):
                if vm.status is not VmStatus.RUNNING:
                    continue
                headers = {"Authorization": f"Bearer {agent_token(token, vm.id)}"}
                body = {"vm_id": vm.id, **vm.activity.to_json()}
                try:
                    await client.post(url, json=body, headers=headers)
                except httpx.HTTPError as error:
                    logger.warning("heartbeat for %s failed: %s", vm.name, error)
            await _sleep_or_stop(stop, interval)


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), timeout=seconds)
    except TimeoutError:
        return


async def watch_progress(
    store: Store, account: DemoAccount, market: SimulatedMarket, progress: Progress
) -> None:
    """Read the daemon's own records and note each rule kind's first visible act."""
    alerts = await store.list_alerts(limit=500)
    actions = await store.recent_actions(limit=500)

    def note(flag: str, text: str) -> None:
        if not getattr(progress, flag):
            setattr(progress, flag, True)
            progress.events.append((market.now(), text))

    for alert in alerts:
        if alert.rule == "cheapest-4090" and alert.subject == "best":
            note("cheapest_alert", "cheapest-hostnode alert fired")
        if alert.rule == "low-balance":
            note("balance_fired", "low-balance alert fired")
            if alert.resolved_at is not None:
                note("balance_cleared", "low-balance alert cleared after the top-up")
        if alert.rule == "idle-stop:report" and alert.subject == f"{account.idle.id}:warnidle":
            note("idle_warned", f"idle warning sent for {account.idle.name}")
    for action in actions:
        if action.state != "verified":
            continue
        if action.kind == "rebid" and market.vm(account.spot.id).status is VmStatus.RUNNING:
            note("spot_rebid", f"{account.spot.name} re-bid and Running again")
        if action.kind == "stop" and action.subject == account.idle.id:
            note("idle_stopped", f"{account.idle.name} stopped after its warning")


async def run_story_until_done(
    daemon: Daemon,
    market: SimulatedMarket,
    account: DemoAccount,
    progress: Progress,
    stop: asyncio.Event,
    timeout_seconds: float,
    out: TextIO,
) -> None:
    """Run the story, and stop the daemon however it ends, so a failure cannot hang it."""
    try:
        await run_story(daemon, market, account, progress, stop, timeout_seconds, out)
    finally:
        stop.set()


async def run_story(
    daemon: Daemon,
    market: SimulatedMarket,
    account: DemoAccount,
    progress: Progress,
    stop: asyncio.Event,
    timeout_seconds: float,
    out: TextIO,
) -> None:
    """Change the simulated world on cue and stop the daemon once every rule acted."""
    started = market.now()
    outbid_done = topped_up = False
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_seconds
    while not progress.done and loop.time() < deadline:
        elapsed = market.now() - started
        if not outbid_done and elapsed >= OUTBID_AT:
            needed = outbid(market, account.spot)
            outbid_done = True
            _say(
                out,
                market,
                started,
                f"spot price rises: {account.spot.name} is outbid "
                f"(the host now takes {needed:.2f} $/h, the bid was {needed - 0.02:.2f})",
            )
        if not topped_up and progress.balance_fired and elapsed >= TOP_UP_AFTER:
            market.add_balance(TOP_UP_USD)
            topped_up = True
            _say(out, market, started, f"the user tops up the balance by {TOP_UP_USD:.0f} USD")
        await watch_progress(daemon.store, account, market, progress)
        await asyncio.sleep(0.25)
    stop.set()


def _say(out: TextIO, market: SimulatedMarket, started: datetime, text: str) -> None:
    out.write(f"\n[demo +{_minutes(market.now() - started)}] {text}\n")
    out.flush()


def _minutes(delta: timedelta) -> str:
    minutes = int(delta.total_seconds() // 60)
    return f"{minutes // 60:d}h{minutes % 60:02d}m"


async def run_demo(*, speed: float = 60.0, timeout_seconds: float = 150.0) -> int:
    """Run the demo; return 0 when all four rule kinds acted, else 1."""
    out = sys.stdout
    with tempfile.TemporaryDirectory(prefix="tdbot-demo-") as folder:
        market = SimulatedMarket.from_packaged(
            clock=SimClock(time_scale=speed), balance_usd=START_BALANCE_USD
        )
        account = seed_account(market)
        server = await serve(market, "127.0.0.1", 0)
        try:
            return await _run_with_simulator(
                market, server, account, Path(folder), speed, timeout_seconds, out
            )
        finally:
            await server.stop()


async def _run_with_simulator(
    market: SimulatedMarket,
    server: SimulatorServer,
    account: DemoAccount,
    folder: Path,
    speed: float,
    timeout_seconds: float,
    out: TextIO,
) -> int:
    settings, secrets_ = demo_settings(market, server, folder)
    rules = demo_rules()
    progress = Progress()
    stop = asyncio.Event()
    started_at = market.now()
    out.write(
        f"tdbot demo: simulated TensorDock API on {server.api_url}, "
        f"{speed:g} simulated seconds per real second.\n"
        f"Account: balance {START_BALANCE_USD:.2f} USD; VMs {account.busy.name} (busy), "
        f"{account.idle.name} (idle), {account.spot.name} (spot, bid 0.30 $/h).\n"
        f"Rules: {', '.join(rule.name for rule in rules)}.\n"
    )
    background: list[asyncio.Task[None]] = []

    async def started(daemon: Daemon) -> None:
        assert daemon.heartbeat_url is not None
        token = secrets_.heartbeat_token or ""
        background.append(
            asyncio.create_task(push_heartbeats(market, daemon.heartbeat_url, token, stop))
        )
        background.append(
            asyncio.create_task(
                run_story_until_done(daemon, market, account, progress, stop, timeout_seconds, out)
            )
        )

    notifier = build_notifier(settings, secrets_)
    await run_daemon(
        settings,
        secrets_,
        clock=market.clock,
        notifier=notifier,
        stop=stop,
        rules=rules,
        started=started,
    )
    stop.set()
    for result in await asyncio.gather(*background, return_exceptions=True):
        if isinstance(result, Exception):
            logger.error("demo task failed", exc_info=result)
            out.write(f"demo task failed: {type(result).__name__}: {result}\n")

    store = await Store.open(settings.daemon.database)
    try:
        await print_summary(store, market, progress, started_at, out)
    finally:
        await store.close()
    return 0 if progress.done else 1


def demo_settings(
    market: SimulatedMarket, server: SimulatorServer, folder: Path
) -> tuple[Settings, Secrets]:
    """Settings for the demo daemon: the simulator's API, a temporary database."""
    chat_id = os.environ.get("TDBOT_TELEGRAM_CHAT_ID", "").strip()
    settings = Settings(
        tensordock=TensorDockSettings(base_url=server.api_url, timeout_seconds=10),
        daemon=DaemonSettings(
            rules_dir=folder, database=str(folder / "demo.db"), log_level="WARNING"
        ),
        heartbeat=HeartbeatSettings(host="127.0.0.1", port=0),
        telegram=TelegramSettings(chat_ids=[int(chat_id)] if chat_id.lstrip("-").isdigit() else []),
        alerts=AlertSettings(),
    )
    secrets_ = Secrets(
        api_key=market.api_key,
        api_token=market.api_token,
        telegram_bot_token=os.environ.get("TDBOT_TELEGRAM_BOT_TOKEN") or None,
        heartbeat_token=secrets.token_hex(16),
    )
    return settings, secrets_


async def print_summary(
    store: Store, market: SimulatedMarket, progress: Progress, started: datetime, out: TextIO
) -> None:
    """Print what happened: each rule kind's result, the actions and the alerts."""
    from rich.console import Console
    from rich.table import Table

    console = Console(file=out, width=120)
    names = {vm.id: vm.name for vm in market.vms.values()}

    checks = Table(title="What each rule kind did")
    for column in ("rule kind", "seen", "when (simulated)"):
        checks.add_column(column)
    when = {text: at for at, text in progress.events}
    for kind, ok, text in _check_rows(progress):
        at = next((stamp for label, stamp in when.items() if label.startswith(text)), None)
        checks.add_row(
            kind, "yes" if ok else "NO", "-" if at is None else f"+{_minutes(at - started)}"
        )
    console.print(checks)

    actions = Table(title="Actions (intent journal)")
    for column in ("id", "rule", "action", "VM", "state", "detail"):
        actions.add_column(column, overflow="fold")
    for action in reversed(await store.recent_actions(limit=50)):
        subject = names.get(action.subject, action.subject)
        actions.add_row(
            str(action.id), action.rule, action.kind, subject, action.state, action.error or ""
        )
    console.print(actions)

    alerts = Table(title="Alerts")
    for column in ("rule", "subject", "severity", "fired", "resolved"):
        alerts.add_column(column, overflow="fold")
    for alert in reversed(await store.list_alerts(limit=100)):
        if alert.rule.endswith(":report"):
            continue
        resolved = "-" if alert.resolved_at is None else f"+{_minutes(alert.resolved_at - started)}"
        alerts.add_row(
            alert.rule,
            names.get(alert.subject, alert.subject),
            alert.severity,
            f"+{_minutes(alert.first_fired_at - started)}",
            resolved,
        )
    console.print(alerts)

    balance = market.balance()
    console.print(
        f"Final balance {balance['balance']:.2f} USD, burning {balance['hourly_cost']:.4f} USD/h. "
        + (
            "All four rule kinds acted."
            if progress.done
            else "Some rule kinds did not act in time."
        )
    )


def _check_rows(progress: Progress) -> list[tuple[str, bool, str]]:
    return [
        ("cheapest hostnode", progress.cheapest_alert, "cheapest-hostnode alert fired"),
        ("spot re-bid", progress.spot_rebid, "whisper-spot re-bid"),
        ("idle stop: warning", progress.idle_warned, "idle warning sent"),
        ("idle stop: stop", progress.idle_stopped, "notebook-a4000 stopped"),
        ("low balance: fired", progress.balance_fired, "low-balance alert fired"),
        ("low balance: cleared", progress.balance_cleared, "low-balance alert cleared"),
    ]
