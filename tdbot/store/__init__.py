"""tdbot's state: SQLModel tables on SQLite by default, or PostgreSQL, behind `Store`."""

from tdbot.store.db import Store
from tdbot.store.tables import ActionKind, ActionRecord, ActionState, AlertRecord, AlertState

__all__ = ["ActionKind", "ActionRecord", "ActionState", "AlertRecord", "AlertState", "Store"]
