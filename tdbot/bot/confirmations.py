"""Confirmation questions: a stored row and a message with Confirm and Cancel buttons.

The buttons carry `c:<id>:y` and `c:<id>:n` as callback data, where <id> is a short
random id of the stored row. The data names the row and contains no secret. Pressing a
button only works for an allowed user, once, and before the row expires.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from tdbot.bot.views import moment
from tdbot.notify.base import Button, Message
from tdbot.rules.schema import format_duration
from tdbot.store.db import Store
from tdbot.store.tables import ConfirmationRecord

CALLBACK_PREFIX = "c"
# 6 random bytes give 8 URL-safe characters, 48 bits: guessing an open id is hopeless,
# and the callback data stays far below Telegram's 64 bytes.
ID_BYTES = 6
_CALLBACK_PATTERN = re.compile(r"c:([A-Za-z0-9_-]{1,16}):([yn])")


class Answer(StrEnum):
    CONFIRM = "y"
    CANCEL = "n"


@dataclass(frozen=True)
class Question:
    """A confirmation question: the action, its subject, and the text shown to the user.

    `title` says exactly what will happen and what it costs per hour; `lines` add the
    consequences. `params` is what the action needs later, and what it expects to
    find then, such as the VM's status when the question was asked.
    """

    action: str
    subject: str
    title: str
    lines: tuple[str, ...] = ()
    params: dict[str, Any] = field(default_factory=dict)


def parse_callback(data: str) -> tuple[str, Answer] | None:
    """Return (confirmation id, answer) of a confirmation button's data, or None."""
    match = _CALLBACK_PATTERN.fullmatch(data)
    if match is None:
        return None
    return match.group(1), Answer(match.group(2))


def is_confirmation_callback(data: str) -> bool:
    return data.startswith(f"{CALLBACK_PREFIX}:")


class Confirmations:
    """Create confirmation rows and render them as messages with buttons."""

    def __init__(self, store: Store, ttl: timedelta) -> None:
        self._store = store
        self.ttl = ttl

    async def create(
        self,
        question: Question,
        *,
        origin: str,
        now: datetime,
        chat_id: int | None = None,
        user_id: int | None = None,
    ) -> ConfirmationRecord:
        """Store a question that expires after the TTL; None ids let any allowed user answer."""
        record = ConfirmationRecord(
            id=secrets.token_urlsafe(ID_BYTES),
            chat_id=chat_id,
            user_id=user_id,
            origin=origin,
            action=question.action,
            subject=question.subject,
            summary=question.title,
            params={**question.params, "lines": list(question.lines)},
            created_at=now,
            expires_at=now + self.ttl,
        )
        return await self._store.add_confirmation(record)

    def question_message(self, record: ConfirmationRecord) -> Message:
        """Render the question with its consequences, its expiry and the two buttons."""
        lines = (
            *_lines(record),
            f"Confirm within {format_duration(self.ttl)}, by {moment(record.expires_at)}.",
        )
        buttons = (
            (
                Button("Confirm", callback_data(record.id, Answer.CONFIRM)),
                Button("Cancel", callback_data(record.id, Answer.CANCEL)),
            ),
        )
        return Message(title=record.summary, lines=lines, severity="warning", buttons=buttons)


def callback_data(confirmation_id: str, answer: Answer) -> str:
    return f"{CALLBACK_PREFIX}:{confirmation_id}:{answer.value}"


def closed_message(record: ConfirmationRecord, note: str) -> Message:
    """Render the question without buttons, with a note on how it ended."""
    return Message(title=record.summary, lines=(*_lines(record), note))


def _lines(record: ConfirmationRecord) -> tuple[str, ...]:
    return tuple(str(line) for line in record.params.get("lines", []))
