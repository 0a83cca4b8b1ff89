"""Price history of one GPU model: the best available full price of a deployment over time.

What is computed, and what is not:

- The series is the lowest full hourly price (GPUs, vCPUs, RAM and storage) of one
  deployment size among the hostnodes that could host it, rebuilt as a step function
  from the stored change rows. Each row keeps the hostnode's unit prices, free amounts
  and restrictions, so a hostnode is sized and priced as `tdbot.evaluation.pricing`
  sizes and prices it now: vCPUs rounded up to even, raised to a restriction's minimum,
  and left out when it has too few free units.
- A stored price holds until the next change, but only while the daemon was watching:
  from a clean stop until the next start, and from WATCH_GAP (2 hours,
  tdbot.store.db) after the last snapshot when no new one comes, the series has gaps.
- The history covers every location: a rule's country or uptime filters do not apply.
- Times when no hostnode could host the size are gaps: they count in no statistic.
  Rows stored before the vCPU, RAM and storage prices were kept have no full price,
  so they are gaps too.
- The statistics of a window (1, 7, 30 days by default) are time-weighted: each value
  counts for as long as it held. A percentile p is the lowest value v such that the
  series was at or under v for at least p% of the covered time (the lower weighted
  percentile, so it is always a price that really occurred).
"""

from __future__ import annotations

import io
import json
import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timedelta
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, TextIO

from tdbot.evaluation.cheapest import ranked_offers
from tdbot.evaluation.model import MarketSnapshot, RuleState
from tdbot.evaluation.pricing import Sizing, price_total, round_up_to_even, size_deployment
from tdbot.rules.schema import CheapestHostnodeRule, HostnodeSpec, RuleBase
from tdbot.spec import gpu_matches, suggest_gpu_models
from tdbot.store.codec import decode_restrictions
from tdbot.tensordock.models import (
    CpuOffer,
    GpuOffer,
    Hostnode,
    HostnodeSpecs,
    HostnodeStatus,
    Networking,
    ResourceOffer,
)

if TYPE_CHECKING:
    from tdbot.store.db import PricePoint, Store, Watch

DEFAULT_WINDOWS_DAYS = (1, 7, 30)
SPARK_LEVELS = "▁▂▃▄▅▆▇█"
SPARK_WIDTH = 48


@dataclass(frozen=True)
class DeploymentSize:
    """The deployment whose full price the history follows."""

    gpu_count: int
    vcpus: int
    ram_gb: int
    storage_gb: int

    @classmethod
    def of(cls, spec: HostnodeSpec) -> DeploymentSize:
        return cls(spec.gpu_count, spec.vcpus, spec.ram_gb, spec.storage_gb)

    def spec(self, gpu_model: str) -> HostnodeSpec:
        """Return the spec that requests this size of `gpu_model`, with no other filter."""
        return HostnodeSpec(
            gpu=[gpu_model],
            gpu_count=self.gpu_count,
            vcpus=self.vcpus,
            ram_gb=self.ram_gb,
            storage_gb=self.storage_gb,
        )

    def describe(self) -> str:
        gpus = "1 GPU" if self.gpu_count == 1 else f"{self.gpu_count} GPUs"
        # Sizing rounds vCPUs up to even, so the description names what is priced.
        vcpus = round_up_to_even(self.vcpus)
        return f"{gpus}, {vcpus} vCPUs, {self.ram_gb} GB RAM, {self.storage_gb} GB storage"


def _spec_default(name: str) -> int:
    default: int = HostnodeSpec.model_fields[name].default
    return default


# The size a rule gets when its match sets none: 1 GPU, 8 vCPUs, 32 GB RAM, 100 GB.
DEFAULT_SIZE = DeploymentSize(
    _spec_default("gpu_count"),
    _spec_default("vcpus"),
    _spec_default("ram_gb"),
    _spec_default("storage_gb"),
)


class PriceStep(NamedTuple):
    """The best available full price from `start` until the next step; None is a gap.

    A named tuple, because a year's series has thousands of steps and they are built
    twice per report.
    """

    start: datetime
    usd_per_hour: float | None


@dataclass(frozen=True)
class WindowStats:
    """Time-weighted statistics of the series over the last `days` days."""

    days: float
    lowest: float | None
    p10: float | None
    median: float | None
    p90: float | None
    covered_hours: float


