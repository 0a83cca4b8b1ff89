"""The Store: tdbot's state on SQLite (default) or PostgreSQL through one async engine.

Each method opens a short session and commits before it returns, so a row written
by `record_intent` is durable before the caller sends the API call it describes.
"""

from __future__ import annotations

import ast
import hashlib
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, NamedTuple

from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    delete,
    event,
    func,
    insert,
    inspect,
    text,
    update,
)
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, IntegrityError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.sql.dml import Delete, Update
from sqlmodel import SQLModel, col, select
from sqlmodel.ext.asyncio.session import AsyncSession
from sqlmodel.sql.expression import SelectOfScalar

from tdbot.config import ConfigError
from tdbot.evaluation.model import (
    Decision,
    IdleSample,
    IdleWarningState,
    LadderState,
    MarketSnapshot,
    RuleState,
)
from tdbot.store import codec
from tdbot.store.tables import (
    UNFINISHED_STATES,
    ActionRecord,
    ActionState,
    AlertRecord,
    AlertState,
    ConfirmationRecord,
    DecisionRecord,
    IdleSampleRecord,
    PriceSnapshot,
    PriceWatch,
    RuleRun,
    RuleStateRecord,
    SshHostKeyRecord,
    VmObservation,
    utc_now,
)
from tdbot.tensordock.models import Bounds, Restriction

logger = logging.getLogger("tdbot.store")

SQLITE_BUSY_TIMEOUT_MS = 5000

# Keys of RuleStateRecord rows. Per-VM entries append ":<vm id>".
KEY_BEST_PRICE = "best_price_usd"
KEY_PAUSED_UNTIL = "paused_until"
PREFIX_LADDER = "ladder:"
PREFIX_IDLE_WARNING = "idle_warning:"
PREFIX_RUNNING_SINCE = "running_since:"
PREFIX_DEPLOYED = "deployed:"
# Subjects of alerts about failed actions; they are not the rule's own evaluation
# alerts, so `RuleState.open_alerts` leaves them out.
ACTION_SUBJECT_PREFIX = "action:"


def database_url(url_or_path: str | Path) -> URL:
    """Turn a plain file path into a SQLite URL; pass real URLs through unchanged."""
    text = str(url_or_path)
    if "://" in text:
        return make_url(text)
    path = Path(text).expanduser().resolve()
    return make_url(f"sqlite+aiosqlite:///{path}")


def _set_sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets the bot read while the scheduler writes; the busy timeout makes a second
    # writer wait instead of failing with "database is locked".
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


class PricePoint(NamedTuple):
    """One stored change: what a GPU model on a hostnode offered from `taken_at` on.

    The fields after `available` are None in rows stored before they were recorded.
    A named tuple, because a year of history builds thousands of them per query and a
    frozen dataclass is several times slower to create.
    """

    gpu_model: str
    taken_at: datetime
    hostnode_id: str
    usd_per_gpu_hour: float
    available: bool
    gpus_free: int | None = None
    usd_per_vcpu_hour: float | None = None
    vcpus_free: int | None = None
    usd_per_gb_ram_hour: float | None = None
    ram_gb_free: int | None = None
    usd_per_gb_storage_hour: float | None = None
    storage_gb_free: int | None = None
    ports_free: int | None = None
    restrictions: str | None = None


# The PriceSnapshot columns that make up an offer, in PricePoint's order. A row is
# written when any of them changes.
OFFER_COLUMNS = (
    "usd_per_gpu_hour",
    "available",
    "gpus_free",
    "usd_per_vcpu_hour",
    "vcpus_free",
    "usd_per_gb_ram_hour",
    "ram_gb_free",
    "usd_per_gb_storage_hour",
    "storage_gb_free",
    "ports_free",
    "restrictions",
)
OfferValues = tuple[Any, ...]
# Distinct hostnode restrictions whose stored text is kept, see _restrictions_text.
RESTRICTION_TEXTS_MAX = 10_000

# A stored price is taken to hold until the next snapshot, but for at most this long:
# after that, with no snapshot (a crash, the hostnode list failing), the history has a
# gap. A clean stop ends the watch at once. Two hours covers rules that run every hour.
WATCH_GAP = timedelta(hours=2)


@dataclass(frozen=True)
class Watch:
    """A stretch of market snapshots: prices are known from `start` until `end`."""

    start: datetime
    end: datetime


