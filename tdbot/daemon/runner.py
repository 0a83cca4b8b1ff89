"""Start, run and stop the daemon; and the one-pass `tdbot check`.

Start-up order: logging with secrets redacted, rules, store, API client, notifiers,
reconciliation of actions a crash left unfinished, heartbeat endpoint, Telegram chat
commands, scheduler.
Shutdown (SIGTERM or SIGINT) runs it backwards: no new ticks, running ticks get
`shutdown_timeout` to finish and are then cancelled, and every connection is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sqlite3
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TextIO

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.interval import IntervalTrigger

from tdbot.actions.executor import ActionExecutor
from tdbot.actions.reconcile import reconcile
from tdbot.alerts.manager import AlertManager
from tdbot.clock import Clock, SystemClock
from tdbot.config import ConfigError, Secrets, Settings
from tdbot.daemon.engine import RuleEngine, TickResult
from tdbot.daemon.scheduler import create_scheduler, schedule_rules
from tdbot.daemon.snapshot import SnapshotProvider
from tdbot.logsafe import configure_logging
from tdbot.notify.base import MultiNotifier, Notifier
from tdbot.notify.console import ConsoleNotifier
from tdbot.rules import load_rules
from tdbot.rules.schema import IdleStopRule, RuleBase
from tdbot.store.db import Store
from tdbot.tensordock.client import TensorDockClient

logger = logging.getLogger("tdbot.daemon")

# Idle samples are kept at least this long, so recent evidence stays readable.
SAMPLE_RETENTION = timedelta(days=1)
# Open actions younger than this are left to the executor that is working on them.
RECHECK_MIN_AGE = timedelta(minutes=2)

# Awaited after every scheduled tick with its rule and result, such as the chat bot's
# hook that requests a confirmation of a deploy the executor held back.
TickListener = Callable[[RuleBase, TickResult], Awaitable[None]]


@dataclass
class Daemon:
    """The running parts of one daemon, built by `open_daemon`."""

    settings: Settings
    store: Store
    client: TensorDockClient
    engine: RuleEngine
    snapshots: SnapshotProvider
    notifier: Notifier
    rules: list[RuleBase]
    clock: Clock
    running_ticks: set[asyncio.Task[object]] = field(default_factory=set)
    heartbeat_url: str | None = None
    executor: ActionExecutor | None = None
    scheduler: AsyncIOScheduler | None = None
    started_at: datetime | None = None
    tick_listeners: list[TickListener] = field(default_factory=list)


def build_notifier(settings: Settings, secrets: Secrets) -> Notifier:
    """Console notifier always; Telegram too when a bot token and chats are configured."""
    notifiers: list[Notifier] = [ConsoleNotifier()]
    if secrets.telegram_bot_token and settings.telegram.chat_ids:
        from tdbot.notify.telegram import TelegramNotifier

        notifiers.append(
            TelegramNotifier(
                secrets.telegram_bot_token,
                settings.telegram.chat_ids,
                base_url=settings.telegram.base_url,
            )
        )
    elif secrets.telegram_bot_token:
        logger.warning("TDBOT_TELEGRAM_BOT_TOKEN is set but telegram.chat_ids is empty")
    return MultiNotifier(notifiers)


def load_rule_list(settings: Settings) -> list[RuleBase]:
    """Load the rule folder; invalid rules are logged and left out, the others run.

    Raises ConfigError when the folder does not exist, since a daemon with no rules
    guards nothing.
    """
    if not settings.daemon.rules_dir.exists():
        raise ConfigError(
            f"rules folder {settings.daemon.rules_dir} not found; create it with rule files "
            "or set daemon.rules_dir in the configuration"
        )
    rule_set = load_rules(settings.daemon.rules_dir)
    for error in rule_set.errors:
        logger.error("invalid rule, not scheduled: %s", error)
    rules: list[RuleBase] = [loaded.rule for loaded in rule_set.rules]
    logger.info(
        "%d rules loaded from %s, %d errors",
        len(rules),
        settings.daemon.rules_dir,
        len(rule_set.errors),
    )
    return rules


@contextlib.asynccontextmanager
async def open_daemon(
    settings: Settings,
    secrets: Secrets,
    *,
    clock: Clock | None = None,
    notifier: Notifier | None = None,
    rules: list[RuleBase] | None = None,
    dry_run: bool | None = None,
) -> AsyncIterator[Daemon]:
    """Open the store, client, notifier and engine, and close them all on exit."""
    api_key, api_token = secrets.require_api()
    clock = clock or SystemClock()
    rules = load_rule_list(settings) if rules is None else rules
    notifier = notifier or build_notifier(settings, secrets)
    dry_run = settings.safety.dry_run if dry_run is None else dry_run

    store = await Store.open(settings.daemon.database, clock=clock.now)
    client = TensorDockClient(
        api_key,
        api_token,
        base_url=settings.tensordock.base_url,
        timeout_seconds=settings.tensordock.timeout_seconds,
        read_retries=settings.tensordock.read_retries,
    )
    try:
        parts = SnapshotProvider.parts_for({rule.kind for rule in rules})
        snapshots = SnapshotProvider(client, clock, settings.daemon.snapshot_max_age, parts)
        executor = ActionExecutor(
            client,
            store,
            dry_run=dry_run,
            fleet_max_usd_per_hour=settings.safety.fleet_max_usd_per_hour,
        )
        alerts = AlertManager(store, notifier, repeat_interval=settings.alerts.repeat_interval)
        engine = RuleEngine(
            store=store,
            snapshots=snapshots,
            executor=executor,
            alerts=alerts,
            clock=clock,
            ssh_settings=settings.ssh,
        )
        yield Daemon(
            settings,
            store,
            client,
            engine,
            snapshots,
            notifier,
            rules,
            clock,
            executor=executor,
            started_at=clock.now(),
        )
    finally:
        await client.aclose()
        await store.close()


async def run_daemon(
    settings: Settings,
    secrets: Secrets,
    *,
    clock: Clock | None = None,
    notifier: Notifier | None = None,
    stop: asyncio.Event | None = None,
    rules: list[RuleBase] | None = None,
    started: Callable[[Daemon], Awaitable[None]] | None = None,
) -> int:
    """Run until SIGTERM, SIGINT or `stop` is set; return the process exit code.

    `rules` replaces the rule folder and `started` is awaited once the scheduler runs;
    the demo uses both.
    """
    configure_logging(settings.daemon.log_level, secrets.values())
    stop = stop or asyncio.Event()
    _install_signal_handlers(stop)
    logger.info(
        "tdbot starting (dry run: %s, fleet ceiling %.2f USD/h)",
        settings.safety.dry_run,
        settings.safety.fleet_max_usd_per_hour,
    )

    async with open_daemon(
        settings, secrets, clock=clock, notifier=notifier, rules=rules
    ) as daemon:
        await daemon.notifier.start()
        try:
            for line in await reconcile(daemon.client, daemon.store):
                logger.warning("reconciled after restart: %s", line)
            async with _heartbeat_server(daemon, secrets), _chat_bot(daemon, secrets):
                await _schedule_until_stopped(daemon, stop, started)
        finally:
            await daemon.notifier.stop()
    logger.info("tdbot stopped")
    return 0


async def _schedule_until_stopped(
    daemon: Daemon,
    stop: asyncio.Event,
    started: Callable[[Daemon], Awaitable[None]] | None,
) -> None:
    scheduler = create_scheduler()
    daemon.scheduler = scheduler

    async def job(rule: RuleBase) -> None:
        task = asyncio.current_task()
        assert task is not None
        daemon.running_ticks.add(task)
        try:
            result = await daemon.engine.run_rule(rule)
            await _notify_tick_listeners(daemon, rule, result)
        finally:
            daemon.running_ticks.discard(task)

    schedule_rules(scheduler, daemon.rules, job, time_scale=daemon.clock.time_scale)
    schedule_maintenance(scheduler, daemon)
    schedule_digest(scheduler, daemon)
    scheduler.start()
    if started is not None:
        await started(daemon)
    reload = asyncio.Event()
    _install_reload_handler(reload)
    try:
        while not stop.is_set():
            await _wait_any(stop, reload)
            if reload.is_set() and not stop.is_set():
                reload.clear()
                _reload_rules(daemon, scheduler, job)
    finally:
        logger.info("stopping: no new ticks; waiting for %d running", len(daemon.running_ticks))
        # APScheduler 3.11's AsyncIOExecutor cancels running coroutine jobs on shutdown,
        # so the scheduler is only paused until the running ticks finish or time out.
        scheduler.pause()
        await _finish_running(daemon.running_ticks, daemon.settings.daemon.shutdown_timeout)
        scheduler.shutdown(wait=False)


async def _notify_tick_listeners(daemon: Daemon, rule: RuleBase, result: TickResult) -> None:
    for listener in daemon.tick_listeners:
        try:
            await listener(rule, result)
        except Exception:
            # A failing listener must not fail the tick or keep the others from running.
            logger.exception("tick listener failed after rule %s", rule.name)


def _reload_rules(
    daemon: Daemon, scheduler: AsyncIOScheduler, job: Callable[[RuleBase], Awaitable[None]]
) -> None:
    """Replace the rules with the folder's current ones; keep the old ones if it is gone."""
    try:
        rules = load_rule_list(daemon.settings)
    except ConfigError as error:
        logger.error("reload failed, the previous rules keep running: %s", error)
        return
    daemon.rules = rules
    daemon.snapshots.parts = SnapshotProvider.parts_for({rule.kind for rule in rules})
    schedule_rules(scheduler, rules, job, time_scale=daemon.clock.time_scale)


