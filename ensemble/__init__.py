"""Ensemble unit isolation: every unit of every service in its own LXC container."""

__version__ = "0.1.0"