class Store:
    """Async access to every table; open with `await Store.open(url_or_path)`."""

    def __init__(self, engine: AsyncEngine, *, clock: Callable[[], datetime] = utc_now) -> None:
        self.engine = engine
        self._clock = clock
        self._sessions = async_sessionmaker(engine, class_=AsyncSession, expire_on_commit=False)
        # The latest offer of each (hostnode, GPU model) pair, packed into one string by
        # _pack_offers; None until read from the table.
        self._price_cache: str | None = None
        # The price_watch row this process extends, and its last snapshot time.
        self._watch: tuple[int, datetime] | None = None

    @classmethod
    async def open(
        cls, url_or_path: str | Path, *, clock: Callable[[], datetime] = utc_now
    ) -> Store:
        """Connect, create the database folder and the tables if missing, and return a Store.

        Raises ConfigError, naming the database without its password, when the URL,
        its driver or the database itself cannot be used.
        """
        try:
            url = database_url(url_or_path)
            is_sqlite = url.get_backend_name() == "sqlite"
            engine = create_async_engine(
                url, json_serializer=codec.dumps, pool_pre_ping=not is_sqlite
            )
        except (ArgumentError, ImportError, ValueError) as error:
            # ImportError covers a missing driver, such as psycopg for postgresql://.
            raise ConfigError(
                f"invalid database URL ({type(error).__name__}: {error}). {_DATABASE_FIX}"
            ) from None
        if is_sqlite and url.database and url.database != ":memory:":
            Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        if is_sqlite:
            sync_engine: Engine = engine.sync_engine
            event.listen(sync_engine, "connect", _set_sqlite_pragmas)

        try:
            async with engine.begin() as connection:
                await connection.run_sync(SQLModel.metadata.create_all)
                await connection.run_sync(_add_missing_columns)
        except (DBAPIError, OSError, _MissingColumnError) as error:
            await engine.dispose()
            location = url.render_as_string(hide_password=True)
            reason = getattr(error, "orig", None) or error
            raise ConfigError(
                f"cannot use the database {location}: {reason}. {_DATABASE_FIX}, or move a "
                "damaged SQLite file aside so that tdbot creates a new one"
            ) from error
        logger.info("store opened: %s", url.render_as_string(hide_password=True))
        return cls(engine, clock=clock)

    async def close(self) -> None:
        """End this process's price watch, if it kept one, and release the connections."""
        if self._watch is not None:
            try:
                await self._end_watch()
            except (SQLAlchemyError, OSError) as error:
                # The watch then ends WATCH_GAP after its last snapshot, as after a crash.
                logger.warning("could not record the end of the price watch: %s", error)
        await self.engine.dispose()

    def now(self) -> datetime:
        return self._clock()

    async def _write(self, statement: Update | Delete) -> int:
        """Run one UPDATE or DELETE in its own transaction; return how many rows it matched."""
        async with self._sessions() as session:
            result = await session.exec(statement)
            await session.commit()
            return int(result.rowcount or 0)

    # --- rule runs and decisions -------------------------------------------------

    async def start_run(self, rule: str) -> int:
        async with self._sessions() as session:
            run = RuleRun(rule=rule, started_at=self.now())
            session.add(run)
            await session.commit()
            return _id(run.id)

    async def finish_run(
        self, run_id: int, ok: bool, error: str | None, decisions: Sequence[Decision]
    ) -> None:
        """Close a run and store the decisions it made."""
        now = self.now()
        async with self._sessions() as session:
            run = await session.get(RuleRun, run_id)
            if run is None:
                raise LookupError(f"rule run {run_id} not found")
            run.finished_at = now
            run.ok = ok
            run.error = error
            run.decision_count = len(decisions)
            session.add(run)
            for decision in decisions:
                session.add(_decision_record(run_id, decision, now))
            await session.commit()

    async def recent_decisions(
        self, *, rule: str | None = None, limit: int = 50
    ) -> list[DecisionRecord]:
        query = select(DecisionRecord).order_by(col(DecisionRecord.id).desc()).limit(limit)
        if rule is not None:
            query = query.where(DecisionRecord.rule == rule)
        async with self._sessions() as session:
            return list((await session.exec(query)).all())

    # --- rule state --------------------------------------------------------------

    async def load_rule_state(
        self, rule: str, *, idle_lookback: timedelta | None = None, now: datetime | None = None
    ) -> RuleState:
        """Collect what earlier runs of `rule` stored, with idle samples of the last lookback."""
        async with self._sessions() as session:
            rows = (
                await session.exec(select(RuleStateRecord).where(RuleStateRecord.rule == rule))
            ).all()
            open_alerts = (
                await session.exec(
                    select(AlertRecord.subject).where(
                        AlertRecord.rule == rule,
                        AlertRecord.state == AlertState.FIRING.value,
                        ~col(AlertRecord.subject).startswith(ACTION_SUBJECT_PREFIX),
                    )
                )
            ).all()

        samples: dict[str, list[IdleSample]] = {}
        if idle_lookback is not None:
            samples = await self.idle_samples(since=(now or self.now()) - idle_lookback)
        return _rule_state_from_rows(rows, frozenset(open_alerts), samples)

    async def save_best_price(self, rule: str, price_usd_per_hour: float | None) -> None:
        await self._put_state(rule, KEY_BEST_PRICE, price_usd_per_hour)

    async def save_ladder(self, rule: str, vm_id: str, ladder: LadderState | None) -> None:
        value = None if ladder is None else codec.encode_ladder(ladder)
        await self._put_state(rule, PREFIX_LADDER + vm_id, value)

    async def save_idle_warning(
        self, rule: str, vm_id: str, warning: IdleWarningState | None
    ) -> None:
        value = None if warning is None else codec.encode_idle_warning(warning)
        await self._put_state(rule, PREFIX_IDLE_WARNING + vm_id, value)

    async def set_running_since(self, rule: str, vm_id: str, since: datetime | None) -> None:
        value = None if since is None else codec.encode_time(since)
        await self._put_state(rule, PREFIX_RUNNING_SINCE + vm_id, value)

    async def add_deployed_vm(self, rule: str, vm_id: str) -> None:
        await self._put_state(rule, PREFIX_DEPLOYED + vm_id, codec.encode_time(self.now()))

    async def remove_deployed_vm(self, rule: str, vm_id: str) -> None:
        await self._put_state(rule, PREFIX_DEPLOYED + vm_id, None)

    async def deployed_vms(self, rule: str) -> dict[str, datetime]:
        """Ids of the VMs this rule deployed, with the time each was recorded."""
        query = select(RuleStateRecord).where(
            RuleStateRecord.rule == rule, col(RuleStateRecord.key).startswith(PREFIX_DEPLOYED)
        )
        async with self._sessions() as session:
            rows = (await session.exec(query)).all()
        return {row.key.removeprefix(PREFIX_DEPLOYED): codec.decode_time(row.value) for row in rows}

    async def deployed_vm_ids(self, rule: str) -> frozenset[str]:
        """Ids of every VM this rule deployed and that has not been removed from the list."""
        query = select(RuleStateRecord.key).where(
            RuleStateRecord.rule == rule, col(RuleStateRecord.key).startswith(PREFIX_DEPLOYED)
        )
        async with self._sessions() as session:
            keys = (await session.exec(query)).all()
        return frozenset(key.removeprefix(PREFIX_DEPLOYED) for key in keys)

    async def set_paused_until(self, rule: str, until: datetime | None) -> None:
        await self._put_state(
            rule, KEY_PAUSED_UNTIL, None if until is None else codec.encode_time(until)
        )

    async def paused_until(self, rule: str) -> datetime | None:
        value = await self._get_state(rule, KEY_PAUSED_UNTIL)
        return None if value is None else codec.decode_time(value)

    async def _get_state(self, rule: str, key: str) -> Any:
        query = select(RuleStateRecord).where(
            RuleStateRecord.rule == rule, RuleStateRecord.key == key
        )
        async with self._sessions() as session:
            row = (await session.exec(query)).first()
        return None if row is None else row.value

    async def _put_state(self, rule: str, key: str, value: Any) -> None:
        """Write one state entry; None deletes it, so absent and cleared read the same."""
        query = select(RuleStateRecord).where(
            RuleStateRecord.rule == rule, RuleStateRecord.key == key
        )
        async with self._sessions() as session:
            row = (await session.exec(query)).first()
            if value is None:
                if row is not None:
                    await session.delete(row)
            elif row is None:
                session.add(RuleStateRecord(rule=rule, key=key, value=value, updated_at=self.now()))
            else:
                row.value = value
                row.updated_at = self.now()
                session.add(row)
            await session.commit()

    # --- idle samples ------------------------------------------------------------

    async def add_idle_sample(self, sample: IdleSample) -> None:
        async with self._sessions() as session:
            session.add(
                IdleSampleRecord(
                    vm_id=sample.vm_id,
                    at=sample.at,
                    gpu_util_percent=sample.gpu_util_percent,
                    gpu_memory_mb=sample.gpu_memory_mb,
                    cpu_load=sample.cpu_load,
                    network_kbps=sample.network_kbps,
                    processes=None if sample.processes is None else list(sample.processes),
                    source=sample.source,
                    error=sample.error,
                )
            )
            await session.commit()

    async def idle_samples(
        self, *, since: datetime, vm_ids: Iterable[str] | None = None
    ) -> dict[str, list[IdleSample]]:
        """Samples taken at or after `since`, per VM and oldest first."""
        query = (
            select(IdleSampleRecord)
            .where(IdleSampleRecord.at >= since)
            .order_by(col(IdleSampleRecord.vm_id), col(IdleSampleRecord.at))
        )
        if vm_ids is not None:
            query = query.where(col(IdleSampleRecord.vm_id).in_(list(vm_ids)))
        async with self._sessions() as session:
            rows = (await session.exec(query)).all()

        samples: dict[str, list[IdleSample]] = {}
        for row in rows:
            samples.setdefault(row.vm_id, []).append(_idle_sample(row))
        return samples

    async def prune_idle_samples(self, *, older_than: datetime) -> int:
        """Delete samples taken before `older_than`; returns how many were deleted."""
        async with self._sessions() as session:
            result = await session.exec(
                delete(IdleSampleRecord).where(col(IdleSampleRecord.at) < older_than)
            )
            await session.commit()
            return int(result.rowcount or 0)

    # --- observations and prices -------------------------------------------------

    async def record_observations(self, snapshot: MarketSnapshot) -> int:
        """Store each VM whose status, name or cost changed since its last observation."""
        if snapshot.vms is None:
            return 0
        latest_ids = select(func.max(VmObservation.id)).group_by(col(VmObservation.vm_id))
        async with self._sessions() as session:
            previous = {
                row.vm_id: row
                for row in (
                    await session.exec(
                        select(VmObservation).where(col(VmObservation.id).in_(latest_ids))
                    )
                ).all()
            }
            added = 0
            for vm in snapshot.vms.values():
                observation = VmObservation(
                    vm_id=vm.id,
                    observed_at=snapshot.taken_at,
                    status=vm.status.value,
                    name=vm.name,
                    hourly_cost_usd=vm.hourly_cost,
                    spot_bid_usd=vm.spot_bid,
                )
                if _observation_changed(previous.get(vm.id), observation):
                    session.add(observation)
                    added += 1
            await session.commit()
        return added

    async def record_prices(self, snapshot: MarketSnapshot) -> int:
        """Store each (hostnode, GPU model) offer whose prices, free amounts or state changed.

        A pair that was available before and is missing from this snapshot gets a row
        marked unavailable, so the history shows when it went away. The latest offer
        of each pair is read from the table once and then kept in memory, because a
        query for it on every tick grows with the history.
        """
        if snapshot.hostnodes is None:
            return 0
        await self._extend_watch(snapshot.taken_at)
        current = _current_offers(snapshot)
        texts = {_offer_key(*pair): repr(values) for pair, values in current.items()}
        previous = await self._latest_offer_texts()
        for key, offer_text in previous.items():
            if key in texts:
                continue
            values = ast.literal_eval(offer_text)
            if values[_AVAILABLE]:
                unavailable = (*values[:_AVAILABLE], False, *values[_AVAILABLE + 1 :])
                current[_offer_pair(key)] = unavailable
                texts[key] = repr(unavailable)

        changed = [key for key, offer_text in texts.items() if previous.get(key) != offer_text]
        if not changed:
            return 0
        rows = [
            {
                "taken_at": snapshot.taken_at,
                "hostnode_id": hostnode_id,
                "gpu_model": gpu_model,
                **dict(zip(OFFER_COLUMNS, current[(hostnode_id, gpu_model)], strict=True)),
            }
            for hostnode_id, gpu_model in map(_offer_pair, changed)
        ]
        # A Core insert of plain rows, because the first snapshot of a large market has
        # thousands of rows, and ORM objects for them cost seconds and memory.
        async with self.engine.begin() as connection:
            await connection.execute(insert(PriceSnapshot), rows)
        previous.update((key, texts[key]) for key in changed)
        self._price_cache = _pack_offers(previous)
        return len(changed)

    async def _extend_watch(self, taken_at: datetime) -> None:
        """Record that the market was seen at `taken_at`, extending or starting a watch."""
        if self._watch is None:
            # A restart soon after the last snapshot continues the same watch.
            async with self._sessions() as session:
                latest = (
                    await session.exec(select(PriceWatch).order_by(col(PriceWatch.id).desc()))
                ).first()
            # A restart soon after a crash continues the watch. After a clean stop the
            # time between is known to be unwatched, so a new watch starts.
            if latest is not None and latest.id is not None and latest.stopped_at is None:
                self._watch = (latest.id, latest.last_seen_at)

        if self._watch is None or taken_at - self._watch[1] > WATCH_GAP:
            async with self._sessions() as session:
                watch = PriceWatch(started_at=taken_at, last_seen_at=taken_at)
                session.add(watch)
                await session.commit()
                self._watch = (_id(watch.id), taken_at)
            return

        watch_id, last_seen = self._watch
        if taken_at <= last_seen:
            return
        await self._write(
            update(PriceWatch).where(col(PriceWatch.id) == watch_id).values(last_seen_at=taken_at)
        )
        self._watch = (watch_id, taken_at)

    async def _end_watch(self) -> None:
        assert self._watch is not None
        watch_id, _ = self._watch
        await self._write(
            update(PriceWatch).where(col(PriceWatch.id) == watch_id).values(stopped_at=self.now())
        )
        self._watch = None

    async def price_watches(self, *, since: datetime, until: datetime) -> list[Watch]:
        """Return the stretches of [since, until) in which prices are known, oldest first.

        Each watch ends WATCH_GAP after its last snapshot, or where the next one starts.
        Time before the first stored watch counts as watched, because history stored
        before watches were kept has no record of its gaps.
        """
        async with self._sessions() as session:
            first_start = (await session.exec(select(func.min(PriceWatch.started_at)))).first()
            rows = (
                await session.exec(
                    select(PriceWatch)
                    .where(
                        col(PriceWatch.last_seen_at) >= since - WATCH_GAP,
                        col(PriceWatch.started_at) < until,
                    )
                    .order_by(col(PriceWatch.started_at))
                )
            ).all()
        if first_start is None:
            return [Watch(since, until)]

        watches = [Watch(since, first_start)] if first_start > since else []
        for index, row in enumerate(rows):
            end = row.last_seen_at + WATCH_GAP
            if row.stopped_at is not None:
                # Never before the last snapshot, whatever clock recorded the stop.
                end = min(end, max(row.stopped_at, row.last_seen_at))
            if index + 1 < len(rows):
                end = min(end, rows[index + 1].started_at)
            watches.append(Watch(row.started_at, end))
        return watches

    async def _latest_offer_texts(self) -> dict[str, str]:
        """Return the repr of each pair's latest stored offer, keyed by _offer_key."""
        # NOTE: the cache assumes this process is the only writer of price history,
        # as it is for one daemon per database.
        if self._price_cache is not None:
            return _unpack_offers(self._price_cache)
        latest_ids = select(func.max(PriceSnapshot.id)).group_by(
            col(PriceSnapshot.hostnode_id), col(PriceSnapshot.gpu_model)
        )
        query = select(
            col(PriceSnapshot.hostnode_id), col(PriceSnapshot.gpu_model), *_offer_columns()
        ).where(col(PriceSnapshot.id).in_(latest_ids))
        async with self._sessions() as session:
            rows = (await session.exec(query)).all()
        texts = {_offer_key(row[0], row[1]): repr(tuple(row[2:])) for row in rows}
        self._price_cache = _pack_offers(texts)
        return texts

    async def price_history_models(self) -> list[str]:
        """Return the GPU model ids that have stored price history, sorted by code point."""
        query = select(PriceSnapshot.gpu_model).distinct()
        async with self._sessions() as session:
            models = (await session.exec(query)).all()
        # Sorted here, because ORDER BY follows the database's collation. An en_US
        # collation, common on PostgreSQL servers, puts "a_gpu" before "A-gpu", where
        # SQLite and Python compare code points.
        return sorted(models)

    async def price_history(
        self, gpu_model: str, *, since: datetime, until: datetime | None = None
    ) -> list[PricePoint]:
        """Price changes of one GPU model in a time range, oldest first.

        Read through Core into named tuples instead of ORM objects, because a year of
        history has thousands of rows and the ORM costs several times the query.
        """
        query = (
            select(col(PriceSnapshot.taken_at), col(PriceSnapshot.hostnode_id), *_offer_columns())
            .where(PriceSnapshot.gpu_model == gpu_model, PriceSnapshot.taken_at >= since)
            .order_by(*_STORED_ORDER)
        )
        if until is not None:
            query = query.where(PriceSnapshot.taken_at < until)
        async with self.engine.connect() as connection:
            rows = (await connection.execute(query)).all()
        return [PricePoint(gpu_model, *row) for row in rows]

    # --- alerts ------------------------------------------------------------------

    async def get_open_alert(self, rule: str, subject: str) -> AlertRecord | None:
        async with self._sessions() as session:
            return (await session.exec(_open_alert_query(rule, subject))).first()

    async def upsert_alert(
        self,
        rule: str,
        subject: str,
        *,
        severity: str,
        message: str,
        now: datetime | None = None,
    ) -> AlertRecord:
        """Open the alert (rule, subject), or update the severity and message of the open one."""
        now = now or self.now()
        async with self._sessions() as session:
            alert = (await session.exec(_open_alert_query(rule, subject))).first()
            if alert is None:
                alert = AlertRecord(
                    rule=rule,
                    subject=subject,
                    severity=severity,
                    message=message,
                    first_fired_at=now,
                )
            else:
                alert.severity = severity
                alert.message = message
            session.add(alert)
            await session.commit()
            return alert

    async def resolve_alert(
        self, rule: str, subject: str, *, now: datetime | None = None
    ) -> AlertRecord | None:
        """Close the open alert (rule, subject); returns it, or None if none was open."""
        async with self._sessions() as session:
            alert = (await session.exec(_open_alert_query(rule, subject))).first()
            if alert is None:
                return None
            alert.state = AlertState.RESOLVED.value
            alert.resolved_at = now or self.now()
            session.add(alert)
            await session.commit()
            return alert

    async def silence_alert(
        self, rule: str, subject: str, until: datetime | None
    ) -> AlertRecord | None:
        """Silence the open alert (rule, subject) until a time; None lifts the silence."""
        async with self._sessions() as session:
            alert = (await session.exec(_open_alert_query(rule, subject))).first()
            if alert is None:
                return None
            alert.silenced_until = until
            session.add(alert)
            await session.commit()
            return alert

    async def claim_alert_send(
        self, alert_id: int, *, repeat_every: timedelta | None, now: datetime | None = None
    ) -> bool:
        """Claim the right to send a firing alert now, atomically.

        Succeeds for a firing, unsilenced alert never sent, or last sent at least
        `repeat_every` ago (None: only the first send). Two claimers never both win,
        because the check and the write are one conditional UPDATE.
        """
        now = now or self.now()
        due: ColumnElement[bool] = col(AlertRecord.last_sent_at).is_(None)
        if repeat_every is not None:
            due = due | (col(AlertRecord.last_sent_at) <= now - repeat_every)
        statement = (
            update(AlertRecord)
            .where(
                col(AlertRecord.id) == alert_id,
                col(AlertRecord.state) == AlertState.FIRING.value,
                col(AlertRecord.silenced_until).is_(None)
                | (col(AlertRecord.silenced_until) <= now),
                due,
            )
            .values(last_sent_at=now)
        )
        return await self._write(statement) == 1

    async def list_alerts(
        self, *, state: AlertState | None = None, rule: str | None = None, limit: int = 100
    ) -> list[AlertRecord]:
        """Alerts newest first, optionally only one state or one rule."""
        query = select(AlertRecord).order_by(col(AlertRecord.id).desc()).limit(limit)
        if state is not None:
            query = query.where(AlertRecord.state == state.value)
        if rule is not None:
            query = query.where(AlertRecord.rule == rule)
        async with self._sessions() as session:
            return list((await session.exec(query)).all())

    # --- alert silences, inhibition and the daily digest (tdbot.alerts) ----------

    async def get_alert(self, alert_id: int) -> AlertRecord | None:
        async with self._sessions() as session:
            return await session.get(AlertRecord, alert_id)

    async def set_alert_silence(self, alert_id: int, until: datetime | None) -> AlertRecord | None:
        """Silence the firing alert `alert_id` until a time, or lift its silence with None.

        Returns the updated alert, or None when no firing alert has that id. The state
        check and the write are one conditional UPDATE, so a resolved alert never changes.
        """
        statement = (
            update(AlertRecord)
            .where(
                col(AlertRecord.id) == alert_id,
                col(AlertRecord.state) == AlertState.FIRING.value,
            )
            .values(silenced_until=until)
        )
        async with self._sessions() as session:
            result = await session.exec(statement)
            await session.commit()
            if result.rowcount != 1:
                return None
            return await session.get(AlertRecord, alert_id)

    async def latest_vm_observations(self) -> dict[str, VmObservation]:
        """The newest observation of every VM ever observed, keyed by VM id."""
        latest_ids = select(func.max(VmObservation.id)).group_by(col(VmObservation.vm_id))
        query = select(VmObservation).where(col(VmObservation.id).in_(latest_ids))
        async with self._sessions() as session:
            return {row.vm_id: row for row in (await session.exec(query)).all()}

    async def vm_observation_history(
        self, *, since: datetime, until: datetime
    ) -> dict[str, list[VmObservation]]:
        """Observations per VM, oldest first, taken before `until`.

        Each VM's list starts with its last observation at or before `since`, when there
        is one, because that row gives the VM's status and cost when the span began.
        """
        at_start = (
            select(func.max(VmObservation.id))
            .where(col(VmObservation.observed_at) <= since)
            .group_by(col(VmObservation.vm_id))
        )
        inside = (col(VmObservation.observed_at) > since) & (col(VmObservation.observed_at) < until)
        query = (
            select(VmObservation)
            .where(col(VmObservation.id).in_(at_start) | inside)
            .order_by(col(VmObservation.vm_id), col(VmObservation.observed_at))
        )
        async with self._sessions() as session:
            rows = (await session.exec(query)).all()

        history: dict[str, list[VmObservation]] = {}
        for row in rows:
            history.setdefault(row.vm_id, []).append(row)
        return history

    async def first_vm_observation(
        self, vm_id: str, *, statuses: Sequence[str], after: datetime, until: datetime
    ) -> VmObservation | None:
        """The earliest observation of `vm_id` in one of `statuses`, in (after, until)."""
        query = (
            select(VmObservation)
            .where(
                VmObservation.vm_id == vm_id,
                col(VmObservation.status).in_(list(statuses)),
                col(VmObservation.observed_at) > after,
                col(VmObservation.observed_at) < until,
            )
            .order_by(col(VmObservation.observed_at))
            .limit(1)
        )
        async with self._sessions() as session:
            return (await session.exec(query)).first()

    async def alerts_changed_between(self, since: datetime, until: datetime) -> list[AlertRecord]:
        """Alerts opened or resolved in [since, until), oldest first."""
        opened = (col(AlertRecord.first_fired_at) >= since) & (
            col(AlertRecord.first_fired_at) < until
        )
        resolved = (col(AlertRecord.resolved_at) >= since) & (col(AlertRecord.resolved_at) < until)
        query = select(AlertRecord).where(opened | resolved).order_by(col(AlertRecord.id))
        async with self._sessions() as session:
            return list((await session.exec(query)).all())

    async def actions_created_between(self, since: datetime, until: datetime) -> list[ActionRecord]:
        """Journal rows created in [since, until), oldest first."""
        query = (
            select(ActionRecord)
            .where(col(ActionRecord.created_at) >= since, col(ActionRecord.created_at) < until)
            .order_by(col(ActionRecord.id))
        )
        async with self._sessions() as session:
            return list((await session.exec(query)).all())

    async def actions_in_state(
        self, kind: str, state: ActionState, *, updated_before: datetime
    ) -> list[ActionRecord]:
        """Journal rows of one kind in one state, last changed before a time, oldest first."""
        query = (
            select(ActionRecord)
            .where(
                ActionRecord.kind == kind,
                ActionRecord.state == state.value,
                col(ActionRecord.updated_at) < updated_before,
            )
            .order_by(col(ActionRecord.id))
        )
        async with self._sessions() as session:
            return list((await session.exec(query)).all())

    # --- end of alert silences, inhibition and the daily digest ------------------

    # --- intent journal ----------------------------------------------------------

    async def record_intent(
        self,
        rule: str,
        kind: str,
        subject: str,
        params: dict[str, Any],
        *,
        state: ActionState = ActionState.INTENT,
        error: str | None = None,
        vm_id: str | None = None,
    ) -> int:
        """Write and commit a journal row before anything is sent; returns its id.

        Pass `state=DRY_RUN` or `state=BLOCKED` (with `error` saying why) for an action
        that will never be sent.
        """
        now = self.now()
        action = ActionRecord(
            rule=rule,
            kind=kind,
            subject=subject,
            vm_id=vm_id,
            params=params,
            state=state.value,
            error=error,
            created_at=now,
            updated_at=now,
        )
        async with self._sessions() as session:
            session.add(action)
            await session.commit()
            return _id(action.id)

    async def mark_action(
        self,
        action_id: int,
        state: ActionState,
        *,
        error: str | None = None,
        result: dict[str, Any] | None = None,
        api_call: dict[str, Any] | None = None,
        api_calls: Sequence[dict[str, Any]] = (),
        vm_id: str | None = None,
    ) -> ActionRecord:
        """Move an action to `state` and append `api_call` and `api_calls` to its call list.

        `result` is merged into the stored result; the change is committed at once.
        """
        new_calls = [*api_calls, *([api_call] if api_call is not None else [])]
        async with self._sessions() as session:
            action = await session.get(ActionRecord, action_id)
            if action is None:
                raise LookupError(f"action {action_id} not found in the journal")
            action.state = state.value
            action.updated_at = self.now()
            if error is not None:
                action.error = error
            if result is not None:
                action.result = {**(action.result or {}), **result}
            if new_calls:
                # A new list object, so SQLAlchemy detects that the JSON column changed.
                action.api_calls = [*action.api_calls, *new_calls]
            if vm_id is not None:
                action.vm_id = vm_id
            session.add(action)
            await session.commit()
            return action

    async def get_action(self, action_id: int) -> ActionRecord | None:
        async with self._sessions() as session:
            return await session.get(ActionRecord, action_id)

    async def unfinished_actions(self) -> list[ActionRecord]:
        """Actions in state intent, sent or unknown, oldest first."""
        query = (
            select(ActionRecord)
            .where(col(ActionRecord.state).in_([state.value for state in UNFINISHED_STATES]))
            .order_by(col(ActionRecord.id))
        )
        async with self._sessions() as session:
            return list((await session.exec(query)).all())

    async def recent_actions(
        self, *, rule: str | None = None, limit: int = 50
    ) -> list[ActionRecord]:
        """Journal rows newest first, optionally of one rule."""
        query = select(ActionRecord).order_by(col(ActionRecord.id).desc()).limit(limit)
        if rule is not None:
            query = query.where(ActionRecord.rule == rule)
        async with self._sessions() as session:
            return list((await session.exec(query)).all())

    # --- confirmations -----------------------------------------------------------

    async def add_confirmation(self, confirmation: ConfirmationRecord) -> ConfirmationRecord:
        """Store a new confirmation question and return it."""
        async with self._sessions() as session:
            session.add(confirmation)
            await session.commit()
            return confirmation

    async def get_confirmation(self, confirmation_id: str) -> ConfirmationRecord | None:
        async with self._sessions() as session:
            return await session.get(ConfirmationRecord, confirmation_id)

    async def claim_confirmation(self, confirmation_id: str, *, now: datetime) -> bool:
        """Mark an unused, unexpired confirmation used; True only for the one caller that did.

        The check and the write are one conditional UPDATE, so two presses of the same
        button never both win.
        """
        statement = (
            update(ConfirmationRecord)
            .where(
                col(ConfirmationRecord.id) == confirmation_id,
                col(ConfirmationRecord.used_at).is_(None),
                col(ConfirmationRecord.expires_at) > now,
            )
            .values(used_at=now)
        )
        return await self._write(statement) == 1

    async def finish_confirmation(self, confirmation_id: str, outcome: str) -> None:
        """Store what came of a claimed confirmation, such as "done" or "cancelled"."""
        statement = (
            update(ConfirmationRecord)
            .where(col(ConfirmationRecord.id) == confirmation_id)
            .values(outcome=outcome)
        )
        await self._write(statement)

    async def open_confirmation(
        self, *, origin: str, action: str, subject: str, now: datetime
    ) -> ConfirmationRecord | None:
        """Return an unused, unexpired confirmation for the same action and subject, if any."""
        query = (
            select(ConfirmationRecord)
            .where(
                ConfirmationRecord.origin == origin,
                ConfirmationRecord.action == action,
                ConfirmationRecord.subject == subject,
                col(ConfirmationRecord.used_at).is_(None),
                col(ConfirmationRecord.expires_at) > now,
            )
            .order_by(col(ConfirmationRecord.created_at).desc())
        )
        async with self._sessions() as session:
            return (await session.exec(query)).first()

    # --- SSH host keys (tdbot.probes) --------------------------------------------

    async def get_host_key(self, vm_id: str) -> SshHostKeyRecord | None:
        """Return the trusted SSH host key of a VM, or None when none is stored."""
        async with self._sessions() as session:
            return await session.get(SshHostKeyRecord, vm_id)

    async def trust_host_key(
        self, vm_id: str, *, key_type: str, fingerprint: str, public_key: str, now: datetime
    ) -> SshHostKeyRecord:
        """Store the first SSH host key seen on a VM and return the stored key.

        When a key is already stored (a concurrent probe stored it first), that key is
        returned unchanged, so the caller compares it with the key it was shown.
        """
        record = SshHostKeyRecord(
            vm_id=vm_id,
            key_type=key_type,
            fingerprint=fingerprint,
            public_key=public_key,
            first_seen_at=now,
            last_seen_at=now,
        )
        try:
            async with self._sessions() as session:
                session.add(record)
                await session.commit()
                return record
        except IntegrityError:
            stored = await self.get_host_key(vm_id)
            if stored is None:
                raise
            return stored

    async def touch_host_key(self, vm_id: str, now: datetime) -> None:
        """Set the time the stored SSH host key of a VM was last seen."""
        statement = (
            update(SshHostKeyRecord)
            .where(col(SshHostKeyRecord.vm_id) == vm_id)
            .values(last_seen_at=now)
        )
        await self._write(statement)

    async def forget_host_key(self, vm_id: str) -> bool:
        """Delete the stored SSH host key of a VM, so the next probe trusts the key presented.

        Use it after a VM was reinstalled and its new key was checked. Returns whether
        a key was stored.
        """
        statement = delete(SshHostKeyRecord).where(col(SshHostKeyRecord.vm_id) == vm_id)
        return await self._write(statement) > 0

    # --- end of SSH host keys ----------------------------------------------------

    # --- idle warning buttons (tdbot.bot.idle_warnings) ---------------------------

    async def idle_warning(self, rule: str, vm_id: str) -> StoredIdleWarning | None:
        """Return the pending idle warning of `rule` for a VM, with its row id."""
        query = select(RuleStateRecord).where(
            RuleStateRecord.rule == rule, RuleStateRecord.key == PREFIX_IDLE_WARNING + vm_id
        )
        async with self._sessions() as session:
            row = (await session.exec(query)).first()
        return None if row is None else _stored_idle_warning(row)

    async def idle_warning_by_row(self, row_id: int) -> StoredIdleWarning | None:
        """Return the pending idle warning stored in row `row_id`, or None."""
        async with self._sessions() as session:
            row = await session.get(RuleStateRecord, row_id)
        if row is None or not row.key.startswith(PREFIX_IDLE_WARNING):
            return None
        return _stored_idle_warning(row)

    async def move_idle_warning_due(self, stored: StoredIdleWarning, due_at: datetime) -> bool:
        """Set a pending warning's stop time to `due_at`; False when it is no longer pending.

        One conditional UPDATE of the same row and key, so a warning that a tick has
        cancelled or settled in the meantime is not brought back.
        """
        warning = IdleWarningState(warned_at=stored.warning.warned_at, due_at=due_at)
        statement = (
            update(RuleStateRecord)
            .where(
                col(RuleStateRecord.id) == stored.row_id,
                col(RuleStateRecord.rule) == stored.rule,
                col(RuleStateRecord.key) == PREFIX_IDLE_WARNING + stored.vm_id,
            )
            .values(value=codec.encode_idle_warning(warning), updated_at=self.now())
        )
        return await self._write(statement) == 1

    # --- end of idle warning buttons ---------------------------------------------

    # --- price history (tdbot.history) -------------------------------------------

    async def price_series_points(
        self, gpu_model: str, *, since: datetime, until: datetime | None = None
    ) -> list[PricePoint]:
        """Price changes of one GPU model from `since`, led by each hostnode's last earlier row.

        The leading rows give the price each hostnode had at `since`, so a series
        rebuilt from the result is correct from its first instant. Oldest first.
        """
        latest_before = (
            select(func.max(PriceSnapshot.id))
            .where(PriceSnapshot.gpu_model == gpu_model, PriceSnapshot.taken_at < since)
            .group_by(col(PriceSnapshot.hostnode_id))
        )
        query = (
            select(col(PriceSnapshot.taken_at), col(PriceSnapshot.hostnode_id), *_offer_columns())
            .where(col(PriceSnapshot.id).in_(latest_before))
            .order_by(*_STORED_ORDER)
        )
        async with self.engine.connect() as connection:
            leading = (await connection.execute(query)).all()
        points = [PricePoint(gpu_model, *row) for row in leading]
        return points + await self.price_history(gpu_model, since=since, until=until)

    async def prune_price_history(self, *, older_than: datetime) -> int:
        """Delete price rows taken before `older_than`, except the last one of each pair.

        The last row before the cut of each (hostnode, GPU model) pair is the price
        that pair had at the cut, so series that start there stay correct. The latest
        row of a pair is never deleted, so the in-memory latest prices stay valid.
        Returns how many rows were deleted.
        """
        keep = (
            select(func.max(PriceSnapshot.id))
            .where(col(PriceSnapshot.taken_at) < older_than)
            .group_by(col(PriceSnapshot.hostnode_id), col(PriceSnapshot.gpu_model))
        )
        statement = delete(PriceSnapshot).where(
            col(PriceSnapshot.taken_at) < older_than, col(PriceSnapshot.id).not_in(keep)
        )
        # A watch is kept while its gap allowance reaches past the cut. The first one
        # ever stored is kept too, because time before it counts as watched.
        first_watch = select(func.min(PriceWatch.id)).scalar_subquery()
        old_watches = delete(PriceWatch).where(
            col(PriceWatch.last_seen_at) < older_than - WATCH_GAP,
            col(PriceWatch.id) != first_watch,
        )
        async with self._sessions() as session:
            result = await session.exec(statement)
            await session.exec(old_watches)
            await session.commit()
            return int(result.rowcount or 0)

    # --- end of price history ----------------------------------------------------


