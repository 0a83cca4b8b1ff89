"""Injected failures: the next N requests to an endpoint fail in a chosen way."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class FaultMode(StrEnum):
    """The way a faulted request fails, and whether the market still carries it out."""

    # Not carried out: a JSON {"success": false, "error": "Internal Server Error"} with 500.
    HTTP_500 = "http_500"
    # Not carried out: an HTML "502 Bad Gateway" page, as a proxy in front of the API sends.
    HTML_502 = "html_502"
    # Carried out, then sent as 200 with the JSON body cut off in the middle.
    TRUNCATED_JSON = "truncated_json"
    # Carried out after `delay_seconds` of real time, so a client with a shorter timeout
    # gives up while the server still acts, as slow deletes on the real API do.
    DELAY = "delay"
    # Carried out, then the connection closes after the headers without a body.
    DROP_RESPONSE = "drop_response"
    # Carried out, but the client gets the HTML 502 page instead of the result.
    DROP_RESPONSE_502 = "drop_response_502"

    @property
    def carries_out(self) -> bool:
        return self not in (FaultMode.HTTP_500, FaultMode.HTML_502)


ANY_ENDPOINT = "*"


def normalize_endpoint(endpoint: str) -> str:
    """Turn "/api/v0/client/list" or "client/list" into "client/list"."""
    name = endpoint.strip().strip("/")
    return name.removeprefix("api/v0/")


@dataclass
class FaultRule:
    endpoint: str
    mode: FaultMode
    remaining: int
    delay_seconds: float

    def to_json(self) -> dict[str, Any]:
        return {
            "delay_seconds": self.delay_seconds,
            "endpoint": self.endpoint,
            "mode": self.mode.value,
            "remaining": self.remaining,
        }


class FaultPlan:
    """Pending faults, consumed in the order they were added."""

    def __init__(self) -> None:
        self._rules: list[FaultRule] = []

    def add(
        self,
        endpoint: str,
        mode: FaultMode | str,
        count: int = 1,
        *,
        delay_seconds: float = 30.0,
    ) -> FaultRule:
        """Make the next `count` requests to `endpoint` ("*" for any) fail with `mode`."""
        if count < 1:
            raise ValueError(f"fault count must be at least 1, got {count}")
        if delay_seconds < 0:
            raise ValueError(f"fault delay_seconds must be 0 or more, got {delay_seconds}")
        rule = FaultRule(normalize_endpoint(endpoint), FaultMode(mode), count, delay_seconds)
        self._rules.append(rule)
        return rule

    def take(self, endpoint: str) -> FaultRule | None:
        """Consume one use of the first fault that matches `endpoint`, if any."""
        name = normalize_endpoint(endpoint)
        for rule in self._rules:
            if rule.endpoint in (name, ANY_ENDPOINT):
                rule.remaining -= 1
                if rule.remaining == 0:
                    self._rules.remove(rule)
                return rule
        return None

    def clear(self) -> None:
        self._rules.clear()

    def pending(self) -> list[FaultRule]:
        return list(self._rules)
