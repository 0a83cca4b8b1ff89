"""One tick of one rule: snapshot, stored state, evaluation, actions, alerts, record.

The engine is what both `tdbot run` (on a schedule) and `tdbot check` (once, as a
dry run) call. It never lets one rule's failure stop another rule: every error is
logged with the rule's name, stored with the run, and the next tick tries again.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sqlalchemy.exc import SQLAlchemyError

from tdbot.actions.executor import ActionExecutor
from tdbot.actions.outcome import ActionOutcome, OutcomeStatus
from tdbot.alerts import messages
from tdbot.alerts.manager import AlertBatch, AlertManager
from tdbot.clock import Clock
from tdbot.daemon.snapshot import SnapshotProvider
from tdbot.daemon.state_updates import apply_state_updates, outcome_alerts
from tdbot.evaluation import evaluate
from tdbot.evaluation.model import Decision, MarketSnapshot
from tdbot.history import with_price_percentiles
from tdbot.probes.hook import ProbeHook
from tdbot.rules.schema import IdleStopRule, LowBalanceRule, RuleBase
from tdbot.store.db import Store

if TYPE_CHECKING:
    from tdbot.config import SshSettings
    from tdbot.probes.ssh import SshProbe

logger = logging.getLogger("tdbot.daemon.engine")

# A tick joins the alert batch of the ticks running now only if that batch was opened
# this many seconds ago or less; rules fired together start within a second or two.
BATCH_JOIN_SECONDS = 10.0

# Outcomes after which the account may differ from the snapshot the rule acted on.
CHANGED_ACCOUNT = frozenset({OutcomeStatus.DONE, OutcomeStatus.FAILED, OutcomeStatus.UNKNOWN})


@dataclass
class TickResult:
    """The decisions and action outcomes of one tick of one rule."""

    rule: str
    decisions: list[Decision] = field(default_factory=list)
    outcomes: list[ActionOutcome] = field(default_factory=list)
    skipped: str | None = None
    error: str | None = None
    # Parts of the market that failed to load for this tick, with their errors.
    data_errors: dict[str, str] = field(default_factory=dict)


@dataclass
class TickBatch:
    """The alert batch shared by the ticks that run at the same time."""

    alerts: AlertBatch | None
    opened_at: float
    users: int = 0


class RuleEngine:
    """Run rule ticks; at most one tick of the same rule runs at a time."""

    def __init__(
        self,
        *,
        store: Store,
        snapshots: SnapshotProvider,
        executor: ActionExecutor,
        alerts: AlertManager | None,
        clock: Clock,
        ssh_probe: SshProbe | None = None,
        ssh_settings: SshSettings | None = None,
    ) -> None:
        self._store = store
        self._snapshots = snapshots
        self._executor = executor
        self._alerts = alerts
        self._clock = clock
        # Reads idle signals over SSH for idle_stop rules with "ssh" in `sources`.
        self._probes = ProbeHook(ssh_probe, ssh_settings)
        self._locks: dict[str, asyncio.Lock] = {}
        self._batch: TickBatch | None = None
        # A weak reference, so the engine does not keep a large market in memory.
        self._recorded_snapshot: weakref.ref[MarketSnapshot] | None = None
        self.last_results: dict[str, TickResult] = {}
        # Set while ticks fail on the store, so its outage is announced once.
        self._database_down = False

    async def run_rule(self, rule: RuleBase) -> TickResult:
        """Run one tick of `rule`, unless it is paused or its previous tick still runs."""
        lock = self._locks.setdefault(rule.name, asyncio.Lock())
        if lock.locked():
            logger.warning("rule %s skipped: its previous tick is still running", rule.name)
            return TickResult(rule.name, skipped="previous tick still running")

        async with lock:
            try:
                paused_until = await self._store.paused_until(rule.name)
                if paused_until is not None and paused_until > self._clock.now():
                    logger.info("rule %s is paused until %s", rule.name, paused_until.isoformat())
                    return TickResult(rule.name, skipped=f"paused until {paused_until.isoformat()}")
                result = await self._tick(rule)
            except (SQLAlchemyError, OSError) as error:
                # Without the store there is no intent journal, so nothing may be done:
                # the tick ends here, and the rule runs again at its next time.
                result = TickResult(rule.name, error=f"database unavailable: {error}")
                await self._database_failed(rule, error)
            else:
                # A whole tick went through the store, so an outage is over.
                await self._database_recovered()
            self.last_results[rule.name] = result
            return result

    async def _database_failed(self, rule: RuleBase, error: Exception) -> None:
        """Log the failure of a tick on the store, and send one alert per outage."""
        logger.error(
            "rule %s: tick stopped, the database is unavailable (%s: %s); no action is "
            "taken until it is back",
            rule.name,
            type(error).__name__,
            error,
        )
        if self._database_down:
            return
        self._database_down = True
        if self._alerts is not None:
            await self._alerts.notify(messages.database_unavailable(error))

    async def _database_recovered(self) -> None:
        if not self._database_down:
            return
        self._database_down = False
        logger.info("the database is available again")
        if self._alerts is not None:
            await self._alerts.notify(messages.database_available())

    async def _tick(self, rule: RuleBase) -> TickResult:
        batch = self._join_batch()
        try:
            return await self._tick_in_batch(rule, batch)
        finally:
            await self._leave_batch(batch)

    def _join_batch(self) -> TickBatch:
        """Join the alert batch of the ticks running now, or open one.

        Rules fired together run concurrently, so their messages can go out together
        (a critical balance alert then leads them). A batch takes no newcomers once it
        is older than BATCH_JOIN_SECONDS, so ticks that keep overlapping cannot hold
        messages back for long.
        """
        now = time.monotonic()
        current = self._batch
        if current is None or now - current.opened_at > BATCH_JOIN_SECONDS:
            alert_batch = self._alerts.begin_batch() if self._alerts is not None else None
            current = TickBatch(alert_batch, opened_at=now)
            self._batch = current
        current.users += 1
        return current

    async def _leave_batch(self, batch: TickBatch) -> None:
        batch.users -= 1
        if batch.users > 0:
            return
        if self._batch is batch:
            self._batch = None
        if self._alerts is not None and batch.alerts is not None:
            await self._alerts.flush_batch(batch.alerts)

    async def _tick_in_batch(self, rule: RuleBase, tick_batch: TickBatch) -> TickResult:
        batch = tick_batch.alerts
        run_id = await self._store.start_run(rule.name)
        result = TickResult(rule.name)
        try:
            snapshot = await self._snapshots.get()
            result.data_errors = dict(snapshot.errors)
            await self._record_snapshot(snapshot)
            now = self._clock.now()

            # 1. Decide from the snapshot and what earlier ticks stored. An idle rule
            # that reads over SSH probes its VMs first, so this tick's readings count.
            # The probe's alerts, such as a changed host key, join the decisions.
            probe_alerts = await self._probes.before_evaluation(rule, snapshot, self._store, now)
            lookback = rule.window if isinstance(rule, IdleStopRule) else None
            state = await self._store.load_rule_state(rule.name, idle_lookback=lookback, now=now)
            state = await with_price_percentiles(rule, snapshot, state, self._store, now)
            result.decisions = [*probe_alerts, *evaluate(rule, snapshot, state, now)]

            # 2. Act within the guards, then remember what changed.
            result.outcomes = await self._executor.execute(rule, result.decisions, snapshot, now)
            if any(outcome.status in CHANGED_ACCOUNT for outcome in result.outcomes):
                # The shared snapshot no longer shows the account as it is, so the next
                # rule must not act on it (an outbid VM re-bid here is Running now).
                self._snapshots.invalidate()
            await apply_state_updates(self._store, rule, state, snapshot, result, now)

            # 3. Alert on what the rule found and on actions that failed.
            if self._alerts is not None:
                alert_decisions = [*result.decisions, *outcome_alerts(rule, result.outcomes)]
                repeat = rule.repeat_every if isinstance(rule, LowBalanceRule) else None
                await self._alerts.handle_run(
                    rule.name,
                    alert_decisions,
                    now,
                    repeat_interval=repeat,
                    kind=rule.kind,
                    batch=batch,
                )
        except asyncio.CancelledError:
            # Shutdown cancelled the tick after its grace time: close the run row so
            # it does not look unfinished, then let the cancellation go on.
            logger.warning("rule %s: tick cancelled at shutdown", rule.name)
            await asyncio.shield(
                self._store.finish_run(run_id, False, "cancelled at shutdown", result.decisions)
            )
            raise
        except Exception as error:
            # One rule's failure must never stop the daemon or the other rules.
            logger.exception("rule %s failed in this tick", rule.name)
            result.error = f"{type(error).__name__}: {error}"

        await self._store.finish_run(run_id, result.error is None, result.error, result.decisions)
        _log_result(result)
        return result

    async def _record_snapshot(self, snapshot: MarketSnapshot) -> None:
        """Store VM observations and price changes once per snapshot, not once per rule."""
        if self._recorded_snapshot is not None and self._recorded_snapshot() is snapshot:
            return
        self._recorded_snapshot = weakref.ref(snapshot)
        await self._store.record_observations(snapshot)
        await self._store.record_prices(snapshot)


def _log_result(result: TickResult) -> None:
    if result.error is not None:
        return
    logger.info(
        "rule %s: %d decisions, %s",
        result.rule,
        len(result.decisions),
        _describe_outcomes(result.outcomes),
    )


def _describe_outcomes(outcomes: Sequence[ActionOutcome]) -> str:
    if not outcomes:
        return "no actions"
    return ", ".join(
        f"{type(outcome.decision).__name__} {outcome.status.value}" for outcome in outcomes
    )
