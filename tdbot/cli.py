"""The `tdbot` command line.

Only click is imported at start, so `tdbot --help` stays instant; each command imports
what it needs (the Telegram stack, the simulator, the database) when it runs.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from tdbot.config import Secrets, Settings

# The maximum days of history `tdbot prices` shows: ten years, beyond any retention.
MAX_HISTORY_DAYS = 3650.0

CONFIG_OPTION = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="TDBOT_CONFIG",
    help="TOML configuration file (default: none, built-in defaults). Env: TDBOT_CONFIG.",
)


def _finite(_context: click.Context, parameter: click.Parameter, value: float) -> float:
    # FloatRange lets "nan" through, because every comparison with NaN is false.
    if value != value:
        raise click.BadParameter(f"{value} is not a number of days", param=parameter)
    return value


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="tdbot")
def main() -> None:
    """tdbot guards a TensorDock GPU account: rules on a schedule, alerts in Telegram.

    Secrets come from the environment: TDBOT_API_KEY, TDBOT_API_TOKEN,
    TDBOT_TELEGRAM_BOT_TOKEN, TDBOT_HEARTBEAT_TOKEN (or the same names with _FILE).
    """


def _load(config_path: Path | None) -> tuple[Settings, Secrets]:
    from tdbot.config import ConfigError, load_secrets, load_settings

    try:
        return load_settings(config_path), load_secrets()
    except ConfigError as error:
        raise click.ClickException(str(error)) from None


def _fail_on_config_error(error: Exception) -> None:
    raise click.ClickException(str(error)) from None


@main.command()
@CONFIG_OPTION
@click.option("--dry-run", is_flag=True, help="Decide and report, but send no change to the API.")
def run(config_path: Path | None, dry_run: bool) -> None:
    """Run the daemon until SIGTERM or SIGINT."""
    import asyncio

    from tdbot.config import ConfigError
    from tdbot.daemon.runner import run_daemon

    settings, secrets = _load(config_path)
    if dry_run:
        safety = settings.safety.model_copy(update={"dry_run": True})
        settings = settings.model_copy(update={"safety": safety})
    try:
        code = asyncio.run(run_daemon(settings, secrets))
    except ConfigError as error:
        _fail_on_config_error(error)
    sys.exit(code)


@main.command()
@CONFIG_OPTION
def check(config_path: Path | None) -> None:
    """Run one evaluation pass, print each rule's decisions, and change nothing."""
    import asyncio

    from tdbot.config import ConfigError
    from tdbot.daemon.runner import check_once

    settings, secrets = _load(config_path)
    try:
        code = asyncio.run(check_once(settings, secrets, sys.stdout))
    except ConfigError as error:
        _fail_on_config_error(error)
    sys.exit(code)


@main.group()
def rules() -> None:
    """Work with rule files."""


@rules.command("validate")
@click.argument(
    "path", required=False, type=click.Path(exists=True, path_type=Path), default=Path("rules")
)
def rules_validate(path: Path) -> None:
    """Validate every rule file in PATH (default: ./rules) and print each error."""
    from tdbot.rules.loader import validate_command

    sys.exit(validate_command(path, sys.stdout))


