"""Redaction of secrets and bot tokens in log records."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import httpx
import pytest
import telegram

from tdbot.logsafe import RedactingFilter, configure_logging, install_redaction, redact
from tests.fakes.telegram_api import DEFAULT_TOKEN, FakeTelegramApi

TOKEN = "123456789:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw"
BOT_URL = f"https://api.telegram.org/bot{TOKEN}/sendMessage"
QUIET_LOGGERS = ("httpx", "httpcore", "telegram", "telegram.ext")
SCHEDULER_LOGGERS = ("apscheduler.executors", "apscheduler.scheduler")


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """Put the root handlers, their filters and the library logger levels back after a test."""
    root = logging.getLogger()
    handlers = list(root.handlers)
    filters = {handler: list(handler.filters) for handler in handlers}
    level = root.level
    levels = {name: logging.getLogger(name).level for name in QUIET_LOGGERS + SCHEDULER_LOGGERS}
    yield
    root.handlers[:] = handlers
    for handler, saved_filters in filters.items():
        handler.filters[:] = saved_filters
    root.setLevel(level)
    for name, saved_level in levels.items():
        logging.getLogger(name).setLevel(saved_level)
    logging.captureWarnings(False)


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    """A root handler writing formatted records to a string."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logging.getLogger().addHandler(handler)
    yield stream
    logging.getLogger().removeHandler(handler)


def test_redact_bot_url() -> None:
    text = redact(f"POST {BOT_URL} failed")

    assert TOKEN not in text
    assert text == "POST https://api.telegram.org/bot***/sendMessage failed"


def test_redact_configured_secret() -> None:
    text = redact("key=abc123key token=t0k3n-value", ["abc123key", "t0k3n-value"])

    assert text == "key=*** token=***"


def test_redact_longer_secret_first() -> None:
    text = redact("secret-extended", ["secret", "secret-extended"])

    assert text == "***"


def test_redact_ignores_empty_secret() -> None:
    assert redact("nothing to hide", [""]) == "nothing to hide"


def test_redact_leaves_short_secret() -> None:
    text = redact("every line here", ["e"])

    assert text == "every line here"


def test_short_secret_warned_not_shown(log_stream: io.StringIO) -> None:
    install_redaction(["zq", "long-api-secret"])

    logging.getLogger("tdbot.test").warning("sent long-api-secret")

    lines = log_stream.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("WARNING 1 configured secret(s) shorter than 8 characters")
    assert "zq" not in lines[0]
    assert lines[1] == "WARNING sent ***"


def test_filter_redacts_message_args(log_stream: io.StringIO) -> None:
    install_redaction(["api-secret-value"])

    logging.getLogger("tdbot.test").warning("request to %s with %s", BOT_URL, "api-secret-value")

    output = log_stream.getvalue()
    assert TOKEN not in output
    assert "api-secret-value" not in output
    assert "request to https://api.telegram.org/bot***/sendMessage with ***" in output


def test_filter_redacts_traceback(log_stream: io.StringIO) -> None:
    install_redaction([])

    try:
        raise RuntimeError(f"connect to {BOT_URL} failed")
    except RuntimeError:
        logging.getLogger("tdbot.test").exception("send failed")

    output = log_stream.getvalue()
    assert "RuntimeError: connect to https://api.telegram.org/bot***/sendMessage" in output
    assert TOKEN not in output


def test_filter_survives_bad_args(log_stream: io.StringIO) -> None:
    install_redaction([])

    logging.getLogger("tdbot.test").warning("one %s two %s", BOT_URL)

    output = log_stream.getvalue()
    assert "did not match" in output
    assert TOKEN not in output


def test_install_redaction_twice_one_filter(log_stream: io.StringIO) -> None:
    install_redaction(["first-secret"])
    install_redaction(["second-secret"])

    logging.getLogger("tdbot.test").warning("first-secret second-secret")

    handler = logging.getLogger().handlers[-1]
    assert sum(isinstance(f, RedactingFilter) for f in handler.filters) == 1
    assert "WARNING *** ***" in log_stream.getvalue()


async def test_httpx_request_lines_not_emitted(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    install_redaction([])

    async with FakeTelegramApi() as api, httpx.AsyncClient() as client:
        response = await client.post(f"{api.base_url}{api.token}/getMe")
        async with telegram.Bot(api.token, base_url=api.base_url) as bot:
            await bot.send_message(42, "hello")

    assert response.json()["ok"] is True
    assert [r for r in caplog.records if r.name.startswith(("httpx", "httpcore"))] == []
    assert DEFAULT_TOKEN not in caplog.text


def test_configure_logging_format(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("info", ["api-secret-value"])

    logging.getLogger("tdbot.test").info("using %s at %s", "api-secret-value", BOT_URL)
    logging.getLogger("tdbot.test").debug("not shown at INFO")

    err = capsys.readouterr().err
    assert "INFO     tdbot.test: using *** at https://api.telegram.org/bot***/sendMessage" in err
    assert "not shown" not in err
    assert logging.getLogger("httpx").level == logging.WARNING


@pytest.mark.parametrize(("level", "shown"), [("info", False), ("debug", True)])
def test_configure_logging_scheduler_runs(
    capsys: pytest.CaptureFixture[str], level: str, shown: bool
) -> None:
    configure_logging(level, [])

    logging.getLogger("apscheduler.executors.default").info("Running job tick")
    logging.getLogger("apscheduler.scheduler").info("Added job tick")
    logging.getLogger("apscheduler.executors.default").warning("Run time of job was missed")

    err = capsys.readouterr().err
    assert ("Running job tick" in err) is shown
    assert ("Added job tick" in err) is shown
    assert "Run time of job was missed" in err
