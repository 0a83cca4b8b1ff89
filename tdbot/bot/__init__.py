"""The Telegram bot inside the daemon: chat commands, confirmations and the allowlist."""

from tdbot.bot.app import BotStartError, ChatBot

__all__ = ["BotStartError", "ChatBot"]