@main.command()
@CONFIG_OPTION
@click.argument("spec", required=False, default="")
@click.option("--gpu", "gpus", multiple=True, help="GPU model id, for example h100-sxm5-80gb.")
@click.option("--gpu-count", type=click.IntRange(1, 8), help="GPUs per VM  [default: 1]")
@click.option("--vcpus", type=click.IntRange(2), help="vCPUs per VM  [default: 8]")
@click.option("--ram-gb", type=click.IntRange(1), help="RAM in GB  [default: 32]")
@click.option("--storage-gb", type=click.IntRange(20), help="storage in GB  [default: 100]")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1))
@click.option(
    "--sort",
    type=click.Choice(["price", "gpu", "hostnode", "location", "ports", "uptime"]),
    default="price",
    show_default=True,
    help="Column to sort by; uptime and ports sort highest first.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.option(
    "--spot-checks",
    default=10,
    show_default=True,
    type=click.IntRange(1, 100),
    help=(
        "With the spot term: how many of the cheapest offers by on-demand price are "
        "checked for their lowest spot bid, with up to 7 API calls each."
    ),
)
def hostnodes(
    config_path: Path | None,
    spec: str,
    gpus: tuple[str, ...],
    gpu_count: int | None,
    vcpus: int | None,
    ram_gb: int | None,
    storage_gb: int | None,
    limit: int,
    sort: str,
    as_json: bool,
    spot_checks: int,
) -> None:
    """List hostnodes able to host a deployment, cheapest full price first.

    SPEC is a search such as "gpu=4090 count>=2 price<0.8 country in [Canada]"; the
    options replace the fields they set. docs/rules.md describes the language. With
    the spot term, the price cap applies to the spot price (bid plus storage), and the
    search needs TDBOT_API_KEY and TDBOT_API_TOKEN.
    """
    import asyncio

    from tdbot.views import show_hostnodes

    settings, secrets = _load(config_path)
    options = {
        "gpu": list(gpus) or None,
        "gpu_count": gpu_count,
        "vcpus": vcpus,
        "ram_gb": ram_gb,
        "storage_gb": storage_gb,
    }
    overrides = {name: value for name, value in options.items() if value is not None}
    result = show_hostnodes(
        settings,
        spec,
        overrides,
        limit,
        as_json,
        sys.stdout,
        sort,
        secrets=secrets,
        spot_checks=spot_checks,
    )
    sys.exit(asyncio.run(result))


@main.command()
@CONFIG_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def vms(config_path: Path | None, as_json: bool) -> None:
    """List the account's VMs with status, spot bid and hourly cost."""
    import asyncio

    from tdbot.views import show_vms

    settings, secrets = _load(config_path)
    sys.exit(asyncio.run(show_vms(settings, secrets, as_json, sys.stdout)))


@main.command()
@CONFIG_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def balance(config_path: Path | None, as_json: bool) -> None:
    """Show the balance, the hourly burn rate and the runway."""
    import asyncio

    from tdbot.views import show_balance

    settings, secrets = _load(config_path)
    sys.exit(asyncio.run(show_balance(settings, secrets, as_json, sys.stdout)))


@main.command()
@CONFIG_OPTION
@click.argument("gpu")
@click.option(
    "--days",
    default=30.0,
    show_default=True,
    type=click.FloatRange(min=0, max=MAX_HISTORY_DAYS, min_open=True),
    callback=_finite,
    help=f"Days of history to show, at most {MAX_HISTORY_DAYS:g}.",
)
@click.option("--gpu-count", default=1, show_default=True, type=click.IntRange(1, 8))
@click.option("--vcpus", default=8, show_default=True, type=click.IntRange(2))
@click.option("--ram-gb", default=32, show_default=True, type=click.IntRange(1))
@click.option("--storage-gb", default=100, show_default=True, type=click.IntRange(20))
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def prices(
    config_path: Path | None,
    gpu: str,
    days: float,
    gpu_count: int,
    vcpus: int,
    ram_gb: int,
    storage_gb: int,
    as_json: bool,
) -> None:
    """Show the best available full price of a deployment on GPU from stored history.

    GPU is a model id such as geforcertx4090-pcie-24gb, or a name such as 4090 that
    matches one stored model. The options set the deployment's size. Reads the database
    in the configuration; no API key is needed.
    """
    import asyncio
    from datetime import UTC, datetime

    from tdbot.config import ConfigError
    from tdbot.history import DeploymentSize, missing_database, show_prices

    settings, _ = _load(config_path)
    problem = missing_database(settings.daemon.database)
    if problem is not None:
        sys.stderr.write(f"error: {problem}\n")
        sys.exit(1)
    size = DeploymentSize(gpu_count, vcpus, ram_gb, storage_gb)
    try:
        code = asyncio.run(
            show_prices(
                settings.daemon.database,
                gpu,
                size,
                days=days,
                as_json=as_json,
                out=sys.stdout,
                now=datetime.now(UTC),
            )
        )
    except ConfigError as error:
        _fail_on_config_error(error)
    sys.exit(code)