# --- helpers -------------------------------------------------------------------------


def _id(value: int | None) -> int:
    if value is None:
        raise RuntimeError("the database assigned no primary key")
    return value


def _decision_record(run_id: int, decision: Decision, now: datetime) -> DecisionRecord:
    return DecisionRecord(
        run_id=run_id,
        rule=decision.rule,
        kind=type(decision).__name__,
        subject=decision.subject,
        summary=decision.summary,
        evidence=decision.evidence,
        created_at=now,
    )


def _open_alert_query(rule: str, subject: str) -> SelectOfScalar[AlertRecord]:
    return select(AlertRecord).where(
        AlertRecord.rule == rule,
        AlertRecord.subject == subject,
        AlertRecord.state == AlertState.FIRING.value,
    )


def _rule_state_from_rows(
    rows: Sequence[RuleStateRecord],
    open_alerts: frozenset[str],
    samples: dict[str, list[IdleSample]],
) -> RuleState:
    best_price: float | None = None
    ladders: dict[str, LadderState] = {}
    warnings: dict[str, IdleWarningState] = {}
    running_since: dict[str, datetime] = {}
    deployed: set[str] = set()
    for row in rows:
        key = row.key
        if key == KEY_BEST_PRICE:
            best_price = float(row.value)
        elif key.startswith(PREFIX_LADDER):
            ladders[key.removeprefix(PREFIX_LADDER)] = codec.decode_ladder(row.value)
        elif key.startswith(PREFIX_IDLE_WARNING):
            warnings[key.removeprefix(PREFIX_IDLE_WARNING)] = codec.decode_idle_warning(row.value)
        elif key.startswith(PREFIX_RUNNING_SINCE):
            running_since[key.removeprefix(PREFIX_RUNNING_SINCE)] = codec.decode_time(row.value)
        elif key.startswith(PREFIX_DEPLOYED):
            deployed.add(key.removeprefix(PREFIX_DEPLOYED))

    return RuleState(
        open_alerts=open_alerts,
        best_price_usd=best_price,
        ladders=ladders,
        idle_samples=samples,
        idle_warnings=warnings,
        running_since=running_since,
        deployed_vm_ids=frozenset(deployed),
    )


