"""Logging set-up that keeps secrets out of every log line.

httpx logs each request URL at INFO, and a Telegram Bot API URL carries the bot token
in its path; exception texts and reprs of library objects can carry it too. A
`RedactingFilter` on the root handlers replaces every configured secret, and every
string shaped like a Telegram bot token, with `***` before a record is formatted.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

REDACTED = "***"

# A bot token is "<bot id>:<secret>": digits, a colon, then 35 letters, digits, "_" or "-".
BOT_TOKEN_PATTERN = r"\d{6,}:[A-Za-z0-9_-]{30,}"  # noqa: S105 (a pattern, not a password)

LOG_FORMAT = "%(asctime)s %(levelname)-8s %(name)s: %(message)s"

# Loggers of libraries that log per request, and the lowest level each may emit.
# httpx and httpcore log every URL (with the bot token) at INFO and DEBUG; PTB logs
# every Bot API call and each long poll at DEBUG.
_QUIET_LOGGERS = {
    "httpx": logging.WARNING,
    "httpcore": logging.WARNING,
    "telegram": logging.INFO,
    "telegram.ext": logging.INFO,
}


def _compile(secrets: Iterable[str]) -> re.Pattern[str]:
    # Longer secrets first, so a secret that contains another is replaced whole.
    literal = sorted({s for s in secrets if s}, key=len, reverse=True)
    alternatives = [re.escape(s) for s in literal] + [BOT_TOKEN_PATTERN]
    return re.compile("|".join(alternatives))


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """Replace each of `secrets` and each bot-token-shaped string in `text` with `***`."""
    return _compile(secrets).sub(REDACTED, text)


class RedactingFilter(logging.Filter):
    """Rewrite a record's message, traceback and stack text with secrets redacted.

    The message is formatted here (args merged into msg) so a secret passed as an
    argument is caught too. The filter never drops a record.
    """

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self._secrets: set[str] = set()
        self._pattern = _compile(())
        self.add_secrets(secrets)

    def add_secrets(self, secrets: Iterable[str]) -> None:
        """Add secrets to the set this filter redacts."""
        self._secrets.update(s for s in secrets if s)
        self._pattern = _compile(self._secrets)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):
            # logging would print the raw msg and args on a formatting error, so the
            # filter formats them itself to redact them.
            message = f"{record.msg} (log arguments did not match: {record.args!r})"
        record.msg = self._pattern.sub(REDACTED, message)
        record.args = None

        # Formatters reuse a cached exc_text and skip formatting exc_info again.
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self._pattern.sub(REDACTED, record.exc_text)
        if record.stack_info:
            record.stack_info = self._pattern.sub(REDACTED, record.stack_info)
        return True


def install_redaction(secrets: Iterable[str]) -> None:
    """Add a `RedactingFilter` for `secrets` to every root handler and quiet request loggers.

    Calling it again adds the new secrets to the filters already installed. A handler
    added to the root logger later needs another call.
    """
    secrets = list(secrets)
    for handler in logging.getLogger().handlers:
        _redacting_filter_of(handler).add_secrets(secrets)
    quiet_request_loggers()


def _redacting_filter_of(handler: logging.Handler) -> RedactingFilter:
    for existing in handler.filters:
        if isinstance(existing, RedactingFilter):
            return existing
    added = RedactingFilter()
    handler.addFilter(added)
    return added


def quiet_request_loggers() -> None:
    """Set the per-request loggers of httpx, httpcore and PTB to at least their quiet level.

    A root level above the quiet level (such as ERROR) is kept for them too, because a
    record that propagates to the root handlers skips the root logger's own level.
    """
    root_level = logging.getLogger().getEffectiveLevel()
    for name, level in _QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(max(level, root_level))


def configure_logging(level: str, secrets: Iterable[str]) -> None:
    """Log to stderr at `level` (such as "INFO") with time, level and logger name, redacted."""
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT, force=True)
    logging.captureWarnings(True)
    install_redaction(secrets)