def schedule_maintenance(scheduler: AsyncIOScheduler, daemon: Daemon) -> None:
    """Run `run_maintenance` every hour and `recheck_open_actions` every minute."""
    jobs = (
        (run_maintenance, timedelta(hours=1), "maintenance"),
        (recheck_open_actions, timedelta(minutes=1), "recheck-actions"),
    )
    for function, every, job_id in jobs:
        scheduler.add_job(
            function,
            trigger=IntervalTrigger(
                seconds=every.total_seconds() / daemon.clock.time_scale, timezone=UTC
            ),
            args=[daemon],
            id=job_id,
            name=job_id,
            replace_existing=True,
        )


async def recheck_open_actions(daemon: Daemon) -> list[str]:
    """Settle actions left open by lost responses, such as a deploy not listed yet."""
    lines = await reconcile(daemon.client, daemon.store, min_age=RECHECK_MIN_AGE)
    for line in lines:
        logger.info("open action rechecked: %s", line)
    return lines


async def run_maintenance(daemon: Daemon) -> None:
    """Delete idle samples and price history past their retention."""
    await prune_samples(daemon)
    await prune_prices(daemon)


async def prune_prices(daemon: Daemon) -> int:
    """Delete price history older than `daemon.price_history_retention`."""
    keep = timedelta(days=daemon.settings.daemon.price_history_retention)
    removed = await daemon.store.prune_price_history(older_than=daemon.clock.now() - keep)
    logger.info("maintenance: removed %d price rows older than %s", removed, keep)
    return removed


