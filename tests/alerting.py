"""Fixtures and decisions shared by the alert tests.

The alert manager runs over a real SQLite store and notifies through the fake Bot API
server on 127.0.0.1. `tests/conftest.py` registers this module as a pytest plugin, so
its fixtures are available to every test module that does not define its own.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tdbot.alerts.manager import AlertManager
from tdbot.evaluation.model import FireAlert, Report, ResolveAlert, Severity
from tdbot.notify.base import Message
from tdbot.notify.telegram import TelegramNotifier
from tdbot.store.db import Store
from tests.fakes.telegram_api import FakeTelegramApi

T0 = datetime(2025, 1, 6, 12, 0, tzinfo=UTC)
REPEAT = timedelta(hours=1)
RULE = "spot-a100"
CHAT_ID = 42


@pytest.fixture
async def api() -> AsyncIterator[FakeTelegramApi]:
    async with FakeTelegramApi() as server:
        yield server


@pytest.fixture
async def notifier(api: FakeTelegramApi) -> AsyncIterator[TelegramNotifier]:
    sender = TelegramNotifier(api.token, [CHAT_ID], base_url=api.base_url)
    yield sender
    await sender.stop()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "tdbot.db"


@pytest.fixture
async def store(db_path: Path) -> AsyncIterator[Store]:
    opened = await Store.open(db_path)
    yield opened
    await opened.close()


@pytest.fixture
def manager(store: Store, notifier: TelegramNotifier) -> AlertManager:
    return AlertManager(store, notifier, repeat_interval=REPEAT)


def outbid(subject: str = "vm-1", severity: Severity = Severity.WARNING) -> FireAlert:
    return FireAlert(
        rule=RULE, subject=subject, summary=f"Spot VM {subject} is outbid.", severity=severity
    )


def running_again(subject: str = "vm-1") -> ResolveAlert:
    return ResolveAlert(rule=RULE, subject=subject, summary=f"Spot VM {subject} runs again.")


def unknown_bid(reason: str = "bid_unknown") -> Report:
    return Report(
        rule=RULE,
        subject="vm-1",
        summary="The current bid of vm-1 is unknown, so it was not raised.",
        evidence={"reason": reason},
    )


class RecordingNotifier:
    """A notifier that records every message sent, in order, for tests without Telegram."""

    def __init__(self) -> None:
        self.messages: list[Message] = []

    async def start(self) -> None:
        return None

    async def send(self, message: Message) -> None:
        self.messages.append(message)

    async def stop(self) -> None:
        return None

    def text(self) -> str:
        """Return every message's title and lines as one text."""
        return "\n".join(f"{m.title}\n" + "\n".join(m.lines) for m in self.messages)
