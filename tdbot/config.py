"""Daemon settings from a TOML file, and secrets from the environment.

Secrets never live in the configuration file or the rule files. Each one is read from
an environment variable, or from a file named by the same variable with `_FILE`
appended (the form systemd's `LoadCredential=` and container secrets use).
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import ErrorDetails

from tdbot.alerts.digest_schedule import ClockTime, TimeZoneName
from tdbot.rules.schema import Duration
from tdbot.tensordock.client import DEFAULT_BASE_URL


class ConfigError(Exception):
    """The configuration file or a secret is missing or invalid; the message names which."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def check_http_url(value: str, example: str) -> str:
    """Return `value` if it is an http:// or https:// URL with a host, else raise ValueError."""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(
            f"invalid URL {value!r}: expected an http:// or https:// URL, such as {example}"
        )
    return value


class TensorDockSettings(Section):
    base_url: str = Field(DEFAULT_BASE_URL, description="Root URL of the TensorDock v0 API.")
    timeout_seconds: Annotated[float, Field(gt=0)] = Field(
        30.0, description="Seconds to wait for one API response."
    )
    read_retries: Annotated[int, Field(ge=0, le=10)] = Field(
        3, description="How often a failed read (lists, details, balance) is retried."
    )

    @field_validator("base_url")
    @classmethod
    def _check_base_url(cls, value: str) -> str:
        return check_http_url(value, DEFAULT_BASE_URL)


class SafetySettings(Section):
    dry_run: bool = False
    fleet_max_usd_per_hour: Annotated[float, Field(ge=0)] = Field(
        5.0,
        description=(
            "Fleet-wide ceiling in USD per hour: a deploy or re-bid that would lift "
            "the account's hourly cost above it is blocked and reported."
        ),
    )


class DaemonSettings(Section):
    rules_dir: Path = Path("rules")
    database: str = "tdbot.db"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    snapshot_max_age: Duration = timedelta(seconds=5)
    shutdown_timeout: Duration = timedelta(seconds=30)
    # Whole days, because durations elsewhere stop at 366 days.
    price_history_retention: Annotated[int, Field(ge=1)] = Field(
        400,
        description=(
            "Days of price history to keep; older rows are deleted hourly, except the "
            "last row of each hostnode and GPU model before the cut."
        ),
    )


class HeartbeatSettings(Section):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = Field(
        8787, description="TCP port of the heartbeat endpoint; 0 picks a free port."
    )


class TelegramSettings(Section):
    chat_ids: list[int] = Field(default_factory=list)
    # Empty or None: Telegram's own Bot API server.
    base_url: str | None = Field(None, description="Root URL of a self-hosted Bot API server.")
    # Chat commands and confirmation buttons; they also need the bot token.
    commands: bool = True
    # Users who may command the bot, in every chat. Empty: nobody may.
    allowed_user_ids: list[int] = Field(default_factory=list)
    # Group chats where those users may command it; None means `chat_ids`.
    allowed_chat_ids: list[int] | None = None
    confirmation_ttl: Duration = timedelta(minutes=10)

    @field_validator("base_url")
    @classmethod
    def _check_base_url(cls, value: str | None) -> str | None:
        if not value:
            return None
        return check_http_url(value, "http://127.0.0.1:8081/bot")

    @property
    def command_chat_ids(self) -> list[int]:
        """Group chats where allowed users may give commands."""
        return self.chat_ids if self.allowed_chat_ids is None else self.allowed_chat_ids


class AlertSettings(Section):
    repeat_interval: Duration = timedelta(hours=4)
    # Daily digest time of day ("HH:MM") in `digest_timezone`; None sends no digest.
    digest_time: ClockTime | None = None
    digest_timezone: TimeZoneName = "UTC"


# --- SSH idle probes (tdbot.probes) ---------------------------------------------------


class SshSettings(Section):
    """How idle_stop rules with `sources: [ssh]` log in to a VM to read its activity."""

    key_file: Path | None = Field(
        None,
        description=(
            "Private key file (OpenSSH or PEM format, without a passphrase) the probe "
            "logs in with; its public key must be in the VM's authorized_keys."
        ),
    )
    username: str | None = Field(
        None, description="User to log in as; unset uses the VM's default user."
    )
    connect_timeout: Duration = Field(
        timedelta(seconds=10),
        description="Time allowed to connect, exchange keys and log in, such as '10s'.",
    )
    command_timeout: Duration = Field(
        timedelta(seconds=15),
        description="Time allowed for the probe's commands to finish, such as '15s'.",
    )
    max_concurrent: Annotated[int, Field(ge=1, le=256)] = Field(
        8, description="VMs probed at the same time, at most."
    )


def _resolve_ssh_paths(settings: Settings, base: Path) -> Settings:
    """Take a relative `ssh.key_file` relative to the configuration file's folder."""
    key_file = settings.ssh.key_file
    if key_file is None:
        return settings
    key_file = key_file.expanduser()
    if not key_file.is_absolute():
        key_file = base / key_file
    ssh = settings.ssh.model_copy(update={"key_file": key_file})
    return settings.model_copy(update={"ssh": ssh})


# --- end of SSH idle probes ------------------------------------------------------------


class Settings(Section):
    """Everything in the configuration file; see config.example.toml for each key."""

    tensordock: TensorDockSettings = Field(default_factory=TensorDockSettings)
    safety: SafetySettings = Field(default_factory=SafetySettings)
    daemon: DaemonSettings = Field(default_factory=DaemonSettings)
    heartbeat: HeartbeatSettings = Field(default_factory=HeartbeatSettings)
    telegram: TelegramSettings = Field(default_factory=TelegramSettings)
    alerts: AlertSettings = Field(default_factory=AlertSettings)
    ssh: SshSettings = Field(default_factory=SshSettings)


