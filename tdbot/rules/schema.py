"""Schema of rule files: one pydantic model per rule kind, unknown keys forbidden.

Units are part of every name or value: durations are strings such as "90s", "10m",
"1h30m" or "2d"; money fields end in `_usd` or `_usd_per_hour`; percentages end in
`_percent`. The loader (`tdbot.rules.loader`) turns validation errors into messages
with the file, line and column of the offending value.
"""

from __future__ import annotations

import re
from datetime import timedelta
from fnmatch import fnmatchcase
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    field_validator,
    model_validator,
)

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_DURATION_UNITS = {
    "ms": timedelta(milliseconds=1),
    "s": timedelta(seconds=1),
    "m": timedelta(minutes=1),
    "h": timedelta(hours=1),
    "d": timedelta(days=1),
    "w": timedelta(weeks=1),
}
# A year and a day is longer than any interval, window or silence a rule needs.
MAX_DURATION = timedelta(days=366)


def parse_duration(value: Any) -> timedelta:
    """Parse "90s", "10m", "1h30m" or "2d" into a timedelta; a bare number is rejected.

    Raises ValueError for text that is not a duration, for zero, and for more than
    MAX_DURATION.
    """
    if isinstance(value, timedelta):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        raise ValueError(
            f"{value!r} has no unit; write a duration such as '{value}m' or '{value}s'"
        )
    if not isinstance(value, str):
        raise ValueError(f"expected a duration such as '10m', got {type(value).__name__}")
    text = value.strip().replace(" ", "")
    position = 0
    total = timedelta()
    for match in _DURATION_PART.finditer(text):
        if match.start() != position:
            break
        total += _duration_part(value, float(match.group(1)), _DURATION_UNITS[match.group(2)])
        if total > MAX_DURATION:
            raise _too_long(value)
        position = match.end()
    if position != len(text) or not text:
        raise ValueError(
            f"{value!r} is not a duration; use a number and a unit (ms, s, m, h, d, w), "
            "for example '90s', '10m' or '1h30m'"
        )
    if total <= timedelta():
        raise ValueError(f"{value!r} must be longer than zero")
    return total


def _duration_part(value: str, amount: float, unit: timedelta) -> timedelta:
    # Compare in seconds first, because a timedelta beyond 999999999 days raises
    # OverflowError instead of ValueError.
    if amount * unit.total_seconds() > MAX_DURATION.total_seconds():
        raise _too_long(value)
    return amount * unit


def _too_long(value: str) -> ValueError:
    return ValueError(
        f"{value!r} is too long; a duration is at most {MAX_DURATION.days} days "
        f"('{MAX_DURATION.days}d')"
    )


def check_time_zone(value: str) -> str:
    """Accept an IANA time zone name, such as "UTC" or "Europe/Berlin"."""
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f"unknown time zone {value!r}; use an IANA name such as 'UTC' or 'Europe/Berlin'"
        ) from None
    return value


def format_duration(value: timedelta) -> str:
    """Format a timedelta the way rule files write it, for example "1h30m"."""
    seconds = int(value.total_seconds())
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        count, seconds = divmod(seconds, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts) or "0s"


Duration = Annotated[
    timedelta,
    BeforeValidator(parse_duration),
    PlainSerializer(format_duration, return_type=str),
]
Usd = Annotated[float, Field(ge=0)]
Percent = Annotated[float, Field(ge=0, le=100)]

RULE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


class Strict(BaseModel):
    """Base of every rule model: unknown keys are errors, not silently ignored.

    Numbers must be finite, because `.inf` or `nan` as a price, percentage or threshold
    would make every comparison with it always true or always false.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class VmSelector(Strict):
    """Which of the account's VMs a rule watches; empty means all of them."""

    names: list[str] = Field(
        default_factory=list, description="VM name patterns with shell wildcards"
    )
    ids: list[str] = Field(default_factory=list, description="exact VM UUIDs")
    exclude_names: list[str] = Field(default_factory=list)

    def matches(self, vm_id: str, vm_name: str) -> bool:
        """Whether a VM with this id and name is selected."""
        if any(fnmatchcase(vm_name, pattern) for pattern in self.exclude_names):
            return False
        if not self.names and not self.ids:
            return True
        return vm_id in self.ids or any(fnmatchcase(vm_name, pattern) for pattern in self.names)


