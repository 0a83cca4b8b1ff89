"""Find the lowest spot bid a hostnode accepts, by probing `client/spot/validate/new`.

The v0 hostnode list publishes on-demand unit prices only, so the price of a spot VM
on a hostnode is found by asking. A bid covers the VM's compute (GPUs, vCPUs and RAM),
and storage is billed on top at the on-demand storage price. A bid is never above
`spot_bid_ceiling`: the on-demand compute price, and the price cap minus storage.

The search probes the ceiling first. If the hostnode accepts it, the search bisects
between 0 and the lowest accepted bid with a bounded number of probes, and returns the
lowest bid the API accepted. Each probe is one validation call, which creates nothing
and bills nothing, so the client resends it after a transport error like a read.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tdbot.evaluation.cheapest import spot_bid_ceiling
from tdbot.evaluation.pricing import PRICE_DECIMALS, Offer
from tdbot.tensordock.client import TensorDockClient
from tdbot.tensordock.errors import AuthenticationError, TensorDockError

logger = logging.getLogger("tdbot.actions.spot_bids")

VALIDATE_ENDPOINT = "client/spot/validate/new"
# Probes after the one at the ceiling. Six probes divide the interval by 64, which
# brings it under $0.005 for any ceiling up to $0.32/h.
DEFAULT_BISECTION_PROBES = 6
# The bisection stops once the rejected and accepted bids are this close, in USD/h.
DEFAULT_PRECISION_USD = 0.005
# Offers checked at the same time by `quote_spot_offers`; each check is sequential.
DEFAULT_CONCURRENCY = 4

# Called after each probe with the bid and whether the API accepted it.
ProbeCallback = Callable[[float, bool], None]


@dataclass(frozen=True)
class SpotQuote:
    """The lowest accepted spot bid on a hostnode, in USD per hour, and what it cost to find."""

    hostnode_id: str
    gpu_model: str
    bid_usd_per_hour: float
    storage_usd_per_hour: float
    # Validation calls made, the one at the ceiling included.
    probes: int

    @property
    def total_usd_per_hour(self) -> float:
        """Hourly price of the spot VM while it runs: the bid plus storage."""
        return round(self.bid_usd_per_hour + self.storage_usd_per_hour, PRICE_DECIMALS)

    def to_evidence(self) -> dict[str, float | int]:
        return {
            "bid_usd_per_hour": self.bid_usd_per_hour,
            "storage_usd_per_hour": round(self.storage_usd_per_hour, PRICE_DECIMALS),
            "total_usd_per_hour": self.total_usd_per_hour,
            "probes": self.probes,
        }


@dataclass(frozen=True)
class SpotCheck:
    """The outcome of checking one offer for spot bids.

    `quote` is set when the hostnode accepted a bid. `error` is set when an API call
    failed, so the offer is unchecked. With neither, the hostnode rejected every bid up
    to `ceiling_usd_per_hour`.
    """

    offer: Offer
    ceiling_usd_per_hour: float
    quote: SpotQuote | None = None
    error: str | None = None

    @property
    def rejected(self) -> bool:
        return self.quote is None and self.error is None


async def lowest_spot_bid(
    client: TensorDockClient,
    offer: Offer,
    *,
    ceiling_usd_per_hour: float | None,
    bisection_probes: int = DEFAULT_BISECTION_PROBES,
    precision_usd: float = DEFAULT_PRECISION_USD,
    on_probe: ProbeCallback | None = None,
) -> SpotQuote | None:
    """Return the lowest spot bid the offer's hostnode accepts now, or None if it takes none.

    `ceiling_usd_per_hour` caps the full price (bid plus storage). Without it, the
    on-demand compute price is the bid's only ceiling. The result is None when the
    hostnode rejects the bid at the ceiling, or when storage alone reaches the cap.
    Raises TensorDockError when a validation call fails, because a bisection with a
    gap cannot be trusted.
    """
    ceiling = spot_bid_ceiling(offer.price, ceiling_usd_per_hour)
    if ceiling <= 0:
        return None

    probe = _Prober(client, offer, on_probe)
    if not await probe.accepts(ceiling):
        return None

    # The accepted bid only goes down. The bisection starts from 0 as the rejected
    # bound without probing it, because the API takes positive bids only.
    rejected, accepted = 0.0, ceiling
    for _ in range(bisection_probes):
        if accepted - rejected < precision_usd:
            break
        middle = round((rejected + accepted) / 2, PRICE_DECIMALS)
        if not rejected < middle < accepted:
            break
        if await probe.accepts(middle):
            accepted = middle
        else:
            rejected = middle

    return SpotQuote(
        hostnode_id=offer.hostnode_id,
        gpu_model=offer.gpu_model,
        bid_usd_per_hour=accepted,
        storage_usd_per_hour=offer.price.storage_usd,
        probes=probe.count,
    )


class _Prober:
    """Sends one validation call per bid for one offer's size, and counts them."""

    def __init__(
        self, client: TensorDockClient, offer: Offer, on_probe: ProbeCallback | None
    ) -> None:
        self.client = client
        self.offer = offer
        self.on_probe = on_probe
        self.count = 0

    async def accepts(self, bid: float) -> bool:
        sizing = self.offer.sizing
        self.count += 1
        validation = await self.client.validate_spot_new(
            hostnode_id=self.offer.hostnode_id,
            gpu_model=sizing.gpu_model,
            gpu_count=sizing.gpu_count,
            vcpus=sizing.vcpus,
            ram_gb=sizing.ram_gb,
            storage_gb=sizing.storage_gb,
            price_usd_per_hour=bid,
        )
        logger.debug(
            "hostnode %s: spot bid %.6f USD/h %s",
            self.offer.hostnode_id,
            bid,
            "accepted" if validation.accepted else "rejected",
        )
        if self.on_probe is not None:
            self.on_probe(bid, validation.accepted)
        return validation.accepted


