"""Send notifications to Telegram chats through python-telegram-bot's `Bot`.

The telegram package is imported when a notifier is created, not when this module is
imported, so commands that never talk to Telegram start fast. The bot token is kept
inside the `Bot`. This module logs neither the Bot, a request URL nor the token, and it
redacts error texts before it logs or raises them.
"""

from __future__ import annotations

import asyncio
import html
import logging
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

from tdbot.logsafe import redact
from tdbot.notify.base import Button, Message, NotifyError

if TYPE_CHECKING:
    from telegram import Bot, InlineKeyboardMarkup
    from telegram.error import RetryAfter

logger = logging.getLogger("tdbot.notify.telegram")

# The Bot API rejects message text longer than 4,096 characters (counted in UTF-16
# code units, as Telegram counts them).
MESSAGE_LIMIT = 4096

_SEVERITY_MARKS = {"info": "ℹ️", "warning": "⚠️", "critical": "🚨"}


def text_length(text: str) -> int:
    """Return the length of `text` in UTF-16 code units, the unit of Telegram's limits."""
    return len(text.encode("utf-16-le")) // 2


def render_chunks(message: Message, limit: int = MESSAGE_LIMIT) -> list[str]:
    """Render `message` as Telegram HTML in chunks of at most `limit` characters each.

    Every title and body text is HTML-escaped. Chunks break at line boundaries; a
    single line longer than `limit` is cut into pieces, never inside an HTML entity.
    """
    mark = _SEVERITY_MARKS[message.severity]
    title = html.escape(f"{mark} {message.title}")
    bold_title = f"<b>{title}</b>"
    if text_length(bold_title) <= limit:
        lines = [bold_title]
    else:
        lines = list(_escaped_pieces(f"{mark} {message.title}", limit))

    for line in message.lines:
        lines.extend(_escaped_pieces(line, limit))
    return _join_lines(lines, limit)


def _escaped_pieces(raw: str, limit: int) -> Iterator[str]:
    """Escape `raw` and cut it into pieces of at most `limit` characters each."""
    piece: list[str] = []
    size = 0
    for char in raw:
        escaped = html.escape(char)
        width = text_length(escaped)
        if size + width > limit:
            yield "".join(piece)
            piece, size = [], 0
        piece.append(escaped)
        size += width
    yield "".join(piece)


def _join_lines(lines: list[str], limit: int) -> list[str]:
    chunks: list[str] = []
    current: list[str] = []
    size = 0
    for line in lines:
        width = text_length(line)
        # A newline joins the line to the chunk and counts towards the limit.
        if current and size + 1 + width > limit:
            chunks.append("\n".join(current))
            current, size = [], 0
        size += width + (1 if current else 0)
        current.append(line)
    if current:
        chunks.append("\n".join(current))
    return chunks


@dataclass
class _RetryBudget:
    """Whether the one flood-control retry allowed per message has been spent."""

    spent: bool = False


