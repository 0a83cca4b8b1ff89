"""Rule evaluation: pure functions from (rule, market snapshot, stored state, now) to decisions."""

from tdbot.evaluation.burn import burn_rate
from tdbot.evaluation.dispatch import evaluate
from tdbot.evaluation.pricing import Offer, rank_hostnodes

__all__ = ["Offer", "burn_rate", "evaluate", "rank_hostnodes"]
