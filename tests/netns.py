"""Network namespaces made by tests, removed by them."""

import contextlib
import uuid

from pyroute2 import netns


@contextlib.contextmanager
def temporary_netns(prefix="enst"):
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    netns.create(name)
    try:
        yield name
    finally:
        netns.remove(name)
