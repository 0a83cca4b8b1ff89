"""Configuration tests: the TOML settings file, path resolution and secrets from the environment."""

from __future__ import annotations

import re
import tomllib
from datetime import timedelta
from pathlib import Path

import pytest
from pydantic import BaseModel

from tdbot.config import ConfigError, Secrets, Settings, load_secrets, load_settings, read_secret
from tdbot.tensordock.client import DEFAULT_BASE_URL

REPOSITORY = Path(__file__).resolve().parent.parent
EXAMPLE = REPOSITORY / "config.example.toml"


def write_config(folder: Path, text: str) -> Path:
    path = folder / "config.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_without_file() -> None:
    settings = load_settings(None)

    assert settings.tensordock.base_url == DEFAULT_BASE_URL
    assert settings.tensordock.read_retries == 3
    assert settings.safety.dry_run is False
    assert settings.safety.fleet_max_usd_per_hour == 5.0
    assert settings.daemon.rules_dir == Path("rules")
    assert settings.daemon.database == "tdbot.db"
    assert settings.daemon.snapshot_max_age == timedelta(seconds=5)
    assert settings.daemon.shutdown_timeout == timedelta(seconds=30)
    assert settings.heartbeat.host == "127.0.0.1"
    assert settings.telegram.chat_ids == []
    assert settings.alerts.repeat_interval == timedelta(hours=4)


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    settings = load_settings(write_config(tmp_path, ""))

    assert settings.tensordock == Settings().tensordock
    assert settings.safety == Settings().safety
    assert settings.daemon.rules_dir == tmp_path / "rules"


def test_example_loads_every_section() -> None:
    raw = tomllib.loads(EXAMPLE.read_text(encoding="utf-8"))
    settings = load_settings(EXAMPLE)

    assert set(raw) == set(Settings.model_fields)
    for section_name, values in raw.items():
        section = getattr(settings, section_name)
        for key in values:
            assert hasattr(section, key), f"{section_name}.{key} is not a setting"
    assert settings.daemon.rules_dir == REPOSITORY / "rules"
    assert settings.daemon.database == str(REPOSITORY / "tdbot.db")
    assert settings.daemon.snapshot_max_age == timedelta(seconds=5)
    assert settings.alerts.repeat_interval == timedelta(hours=4)


def test_example_documents_every_setting() -> None:
    text = EXAMPLE.read_text(encoding="utf-8")

    for section_name, section_field in Settings.model_fields.items():
        assert f"[{section_name}]" in text
        section_model = section_field.annotation
        assert isinstance(section_model, type)
        assert issubclass(section_model, BaseModel)
        for key in section_model.model_fields:
            # A setting may be shown commented out, as "# key = value".
            pattern = rf"^#?\s*{key}\s*="
            assert re.search(pattern, text, re.MULTILINE), f"{section_name}.{key} missing"


def test_unknown_setting_named(tmp_path: Path) -> None:
    path = write_config(tmp_path, '[daemon]\nrules_dri = "rules"\n')

    with pytest.raises(ConfigError) as caught:
        load_settings(path)

    message = str(caught.value)
    assert "daemon.rules_dri" in message
    assert "unknown setting" in message
    assert str(path) in message


def test_unknown_section_named(tmp_path: Path) -> None:
    path = write_config(tmp_path, "[telegramm]\nchat_ids = [1]\n")

    with pytest.raises(ConfigError, match=r"telegramm: unknown setting"):
        load_settings(path)


def test_invalid_value_named(tmp_path: Path) -> None:
    path = write_config(tmp_path, "[daemon]\nshutdown_timeout = 30\n[heartbeat]\nport = 70000\n")

    with pytest.raises(ConfigError) as caught:
        load_settings(path)

    message = str(caught.value)
    assert "daemon.shutdown_timeout" in message
    assert "has no unit" in message
    assert "heartbeat.port" in message


def test_negative_ceiling_explained(tmp_path: Path) -> None:
    path = write_config(tmp_path, "[safety]\nfleet_max_usd_per_hour = -1\n")

    with pytest.raises(ConfigError) as caught:
        load_settings(path)

    message = str(caught.value)
    assert "safety.fleet_max_usd_per_hour: must be 0 or more, got -1" in message
    assert "ceiling in USD per hour" in message
    assert "Input should be" not in message


@pytest.mark.parametrize(
    ("section", "url"),
    [
        ("tensordock", "marketplace.tensordock.com/api/v0"),
        ("tensordock", "ftp://marketplace.tensordock.com/api/v0"),
        ("telegram", "127.0.0.1:8081/bot"),
        ("telegram", "https://"),
    ],
)
def test_base_url_must_be_http(tmp_path: Path, section: str, url: str) -> None:
    path = write_config(tmp_path, f'[{section}]\nbase_url = "{url}"\n')

    with pytest.raises(ConfigError) as caught:
        load_settings(path)

    message = str(caught.value)
    assert f"{section}.base_url: invalid URL {url!r}" in message
    assert "such as http" in message


