"""Carrying out decisions through the TensorDock client, under guards and an intent journal."""

from tdbot.actions.executor import ActionExecutor
from tdbot.actions.outcome import ActionOutcome, OutcomeStatus
from tdbot.actions.reconcile import reconcile

__all__ = ["ActionExecutor", "ActionOutcome", "OutcomeStatus", "reconcile"]
