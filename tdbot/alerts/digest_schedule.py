"""Types of the daily digest settings, validated when the configuration loads.

This module imports only pydantic, the standard library and the rule schema, so the
configuration can use it without loading the store.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator

from tdbot.rules.schema import check_time_zone

_CLOCK_TIME = re.compile(r"([01][0-9]|2[0-3]):([0-5][0-9])")


def check_clock_time(value: str) -> str:
    """Accept a time of day as "HH:MM" on the 24-hour clock, such as "08:30"."""
    if not _CLOCK_TIME.fullmatch(value):
        raise ValueError(f"{value!r} is not a time of day; write it as HH:MM, such as '08:30'")
    return value


ClockTime = Annotated[str, AfterValidator(check_clock_time)]
TimeZoneName = Annotated[str, AfterValidator(check_time_zone)]