def _idle_sample(row: IdleSampleRecord) -> IdleSample:
    return IdleSample(
        vm_id=row.vm_id,
        at=row.at,
        gpu_util_percent=row.gpu_util_percent,
        gpu_memory_mb=row.gpu_memory_mb,
        cpu_load=row.cpu_load,
        network_kbps=row.network_kbps,
        processes=None if row.processes is None else tuple(row.processes),
        source=row.source,
        error=row.error,
    )


def _observation_changed(last: VmObservation | None, new: VmObservation) -> bool:
    if last is None:
        return True
    return (last.status, last.name, last.hourly_cost_usd, last.spot_bid_usd) != (
        new.status,
        new.name,
        new.hourly_cost_usd,
        new.spot_bid_usd,
    )


def _current_offers(snapshot: MarketSnapshot) -> dict[tuple[str, str], OfferValues]:
    """Map (hostnode id, GPU model) to its offer values, in OFFER_COLUMNS order."""
    offers: dict[tuple[str, str], OfferValues] = {}
    for hostnode_id, hostnode in (snapshot.hostnodes or {}).items():
        specs = hostnode.specs
        # The reasons that keep sizing from placing any deployment on a hostnode.
        deployable = hostnode.available and hostnode.status.reserved is not True
        shared = (
            specs.cpu.price,
            specs.cpu.amount,
            specs.ram.price,
            specs.ram.amount,
            specs.storage.price,
            specs.storage.amount,
            len(set(hostnode.networking.ports)),
            _restrictions_text(specs.restrictions),
        )
        for gpu_model, gpu in specs.gpu.items():
            available = deployable and gpu.amount > 0
            offers[(hostnode_id, gpu_model)] = (gpu.price, available, gpu.amount, *shared)
    return offers


