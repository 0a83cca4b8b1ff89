"""Market and account views for the command line: hostnodes, VMs and balance."""

from __future__ import annotations

import difflib
import json
import sys
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, TextIO

from pydantic import ValidationError

from tdbot.config import ConfigError, Secrets, Settings
from tdbot.evaluation.burn import burn_rate, vm_hourly_cost
from tdbot.evaluation.pricing import Offer, count_rejections, rank_hostnodes
from tdbot.rules.schema import HostnodeSpec
from tdbot.spec import SpecError, check_gpu_names, parse_spec_fields, parse_terms
from tdbot.tensordock.client import TensorDockClient
from tdbot.tensordock.errors import TensorDockError
from tdbot.tensordock.models import Hostnode

if TYPE_CHECKING:
    from tdbot.actions.spot_bids import SpotCheck

# Layout of the GPU model list in the error for a model no hostnode offers.
GPU_MODELS_PER_LINE = 4
# Lowest difflib similarity ratio at which a model id is suggested for a misspelt one.
GPU_SUGGESTION_CUTOFF = 0.5
# Offers that `tdbot hostnodes` with the spot term checks for spot bids by default.
DEFAULT_SPOT_CHECKS = 10


def _client(settings: Settings, secrets: Secrets | None) -> TensorDockClient:
    key, token = ("", "") if secrets is None else secrets.require_api()
    return TensorDockClient(
        key,
        token,
        base_url=settings.tensordock.base_url,
        timeout_seconds=settings.tensordock.timeout_seconds,
        read_retries=settings.tensordock.read_retries,
    )


def _table(title: str, columns: list[str], rows: list[list[str]], out: TextIO) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*row)
    Console(file=out, width=160).print(table)


def _error(error: Exception) -> int:
    # Errors go to stderr, so a --json caller never reads them as JSON.
    sys.stderr.write(f"error: {error}\n")
    return 1


# Columns `tdbot hostnodes --sort` accepts, and the key each sorts by; ties keep price order.
SORT_KEYS: dict[str, Callable[[Offer], Any]] = {
    "price": lambda offer: offer.price.total_usd,
    "gpu": lambda offer: offer.sizing.gpu_model,
    "hostnode": lambda offer: offer.hostnode_id,
    "location": lambda offer: offer.location,
    "ports": lambda offer: -len(offer.free_ports),
    "uptime": lambda offer: -(offer.uptime_percent if offer.uptime_percent is not None else -1.0),
}


def hostnode_spec(text: str, overrides: dict[str, Any]) -> HostnodeSpec:
    """Build a spec from a spec string and option values, which replace the string's fields.

    GPU names are not checked here, because the live hostnode list checks them later.
    """
    fields = parse_spec_fields(text, gpu_models=()) if text.strip() else {}
    fields.update(overrides)
    if not fields.get("gpu"):
        raise ValueError(
            "give a GPU in the spec or with --gpu, for example "
            "'tdbot hostnodes \"gpu=4090 price<0.6\"' or --gpu geforcertx4090-pcie-24gb"
        )
    return HostnodeSpec.model_validate(fields)


