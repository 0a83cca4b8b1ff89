"""SQLModel tables of tdbot's state.

Every datetime column is timezone-aware UTC on the way in and on the way out.
SQLite has no time zone type and returns naive values, so `UtcDateTime` converts
to UTC before storing and attaches UTC when reading back. PostgreSQL stores the
same columns as `timestamp with time zone`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, BigInteger, DateTime, Dialect, Index, UniqueConstraint, text
from sqlalchemy.types import TypeDecorator
from sqlmodel import Field, SQLModel


class UtcDateTime(TypeDecorator[datetime]):
    """A DateTime column that only accepts aware values and always returns aware UTC."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value.isoformat()} rejected; pass an aware UTC time")
        value = value.astimezone(UTC)
        # SQLite compares the stored text, so every row must be written in the same zone
        # and format: UTC without an offset suffix.
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


def utc_now() -> datetime:
    return datetime.now(UTC)


class ActionKind(StrEnum):
    DEPLOY = "deploy"
    STOP = "stop"
    REBID = "rebid"
    START = "start"
    DELETE = "delete"


class ActionState(StrEnum):
    """State of an action in the intent journal.

    intent → sent → verified | failed | unknown. `dry_run` and `blocked` mark
    actions that were never sent to the API.
    """

    INTENT = "intent"
    SENT = "sent"
    VERIFIED = "verified"
    FAILED = "failed"
    UNKNOWN = "unknown"
    DRY_RUN = "dry_run"
    BLOCKED = "blocked"


# States of an action whose outcome is not settled yet; reconciliation looks at these.
UNFINISHED_STATES = (ActionState.INTENT, ActionState.SENT, ActionState.UNKNOWN)


class AlertState(StrEnum):
    FIRING = "firing"
    RESOLVED = "resolved"


class RuleRun(SQLModel, table=True):
    """One evaluation of one rule."""

    __tablename__ = "rule_run"

    id: int | None = Field(default=None, primary_key=True)
    rule: str = Field(index=True)
    started_at: datetime = Field(sa_type=UtcDateTime)
    finished_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    ok: bool | None = None
    error: str | None = None
    decision_count: int = 0


class DecisionRecord(SQLModel, table=True):
    """A decision a rule run produced, with the evidence behind it."""

    __tablename__ = "decision"
    __table_args__ = (Index("ix_decision_rule_created", "rule", "created_at"),)

    id: int | None = Field(default=None, primary_key=True)
    run_id: int | None = Field(default=None, foreign_key="rule_run.id", index=True)
    rule: str
    kind: str
    subject: str
    summary: str
    evidence: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)
    created_at: datetime = Field(sa_type=UtcDateTime)


class ActionRecord(SQLModel, table=True):
    """One entry of the intent journal: a spending or destructive call and its outcome.

    `subject` is the VM id, or for a deploy the intended VM name; `vm_id` is set once
    the VM is known. `api_calls` lists every call made for the action (endpoint, VM id,
    outcome, time) and never contains a secret.
    """

    __tablename__ = "action"
    __table_args__ = (
        Index("ix_action_state", "state"),
        Index("ix_action_rule_created", "rule", "created_at"),
    )

    id: int | None = Field(default=None, primary_key=True)
    rule: str
    kind: str
    subject: str
    vm_id: str | None = None
    params: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)
    state: str = ActionState.INTENT.value
    error: str | None = None
    result: dict[str, Any] | None = Field(default=None, sa_type=JSON)
    api_calls: list[dict[str, Any]] = Field(default_factory=list, sa_type=JSON)
    created_at: datetime = Field(sa_type=UtcDateTime)
    updated_at: datetime = Field(sa_type=UtcDateTime)


class AlertRecord(SQLModel, table=True):
    """An alert with key (rule, subject); at most one firing row exists per key."""

    __tablename__ = "alert"
    __table_args__ = (
        Index(
            "ux_alert_open",
            "rule",
            "subject",
            unique=True,
            sqlite_where=text("state = 'firing'"),
            postgresql_where=text("state = 'firing'"),
        ),
        Index("ix_alert_state", "state"),
    )

    id: int | None = Field(default=None, primary_key=True)
    rule: str
    subject: str
    severity: str
    state: str = AlertState.FIRING.value
    message: str
    first_fired_at: datetime = Field(sa_type=UtcDateTime)
    last_sent_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    resolved_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    silenced_until: datetime | None = Field(default=None, sa_type=UtcDateTime)