_AVAILABLE = OFFER_COLUMNS.index("available")

# Separators that occur in no hostnode id, GPU model id or repr of an offer.
_PAIR_SEPARATOR = "\x1f"
_TEXT_SEPARATOR = "\x1e"


def _offer_key(hostnode_id: str, gpu_model: str) -> str:
    return f"{hostnode_id}{_PAIR_SEPARATOR}{gpu_model}"


def _offer_pair(key: str) -> tuple[str, str]:
    hostnode_id, gpu_model = key.split(_PAIR_SEPARATOR, 1)
    return hostnode_id, gpu_model


def _pack_offers(texts: dict[str, str]) -> str:
    """Pack the latest offers into one string, kept between snapshots.

    One large string lives outside Python's small-object arenas. Thousands of small
    objects kept from a snapshot would be scattered over the memory its parse used and
    keep all of it from being returned: 22 MiB with 5,000 hostnodes, measured.
    """
    return "\n".join(f"{key}{_TEXT_SEPARATOR}{text}" for key, text in texts.items())


def _unpack_offers(packed: str) -> dict[str, str]:
    if not packed:
        return {}
    return dict(line.split(_TEXT_SEPARATOR, 1) for line in packed.split("\n"))


def _restrictions_text(restrictions: dict[int, Restriction] | None) -> str | None:
    """Return the stored text of a hostnode's restrictions, encoding each distinct one once.

    JSON-encoding the restrictions of 5,000 hostnodes took most of an unchanged tick.
    A market has only a few dozen distinct ones, so the text is cached by a flat tuple
    of the bounds, which is cheap to build and to hash.
    """
    if restrictions is None:
        return None
    key = tuple(
        (count, *_bounds_key(part.cpu), *_bounds_key(part.ram), *_bounds_key(part.storage))
        for count, part in sorted(restrictions.items())
    )
    return _encoded_restrictions(key, restrictions)