async def show_hostnodes(
    settings: Settings,
    spec_text: str,
    overrides: dict[str, Any],
    limit: int,
    as_json: bool,
    out: TextIO,
    sort: str = "price",
    *,
    secrets: Secrets | None = None,
    spot_checks: int = DEFAULT_SPOT_CHECKS,
) -> int:
    """Print the cheapest hostnodes for a spec.

    The hostnode list needs no credentials. With the `spot` term, the `spot_checks`
    cheapest offers by on-demand price are checked for spot bids, which needs them.
    """
    try:
        spec = hostnode_spec(spec_text, overrides)
        if spec.spot:
            secrets = _spot_secrets(secrets)
        async with _client(settings, secrets if spec.spot else None) as client:
            hostnodes = await client.list_hostnodes()
            if "gpu" in overrides:
                # --gpu takes exact model ids, so a near miss gets the list of ids.
                check_gpu_models_offered(hostnodes.values(), spec.gpu)
            else:
                offered = {model for node in hostnodes.values() for model in node.specs.gpu}
                check_gpu_names(parse_terms(spec_text), offered)
            if spec.spot:
                # The price cap applies to the spot price (bid plus storage), so the
                # on-demand ranking is taken without it.
                uncapped = spec.model_copy(update={"max_usd_per_hour": None})
                candidates = rank_hostnodes(hostnodes, uncapped)[:spot_checks]
                if not candidates:
                    return _print_no_spot_offers(hostnodes, uncapped, as_json, out)
                checks = await _check_spot_offers(client, candidates, spec)
                return _print_spot_offers(checks, spec, spot_checks, limit, as_json, out, sort)
        offers = rank_hostnodes(hostnodes, spec)
        offers = sorted(offers, key=SORT_KEYS[sort])[:limit]
    except SpecError as error:
        return _error(ValueError(f"invalid spec, {error}\n{error.pointer(spec_text)}"))
    except (ValueError, ValidationError, TensorDockError, ConfigError) as error:
        return _error(error)

    if not offers:
        # An empty table gives no reason, and a misspelt country looks the same.
        for line in explain_no_offers(hostnodes, spec):
            sys.stderr.write(line + "\n")
    if as_json:
        out.write(json.dumps([_offer_json(offer) for offer in offers], indent=2) + "\n")
        return 0
    rows = [
        [
            offer.hostnode_id,
            offer.sizing.gpu_model,
            f"{offer.price.total_usd:.4f}",
            f"{offer.price.gpu_usd:.4f}",
            f"{offer.price.cpu_usd:.4f}",
            f"{offer.price.ram_usd:.4f}",
            f"{offer.price.storage_usd:.4f}",
            str(len(offer.free_ports)),
            offer.location,
            "?" if offer.uptime_percent is None else f"{offer.uptime_percent:.2f}%",
        ]
        for offer in offers
    ]
    columns = ["hostnode", "GPU", "$/h", "GPU $", "CPU $", "RAM $", "disk $", "ports"]
    _table(f"{len(offers)} cheapest hostnodes", [*columns, "location", "uptime"], rows, out)
    return 0


def explain_no_offers(hostnodes: dict[str, Hostnode], spec: HostnodeSpec) -> list[str]:
    """Explain why no hostnode can host a spec, and name countries or cities none is in."""
    reasons = count_rejections(hostnodes, spec)
    listed = ", ".join(f"{reason} {count}" for reason, count in reasons.items())
    lines = [f"No hostnode can host this spec; (hostnode, GPU model) pairs by reason: {listed}."]
    places = {
        "country": ({node.location.country for node in hostnodes.values()}, spec.countries),
        "city": ({node.location.city for node in hostnodes.values()}, spec.cities),
    }
    for kind, (known, wanted) in places.items():
        names = sorted(name for name in known if name)
        folded = {name.casefold() for name in names}
        for name in wanted:
            if name.strip().casefold() in folded:
                continue
            close = difflib.get_close_matches(name, names, n=3, cutoff=GPU_SUGGESTION_CUTOFF)
            hint = f"did you mean {' or '.join(close)}?" if close else "check the spelling"
            lines.append(f"No hostnode lists the {kind} {name!r}; {hint}")
    return lines


def _spot_secrets(secrets: Secrets | None) -> Secrets:
    if secrets is None or not secrets.api_key or not secrets.api_token:
        raise ConfigError(
            "the spot term needs TensorDock credentials, because spot bids are checked "
            "with client/spot/validate/new: set TDBOT_API_KEY and TDBOT_API_TOKEN "
            "(or TDBOT_API_KEY_FILE and TDBOT_API_TOKEN_FILE) in the environment"
        )
    return secrets


async def _check_spot_offers(
    client: TensorDockClient, candidates: list[Offer], spec: HostnodeSpec
) -> list[SpotCheck]:
    """Check each candidate offer for its lowest spot bid with bid plus storage under the cap.

    Raises AuthenticationError at the first rejected credentials, so a bad key gives
    one error and not one per hostnode.
    """
    # Imported here, because the tdbot.actions package loads the database layer,
    # which the other views do not need.
    from tdbot.actions.spot_bids import quote_spot_offers

    sys.stderr.write(f"checking spot bids on {len(candidates)} hostnodes…\n")
    return await quote_spot_offers(client, candidates, ceiling_usd_per_hour=spec.max_usd_per_hour)