class RuleBase(Strict):
    """Fields every rule kind shares: identity, schedule and dry run."""

    name: str = Field(description="unique rule name: lowercase letters, digits, '-' and '_'")
    kind: str
    every: Duration | None = Field(default=None, description="run interval, such as '10m'")
    cron: str | None = Field(
        default=None, description="five-field cron expression, instead of every"
    )
    timezone: str = Field(default="UTC", description="IANA time zone the cron expression uses")
    enabled: bool = True
    dry_run: bool = Field(default=False, description="decide and report, but never act")

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not RULE_NAME.fullmatch(value):
            raise ValueError(
                f"{value!r} is not a valid rule name; use 1 to 63 lowercase letters, "
                "digits, '-' or '_', starting with a letter or digit"
            )
        return value

    @field_validator("timezone")
    @classmethod
    def _check_timezone(cls, value: str) -> str:
        return check_time_zone(value)

    @field_validator("cron")
    @classmethod
    def _check_cron(cls, value: str | None) -> str | None:
        if value is None:
            return value
        fields = value.split()
        if len(fields) != 5:
            raise ValueError(
                f"{value!r} has {len(fields)} fields; a cron expression has five: "
                "minute hour day month weekday, for example '*/15 * * * *'"
            )
        return value

    @model_validator(mode="after")
    def _check_schedule(self) -> RuleBase:
        if (self.every is None) == (self.cron is None):
            raise ValueError("set exactly one of 'every' (such as '10m') or 'cron'")
        if self.every is not None and self.every < timedelta(seconds=10):
            raise ValueError("'every' must be at least 10s so the API is not flooded")
        return self


# --- cheapest hostnode -----------------------------------------------------------


class HostnodeSpec(Strict):
    """The deployment a cheapest-hostnode rule prices on every hostnode."""

    gpu: list[str] = Field(
        min_length=1,
        description="GPU model ids or names such as '4090' or 'a100-80gb', any of which will do",
    )
    exclude_gpu: list[str] = Field(default_factory=list, description="GPU names to skip")
    gpu_count: int = Field(default=1, ge=1, le=8)
    min_vram_gb: int | None = Field(default=None, ge=1)
    max_vram_gb: int | None = Field(default=None, ge=1)
    vcpus: int = Field(default=8, ge=2, description="rounded up to an even number on deploy")
    ram_gb: int = Field(default=32, ge=1)
    storage_gb: int = Field(default=100, ge=20)
    max_usd_per_hour: Usd | None = Field(
        default=None, description="skip offers whose full hourly price is higher"
    )
    countries: list[str] = Field(default_factory=list)
    exclude_countries: list[str] = Field(default_factory=list)
    cities: list[str] = Field(default_factory=list)
    exclude_cities: list[str] = Field(default_factory=list)
    min_uptime_percent: Percent = 0.0
    spot: bool = Field(default=False, description="the deployment would be a spot VM")

    @model_validator(mode="before")
    @classmethod
    def _parse_string(cls, value: Any) -> Any:
        # A string is the one-line form, such as "gpu=4090 count=1 vcpus=8 ram>=32".
        if not isinstance(value, str):
            return value
        from tdbot.spec import parse_spec_fields

        return parse_spec_fields(value)


class PriceAlert(Strict):
    below_usd_per_hour: Usd | None = Field(
        default=None, description="alert when the best full price is under this"
    )
    on_new_best: bool = Field(default=True, description="alert when the best price drops")
    deal_below_percentile: Percent | None = Field(
        default=None,
        description=(
            "alert when the best offer's full price is under this percentile of the "
            "stored best full price of the same size and GPU model over deal_window"
        ),
    )
    deal_window: Duration = Field(
        default=timedelta(days=7), description="history the deal percentile is taken over"
    )


class DeployPolicy(Strict):
    """Optional automatic deployment on the best hostnode, always within the caps."""

    enabled: bool = False
    max_vms: int = Field(default=1, ge=1, le=50, description="live VMs this rule may create")
    max_usd_per_hour: Usd = Field(description="price cap per VM, compute plus storage")
    name_template: str = Field(default="{rule}-{n}", description="placeholders: {rule}, {n}")
    operating_system: str = "Ubuntu 22.04 LTS"
    ssh_public_key: str | None = None
    internal_ports: list[Annotated[int, Field(ge=1, le=65535)]] = Field(
        default_factory=lambda: [22]
    )
    confirm: bool = Field(default=True, description="ask in Telegram before deploying")
    cloudinit_script: str | None = Field(
        default=None, description="cloud-init script run on the VM's first boot"
    )


class CheapestHostnodeRule(RuleBase):
    kind: Literal["cheapest_hostnode"]
    match: HostnodeSpec
    alert: PriceAlert = Field(default_factory=PriceAlert)
    deploy: DeployPolicy | None = None
    top: int = Field(default=5, ge=1, le=50, description="how many hostnodes to report")


# --- spot re-bid -----------------------------------------------------------------


class BidLadder(Strict):
    """How a new bid is found: raise by a step, never past the cap."""

    step_usd: Usd | None = Field(default=None, description="raise per step in USD per hour")
    step_percent: Annotated[float, Field(gt=0, le=100)] | None = None
    max_usd_per_hour: Usd = Field(description="highest bid this rule ever places for one VM")
    max_steps: int = Field(default=5, ge=1, le=50, description="steps before giving up")
    start_usd_per_hour: Usd | None = Field(
        default=None, description="first bid of a ladder, never below the VM's current bid"
    )
    max_steps_per_hour: int | None = Field(
        default=None, ge=1, le=60, description="steps at most in any one hour"
    )

    @model_validator(mode="after")
    def _one_step(self) -> BidLadder:
        if (self.step_usd is None) == (self.step_percent is None):
            raise ValueError("set exactly one of 'step_usd' or 'step_percent'")
        return self