@main.command("agent-token")
@click.argument("vm_id")
def agent_token_command(vm_id: str) -> None:
    """Print the heartbeat token of the agent on VM_ID.

    The token is derived from TDBOT_HEARTBEAT_TOKEN (or the file named by
    TDBOT_HEARTBEAT_TOKEN_FILE) and VM_ID, and the daemon accepts it only for pushes
    about that VM. Put it in the VM's /etc/tdbot-agent.env as TDBOT_AGENT_TOKEN.
    """
    from tdbot.config import ConfigError, read_secret
    from tdbot.daemon.heartbeat import agent_token

    if not vm_id.strip() or vm_id != vm_id.strip():
        raise click.BadParameter("give the VM's id without spaces", param_hint="VM_ID")
    try:
        secret = read_secret("TDBOT_HEARTBEAT_TOKEN")
    except ConfigError as error:
        raise click.ClickException(str(error)) from None
    if not secret:
        raise click.ClickException(
            "TDBOT_HEARTBEAT_TOKEN is not set; set it (or TDBOT_HEARTBEAT_TOKEN_FILE) to the "
            "same secret the daemon uses, then run this command again"
        )
    click.echo(agent_token(secret, vm_id))


@main.command()
@click.option(
    "--speed",
    default=60.0,
    show_default=True,
    type=click.FloatRange(1, 600),
    help="Simulated seconds per real second.",
)
@click.option(
    "--timeout",
    "timeout_seconds",
    default=150.0,
    show_default=True,
    type=click.FloatRange(10),
    help="Give up after this many real seconds.",
)
def demo(speed: float, timeout_seconds: float) -> None:
    """Run the daemon against a simulated account and show all four rule kinds acting.

    Needs no account and no configuration. Alerts also go to Telegram when
    TDBOT_TELEGRAM_BOT_TOKEN and TDBOT_TELEGRAM_CHAT_ID are set.
    """
    import asyncio

    from tdbot.demo import run_demo

    sys.exit(asyncio.run(run_demo(speed=speed, timeout_seconds=timeout_seconds)))


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8700, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--marketplace",
    "marketplace_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Hostnode list to start from (default: the packaged marketplace).",
)
@click.option("--api-key", envvar="TDBOT_SIM_API_KEY", help="Accepted API key (default: random).")
@click.option(
    "--api-token", envvar="TDBOT_SIM_API_TOKEN", help="Accepted API token (default: random)."
)
@click.option(
    "--time-scale",
    default=1.0,
    show_default=True,
    type=click.FloatRange(0),
    help="Simulated seconds per real second; 0 freezes the clock.",
)
@click.option(
    "--balance-usd",
    default=100.0,
    show_default=True,
    type=click.FloatRange(0),
    help="Starting account balance in USD.",
)
@click.option(
    "--seed-example-vms",
    is_flag=True,
    help="Start with three VMs in the account: running on-demand, running spot and stopped.",
)
@click.option("--allow-remote", is_flag=True, help="Allow a non-loopback --host.")
def simulator(**options: Any) -> None:
    """Serve a simulated TensorDock v0 API under /api/v0 for tests and experiments.

    Point a configuration at it with [tensordock] base_url set to the printed URL, and
    set TDBOT_API_KEY and TDBOT_API_TOKEN to the accepted key and token.
    """
    from tdbot.simulator.server import run_simulator

    try:
        run_simulator(**options)
    except ValueError as error:
        raise click.ClickException(str(error)) from None


if __name__ == "__main__":
    main()