def _bounds_key(bounds: Bounds | None) -> tuple[int | None, int | None]:
    return (None, None) if bounds is None else (bounds.min, bounds.max)


_RESTRICTION_TEXTS: dict[tuple[tuple[int | None, ...], ...], str | None] = {}


def _encoded_restrictions(
    key: tuple[tuple[int | None, ...], ...], restrictions: dict[int, Restriction]
) -> str | None:
    text = _RESTRICTION_TEXTS.get(key)
    if text is None:
        text = codec.encode_restrictions(restrictions)
        # Bounded, so a market of ever new restrictions cannot grow it without end.
        if len(_RESTRICTION_TEXTS) < RESTRICTION_TEXTS_MAX:
            _RESTRICTION_TEXTS[key] = text
    return text


# Oldest first, and rows of the same time in the order they were stored. SQL leaves
# the order of equal times open, so the id settles it on every backend.
_STORED_ORDER = (col(PriceSnapshot.taken_at), col(PriceSnapshot.id))


def _offer_columns() -> list[Any]:
    return [col(getattr(PriceSnapshot, name)) for name in OFFER_COLUMNS]


class _MissingColumnError(Exception):
    """A table lacks a column that cannot be added to rows already stored."""


# The fix offered when tdbot cannot open a database.
_DATABASE_FIX = (
    "Set daemon.database to a SQLite file path or to a postgresql+asyncpg://user@host/name "
    "URL (with the postgres extra installed)"
)