@dataclass(frozen=True)
class PriceReport:
    """The series and its window statistics for one GPU model and size, up to `until`."""

    gpu_model: str
    size: DeploymentSize
    since: datetime
    until: datetime
    steps: list[PriceStep]
    windows: list[WindowStats]
    # Rows read, and those of them stored before unit prices were kept.
    rows: int = 0
    rows_without_unit_prices: int = 0
    # Whether the daemon took any market snapshot in the covered time.
    watched: bool = True


def point_price(point: PricePoint, size: DeploymentSize) -> float | None:
    """Return the full hourly price of `size` on the point's hostnode, or None.

    None when the model was not available there, when the hostnode could not host the
    size, or when the row has no vCPU, RAM and storage prices.
    """
    vcpu = point.usd_per_vcpu_hour
    ram_gb = point.usd_per_gb_ram_hour
    storage_gb = point.usd_per_gb_storage_hour
    if not point.available or vcpu is None or ram_gb is None or storage_gb is None:
        return None
    sizing = _sizing(point.gpu_model, point.restrictions, size)
    if sizing is None or not _has_room(point, sizing):
        return None
    return price_total(
        sizing, gpu=point.usd_per_gpu_hour, vcpu=vcpu, ram_gb=ram_gb, storage_gb=storage_gb
    )


# Enough of every resource for any deployment, so that sizing checks only restrictions.
_UNLIMITED = 1 << 30


# Sizing builds a Hostnode and a HostnodeSpec, while a model's history has thousands of
# rows but only a few distinct restrictions, so sizings are cached.
@lru_cache(maxsize=1024)
def _sizing(gpu_model: str, restrictions: str | None, size: DeploymentSize) -> Sizing | None:
    """Size `size` as tdbot.evaluation.pricing does, under the restrictions only."""
    hostnode = Hostnode(
        id="history",
        networking=Networking(ports=[1]),
        specs=HostnodeSpecs(
            cpu=CpuOffer(amount=_UNLIMITED),
            ram=ResourceOffer(amount=_UNLIMITED),
            storage=ResourceOffer(amount=_UNLIMITED),
            gpu={gpu_model: GpuOffer(amount=_UNLIMITED)},
            restrictions=decode_restrictions(restrictions),
        ),
        status=HostnodeStatus(online=True, listed=True, reserved=False),
    )
    return size_deployment(hostnode, gpu_model, size.spec(gpu_model))


def _has_room(point: PricePoint, sizing: Sizing) -> bool:
    """Return whether the point's free units and ports fit the sizing; unknown amounts do not."""
    gpus, vcpus, ram_gb = point.gpus_free, point.vcpus_free, point.ram_gb_free
    storage_gb, ports = point.storage_gb_free, point.ports_free
    if gpus is None or vcpus is None or ram_gb is None or storage_gb is None or ports is None:
        return False
    # One external port, for SSH, as tdbot.evaluation.pricing requests by default.
    return (
        gpus >= sizing.gpu_count
        and vcpus >= sizing.vcpus
        and ram_gb >= sizing.ram_gb
        and storage_gb >= sizing.storage_gb
        and ports >= 1
    )


def lowest_price_series(
    points: Iterable[PricePoint], size: DeploymentSize, *, since: datetime, until: datetime
) -> list[PriceStep]:
    """Rebuild the best available full price of `size` over [since, until) from change rows.

    `points` must be oldest first and may start before `since`: the rows before it
    set each hostnode's offer at `since`.
    """
    current: dict[str, float | None] = {}
    lowest: float | None = None
    steps: list[PriceStep] = []
    for taken_at, group in _group_by_time(points):
        for point in group:
            price = point_price(point, size)
            before = current.get(point.hostnode_id)
            current[point.hostnode_id] = price
            # The minimum is searched again only when the hostnode that held it got
            # dearer or went away, a small share of the changes.
            if price is not None and (lowest is None or price < lowest):
                lowest = price
            elif before is not None and before == lowest and price != before:
                lowest = _lowest(current.values())
        if taken_at >= until:
            break
        _append_step(steps, PriceStep(max(taken_at, since), lowest))
    return steps


