"""The allowlist of users and group chats that may command the bot."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

logger = logging.getLogger("tdbot.bot.access")

REJECTION_TEXT = "You are not allowed to command this bot."


@dataclass
class Allowlist:
    """The users and group chats allowed to command the bot, and a count of rejections.

    A private chat is accepted when its user is allowed. In a group chat both the chat
    and the sending user must be allowed, so a member added to an allowed group gains
    nothing. An update without a user, such as a channel post, is rejected.
    """

    user_ids: frozenset[int]
    chat_ids: frozenset[int]
    rejected: int = 0

    @classmethod
    def of(cls, user_ids: Iterable[int], chat_ids: Iterable[int]) -> Allowlist:
        return cls(frozenset(user_ids), frozenset(chat_ids))

    def allows(self, user_id: int | None, chat_id: int | None, chat_type: str | None) -> bool:
        """Return whether this user may command the bot in this chat."""
        if user_id is None or user_id not in self.user_ids:
            return False
        if chat_id is None or chat_type == "private":
            return True
        return chat_id in self.chat_ids

    def record_rejection(self, user_id: int | None, chat_id: int | None, what: str) -> None:
        """Count a rejected update and log it with the user and chat ids."""
        self.rejected += 1
        logger.warning(
            "rejected %s from user %s in chat %s: not on the allowlist (%d rejected so far)",
            what,
            user_id,
            chat_id,
            self.rejected,
        )