def _add_missing_columns(connection: Connection) -> None:
    """Add the nullable columns that tables created by an older tdbot lack.

    `create_all` creates missing tables but never alters existing ones. The columns
    added so far are all nullable, and ADD COLUMN adds those on SQLite and PostgreSQL
    alike.
    """
    inspector = inspect(connection)
    preparer = connection.dialect.identifier_preparer
    for table in SQLModel.metadata.sorted_tables:
        present = {column["name"] for column in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name in present:
                continue
            if not column.nullable:
                raise _MissingColumnError(
                    f"table {table.name} lacks the required column {column.name}, which "
                    "cannot be added to the rows already stored"
                )
            column_type = column.type.compile(dialect=connection.dialect)
            connection.execute(
                text(
                    f"ALTER TABLE {preparer.format_table(table)} "
                    f"ADD COLUMN {preparer.format_column(column)} {column_type}"
                )
            )
            logger.info("added column %s.%s to the database", table.name, column.name)


# --- idle warning buttons ------------------------------------------------------------

# Hex digits of the check in an idle warning's button id.
_WARNING_CHECK_DIGITS = 6


@dataclass(frozen=True)
class StoredIdleWarning:
    """A pending idle warning and the row it is stored in."""

    row_id: int
    rule: str
    vm_id: str
    warning: IdleWarningState

    @property
    def button_id(self) -> str:
        """Return the short id that chat buttons carry: "<row id>.<check>".

        SQLite may give a deleted row's id to the next new row, so the check, a hash
        of the rule, VM and warning time, keeps a button of a cancelled warning from
        acting on a later one.
        """
        return f"{self.row_id}.{self.check}"

    @property
    def check(self) -> str:
        text = f"{self.rule}\n{self.vm_id}\n{codec.encode_time(self.warning.warned_at)}"
        return hashlib.sha256(text.encode()).hexdigest()[:_WARNING_CHECK_DIGITS]


def _stored_idle_warning(row: RuleStateRecord) -> StoredIdleWarning:
    return StoredIdleWarning(
        row_id=_id(row.id),
        rule=row.rule,
        vm_id=row.key.removeprefix(PREFIX_IDLE_WARNING),
        warning=codec.decode_idle_warning(row.value),
    )