def mask_unwatched(
    steps: Sequence[PriceStep], watches: Sequence[Watch], *, since: datetime, until: datetime
) -> list[PriceStep]:
    """Turn the parts of the series outside every watch into gaps.

    `watches` must be oldest first and must not overlap, as Store.price_watches
    returns them.
    """
    times = {since, *(step.start for step in steps)}
    for watch in watches:
        times.update((watch.start, watch.end))
    masked: list[PriceStep] = []
    step_index = watch_index = 0
    # Both lists are in time order, so one pass with an index into each finds, for each
    # moment, the step in force and the watch that may cover it.
    for moment in sorted(time for time in times if since <= time < until):
        while step_index + 1 < len(steps) and steps[step_index + 1].start <= moment:
            step_index += 1
        while watch_index < len(watches) and watches[watch_index].end <= moment:
            watch_index += 1
        watched = watch_index < len(watches) and watches[watch_index].start <= moment
        step = steps[step_index] if steps and steps[step_index].start <= moment else None
        value = step.usd_per_hour if watched and step is not None else None
        _append_step(masked, PriceStep(moment, value))
    return masked


def _group_by_time(points: Iterable[PricePoint]) -> list[tuple[datetime, list[PricePoint]]]:
    groups: list[tuple[datetime, list[PricePoint]]] = []
    for point in points:
        if groups and groups[-1][0] == point.taken_at:
            groups[-1][1].append(point)
        else:
            groups.append((point.taken_at, [point]))
    return groups


def _lowest(prices: Iterable[float | None]) -> float | None:
    available = [price for price in prices if price is not None]
    return min(available) if available else None


def _append_step(steps: list[PriceStep], step: PriceStep) -> None:
    # Rows before `since` all start at `since`, so the last of them wins; a step with
    # the same price as the one before adds nothing.
    if steps and steps[-1].start == step.start:
        steps[-1] = step
        if len(steps) > 1 and steps[-2].usd_per_hour == step.usd_per_hour:
            steps.pop()
        return
    if steps and steps[-1].usd_per_hour == step.usd_per_hour:
        return
    steps.append(step)


def weighted_values(
    steps: Sequence[PriceStep], *, since: datetime, until: datetime
) -> list[tuple[float, float]]:
    """Return (price, seconds held) of each step clipped to [since, until), gaps left out."""
    values: list[tuple[float, float]] = []
    for index, step in enumerate(steps):
        end = steps[index + 1].start if index + 1 < len(steps) else until
        start = max(step.start, since)
        end = min(end, until)
        if step.usd_per_hour is None or end <= start:
            continue
        values.append((step.usd_per_hour, (end - start).total_seconds()))
    return values


def weighted_percentile(values: Sequence[tuple[float, float]], percent: float) -> float | None:
    """Return the lowest price at or under which the series spent `percent`% of its time."""
    total = sum(seconds for _, seconds in values)
    if total <= 0:
        return None
    needed = total * percent / 100
    cumulative_seconds = 0.0
    for price, seconds in sorted(values):
        cumulative_seconds += seconds
        # A small tolerance, so 50% of 2 equal halves lands on the lower half.
        if cumulative_seconds >= needed - 1e-9 * total:
            return price
    return max(price for price, _ in values)


def window_stats(steps: Sequence[PriceStep], *, until: datetime, days: float) -> WindowStats:
    """Compute lowest, p10, median and p90 of the last `days` days before `until`."""
    values = weighted_values(steps, since=until - timedelta(days=days), until=until)
    return WindowStats(
        days=days,
        lowest=min((price for price, _ in values), default=None),
        p10=weighted_percentile(values, 10),
        median=weighted_percentile(values, 50),
        p90=weighted_percentile(values, 90),
        covered_hours=round(sum(seconds for _, seconds in values) / 3600, 2),
    )


async def load_report(
    store: Store,
    gpu_model: str,
    size: DeploymentSize = DEFAULT_SIZE,
    *,
    days: float,
    until: datetime,
    windows: Sequence[float] = DEFAULT_WINDOWS_DAYS,
) -> PriceReport:
    """Read the history of `gpu_model` and build the series and statistics of `size`.

    The series covers `days` days. Each window in `windows` up to `days` gets its
    statistics, and `days` itself is added when it is not one of them.
    """
    since = until - timedelta(days=days)
    points = await store.price_series_points(gpu_model, since=since, until=until)
    steps, watched = await _watched_series(store, points, size, since=since, until=until)
    spans = sorted({*(window for window in windows if window <= days), days})
    stats = [window_stats(steps, until=until, days=span) for span in spans]
    unpriced = sum(1 for point in points if point.usd_per_vcpu_hour is None)
    return PriceReport(gpu_model, size, since, until, steps, stats, len(points), unpriced, watched)


