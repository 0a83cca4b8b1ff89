"""Logging set-up that keeps secrets out of every log line.

httpx logs each request URL at INFO, and a Telegram Bot API URL carries the bot token
in its path; exception texts and reprs of library objects can carry it too. A
`RedactingFilter` on the root handlers replaces every configured secret, and every
string shaped like a Telegram bot token, with `***` before a record is formatted.

Secrets shorter than `MIN_REDACTED_CHARS` are not replaced, because replacing a string
as short as "e" would garble every line and show the secret wherever `***` appears.
`install_redaction` logs a warning when it is given such a secret.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

REDACTED = "***"

# Shortest secret that is redacted; real TensorDock keys and tokens are UUIDs.
MIN_REDACTED_CHARS = 8

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

# APScheduler 3.x logs two INFO lines per job run ("Running job ...", "Job ... executed
# successfully"). Unless the daemon logs at DEBUG, only their warnings and errors are kept.
_SCHEDULER_LOGGERS = ("apscheduler.executors", "apscheduler.scheduler")


def is_redactable(secret: str) -> bool:
    """Return whether `secret` is long enough to be replaced in text without garbling it."""
    return len(secret) >= MIN_REDACTED_CHARS


def _compile(secrets: Iterable[str]) -> re.Pattern[str]:
    # Longer secrets first, so a secret that contains another is replaced whole.
    literal = sorted({s for s in secrets if is_redactable(s)}, key=len, reverse=True)
    alternatives = [re.escape(s) for s in literal] + [BOT_TOKEN_PATTERN]
    return re.compile("|".join(alternatives))


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """Replace each of `secrets` and each bot-token-shaped string in `text` with `***`.

    Secrets shorter than `MIN_REDACTED_CHARS` are left in place.
    """
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
    added to the root logger later needs another call. Secrets too short to redact
    are logged as one warning, without their values.
    """
    secrets = list(secrets)
    for handler in logging.getLogger().handlers:
        _redacting_filter_of(handler).add_secrets(secrets)
    quiet_request_loggers()
    _warn_short_secrets(secrets)


def _warn_short_secrets(secrets: list[str]) -> None:
    short = sum(1 for secret in secrets if secret and not is_redactable(secret))
    if short == 0:
        return
    logging.getLogger("tdbot.logsafe").warning(
        "%d configured secret(s) shorter than %d characters are too short to redact safely, "
        "so log lines may show them; set each TDBOT_ secret variable to a real key or token",
        short,
        MIN_REDACTED_CHARS,
    )


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


def quiet_scheduler_loggers() -> None:
    """Keep APScheduler's per-run INFO lines out of the log unless the root level is DEBUG."""
    root_level = logging.getLogger().getEffectiveLevel()
    level = logging.NOTSET if root_level <= logging.DEBUG else max(logging.WARNING, root_level)
    for name in _SCHEDULER_LOGGERS:
        logging.getLogger(name).setLevel(level)


def configure_logging(level: str, secrets: Iterable[str]) -> None:
    """Log to stderr at `level` (such as "INFO") with time, level and logger name, redacted."""
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT, force=True)
    logging.captureWarnings(True)
    quiet_scheduler_loggers()
    install_redaction(secrets)
