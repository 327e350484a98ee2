"""The package version, in one place (stamped into plans, cards and reports)."""

__version__ = "0.2.0"