class TelegramNotifier:
    """Send each message to every chat in `chat_ids`, in HTML parse mode.

    `base_url` points the bot at another Bot API server, such as a self-hosted one or
    a test fake, in PTB's form "http://127.0.0.1:8081/bot" (the token is appended).
    A flood-control response (429 with retry_after) is honoured once per message when
    its wait is at most `max_retry_after` seconds. Other failures raise NotifyError.
    """

    def __init__(
        self,
        token: str,
        chat_ids: Sequence[int],
        *,
        base_url: str | None = None,
        max_retry_after: float = 30.0,
    ) -> None:
        from telegram import Bot

        if not chat_ids:
            raise ValueError("chat_ids is empty; give at least one Telegram chat id")
        self._token = token
        self._chat_ids = list(chat_ids)
        self._max_retry_after = max_retry_after
        self._bot: Bot = Bot(token) if base_url is None else Bot(token, base_url=base_url)

    def __repr__(self) -> str:
        return f"TelegramNotifier(chat_ids={self._chat_ids!r})"

    async def start(self) -> None:
        """Initialize the bot, which calls getMe and so checks the token."""
        from telegram.error import TelegramError

        try:
            await self._bot.initialize()
        except TelegramError as exc:
            reason = self._describe(exc)
            logger.error("Telegram bot failed to start: %s", reason)
            raise NotifyError(f"Telegram bot failed to start: {reason}") from None
        logger.info(
            "Telegram bot @%s started for %d chats", self._bot.username, len(self._chat_ids)
        )

    async def stop(self) -> None:
        await self._bot.shutdown()
        logger.info("Telegram bot stopped")

    async def send(self, message: Message) -> None:
        """Send `message` to every chat; raise NotifyError naming the chats that failed.

        A failure in one chat does not stop delivery to the others.
        """
        chunks = render_chunks(message)
        markup = _reply_markup(message.buttons)
        budget = _RetryBudget()
        failures: dict[int, str] = {}
        for chat_id in self._chat_ids:
            try:
                await self._send_to_chat(chat_id, chunks, markup, budget)
            except NotifyError as exc:
                failures[chat_id] = str(exc)
        if failures:
            reasons = "; ".join(failures.values())
            raise NotifyError(
                f"Telegram message {message.title!r} not delivered to chats "
                f"{list(failures)}: {reasons}"
            )

    async def _send_to_chat(
        self,
        chat_id: int,
        chunks: list[str],
        markup: InlineKeyboardMarkup | None,
        budget: _RetryBudget,
    ) -> None:
        # Buttons go under the last chunk, after the whole text.
        for index, chunk in enumerate(chunks):
            last = index == len(chunks) - 1
            await self._send_chunk(chat_id, chunk, markup if last else None, budget)

    async def _send_chunk(
        self,
        chat_id: int,
        text: str,
        markup: InlineKeyboardMarkup | None,
        budget: _RetryBudget,
    ) -> None:
        from telegram import LinkPreviewOptions
        from telegram.error import RetryAfter, TelegramError

        try:
            await self._bot.send_message(
                chat_id,
                text,
                parse_mode="HTML",
                reply_markup=markup,
                link_preview_options=LinkPreviewOptions(is_disabled=True),
            )
        except RetryAfter as exc:
            await self._wait_for_flood_control(chat_id, exc, budget)
            await self._send_chunk(chat_id, text, markup, budget)
        except TelegramError as exc:
            reason = self._describe(exc)
            logger.error("Telegram sendMessage to chat %s failed: %s", chat_id, reason)
            raise NotifyError(f"Telegram sendMessage to chat {chat_id} failed: {reason}") from None

    async def _wait_for_flood_control(
        self, chat_id: int, exc: RetryAfter, budget: _RetryBudget
    ) -> None:
        """Sleep for the wait Telegram asked for, or raise NotifyError if not allowed."""
        wait = _retry_after_seconds(exc)
        if budget.spent or wait > self._max_retry_after:
            reason = f"flood control asks to wait {wait:.0f} s"
            if budget.spent:
                reason += " again after one retry"
            logger.error("Telegram sendMessage to chat %s failed: %s", chat_id, reason)
            raise NotifyError(f"Telegram sendMessage to chat {chat_id} failed: {reason}")

        budget.spent = True
        logger.warning("Telegram flood control for chat %s: retrying in %.1f s", chat_id, wait)
        await asyncio.sleep(wait)

    def _describe(self, exc: Exception) -> str:
        return redact(f"{type(exc).__name__}: {exc}", [self._token])


def _retry_after_seconds(exc: RetryAfter) -> float:
    from telegram.warnings import PTBDeprecationWarning

    # PTB 22 warns when retry_after is read as an int; it is a timedelta with
    # PTB_TIMEDELTA=true set, and will be one by default in a later version.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PTBDeprecationWarning)
        value = exc.retry_after
    if isinstance(value, timedelta):
        return value.total_seconds()
    return float(value)


def _reply_markup(rows: tuple[tuple[Button, ...], ...]) -> InlineKeyboardMarkup | None:
    from telegram import InlineKeyboardButton, InlineKeyboardMarkup

    if not rows:
        return None
    keyboard = [
        [InlineKeyboardButton(button.text, callback_data=button.callback_data) for button in row]
        for row in rows
    ]
    return InlineKeyboardMarkup(keyboard)