def _print_no_spot_offers(
    hostnodes: dict[str, Hostnode], spec: HostnodeSpec, as_json: bool, out: TextIO
) -> int:
    """Say why no hostnode can host the spec, so no spot bid was checked."""
    for line in explain_no_offers(hostnodes, spec):
        sys.stderr.write(line + "\n")
    if as_json:
        out.write("[]\n")
    return 0


def _print_spot_offers(
    checks: list[SpotCheck],
    spec: HostnodeSpec,
    check_limit: int,
    limit: int,
    as_json: bool,
    out: TextIO,
    sort: str,
) -> int:
    """Print the offers whose hostnode accepted a spot bid, cheapest spot price first.

    Returns 1 when an offer could not be checked, because a cheaper spot price may be
    missing from the list, else 0. The JSON output lists accepted offers only, and the
    unchecked ones are named on stderr.
    """
    from tdbot.actions.spot_bids import accepted_by_total, spot_check_notes, unchecked_notes

    accepted = accepted_by_total(checks)
    if sort != "price":
        accepted = sorted(accepted, key=lambda check: SORT_KEYS[sort](check.offer))
    accepted = accepted[:limit]
    code = 1 if any(check.error is not None for check in checks) else 0
    if as_json:
        out.write(json.dumps([_spot_json(check) for check in accepted], indent=2) + "\n")
        for line in unchecked_notes(checks):
            sys.stderr.write(line + "\n")
        return code

    if accepted:
        rows = [_spot_row(check) for check in accepted]
        columns = ["hostnode", "GPU", "spot $/h", "bid $/h", "disk $", "on-demand $/h"]
        title = f"{len(accepted)} cheapest spot offers"
        _table(title, [*columns, "ports", "location", "uptime"], rows, out)
    notes = spot_check_notes(
        checks, spec.max_usd_per_hour, check_limit, limit_hint=" (--spot-checks sets how many)"
    )
    for line in notes:
        out.write(line + "\n")
    return code


def _spot_row(check: SpotCheck) -> list[str]:
    offer, quote = check.offer, check.quote
    assert quote is not None
    return [
        offer.hostnode_id,
        offer.sizing.gpu_model,
        f"{quote.total_usd_per_hour:.4f}",
        f"{quote.bid_usd_per_hour:.4f}",
        f"{quote.storage_usd_per_hour:.4f}",
        f"{offer.price.total_usd:.4f}",
        str(len(offer.free_ports)),
        offer.location,
        "?" if offer.uptime_percent is None else f"{offer.uptime_percent:.2f}%",
    ]


def _spot_json(check: SpotCheck) -> dict[str, Any]:
    """Describe an accepted offer with its spot quote."""
    assert check.quote is not None
    return _offer_json(check.offer) | {"spot": check.quote.to_evidence()}


def check_gpu_models_offered(hostnodes: Iterable[Hostnode], requested: list[str]) -> None:
    """Raise ValueError listing the market's GPU model ids when no hostnode has any of `requested`.

    A requested model that is offered but busy everywhere passes; only ids the market
    does not know at all, usually misspelt ones, are rejected.
    """
    offered = sorted({model for hostnode in hostnodes for model in hostnode.specs.gpu})
    if set(requested) & set(offered):
        return

    names = ", ".join(repr(model) for model in requested)
    subject = f"GPU model {names}" if len(requested) == 1 else f"any of the GPU models {names}"
    if not offered:
        raise ValueError(f"no hostnode offers {subject}; the market lists no GPUs at all")
    lines = [f"no hostnode offers {subject}."]
    suggestions = _closest_gpu_models(requested, offered)
    if suggestions:
        lines.append(f"Did you mean {' or '.join(suggestions)}?")
    lines.append("GPU model ids on the market:")
    for start in range(0, len(offered), GPU_MODELS_PER_LINE):
        lines.append("  " + ", ".join(offered[start : start + GPU_MODELS_PER_LINE]))
    raise ValueError("\n".join(lines))


