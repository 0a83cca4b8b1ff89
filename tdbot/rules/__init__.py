"""Rule files: schema, loading with positions, and validation."""

from tdbot.rules.errors import RuleError
from tdbot.rules.loader import LoadedRule, RuleSet, load_rules, validate_command

__all__ = ["LoadedRule", "RuleError", "RuleSet", "load_rules", "validate_command"]
