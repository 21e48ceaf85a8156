"""Where the host's id range claims are kept: one symbolic link per claimed range in a
host directory, named by the range's index in the pool and pointing at its owner (a
container's directory). A link is made with one symlink(2), which fails if the name
exists: two agents, of one environment or of two, never claim one range. Claims live
on the host's disk, so a unit keeps its range across agent and host restarts.

Blocking (small directory reads): callers run these through a thread.
"""

import errno
import os

from ensemble.machine.container.id_ranges import POOL

DEFAULT_DIR = "/var/lib/ensemble/id-ranges"


class HostIdRangeStore:
    def __init__(self, directory=DEFAULT_DIR, pool=POOL):
        self.directory = directory
        self.pool = pool

    def __repr__(self):
        return f"HostIdRangeStore({self.directory!r})"

    def claims(self):
        """{index: owner} of every claim."""
        found = {}
        try:
            entries = list(os.scandir(self.directory))
        except FileNotFoundError:
            return found
        for entry in entries:
            if entry.name.isdigit() and entry.is_symlink():
                try:
                    found[int(entry.name)] = os.readlink(entry.path)
                except FileNotFoundError:
                    continue  # released meanwhile
        return found

    def owned_by(self, owner):
        """The range `owner` holds, or None."""
        for index, holder in self.claims().items():
            if holder == owner:
                return self.pool.range(index)
        return None

    def claim(self, owner):
        """`owner`'s range: the one it holds, else a free one, claimed for it now.
        IdRangesExhausted when the pool has none left."""
        owner = os.path.abspath(owner)
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        while True:
            claims = self.claims()
            for index, holder in claims.items():
                if holder == owner:
                    return self.pool.range(index)
            index = self.pool.choose(claims)
            try:
                os.symlink(owner, os.path.join(self.directory, str(index)))
            except FileExistsError:
                continue  # another agent took it first: look again
            return self.pool.range(index)

    def release(self, owner):
        """Free every range `owner` holds; True if it held one."""
        owner = os.path.abspath(owner)
        released = False
        for index, holder in self.claims().items():
            if holder == owner:
                try:
                    os.unlink(os.path.join(self.directory, str(index)))
                    released = True
                except OSError as e:
                    if e.errno != errno.ENOENT:
                        raise
        return released

    def release_orphans(self, parent):
        """Free claims of owners directly in `parent` that no longer exist: those of
        containers whose removal was cut short. Only the one agent that owns `parent`
        (its lxc path) may call this, so no claim it frees is being made right now."""
        parent = os.path.abspath(parent)
        freed = []
        for index, holder in self.claims().items():
            if os.path.dirname(holder) == parent and not os.path.lexists(holder):
                try:
                    os.unlink(os.path.join(self.directory, str(index)))
                    freed.append(index)
                except FileNotFoundError:
                    pass
        return freed
