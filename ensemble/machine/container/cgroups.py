"""The parent cgroup of one machine's units: every container of a driver (one lxc
path, one machine) has its cgroups below it, in every hierarchy, and its cap (memory
with swap, process ids) holds all of them together, whatever each unit's own limits
add up to.

    <the agent's cgroup>/ensemble-<machine>-<hash>/lxc.payload.<container>
                                                  /lxc.monitor.<container>
                                                  /lxc.pivot.<container>

LXC places a container there (config.render: lxc.cgroup.dir.* under lxc.cgroup.relative)
and makes the directories it lacks; the parent is made here first so that it has its cap
before the first unit starts in it (the driver's start, and the limits reconciler on
every pass). Blocking, but a few small files: callers run it inline.
"""

import errno
import hashlib
import os
import re

from ensemble.machine.container import config as lxc_config

PREFIX = "ensemble-"
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


class CgroupError(Exception):
    pass


def parent_name(lxc_path):
    """The parent cgroup's name for the containers of `lxc_path`: readable, and unique
    per lxc path (several simulated machines share one host)."""
    lxc_path = os.path.realpath(lxc_path)
    base = _UNSAFE.sub("-", os.path.basename(lxc_path)).strip(".-")[:40] or "lxc"
    return f"{PREFIX}{base}-{hashlib.sha256(lxc_path.encode()).hexdigest()[:8]}"


def _read(path):
    with open(path) as f:
        return f.read().strip()


def _write(path, value):
    with open(path, "w") as f:
        f.write(str(value))


class MachineCgroup:
    """One parent cgroup, in every hierarchy of the host (`cgroups`: config.HostCgroups,
    read when first needed)."""

    def __init__(self, name, cgroups=None, lxc_path=None):
        """`lxc_path`: the directory the name is made from (parent_name), made with the
        parent: whoever cleans up that path's containers after a killed agent
        (destroy-environment) then finds it, and removes the parent with it."""
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name.startswith("."):
            raise ValueError(f"invalid cgroup name {name!r}")
        self.name = name
        self._cgroups = cgroups
        self.lxc_path = lxc_path

    @property
    def cgroups(self):
        return self._cgroups or lxc_config.host_cgroups()

    def paths(self):
        """The parent's directory in each hierarchy (existing or not)."""
        return [os.path.join(h.base, self.name) for h in self.cgroups.hierarchies]

    def path(self, controller):
        h = self.cgroups.hierarchy(controller)
        return os.path.join(h.base, self.name) if h else None

    def ensure(self, memory=None, pids=None):
        """The parent in every hierarchy, capped at `memory` bytes (memory and swap
        together) and `pids` (None: no cap of ours). Raises CgroupError."""
        if self.lxc_path is not None:
            try:
                os.makedirs(self.lxc_path, exist_ok=True)
            except OSError as e:
                raise CgroupError(f"cannot make {self.lxc_path}: {e.strerror}")
        cgroups = self.cgroups
        for h in cgroups.hierarchies:
            path = os.path.join(h.base, self.name)
            try:
                os.mkdir(path, 0o755)
            except FileExistsError:
                continue
            except OSError as e:
                raise CgroupError(f"cannot make cgroup {path}: {e.strerror}")
            if h.version == 1 and "cpuset" in h.controllers:
                # A v1 cpuset starts empty, and no task may join it (nor a child of it)
                # until it has CPUs and memory nodes: those of its parent.
                for key in ("cpuset.cpus", "cpuset.mems"):
                    _write(os.path.join(path, key), _read(os.path.join(h.base, key)))
        try:
            if cgroups.version == 1:
                self._cap_v1(memory, pids)
            else:
                self._cap_v2(memory, pids)
        except OSError as e:
            raise CgroupError(f"cannot cap cgroup {self.name}: {e.filename}: {e.strerror}")

    def _cap_v1(self, memory, pids):
        cgroups = self.cgroups
        if memory is not None and cgroups.has("memory"):
            path = self.path("memory")
            limit = os.path.join(path, "memory.limit_in_bytes")
            memsw = os.path.join(path, "memory.memsw.limit_in_bytes")
            if os.path.exists(memsw):
                # memsw may never be below the memory limit: lower the limit first when
                # shrinking, raise memsw first when growing.
                if memory <= int(_read(limit)):
                    _write(limit, memory)
                    _write(memsw, memory)
                else:
                    _write(memsw, memory)
                    _write(limit, memory)
            else:
                _write(limit, memory)
                # No swap accounting on this host: no swapping for these either.
                _write(os.path.join(path, "memory.swappiness"), 0)
        if pids is not None and cgroups.has("pids"):
            _write(os.path.join(self.path("pids"), "pids.max"), pids)

    def _cap_v2(self, memory, pids):
        cgroups = self.cgroups
        h = cgroups.hierarchy("memory")
        if h is None:
            return
        path = os.path.join(h.base, self.name)
        wanted = [c for c in ("memory", "pids", "cpu") if cgroups.has(c)]
        for directory in (h.base, path):
            enabled = set(_read(os.path.join(directory, "cgroup.subtree_control")).split())
            missing = [c for c in wanted if c not in enabled]
            if missing:
                _write(os.path.join(directory, "cgroup.subtree_control"), " ".join(f"+{c}" for c in missing))
        if memory is not None and cgroups.has("memory"):
            _write(os.path.join(path, "memory.max"), memory)
            _write(os.path.join(path, "memory.swap.max"), 0)
        if pids is not None and cgroups.has("pids"):
            _write(os.path.join(path, "pids.max"), pids)

    def problem(self, memory=None, pids=None):
        """Why the parent is not in place with these caps (None: it is)."""
        cgroups = self.cgroups
        if memory is not None and not cgroups.has("memory"):
            return "no memory cgroup controller on this host: the units' memory cannot be capped"
        if pids is not None and not cgroups.has("pids"):
            return "no pids cgroup controller on this host: the units' processes cannot be capped"
        missing = [p for p in self.paths() if not os.path.isdir(p)]
        if missing:
            return f"cgroup {missing[0]} is missing"
        try:
            if memory is not None:
                if cgroups.version == 1:
                    files = ["memory.limit_in_bytes"]
                    if cgroups.memsw:
                        files.append("memory.memsw.limit_in_bytes")
                else:
                    files = ["memory.max"]
                for name in files:
                    value = _read(os.path.join(self.path("memory"), name))
                    if value == "max" or int(value) > memory:
                        return f"{self.path('memory')}/{name} is {value}, not {memory}"
            if pids is not None:
                value = _read(os.path.join(self.path("pids"), "pids.max"))
                if value == "max" or int(value) > pids:
                    return f"{self.path('pids')}/pids.max is {value}, not {pids}"
        except (OSError, ValueError) as e:
            return f"cannot read the caps of cgroup {self.name}: {e}"
        return None

    def remove(self):
        """Remove the parent where nothing is left in it (LXC's leftover pivot
        directories included). True if it is gone everywhere."""
        gone = True
        for path in self.paths():
            try:
                children = [e.path for e in os.scandir(path) if e.is_dir(follow_symlinks=False)]
            except FileNotFoundError:
                continue
            for child in children:
                if os.path.basename(child).startswith("lxc.pivot."):
                    _rmdir(child)
            if not _rmdir(path):
                gone = False
        return gone


def _rmdir(path):
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        if e.errno in (errno.EBUSY, errno.ENOTEMPTY):
            return False
        raise CgroupError(f"cannot remove cgroup {path}: {e.strerror}")
    return True