async def quote_spot_offers(
    client: TensorDockClient,
    offers: Sequence[Offer],
    *,
    ceiling_usd_per_hour: float | None,
    concurrency: int = DEFAULT_CONCURRENCY,
) -> list[SpotCheck]:
    """Check each offer for its lowest spot bid, `concurrency` offers at a time.

    Returns one SpotCheck per offer, in the order of `offers`. A failed API call marks
    that offer unchecked with the error and does not stop the others. Rejected
    credentials are the exception: every other call would fail the same way, so the
    search stops at once, cancels the checks in flight and raises AuthenticationError.
    """
    if concurrency < 1:
        raise ValueError(f"concurrency is {concurrency}, but at least 1 offer must be checked")
    slots = asyncio.Semaphore(concurrency)

    async def check(offer: Offer) -> SpotCheck:
        async with slots:
            return await _check_offer(client, offer, ceiling_usd_per_hour)

    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(check(offer)) for offer in offers]
    except* AuthenticationError as failures:
        # The first rejection stands for all of them; the others carry the same text.
        raise failures.exceptions[0] from None
    return [task.result() for task in tasks]


async def _check_offer(
    client: TensorDockClient, offer: Offer, ceiling_usd_per_hour: float | None
) -> SpotCheck:
    ceiling = spot_bid_ceiling(offer.price, ceiling_usd_per_hour)
    try:
        quote = await lowest_spot_bid(client, offer, ceiling_usd_per_hour=ceiling_usd_per_hour)
    except AuthenticationError:
        raise
    except TensorDockError as error:
        # INFO, not WARNING: the caller reports unchecked offers to the user itself.
        logger.info("hostnode %s: spot bids not checked: %s", offer.hostnode_id, error)
        return SpotCheck(offer, ceiling, error=str(error))
    return SpotCheck(offer, ceiling, quote=quote)


def accepted_by_total(checks: Sequence[SpotCheck]) -> list[SpotCheck]:
    """Return the checks with an accepted bid, cheapest spot total first.

    Ties keep the order of `checks`, which is the on-demand ranking.
    """
    quoted = [check for check in checks if check.quote is not None]
    return sorted(quoted, key=_spot_total)


def _spot_total(check: SpotCheck) -> float:
    assert check.quote is not None
    return check.quote.total_usd_per_hour


def spot_check_notes(
    checks: Sequence[SpotCheck],
    cap_usd_per_hour: float | None,
    check_limit: int,
    *,
    limit_hint: str = "",
) -> list[str]:
    """Describe a spot search for a reader: what was checked, rejected and left out.

    `limit_hint` is appended where the notes state that only some offers were tried, such as
    " (--spot-checks sets how many)". The last lines are the `unchecked_notes`.
    """
    if not checks:
        return ["No offer can host the spec, so no spot bid was checked."]

    cap = "" if cap_usd_per_hour is None else _usd(cap_usd_per_hour)
    unchecked = sum(1 for check in checks if check.error is not None)
    lines = []
    if unchecked < len(checks) and not any(check.quote is not None for check in checks):
        within = f" with a spot price up to {cap}" if cap else ""
        checked = " that was checked" if unchecked else ""
        lines.append(f"No hostnode{checked} accepted a spot bid{within}.")
    lines.append(_coverage_note(len(checks), unchecked, check_limit, limit_hint))

    # A ceiling of 0 means storage alone reaches the cap, so no bid was sent.
    priced_out = sum(1 for check in checks if check.rejected and check.ceiling_usd_per_hour <= 0)
    rejected = sum(1 for check in checks if check.rejected) - priced_out
    if rejected:
        limit = f" or {cap} minus storage, if lower" if cap else ""
        lines.append(
            f"{rejected} of them rejected every bid up to the on-demand compute price{limit}."
        )
    if priced_out:
        lines.append(f"{priced_out} of them cost more in storage alone than the cap.")
    lines.extend(unchecked_notes(checks))
    return lines


def unchecked_notes(checks: Sequence[SpotCheck]) -> list[str]:
    """Return one "Not checked: HOSTNODE (GPU): ERROR" line per offer whose check failed."""
    return [
        f"Not checked: {check.offer.hostnode_id} ({check.offer.gpu_model}): {check.error}"
        for check in checks
        if check.error is not None
    ]


def _coverage_note(tried: int, unchecked: int, check_limit: int, limit_hint: str) -> str:
    """Say how many offers were checked, out of all that can host the spec or the cheapest."""
    # Fewer checks than the limit means every offer that can host the spec was tried.
    every_offer = tried < check_limit
    if not unchecked:
        if every_offer:
            return f"All {tried} offers that can host the spec were checked for spot bids."
        return f"Only the {tried} cheapest on-demand offers were checked for spot bids{limit_hint}."

    if every_offer:
        scope = f"Of the {tried} offers that can host the spec"
    else:
        scope = f"Of the {tried} cheapest on-demand offers{limit_hint}"
    return (
        f"{scope}, {tried - unchecked} were checked for spot bids and {unchecked} "
        "could not be checked."
    )


def _usd(value: float) -> str:
    return f"${value:.4f}/h"
