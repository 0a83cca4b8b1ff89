"""Fixtures shared across test modules."""

pytest_plugins = ["tests.alerting", "tests.postgres"]
