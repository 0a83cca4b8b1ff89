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
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tdbot.alerts.digest_schedule import ClockTime, TimeZoneName
from tdbot.rules.schema import Duration
from tdbot.tensordock.client import DEFAULT_BASE_URL


class ConfigError(Exception):
    """The configuration file or a secret is missing or invalid; the message says which."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorDockSettings(Section):
    base_url: str = DEFAULT_BASE_URL
    timeout_seconds: Annotated[float, Field(gt=0)] = 30.0
    read_retries: Annotated[int, Field(ge=0, le=10)] = 3


class SafetySettings(Section):
    dry_run: bool = False
    fleet_max_usd_per_hour: Annotated[float, Field(ge=0)] = 5.0


class DaemonSettings(Section):
    rules_dir: Path = Path("rules")
    database: str = "tdbot.db"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    snapshot_max_age: Duration = timedelta(seconds=5)
    shutdown_timeout: Duration = timedelta(seconds=30)


class HeartbeatSettings(Section):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8787


class TelegramSettings(Section):
    chat_ids: list[int] = Field(default_factory=list)
    base_url: str | None = None
    # Chat commands and confirmation buttons; they also need the bot token.
    commands: bool = True
    # Users who may command the bot, in every chat. Empty: nobody may.
    allowed_user_ids: list[int] = Field(default_factory=list)
    # Group chats where those users may command it; None means `chat_ids`.
    allowed_chat_ids: list[int] | None = None
    confirmation_ttl: Duration = timedelta(minutes=10)

    @property
    def command_chat_ids(self) -> list[int]:
        """Group chats where allowed users may give commands."""
        return self.chat_ids if self.allowed_chat_ids is None else self.allowed_chat_ids


class AlertSettings(Section):
    repeat_interval: Duration = timedelta(hours=4)
    # Daily digest time of day ("HH:MM") in `digest_timezone`; None sends no digest.
    digest_time: ClockTime | None = None
    digest_timezone: TimeZoneName = "UTC"


class Settings(Section):
    """Everything in the configuration file; see config.example.toml for each key."""

    tensordock: TensorDockSettings = Field(default_factory=TensorDockSettings)
    safety: SafetySettings = Field(default_factory=SafetySettings)
    daemon: DaemonSettings = Field(default_factory=DaemonSettings)
    heartbeat: HeartbeatSettings = Field(default_factory=HeartbeatSettings)
    telegram: TelegramSettings = Field(default_factory=TelegramSettings)
    alerts: AlertSettings = Field(default_factory=AlertSettings)


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
    return _resolve_paths(settings, path.resolve().parent)


def _describe_validation_error(path: Path, error: ValidationError) -> str:
    lines = [f"{path}: invalid configuration:"]
    for problem in error.errors():
        location = ".".join(str(part) for part in problem["loc"])
        message = problem["msg"].removeprefix("Value error, ")
        if problem["type"] == "extra_forbidden":
            message = "unknown setting; check its spelling against config.example.toml"
        lines.append(f"  {location}: {message}")
    return "\n".join(lines)


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
        return Path(file_name).read_text(encoding="utf-8").strip() or None
    except OSError as error:
        raise ConfigError(f"cannot read {name}_FILE {file_name}: {error.strerror}") from None


def load_secrets(environ: dict[str, str] | None = None) -> Secrets:
    """Read every secret tdbot uses from the environment."""
    return Secrets(
        api_key=read_secret("TDBOT_API_KEY", environ),
        api_token=read_secret("TDBOT_API_TOKEN", environ),
        telegram_bot_token=read_secret("TDBOT_TELEGRAM_BOT_TOKEN", environ),
        heartbeat_token=read_secret("TDBOT_HEARTBEAT_TOKEN", environ),
    )
