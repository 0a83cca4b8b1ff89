"""One APScheduler job per rule, rebuilt from the rule files at start and on reload.

APScheduler 3.x defaults to a one-second misfire grace time and the machine's local
time zone; both are set here. Jobs keep no state: durable state is in tdbot's own
tables, so the jobs are simply rebuilt whenever the rules change.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from tdbot.rules.schema import RuleBase

logger = logging.getLogger("tdbot.daemon.scheduler")

RuleJob = Callable[[RuleBase], Awaitable[None]]

# A tick that starts late by up to this much still runs; a later one is skipped and
# the next regular tick takes over, so a suspended laptop does not replay a backlog.
MISFIRE_GRACE_SECONDS = 60


def create_scheduler() -> AsyncIOScheduler:
    """Create the scheduler with explicit UTC, coalescing and one instance per job."""
    return AsyncIOScheduler(
        timezone=UTC,
        job_defaults={
            "coalesce": True,
            "max_instances": 1,
            "misfire_grace_time": MISFIRE_GRACE_SECONDS,
        },
    )


def trigger_for(rule: RuleBase, time_scale: float = 1.0) -> BaseTrigger:
    """Build the rule's trigger; `time_scale` shortens intervals on a simulated clock."""
    if rule.every is not None:
        seconds = max(rule.every.total_seconds() / time_scale, 0.2)
        return IntervalTrigger(seconds=seconds, timezone=UTC)
    assert rule.cron is not None
    return CronTrigger.from_crontab(rule.cron, timezone=rule.timezone)


def schedule_rules(
    scheduler: AsyncIOScheduler,
    rules: list[RuleBase],
    job: RuleJob,
    *,
    time_scale: float = 1.0,
    first_run_delay: timedelta = timedelta(seconds=1),
) -> None:
    """Replace every rule job with one job per enabled rule; other jobs stay.

    Interval rules run once shortly after start, so a daemon restart does not wait a
    whole interval before it looks at the account again.
    """
    for existing in scheduler.get_jobs():
        if existing.id.startswith("rule:"):
            existing.remove()

    start = datetime.now(UTC) + first_run_delay
    for rule in rules:
        if not rule.enabled:
            logger.info("rule %s is disabled; not scheduled", rule.name)
            continue
        # APScheduler pauses a job added with next_run_time=None, so a cron rule
        # leaves the argument out and its trigger computes the first run.
        first_run = {"next_run_time": start} if rule.every is not None else {}
        scheduler.add_job(
            job,
            trigger=trigger_for(rule, time_scale),
            args=[rule],
            id=f"rule:{rule.name}",
            name=rule.name,
            replace_existing=True,
            **first_run,
        )
        logger.info("rule %s scheduled (%s)", rule.name, _describe(rule))


def _describe(rule: RuleBase) -> str:
    if rule.every is not None:
        return f"every {rule.every}"
    return f"cron '{rule.cron}' in {rule.timezone}"