class SpotRebidRule(RuleBase):
    kind: Literal["spot_rebid"]
    select: VmSelector = Field(default_factory=VmSelector)
    bid: BidLadder
    on_exhausted: Literal["alert", "redeploy"] = Field(
        default="alert", description="what to do once every step failed"
    )
    redeploy_max_usd_per_hour: Usd | None = Field(
        default=None, description="price cap of the replacement VM, compute plus storage"
    )
    redeploy_confirm: bool = Field(
        default=True, description="ask in Telegram before deploying the replacement"
    )

    @model_validator(mode="after")
    def _redeploy_cap(self) -> SpotRebidRule:
        if self.on_exhausted == "redeploy" and self.redeploy_max_usd_per_hour is None:
            raise ValueError("on_exhausted 'redeploy' needs 'redeploy_max_usd_per_hour'")
        return self


# --- idle stop -------------------------------------------------------------------


class IdleSignals(Strict):
    """Thresholds a VM must stay under for the whole window to count as idle."""

    gpu_util_below_percent: Percent | None = 5.0
    gpu_memory_below_mb: Annotated[float, Field(ge=0)] | None = None
    cpu_load_below: Annotated[float, Field(ge=0)] | None = None
    network_below_kbps: Annotated[float, Field(ge=0)] | None = None

    @model_validator(mode="after")
    def _at_least_one(self) -> IdleSignals:
        if all(value is None for value in self.model_dump().values()):
            raise ValueError("set at least one idle signal, such as gpu_util_below_percent: 5")
        return self


IdleSource = Literal["heartbeat", "ssh"]


def _heartbeat_only() -> list[IdleSource]:
    return ["heartbeat"]


class IdleStopRule(RuleBase):
    kind: Literal["idle_stop"]
    select: VmSelector = Field(default_factory=VmSelector)
    window: Duration = Field(description="how long every signal must stay under its threshold")
    min_samples: int = Field(default=3, ge=1)
    max_sample_age: Duration = Field(
        default=timedelta(minutes=5), description="a newer sample must exist, or it is stale"
    )
    grace_after_start: Duration = Field(default=timedelta(minutes=15))
    warning: Duration = Field(
        default=timedelta(minutes=15), description="time between the warning and the stop"
    )
    signals: IdleSignals = Field(default_factory=IdleSignals)
    busy_processes: list[str] = Field(
        default_factory=list,
        description=(
            "command-line patterns with shell wildcards, such as '*python*train.py*'; "
            "a VM running a matching process is busy"
        ),
    )
    sources: list[IdleSource] = Field(
        default_factory=_heartbeat_only,
        min_length=1,
        description="where readings come from: pushed by an agent, or probed over SSH",
    )
    action: Literal["stop", "stop_release"] = Field(
        default="stop",
        description="'stop' keeps the GPU reserved and billed; 'stop_release' frees it",
    )


# --- low balance -----------------------------------------------------------------


class LowBalanceRule(RuleBase):
    kind: Literal["low_balance"]
    fire_below_runway_hours: Annotated[float, Field(gt=0)] | None = None
    clear_above_runway_hours: Annotated[float, Field(gt=0)] | None = None
    fire_below_balance_usd: Usd | None = None
    clear_above_balance_usd: Usd | None = None
    repeat_every: Duration = Field(default=timedelta(hours=6))

    @model_validator(mode="after")
    def _check_levels(self) -> LowBalanceRule:
        pairs = (
            ("runway_hours", self.fire_below_runway_hours, self.clear_above_runway_hours),
            ("balance_usd", self.fire_below_balance_usd, self.clear_above_balance_usd),
        )
        if all(fire is None for _, fire, _ in pairs):
            raise ValueError("set fire_below_runway_hours, fire_below_balance_usd or both")
        for unit, fire, clear in pairs:
            if clear is not None and fire is None:
                raise ValueError(f"clear_above_{unit} needs fire_below_{unit}")
            if fire is not None and clear is not None and clear < fire:
                raise ValueError(
                    f"clear_above_{unit} ({clear}) must be at least fire_below_{unit} ({fire}), "
                    "or the alert would flap"
                )
        return self

    @property
    def clear_runway_hours(self) -> float | None:
        """Clear level for the runway; the fire level when none is set."""
        if self.clear_above_runway_hours is not None:
            return self.clear_above_runway_hours
        return self.fire_below_runway_hours

    @property
    def clear_balance_usd(self) -> float | None:
        if self.clear_above_balance_usd is not None:
            return self.clear_above_balance_usd
        return self.fire_below_balance_usd


Rule = Annotated[
    CheapestHostnodeRule | SpotRebidRule | IdleStopRule | LowBalanceRule,
    Field(discriminator="kind"),
]
RULE_KINDS: dict[str, type[RuleBase]] = {
    "cheapest_hostnode": CheapestHostnodeRule,
    "spot_rebid": SpotRebidRule,
    "idle_stop": IdleStopRule,
    "low_balance": LowBalanceRule,
}
