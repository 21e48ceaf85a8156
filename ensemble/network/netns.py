"""Running things inside a named network namespace (/run/netns/NAME): whole processes
as if on another host, or single sockets and sysctl writes from one thread."""

import contextlib
import ctypes
import os
import re

from ensemble.errors import InvalidName

CLONE_NEWNET = 0x40000000
_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}\Z")

# `nsenter --net` alone leaves /sys showing the caller's interfaces, and LXC looks
# bridges up in /sys/class/net: a process that is to act as another host also needs a
# mount namespace with that network namespace's sysfs. The host's cgroup mounts are
# moved across so that LXC can still place containers.
_SYSFS_SCRIPT = (
    "set -e; t=; "
    "if mountpoint -q /sys/fs/cgroup; then t=$(mktemp -d); mount --rbind /sys/fs/cgroup \"$t\"; fi; "
    "mount -t sysfs sysfs /sys; "
    "if [ -n \"$t\" ]; then mount --move \"$t\" /sys/fs/cgroup; rmdir \"$t\"; fi; "
    "exec \"$@\""
)


def validate_netns_name(name):
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise InvalidName(f"invalid network namespace name {str(name)[:70]!r}")
    return name


def netns_path(name):
    return f"/run/netns/{validate_netns_name(name)}"


def host_argv(name, argv):
    """An argv that runs `argv` in namespace `name` with its own sysfs: to the command,
    the namespace looks like a whole host."""
    return [
        "unshare", "--mount", "--propagation", "slave", "--",
        "nsenter", f"--net={netns_path(name)}", "--",
        "sh", "-c", _SYSFS_SCRIPT, "ensemble-netns", *argv,
    ]


_libc = None


def _setns(fd):
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))


@contextlib.contextmanager
def inside(name):
    """Run the body with this thread in network namespace `name` (None: stay put).
    Sockets made inside keep that namespace; other threads are unaffected."""
    if name is None:
        yield
        return
    target = os.open(netns_path(name), os.O_RDONLY)
    # thread-self, not self: /proc/self/ns/net is the main thread's namespace.
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(target)
        os.close(home)


def set_ip_forwarding(name=None, enabled=True):
    """Set net.ipv4.ip_forward in namespace `name` (None: this thread's own)."""
    with inside(name):
        with open("/proc/sys/net/ipv4/ip_forward", "w") as f:
            f.write("1\n" if enabled else "0\n")


def ip_forwarding(name=None):
    with inside(name):
        with open("/proc/sys/net/ipv4/ip_forward") as f:
            return f.read().strip() == "1"