async def prune_samples(daemon: Daemon) -> int:
    """Delete idle samples older than the retention or twice the longest idle window."""
    windows = [rule.window for rule in daemon.rules if isinstance(rule, IdleStopRule)]
    keep = max([SAMPLE_RETENTION, *(2 * window for window in windows)])
    removed = await daemon.store.prune_idle_samples(older_than=daemon.clock.now() - keep)
    logger.info("maintenance: removed %d idle samples older than %s", removed, keep)
    return removed


def schedule_digest(scheduler: AsyncIOScheduler, daemon: Daemon) -> None:
    """Send the daily digest at `alerts.digest_time` in `alerts.digest_timezone`, if set.

    The trigger runs on the wall clock, so on the demo's faster clock the digest still
    comes once a real day.
    """
    from tdbot.alerts.digest import digest_trigger, send_digest

    settings = daemon.settings.alerts
    trigger = digest_trigger(settings.digest_time, settings.digest_timezone)
    if trigger is None:
        return
    scheduler.add_job(
        send_digest,
        trigger=trigger,
        args=[daemon.store, daemon.notifier, daemon.clock],
        id="digest",
        name="digest",
        replace_existing=True,
    )
    logger.info("daily digest scheduled at %s %s", settings.digest_time, settings.digest_timezone)