class PriceSnapshot(SQLModel, table=True):
    """The offer of one GPU model on one hostnode, written only when something changes.

    The unit prices and free amounts of vCPUs, RAM, storage and ports, and the
    hostnode's restrictions, are kept with the GPU price, so the full price of any
    deployment size can be rebuilt later. They are None in rows written before they
    were stored, and such a row's full price is unknown.
    """

    __tablename__ = "price_snapshot"
    __table_args__ = (
        Index("ix_price_model_taken", "gpu_model", "taken_at"),
        Index("ix_price_host_model", "hostnode_id", "gpu_model", "id"),
    )

    id: int | None = Field(default=None, primary_key=True)
    taken_at: datetime = Field(sa_type=UtcDateTime)
    hostnode_id: str
    gpu_model: str
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
    # The hostnode's restrictions as compact JSON (tdbot.history.encode_restrictions).
    restrictions: str | None = None


class PriceWatch(SQLModel, table=True):
    """A stretch of time in which the daemon took market snapshots without a long break.

    Price rows are written only on change, so these rows tell a price that held apart
    from one that went unobserved because the daemon stopped or the hostnode list failed.
    """

    __tablename__ = "price_watch"

    id: int | None = Field(default=None, primary_key=True)
    started_at: datetime = Field(sa_type=UtcDateTime)
    last_seen_at: datetime = Field(sa_type=UtcDateTime, index=True)
    # When the daemon stopped cleanly; None while it runs or after a crash.
    stopped_at: datetime | None = Field(default=None, sa_type=UtcDateTime)


class VmObservation(SQLModel, table=True):
    """A VM's status and cost as seen in a snapshot, written only when they change."""

    __tablename__ = "vm_observation"
    __table_args__ = (Index("ix_vm_observation_vm", "vm_id", "observed_at"),)

    id: int | None = Field(default=None, primary_key=True)
    vm_id: str
    observed_at: datetime = Field(sa_type=UtcDateTime)
    status: str
    name: str
    hourly_cost_usd: float | None = None
    spot_bid_usd: float | None = None


class IdleSampleRecord(SQLModel, table=True):
    """One activity reading of a VM, from a heartbeat agent or a probe."""

    __tablename__ = "idle_sample"
    __table_args__ = (Index("ix_idle_sample_vm_at", "vm_id", "at"),)

    id: int | None = Field(default=None, primary_key=True)
    vm_id: str
    at: datetime = Field(sa_type=UtcDateTime)
    gpu_util_percent: float | None = None
    gpu_memory_mb: float | None = None
    cpu_load: float | None = None
    network_kbps: float | None = None
    processes: list[str] | None = Field(default=None, sa_type=JSON)
    source: str = "heartbeat"
    error: str | None = None


class RuleStateRecord(SQLModel, table=True):
    """A small piece of state one rule keeps between runs, as JSON under a key."""

    __tablename__ = "rule_state"
    __table_args__ = (UniqueConstraint("rule", "key", name="ux_rule_state_key"),)

    id: int | None = Field(default=None, primary_key=True)
    rule: str
    key: str
    value: Any = Field(default=None, sa_type=JSON)
    updated_at: datetime = Field(sa_type=UtcDateTime)


class ConfirmationRecord(SQLModel, table=True):
    """A pending question "do this?" asked in a chat with Confirm and Cancel buttons.

    `id` is a short random text that goes into the buttons' callback data.
    `Store.claim_confirmation` sets `used_at` with a conditional UPDATE only before
    `expires_at` and only once, so a row is used at most once. `chat_id` and `user_id`
    are None for a question a rule asked, which any allowed user may answer. `origin`
    is the rule that asked, or "chat" for a chat command. `params` describes the action
    and contains no secret.
    """

    __tablename__ = "confirmation"
    __table_args__ = (Index("ix_confirmation_open", "action", "subject", "origin"),)

    id: str = Field(primary_key=True, max_length=16)
    # BIGINT, because the Telegram Bot API documents chat and user ids of up to 52
    # significant bits, and PostgreSQL's INTEGER has 32. SQLite stores both types alike.
    chat_id: int | None = Field(default=None, sa_type=BigInteger)
    user_id: int | None = Field(default=None, sa_type=BigInteger)
    origin: str
    action: str
    subject: str
    summary: str
    params: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)
    created_at: datetime = Field(sa_type=UtcDateTime)
    expires_at: datetime = Field(sa_type=UtcDateTime)
    used_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    outcome: str | None = None


# --- SSH host keys (tdbot.probes) ----------------------------------------------------


class SshHostKeyRecord(SQLModel, table=True):
    """The SSH host key first seen on a VM, trusted for every later idle probe.

    Trust on first use: the first probe of a VM stores its key; a later probe that is
    shown another key fails until the row is deleted (`Store.forget_host_key`).
    `fingerprint` is OpenSSH's "SHA256:<base64>" form and `public_key` the one-line
    OpenSSH public key, such as "ssh-ed25519 AAAA...".
    """

    __tablename__ = "ssh_host_key"

    vm_id: str = Field(primary_key=True)
    key_type: str
    fingerprint: str
    public_key: str
    first_seen_at: datetime = Field(sa_type=UtcDateTime)
    last_seen_at: datetime = Field(sa_type=UtcDateTime)


# --- end of SSH host keys ------------------------------------------------------------
