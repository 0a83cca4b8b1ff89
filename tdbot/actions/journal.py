"""One action's entry in the intent journal, with the API calls made for it."""

from __future__ import annotations

import logging
from typing import Any

from tdbot.store.db import Store
from tdbot.store.tables import ActionState

logger = logging.getLogger("tdbot.actions.journal")


class JournalEntry:
    """Collects the API calls of one action and writes them with each state change.

    A call is noted in memory when it returns and written with the next `mark`, so a
    crash loses at most the calls since the last state change, never the state itself.
    """

    def __init__(self, store: Store, action_id: int) -> None:
        self.store = store
        self.action_id = action_id
        self._calls: list[dict[str, Any]] = []

    def note(self, endpoint: str, vm_id: str | None, outcome: str) -> None:
        """Remember one API call; `outcome` is "ok" or the error, never a secret."""
        self._calls.append(
            {
                "endpoint": endpoint,
                "vm_id": vm_id,
                "outcome": outcome,
                "at": self.store.now().isoformat(),
            }
        )

    async def mark(
        self,
        state: ActionState,
        *,
        error: str | None = None,
        result: dict[str, Any] | None = None,
        vm_id: str | None = None,
    ) -> None:
        """Write the new state and the calls noted since the last mark, and commit."""
        calls, self._calls = self._calls, []
        await self.store.mark_action(
            self.action_id, state, error=error, result=result, api_calls=calls, vm_id=vm_id
        )
        logger.info("action %d: %s%s", self.action_id, state.value, f" ({error})" if error else "")
