"""One reconciler per concern of a machine agent (see ensemble/machine/reconciler.py)."""