async def _watched_series(
    store: Store,
    points: Sequence[PricePoint],
    size: DeploymentSize,
    *,
    since: datetime,
    until: datetime,
) -> tuple[list[PriceStep], bool]:
    """Return the series with unwatched time as gaps, and whether any time was watched."""
    steps = lowest_price_series(points, size, since=since, until=until)
    watches = await store.price_watches(since=since, until=until)
    watched = any(watch.start < until and watch.end > since for watch in watches)
    return mask_unwatched(steps, watches, since=since, until=until), watched


async def price_percentile(
    store: Store,
    gpu_model: str,
    size: DeploymentSize,
    *,
    percent: float,
    window: timedelta,
    until: datetime,
) -> float | None:
    """Return the time-weighted percentile of the best full price of `size` over `window`."""
    since = until - window
    points = await store.price_series_points(gpu_model, since=since, until=until)
    steps, _ = await _watched_series(store, points, size, since=since, until=until)
    return weighted_percentile(weighted_values(steps, since=since, until=until), percent)


async def show_prices(
    database: str,
    gpu: str,
    size: DeploymentSize = DEFAULT_SIZE,
    *,
    days: float,
    as_json: bool,
    out: TextIO,
    now: datetime,
) -> int:
    """Print the price report of a GPU model and size from the database; needs no API key.

    `gpu` is a model id or a name such as "4090" that matches one stored model.
    """
    from tdbot.store.db import Store

    store = await Store.open(database)
    try:
        gpu_model = resolve_gpu_model(gpu, await store.price_history_models())
        report = await load_report(store, gpu_model, size, days=days, until=now)
    except ValueError as error:
        sys.stderr.write(f"error: {error}\n")
        return 1
    finally:
        await store.close()
    if not has_prices(report):
        sys.stderr.write(f"error: {no_history_message(report, days)}\n")
        return 1
    out.write((report_json(report) if as_json else format_text(report)) + "\n")
    return 0


def missing_database(database: str) -> str | None:
    """Return why a SQLite database cannot hold history because it does not exist, or None.

    Opening a missing file would create an empty database, which a report has no use for.
    """
    from tdbot.store.db import database_url

    url = database_url(database)
    if url.get_backend_name() != "sqlite" or Path(url.database or "").exists():
        return None
    return (
        f"no database at {url.database}; the daemon creates it when it first runs, so run "
        "it first or set daemon.database in the configuration to the daemon's database"
    )


def resolve_gpu_model(gpu: str, stored_models: Sequence[str]) -> str:
    """Return the stored model id that `gpu` names, or raise ValueError saying what to give.

    A name such as "4090" must match exactly one stored model id.
    """
    if gpu in stored_models:
        return gpu
    if not stored_models:
        raise ValueError(
            "no price history is stored yet; the daemon stores prices while "
            "cheapest_hostnode rules run"
        )
    matches = [model for model in stored_models if gpu_matches(gpu, model)]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise ValueError(f"{gpu!r} matches {', '.join(matches)}; give one of these model ids")
    close = suggest_gpu_models(gpu, stored_models)
    hint = f"did you mean {' or '.join(close)}?" if close else f"stored: {', '.join(stored_models)}"
    raise ValueError(f"no price history for a GPU model matching {gpu!r}; {hint}")


def has_prices(report: PriceReport) -> bool:
    """Return whether any moment of the report had a full price."""
    return any(step.usd_per_hour is not None for step in report.steps)


def no_history_message(report: PriceReport, days: float) -> str:
    """Say why a report has no prices and what to do about it."""
    if not report.watched:
        return (
            f"the daemon took no market snapshot in the last {days:g} days, so no price "
            "is known for that time; choose more days, or keep the daemon running"
        )
    if report.rows and report.rows == report.rows_without_unit_prices:
        return (
            f"the stored rows of {report.gpu_model} hold GPU prices only, from before vCPU, "
            "RAM and storage prices were stored, so no full price is known; full prices "
            "appear as the daemon stores new market snapshots"
        )
    return (
        f"no full price of {report.size.describe()} on {report.gpu_model} in the last "
        f"{days:g} days: no hostnode with stored prices could host that size; try a "
        "smaller size or more days"
    )