async def _wait_any(*events: asyncio.Event) -> None:
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


async def _finish_running(ticks: set[asyncio.Task[object]], grace: timedelta) -> None:
    if not ticks:
        return
    seconds = grace.total_seconds()
    _, pending = await asyncio.wait(set(ticks), timeout=seconds)
    for task in pending:
        logger.warning("cancelling a tick still running after %.0f s", seconds)
        task.cancel()
    if pending:
        await asyncio.wait(pending, timeout=5)


@contextlib.asynccontextmanager
async def _heartbeat_server(daemon: Daemon, secrets: Secrets) -> AsyncIterator[None]:
    settings = daemon.settings.heartbeat
    if not settings.enabled:
        yield
        return

    from tdbot.asgi import serve_app
    from tdbot.daemon.heartbeat import create_heartbeat_app

    if not secrets.heartbeat_token:
        logger.warning("TDBOT_HEARTBEAT_TOKEN is unset: the heartbeat endpoint rejects all pushes")
    app = create_heartbeat_app(daemon.store.add_idle_sample, daemon.clock, secrets.heartbeat_token)
    # The daemon's own SIGTERM and SIGINT handlers stop the server with the rest.
    async with serve_app(
        app, settings.host, settings.port, name="heartbeat", handle_signals=False
    ) as server:
        daemon.heartbeat_url = f"{server.url}/v1/heartbeat"
        logger.info("heartbeat endpoint listening on %s", daemon.heartbeat_url)
        yield


@contextlib.asynccontextmanager
async def _chat_bot(daemon: Daemon, secrets: Secrets) -> AsyncIterator[None]:
    settings = daemon.settings.telegram
    if not secrets.telegram_bot_token or not settings.commands:
        yield
        return

    from tdbot.bot import BotStartError, ChatBot

    bot = ChatBot(daemon, secrets.telegram_bot_token)
    try:
        await bot.start()
    except BotStartError as error:
        # Alerts still work without commands, so the daemon keeps running.
        logger.error("Telegram chat commands are off: %s", error)
        yield
        return
    try:
        yield
    finally:
        await bot.stop()


def _install_signal_handlers(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, _request_stop, stop, signum)


def _install_reload_handler(reload: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError, RuntimeError, AttributeError):
        loop.add_signal_handler(signal.SIGHUP, reload.set)


def _request_stop(stop: asyncio.Event, signum: int) -> None:
    logger.info("received %s; shutting down", signal.Signals(signum).name)
    stop.set()


async def check_once(settings: Settings, secrets: Secrets, out: TextIO) -> int:
    """Evaluate every rule once as a dry run, print the plan, and change nothing.

    The rules see the daemon's stored state through a copy of the database, so this
    pass neither sends to the API nor marks alerts as sent for the running daemon.
    """
    from tdbot.daemon.plan import print_plan
    from tdbot.notify.base import NullNotifier

    configure_logging("WARNING", secrets.values())
    with tempfile.TemporaryDirectory(prefix="tdbot-check-") as folder:
        copy = Path(folder) / "check.db"
        copy_sqlite_database(settings.daemon.database, copy)
        daemon_settings = settings.daemon.model_copy(update={"database": str(copy)})
        check_settings = settings.model_copy(update={"daemon": daemon_settings})
        async with open_daemon(
            check_settings, secrets, notifier=NullNotifier(), dry_run=True
        ) as daemon:
            results = [await daemon.engine.run_rule(rule) for rule in daemon.rules]
    return print_plan(results, out)


def copy_sqlite_database(source: str, target: Path) -> None:
    """Copy a SQLite database with its write-ahead log; other databases start empty."""
    if "://" in source or not Path(source).exists():
        return
    with (
        sqlite3.connect(f"file:{source}?mode=ro", uri=True) as origin,
        sqlite3.connect(target) as copy,
    ):
        origin.backup(copy)
