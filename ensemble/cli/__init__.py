"""The `ensemble` command line (ensemble.cli.main)."""

from ensemble.cli.main import main, run  # noqa: F401