def test_empty_telegram_base_url_default(tmp_path: Path) -> None:
    path = write_config(tmp_path, '[telegram]\nbase_url = ""\n')

    assert load_settings(path).telegram.base_url is None


def test_invalid_toml_names_path(tmp_path: Path) -> None:
    path = write_config(tmp_path, "[daemon\nrules_dir = 'rules'\n")

    with pytest.raises(ConfigError) as caught:
        load_settings(path)

    assert str(path) in str(caught.value)
    assert "invalid TOML" in str(caught.value)


def test_missing_file_names_path(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"

    with pytest.raises(ConfigError, match=r"absent\.toml not found"):
        load_settings(path)


def test_relative_paths_resolved_against_file(tmp_path: Path) -> None:
    folder = tmp_path / "etc" / "tdbot"
    folder.mkdir(parents=True)
    path = write_config(folder, '[daemon]\nrules_dir = "my-rules"\ndatabase = "state/tdbot.db"\n')

    settings = load_settings(path)

    assert settings.daemon.rules_dir == folder / "my-rules"
    assert settings.daemon.database == str(folder / "state" / "tdbot.db")


def test_absolute_paths_and_urls_kept(tmp_path: Path) -> None:
    rules = tmp_path / "elsewhere"
    url = "postgresql+asyncpg://tdbot@localhost/tdbot"
    path = write_config(tmp_path, f'[daemon]\nrules_dir = "{rules}"\ndatabase = "{url}"\n')

    settings = load_settings(path)

    assert settings.daemon.rules_dir == rules
    assert settings.daemon.database == url


def test_secrets_from_environment() -> None:
    environ = {
        "TDBOT_API_KEY": " key-value \n",
        "TDBOT_API_TOKEN": "token-value",
        "TDBOT_TELEGRAM_BOT_TOKEN": "123456:bot-token-value",
        "TDBOT_HEARTBEAT_TOKEN": "heartbeat-value",
    }

    secrets = load_secrets(environ)

    assert secrets.api_key == "key-value"
    assert secrets.api_token == "token-value"
    assert secrets.telegram_bot_token == "123456:bot-token-value"
    assert secrets.heartbeat_token == "heartbeat-value"
    assert secrets.require_api() == ("key-value", "token-value")


def test_secrets_from_files(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("file-key\n", encoding="utf-8")
    token_file = tmp_path / "token"
    token_file.write_text("file-token", encoding="utf-8")
    environ = {"TDBOT_API_KEY_FILE": str(key_file), "TDBOT_API_TOKEN_FILE": str(token_file)}

    secrets = load_secrets(environ)

    assert secrets.require_api() == ("file-key", "file-token")
    assert secrets.telegram_bot_token is None


def test_environment_value_beats_file(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("file-key", encoding="utf-8")
    environ = {"TDBOT_API_KEY": "env-key", "TDBOT_API_KEY_FILE": str(key_file)}

    assert read_secret("TDBOT_API_KEY", environ) == "env-key"


def test_empty_secret_file_named(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n", encoding="utf-8")

    with pytest.raises(ConfigError) as caught:
        load_secrets({"TDBOT_API_KEY_FILE": str(empty), "TDBOT_API_TOKEN": "token-value"})

    assert f"TDBOT_API_KEY_FILE names {empty}, which is empty" in str(caught.value)


def test_unreadable_secret_file_named(tmp_path: Path) -> None:
    missing = tmp_path / "missing-key"

    with pytest.raises(ConfigError) as caught:
        read_secret("TDBOT_API_KEY", {"TDBOT_API_KEY_FILE": str(missing)})

    assert "TDBOT_API_KEY_FILE" in str(caught.value)
    assert str(missing) in str(caught.value)


def test_secrets_repr_hides_values() -> None:
    secrets = Secrets(
        api_key="key-4f1d",
        api_token="token-9a2c",
        telegram_bot_token="123456:bot-7e3b",
        heartbeat_token="heartbeat-0c5e",
    )

    for text in (repr(secrets), str(secrets)):
        for value in secrets.values():
            assert value not in text
    assert len(secrets.values()) == 4


def test_require_api_names_variables() -> None:
    secrets = Secrets(api_key="only-the-key")

    with pytest.raises(ConfigError) as caught:
        secrets.require_api()

    message = str(caught.value)
    assert "TDBOT_API_KEY" in message
    assert "TDBOT_API_TOKEN" in message
    assert "TDBOT_API_KEY_FILE" in message
    assert "only-the-key" not in message
