"""Helpers for this charm's hooks: the hook environment and running one daemon.

Self-contained on purpose: each charm ships on its own, so nothing is imported
from other charms.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

CHARM_DIR = os.path.abspath(os.environ.get("CHARM_DIR") or os.path.dirname(__file__))


def fail(message):
    print(f"{os.path.basename(sys.argv[0])}: {message}", file=sys.stderr)
    sys.exit(1)


def require(name):
    value = os.environ.get(name)
    if not value:
        fail(f"${name} is not set")
    return value


def unit_name():
    return require("ENSEMBLE_UNIT_NAME")


def private_address():
    return os.environ.get("ENSEMBLE_PRIVATE_ADDRESS") or "0.0.0.0"


def config():
    try:
        value = json.loads(os.environ.get("ENSEMBLE_CONFIG") or "{}")
    except ValueError as e:
        fail(f"$ENSEMBLE_CONFIG is not JSON: {e}")
    if not isinstance(value, dict):
        fail("$ENSEMBLE_CONFIG is not a JSON object")
    return value


def work_dir(sub):
    path = os.path.join(require("ENSEMBLE_UNIT_DIR"), sub)
    os.makedirs(path, exist_ok=True)
    return path


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A killed daemon is reparented to init, which may be slow to reap it.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().decode(errors="replace").split("\0")
    except OSError:
        return []


class Daemon:
    """One server process: `server.py` of this charm, tracked by a pid file in `directory`."""

    def __init__(self, directory):
        self.directory = directory
        self.pid_file = os.path.join(directory, "server.pid")
        self.log_file = os.path.join(directory, "server.log")
        self.script = os.path.join(CHARM_DIR, "server.py")

    def running_pid(self):
        """The recorded pid if it is alive and still our server (pids get recycled)."""
        try:
            with open(self.pid_file) as f:
                pid = int(f.read().strip())
        except (OSError, ValueError):
            return None
        cmdline = _cmdline(pid)
        if pid_alive(pid) and self.script in cmdline and self.directory in cmdline:
            return pid
        return None

    def start(self, args, host, port, timeout=10.0):
        pid = self.running_pid()
        if pid:
            print(f"server already running (pid {pid})")
            return
        probe = "127.0.0.1" if host in ("", "0.0.0.0") else host
        if port_open(probe, port):
            fail(f"port {port} on {probe} is already in use by another process")
        argv = [sys.executable, "-u", self.script, "--data", self.directory, *map(str, args)]
        with open(self.log_file, "ab") as log:
            proc = subprocess.Popen(
                argv,
                # The server needs no ZooKeeper credential: a hook's is for `ensemble`
                # commands, and a compromised server should not inherit it.
                env={k: v for k, v in os.environ.items() if k != "ENSEMBLE_AUTH"},
                cwd=self.directory,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _write_atomic(self.pid_file, f"{proc.pid}\n")
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                self._forget()
                fail(f"server exited with status {proc.returncode}; log:\n{_tail(self.log_file)}")
            if port_open(probe, port):
                print(f"server started (pid {proc.pid}) on {host}:{port}")
                return
            if time.monotonic() > deadline:
                self._kill(proc.pid, 2.0)
                self._forget()
                fail(f"server did not accept connections on {probe}:{port} within {timeout:g}s; "
                     f"log:\n{_tail(self.log_file)}")
            time.sleep(0.05)

    def stop(self, timeout=5.0):
        pid = self.running_pid()
        if pid:
            self._kill(pid, timeout)
            print(f"server stopped (pid {pid})")
        else:
            print("server not running")
        self._forget()

    def _kill(self, pid, timeout):
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 2.0)):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                if not pid_alive(pid):
                    return
                time.sleep(0.05)

    def _forget(self):
        try:
            os.unlink(self.pid_file)
        except FileNotFoundError:
            pass


def open_port(port, proto="tcp"):
    """Let other units connect to PORT (the `open-port` hook tool)."""
    subprocess.run(["open-port", f"{port}/{proto}"], check=True)


def port_open(host, port, timeout=0.5):
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _write_atomic(path, text):
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _tail(path, lines=20):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return "(no log)"
