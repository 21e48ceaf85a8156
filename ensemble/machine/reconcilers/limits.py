"""What holds this machine's units together, put in place on every pass:

- the parent cgroup of all its units (the driver's, cgroups.py) with the machine's cap
  on memory (with swap) and process ids: the units together cannot take the host's;
- the host's per-user-namespace kernel limits (/proc/sys/user: inotify instances and
  watches, fanotify, namespaces) raised to room for every unit at its own caps (which
  each unit's config sets inside its user namespace) besides host root's own: what the
  units hold is charged to host root too, the creator of their namespaces;
- what units' own filesystems need (loop devices, mkfs.ext4; disk.py).

Until all are in place no unit starts and the machine says why (safeguards.py); a
pass finds what was changed by hand (a cap removed, a sysctl lowered) and puts it back.
"""

import os
import shutil

from ensemble import limits
from ensemble.machine import safeguards
from ensemble.machine.container.cgroups import CgroupError
from ensemble.machine.reconciler import Reconciler

USER_LIMITS = "/proc/sys/user"
TOOLS_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


# In the host's user namespace some of them are also the fs.* sysctls, which root may
# write without CAP_SYS_RESOURCE (/proc/sys/user/* asks for it; a host in a container
# or a sandbox may not have it).
ALIASES = {
    "max_inotify_instances": "/proc/sys/fs/inotify/max_user_instances",
    "max_inotify_watches": "/proc/sys/fs/inotify/max_user_watches",
}


def ensure_user_limits(floors, directory=USER_LIMITS, aliases=None):
    """Each /proc/sys/user/<key> at least its floor (never lowered). Why not, or None."""
    aliases = ALIASES if aliases is None and directory == USER_LIMITS else (aliases or {})
    for key, floor in sorted(floors.items()):
        path = os.path.join(directory, key)
        try:
            with open(path) as f:
                value = int(f.read().split()[0])
            if value < floor:
                with open(aliases.get(key, path), "w") as f:
                    f.write(str(floor))
                with open(path) as f:
                    value = int(f.read().split()[0])
        except FileNotFoundError:
            continue  # a kernel without this limit: nothing to exhaust
        except (OSError, ValueError) as e:
            return f"cannot raise {path} to {floor}: {getattr(e, 'strerror', None) or e}"
        if value < floor:
            return f"{path} is {value}, below the {floor} this machine's units need"
    return None


def disk_problem():
    """Why units' own filesystems cannot be made here (None: they can)."""
    if not os.path.exists("/dev/loop-control"):
        return "no /dev/loop-control: units' disks need loop devices (modprobe loop)"
    if shutil.which("mkfs.ext4", path=TOOLS_PATH) is None:
        return "mkfs.ext4 is missing: units' disks need it (install e2fsprogs)"
    return None


class LimitsReconciler(Reconciler):
    name = "limits"

    def __init__(self, host, driver, caps, user_floors=None, user_limits_dir=USER_LIMITS):
        """`caps`: {memory, pids} of the machine's parent cgroup (limits.machine_caps)."""
        super().__init__(host)
        self.driver = driver
        self.caps = dict(caps)
        self.user_floors = limits.host_user_limits() if user_floors is None else user_floors
        self.user_limits_dir = user_limits_dir
        # Every start puts the caps on the parent too, should it have been made anew.
        driver.cgroup_caps = self.caps
        host.safeguards.require(safeguards.LIMITS)

    def problem(self):
        caps = {k: self.caps.get(k) for k in (limits.MEMORY, limits.PIDS)}
        try:
            self.driver.cgroup.ensure(**caps)
        except CgroupError as e:
            return str(e)
        problem = self.driver.cgroup.problem(**caps)
        if problem:
            return problem
        return ensure_user_limits(self.user_floors, self.user_limits_dir) or disk_problem()

    async def converge(self):
        # A few small files under /sys and /proc: on the reactor's thread, as the other
        # host checks are.
        self.host.safeguards.report(safeguards.LIMITS, self.problem())