def _closest_gpu_models(requested: list[str], offered: list[str]) -> list[str]:
    # A shortened id such as "rtx4090" is matched by substring first, because difflib
    # rates it closer to "rtxa4000-pcie-16gb" than to "geforcertx4090-pcie-24gb".
    suggestions: list[str] = []
    for name in requested:
        folded = name.strip().lower()
        containing = [model for model in offered if folded and folded in model]
        similar = difflib.get_close_matches(folded, offered, n=1, cutoff=GPU_SUGGESTION_CUTOFF)
        for model in containing[:3] or similar:
            if model not in suggestions:
                suggestions.append(model)
    return suggestions


def _offer_json(offer: Offer) -> dict[str, Any]:
    return {
        "hostnode_id": offer.hostnode_id,
        "gpu_model": offer.sizing.gpu_model,
        "gpu_count": offer.sizing.gpu_count,
        "vcpus": offer.sizing.vcpus,
        "ram_gb": offer.sizing.ram_gb,
        "storage_gb": offer.sizing.storage_gb,
        "price": offer.price.to_evidence(),
        "free_ports": len(offer.free_ports),
        "location": offer.location,
        "uptime_percent": offer.uptime_percent,
    }


async def show_vms(settings: Settings, secrets: Secrets, as_json: bool, out: TextIO) -> int:
    """Print the account's VMs with their status, spot bid and hourly cost."""
    try:
        async with _client(settings, secrets) as client:
            vms = await client.list_vms()
    except (ConfigError, TensorDockError) as error:
        return _error(error)

    records = []
    for vm in sorted(vms.values(), key=lambda vm: vm.name):
        cost, estimated = vm_hourly_cost(vm, None)
        records.append(
            {
                "id": vm.id,
                "name": vm.name,
                "status": vm.status.value,
                "type": "spot" if vm.is_spot else "on-demand",
                "gpu": f"{vm.specs.gpu.amount}x {vm.specs.gpu.type or '?'}",
                "spot_bid_usd_per_hour": vm.spot_bid,
                "hourly_cost_usd": cost,
                "hourly_cost_estimated": estimated,
            }
        )
    if as_json:
        out.write(json.dumps(records, indent=2) + "\n")
        return 0
    rows = [_vm_row(record) for record in records]
    columns = ["name", "id", "status", "type", "GPU", "spot bid $/h", "cost $/h"]
    _table(f"{len(records)} VMs", columns, rows, out)
    return 0


def _vm_row(record: dict[str, Any]) -> list[str]:
    bid = record["spot_bid_usd_per_hour"]
    cost = f"{record['hourly_cost_usd']:.4f}"
    if record["hourly_cost_estimated"]:
        cost += " (est.)"
    return [
        str(record["name"]),
        str(record["id"]),
        str(record["status"]),
        str(record["type"]),
        str(record["gpu"]),
        "-" if bid is None else f"{bid:.4f}",
        cost,
    ]


async def show_balance(settings: Settings, secrets: Secrets, as_json: bool, out: TextIO) -> int:
    """Print the balance, the burn rate reported by the API and by the VM list, and the runway."""
    try:
        async with _client(settings, secrets) as client:
            balance = await client.get_balance()
            vms = await client.list_vms()
    except (ConfigError, TensorDockError) as error:
        return _error(error)

    vm_burn, estimated = burn_rate(vms, None)
    runway = balance.runway_hours
    runs_out = None if runway is None else datetime.now(UTC) + timedelta(hours=runway)
    record = {
        "balance_usd": balance.balance,
        "hourly_cost_usd": balance.hourly_cost,
        "vm_hourly_cost_usd": vm_burn,
        "vm_hourly_cost_estimated": estimated,
        "runway_hours": None if runway is None else round(runway, 1),
        "runs_out_at": None if runs_out is None else runs_out.isoformat(timespec="minutes"),
    }
    if as_json:
        out.write(json.dumps(record, indent=2) + "\n")
        return 0
    out.write(f"balance:    {balance.balance:.2f} USD\n")
    out.write(f"burn rate:  {balance.hourly_cost:.4f} USD/h (API)")
    out.write(f", {vm_burn:.4f} USD/h from the VM list{' (estimated)' if estimated else ''}\n")
    if runway is None or runs_out is None:
        out.write("runway:     unlimited (nothing is billed)\n")
    else:
        out.write(f"runway:     {runway:.1f} h, until {runs_out:%Y-%m-%d %H:%M} UTC\n")
    return 0
