"""Fake servers that tests start on 127.0.0.1 in place of outside services."""
