"""Which host ids a unit runs as: the policy. Where claims are kept is a store's
business (id_range_store.py keeps them in a host directory).

Every unit's root is a different unprivileged host id: ids 0-65535 inside its user
namespace are one range of 65536 host ids, taken from a pool that scripts/install
grants root in /etc/subuid and /etc/subgid (LXC maps ids with newuidmap and
newgidmap, which allow nothing else). One pool per host, shared by every
environment on it, so that no two units on the host ever share an id.

The pool starts at 2^20, clear of the ids distributions hand to users and of the
single range (100000-165535) earlier versions gave every unit; 1024 ranges end below
2^27, far from the 2^31 that some tools take for a sign bit.
"""

import shutil
from typing import NamedTuple

from ensemble.errors import EnsembleError

RANGE_SIZE = 65536
POOL_FIRST = 1 << 20
POOL_RANGES = 1024
SUBID_FILES = ("/etc/subuid", "/etc/subgid")
PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


class IdRangeError(EnsembleError):
    pass


class IdRangesExhausted(IdRangeError):
    def __init__(self, pool):
        super().__init__(f"no free id range on this host: all {pool.ranges} ranges of host ids "
                         f"{pool.first}-{pool.last} are claimed by units")


class IdRange(NamedTuple):
    """Host ids first..first+count-1, seen inside as 0..count-1."""
    first: int
    count: int = RANGE_SIZE


class IdPool(NamedTuple):
    first: int = POOL_FIRST
    ranges: int = POOL_RANGES

    @property
    def size(self):
        return self.ranges * RANGE_SIZE

    @property
    def last(self):
        return self.first + self.size - 1

    def range(self, index):
        if not 0 <= index < self.ranges:
            raise IndexError(f"range {index} is outside the pool of {self.ranges}")
        return IdRange(self.first + index * RANGE_SIZE)

    def index(self, id_range):
        index, rest = divmod(id_range.first - self.first, RANGE_SIZE)
        if rest or not 0 <= index < self.ranges:
            raise ValueError(f"{id_range} is not a range of {self}")
        return index

    def choose(self, claimed):
        """The lowest index not in `claimed`: ranges are re-used, so the pool the
        host grants stays the pool in use."""
        for index in range(self.ranges):
            if index not in claimed:
                return index
        raise IdRangesExhausted(self)

    def subid_line(self):
        return f"root:{self.first}:{self.size}"


POOL = IdPool()


def require_granted(first, count, files=SUBID_FILES):
    """Raise IdRangeError unless root is granted host ids first..first+count-1 in
    each of `files` (and the tools that use them are installed)."""
    for tool in ("newuidmap", "newgidmap"):
        if shutil.which(tool, path=PATH) is None:
            raise IdRangeError(f"{tool} is missing: install the 'uidmap' package (scripts/install does)")
    for path in files:
        try:
            with open(path) as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            lines = []
        granted = False
        for line in lines:
            user, _, rest = line.partition(":")
            start, _, length = rest.partition(":")
            if user in ("root", "0") and start.isdigit() and length.isdigit():
                granted |= int(start) <= first and first + count <= int(start) + int(length)
        if not granted:
            raise IdRangeError(
                f"{path} does not grant root host ids {first}-{first + count - 1}, the ids of "
                f"units' containers: add the line 'root:{first}:{count}' (scripts/install does)"
            )