@dataclass(frozen=True)
class Secrets:
    """Credentials read from the environment; `repr` never shows them."""

    api_key: str | None = field(default=None, repr=False)
    api_token: str | None = field(default=None, repr=False)
    telegram_bot_token: str | None = field(default=None, repr=False)
    heartbeat_token: str | None = field(default=None, repr=False)

    def values(self) -> list[str]:
        """Every secret that is set, for the log redaction filter."""
        candidates = (self.api_key, self.api_token, self.telegram_bot_token, self.heartbeat_token)
        return [value for value in candidates if value]

    def require_api(self) -> tuple[str, str]:
        """Return the API key and token, or raise ConfigError saying how to set them."""
        if not self.api_key or not self.api_token:
            raise ConfigError(
                "TensorDock credentials are missing: set TDBOT_API_KEY and TDBOT_API_TOKEN "
                "(or TDBOT_API_KEY_FILE and TDBOT_API_TOKEN_FILE) in the environment"
            )
        return self.api_key, self.api_token


def load_settings(path: Path | None) -> Settings:
    """Load the TOML configuration file; None gives the defaults.

    Relative paths in the file are taken relative to the file's folder, so a daemon
    started from another working directory finds the same rules and database.
    """
    if path is None:
        return Settings()
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            f"configuration file {path} not found; copy config.example.toml there"
        ) from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: invalid TOML: {error}") from None

    try:
        settings = Settings.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(_describe_validation_error(path, error)) from None
    base = path.resolve().parent
    return _resolve_ssh_paths(_resolve_paths(settings, base), base)


# Messages for pydantic's error types, with its context values (`ge`, `expected`, ...)
# filled in. Other types keep pydantic's own message.
_PROBLEM_MESSAGES = {
    "greater_than_equal": "must be {ge} or more",
    "greater_than": "must be more than {gt}",
    "less_than_equal": "must be {le} or less",
    "less_than": "must be less than {lt}",
    "int_parsing": "must be a whole number",
    "int_type": "must be a whole number",
    "int_from_float": "must be a whole number",
    "float_parsing": "must be a number",
    "float_type": "must be a number",
    "bool_parsing": "must be true or false",
    "bool_type": "must be true or false",
    "string_type": "must be a quoted string",
    "list_type": "must be a list, such as [1, 2]",
    "literal_error": "must be {expected}",
    "model_type": "must be a table, such as [section] in TOML",
}


def _describe_validation_error(path: Path, error: ValidationError) -> str:
    lines = [f"{path}: invalid configuration:"]
    for problem in error.errors():
        location = ".".join(str(part) for part in problem["loc"])
        lines.append(f"  {location}: {_describe_problem(problem)}")
        description = _setting_description(problem["loc"])
        if description:
            lines.append(f"    {description}")
    return "\n".join(lines)


def _describe_problem(problem: ErrorDetails) -> str:
    kind = problem["type"]
    if kind == "extra_forbidden":
        return "unknown setting; check its spelling against config.example.toml"
    template = _PROBLEM_MESSAGES.get(kind)
    if template is None:
        return problem["msg"].removeprefix("Value error, ")
    context = {name: _plain_number(value) for name, value in problem.get("ctx", {}).items()}
    return f"{template.format(**context)}, got {problem['input']!r}"


def _plain_number(value: Any) -> Any:
    # pydantic stores the bound of a float field as a float, such as 0.0 for ge=0.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _setting_description(location: tuple[int | str, ...]) -> str | None:
    """Return the description of the setting at `location`, such as ("safety", "dry_run")."""
    if len(location) < 2:
        return None
    section = Settings.model_fields.get(str(location[0]))
    model = section.annotation if section is not None else None
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        return None
    setting = model.model_fields.get(str(location[1]))
    return setting.description if setting is not None else None


def _resolve_paths(settings: Settings, base: Path) -> Settings:
    daemon = settings.daemon
    rules_dir = daemon.rules_dir if daemon.rules_dir.is_absolute() else base / daemon.rules_dir
    database = daemon.database
    if "://" not in database and not Path(database).is_absolute():
        database = str(base / database)
    resolved = daemon.model_copy(update={"rules_dir": rules_dir, "database": database})
    return settings.model_copy(update={"daemon": resolved})


def read_secret(name: str, environ: dict[str, str] | None = None) -> str | None:
    """Read secret `name` from the environment, or from the file named by `name`_FILE."""
    env = os.environ if environ is None else environ
    value = env.get(name)
    if value:
        return value.strip()
    file_name = env.get(f"{name}_FILE")
    if not file_name:
        return None
    try:
        content = Path(file_name).read_text(encoding="utf-8").strip()
    except OSError as error:
        raise ConfigError(f"cannot read {name}_FILE {file_name}: {error.strerror}") from None
    if not content:
        raise ConfigError(
            f"{name}_FILE names {file_name}, which is empty; "
            f"write the secret into that file or unset {name}_FILE"
        )
    return content


def load_secrets(environ: dict[str, str] | None = None) -> Secrets:
    """Read every secret tdbot uses from the environment."""
    return Secrets(
        api_key=read_secret("TDBOT_API_KEY", environ),
        api_token=read_secret("TDBOT_API_TOKEN", environ),
        telegram_bot_token=read_secret("TDBOT_TELEGRAM_BOT_TOKEN", environ),
        heartbeat_token=read_secret("TDBOT_HEARTBEAT_TOKEN", environ),
    )
