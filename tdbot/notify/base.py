"""What a notification is, and the interface every channel implements."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

logger = logging.getLogger("tdbot.notify")

SeverityName = Literal["info", "warning", "critical"]

# The Bot API accepts 1 to 64 bytes of callback data per inline button.
MAX_CALLBACK_DATA_BYTES = 64


class NotifyError(Exception):
    """A notification could not be delivered; the message names the channel and chat."""


@dataclass(frozen=True)
class Button:
    """An inline button under a chat message; pressing it sends `callback_data` back."""

    text: str
    callback_data: str

    def __post_init__(self) -> None:
        size = len(self.callback_data.encode())
        if not 1 <= size <= MAX_CALLBACK_DATA_BYTES:
            raise ValueError(
                f"callback_data of button {self.text!r} is {size} bytes; "
                f"use 1 to {MAX_CALLBACK_DATA_BYTES} bytes"
            )


@dataclass(frozen=True)
class Message:
    """One notification: a title, body lines and a severity.

    `key` is the (rule, subject) pair of the alert the message belongs to, or None.
    Channels that cannot show `buttons` (rows of inline buttons) leave them out.
    """

    title: str
    lines: tuple[str, ...] = ()
    severity: SeverityName = "info"
    key: tuple[str, str] | None = None
    buttons: tuple[tuple[Button, ...], ...] = field(default=())


class Notifier(Protocol):
    """A channel that delivers messages, such as the console or a Telegram chat."""

    async def start(self) -> None:
        """Connect and check the channel works; called once before the first send."""
        ...

    async def send(self, message: Message) -> None:
        """Deliver `message`, or raise NotifyError."""
        ...

    async def stop(self) -> None:
        """Release connections; no send follows."""
        ...


class MultiNotifier:
    """Send each message to several notifiers at once.

    One notifier's failure is logged and does not stop the others. `send` raises
    NotifyError only when every notifier failed, so the caller can retry later.
    `start` and `stop` log failures and do not raise them.
    """

    def __init__(self, notifiers: Sequence[Notifier]) -> None:
        self._notifiers = list(notifiers)

    async def start(self) -> None:
        await self._run_all("start", [n.start() for n in self._notifiers])

    async def send(self, message: Message) -> None:
        failures = await self._run_all("send", [n.send(message) for n in self._notifiers])
        if self._notifiers and failures == len(self._notifiers):
            raise NotifyError(f"every notifier failed to send {message.title!r}")

    async def stop(self) -> None:
        await self._run_all("stop", [n.stop() for n in self._notifiers])

    async def _run_all(self, operation: str, calls: list[Coroutine[Any, Any, None]]) -> int:
        results = await asyncio.gather(*calls, return_exceptions=True)
        failures = 0
        for notifier, result in zip(self._notifiers, results, strict=True):
            if isinstance(result, Exception):
                failures += 1
                logger.error("%s %s failed: %s", type(notifier).__name__, operation, result)
            elif isinstance(result, BaseException):
                raise result
        return failures


class NullNotifier:
    """Drop every message; `tdbot check` uses it because a dry pass must not notify."""

    async def start(self) -> None:
        return None

    async def send(self, message: Message) -> None:
        return None

    async def stop(self) -> None:
        return None