async def with_price_percentiles(
    rule: RuleBase, snapshot: MarketSnapshot, state: RuleState, store: Store, now: datetime
) -> RuleState:
    """Add the deal percentile of the best offer's GPU model, at the rule's size, to its state.

    Only cheapest-hostnode rules with `alert.deal_below_percentile` need it; other
    rules get `state` back unchanged. The evaluation stays pure because the history
    is read here, before it.
    """
    if not isinstance(rule, CheapestHostnodeRule) or rule.alert.deal_below_percentile is None:
        return state
    if snapshot.hostnodes is None:
        return state
    offers = ranked_offers(rule, snapshot)
    if not offers:
        return state

    # NOTE: no minimum of stored history is required, so a percentile taken over the
    # first hours of history describes only those hours.
    gpu_model = offers[0].gpu_model
    value = await price_percentile(
        store,
        gpu_model,
        DeploymentSize.of(rule.match),
        percent=rule.alert.deal_below_percentile,
        window=rule.alert.deal_window,
        until=now,
    )
    if value is None:
        return state
    return replace(state, price_percentiles={gpu_model: value})


# --- rendering -----------------------------------------------------------------------


def sample_series(
    steps: Sequence[PriceStep], *, since: datetime, until: datetime, width: int = SPARK_WIDTH
) -> list[float | None]:
    """Split [since, until) into `width` equal slots and return each slot's lowest price.

    The lowest rather than a sample at one instant, so a dip shorter than a slot
    still shows. A slot without any available price is None.
    """
    slot = (until - since) / width
    samples: list[float | None] = []
    for column in range(width):
        start = since + slot * column
        values = weighted_values(steps, since=start, until=start + slot)
        samples.append(min((price for price, _ in values), default=None))
    return samples


def sparkline(values: Sequence[float | None]) -> str:
    """Draw values as block characters from ▁ (lowest) to █ (highest); gaps are spaces."""
    present = [value for value in values if value is not None]
    if not present:
        return " " * len(values)
    low, high = min(present), max(present)
    top = len(SPARK_LEVELS) - 1
    characters = []
    for value in values:
        if value is None:
            characters.append(" ")
        elif high == low:
            characters.append(SPARK_LEVELS[0])
        else:
            characters.append(SPARK_LEVELS[round((value - low) / (high - low) * top)])
    return "".join(characters)


def format_text(report: PriceReport) -> str:
    """Render the statistics table and a sparkline as plain text."""
    lines = [
        f"{report.gpu_model}: best available full price of {report.size.describe()}, USD per hour",
        f"{'window':>8} {'lowest':>8} {'p10':>8} {'median':>8} {'p90':>8} {'hours':>8}",
    ]
    for stats in report.windows:
        cells = [stats.lowest, stats.p10, stats.median, stats.p90]
        lines.append(
            f"{_days_label(stats.days):>8} "
            + " ".join(f"{_usd(cell):>8}" for cell in cells)
            + f" {stats.covered_hours:>8.1f}"
        )
    samples = sample_series(report.steps, since=report.since, until=report.until)
    lines.append(
        f"{_days_label((report.until - report.since) / timedelta(days=1))}: {sparkline(samples)}"
    )
    return "\n".join(lines)


def report_json(report: PriceReport) -> str:
    """Render the report as JSON, with times in ISO 8601 UTC."""
    data: dict[str, Any] = {
        "gpu_model": report.gpu_model,
        "size": asdict(report.size),
        "unit": "usd_per_hour",
        "since": report.since.isoformat(),
        "until": report.until.isoformat(),
        "windows": [asdict(stats) for stats in report.windows],
        "steps": [
            {"start": step.start.isoformat(), "usd_per_hour": step.usd_per_hour}
            for step in report.steps
        ],
    }
    return json.dumps(data, indent=2)


def render_png(report: PriceReport) -> bytes:
    """Draw the series as a PNG chart; raises ImportError without the `charts` extra."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 3.5), dpi=100)
    axes = figure.subplots()
    day = timedelta(days=1)
    times = [(step.start - report.until) / day for step in report.steps] + [0.0]
    # NaN leaves a gap in the line where no hostnode offered the model.
    prices = [math.nan if step.usd_per_hour is None else step.usd_per_hour for step in report.steps]
    if prices:
        # A step function keeps each value until the next change, hence "post".
        axes.step(times, [*prices, prices[-1]], where="post")
    axes.set_title(f"{report.gpu_model}: best full price of {report.size.describe()}", fontsize=10)
    axes.set_ylabel("USD per hour")
    axes.set_xlabel(f"days before {report.until:%Y-%m-%d %H:%M} UTC")
    axes.set_xlim((report.since - report.until) / day, 0.0)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _days_label(days: float) -> str:
    return f"{days:g}d"


def _usd(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
