"""Looking at and stopping processes by pid, safely: a pid is only signalled after
checking that it is still the process we mean (pids get recycled)."""

import os
import signal
import time


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0); it is dead for our purposes. Orphans are
    # reparented to a PID 1 that may reap late (or never, on some machines).
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _proc_list(pid, name):
    try:
        with open(f"/proc/{pid}/{name}", "rb") as f:
            return f.read().split(b"\0")
    except OSError:
        return []


def cmdline(pid):
    """The process's argv as bytes, or [] if it is gone."""
    return _proc_list(pid, "cmdline")


def environ(pid):
    """The process's environment as b'KEY=VALUE' items, or [] if it is gone."""
    return _proc_list(pid, "environ")


def stop(pid, timeout=10.0, marker=None):
    """SIGTERM `pid`, then SIGKILL after `timeout`. With `marker`, only if its command
    line contains it."""
    if not alive(pid):
        return
    if marker is not None and marker.encode() not in b"\0".join(cmdline(pid)):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _reap(pid)
        if not alive(pid):
            return
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    while alive(pid):
        _reap(pid)
        time.sleep(0.02)


def _reap(pid):
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
