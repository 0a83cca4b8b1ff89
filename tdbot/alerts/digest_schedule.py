"""Types of the daily digest settings, validated when the configuration loads.

This module imports only pydantic and the standard library, so the configuration can
use it without loading the store.
"""

from __future__ import annotations

import re
from typing import Annotated
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import AfterValidator

_CLOCK_TIME = re.compile(r"([01][0-9]|2[0-3]):([0-5][0-9])")


def check_clock_time(value: str) -> str:
    """Accept a time of day as "HH:MM" on the 24-hour clock, such as "08:30"."""
    if not _CLOCK_TIME.fullmatch(value):
        raise ValueError(f"{value!r} is not a time of day; write it as HH:MM, such as '08:30'")
    return value


def check_time_zone(value: str) -> str:
    """Accept an IANA time zone name, such as "UTC" or "Europe/Berlin"."""
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f"unknown time zone {value!r}; use an IANA name such as 'UTC' or 'Europe/Berlin'"
        ) from None
    return value


ClockTime = Annotated[str, AfterValidator(check_clock_time)]
TimeZoneName = Annotated[str, AfterValidator(check_time_zone)]
