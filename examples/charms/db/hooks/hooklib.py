"""What this charm's hooks share: the hook tools, and running the charm's server.

Each charm ships on its own, so the db and web charms each carry this same file.
The hooks run `python3 -B`, so importing it leaves no __pycache__ in the charm
directory: nothing is written there.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

# Read only: an upgrade of the charm replaces this directory whole, so nothing is kept
# in it (the server's pid file and log go to the state directory the charm is given).
CHARM_DIR = os.environ.get("CHARM_DIR") or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- the hook tools --------------------------------------------------------------------


def _tool(*argv):
    """A hook tool's output; a failed tool fails the hook (the tool said why)."""
    done = subprocess.run(argv, stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        sys.exit(done.returncode)
    return done.stdout


def config():
    return json.loads(_tool("config-get", "--format", "json"))


def private_address():
    return _tool("unit-get", "private-address").strip()


def relation_get(unit=None, relation_id=None):
    """All settings of `unit` (the remote unit by default) in the relation."""
    argv = ["relation-get", "--format", "json"]
    if relation_id:
        argv += ["-r", relation_id]
    argv.append("-")
    if unit:
        argv.append(unit)
    return json.loads(_tool(*argv))


def relation_set(relation_id=None, **settings):
    argv = ["relation-set"]
    if relation_id:
        argv += ["-r", relation_id]
    _tool(*argv, *(f"{key}={value}" for key, value in settings.items()))


def relation_ids(name):
    return json.loads(_tool("relation-ids", "--format", "json", name))


def open_port(port):
    _tool("open-port", f"{port}/tcp")


def close_port(port):
    _tool("close-port", f"{port}/tcp")


def log(message, level="INFO"):
    _tool("juju-log", "-l", level, message)


# -- the server ------------------------------------------------------------------------


class Server:
    """This charm's server.py as a daemon: started detached, its pid file and log in
    `state_dir` (which is its working directory too), found again by its pid file,
    restarted when it should run with other arguments."""

    def __init__(self, args, host, port, state_dir):
        self.script = os.path.join(CHARM_DIR, "server.py")
        self.args = [str(arg) for arg in args]
        # A server bound to every address is probed on loopback.
        self.host = "127.0.0.1" if host in ("", "0.0.0.0") else host
        self.port = int(port)
        self.state_dir = state_dir
        self.pid_file = os.path.join(state_dir, "server.pid")
        self.log_file = os.path.join(state_dir, "server.log")

    def running(self):
        """(pid, its arguments) of our server, or None. The pid must still be our
        script's: pids get recycled. When the pid file here names none, the state
        directory may have been changed under a running server, whose pid file is in the
        old one: it is the process running this unit's server.py (no other unit shares
        the charm directory)."""
        pid = _read_pid(self.pid_file)
        if pid is None or not self._ours(pid):
            pid = next((pid for pid in _pids() if self._ours(pid)), None)
        if pid is None:
            return None
        argv = _cmdline(pid)
        return pid, argv[argv.index(self.script) + 1:]

    def ensure(self, timeout=10.0):
        """Run the server with this object's arguments, restarting it if it runs with
        others; returns once it accepts connections."""
        running = self.running()
        if running and running[1] == self.args:
            return
        if running:
            self.stop()
        self._start(timeout)

    def stop(self, timeout=5.0):
        running = self.running()
        pid_files = [self.pid_file]
        if running:
            # Its pid file is in its working directory, the state directory it started in.
            cwd = _cwd(running[0])
            if cwd:
                pid_files.append(os.path.join(cwd, "server.pid"))
            _kill(running[0], timeout)
            log(f"stopped the server (pid {running[0]})")
        for path in pid_files:
            if path == self.pid_file or (running and _read_pid(path) == running[0]):
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass

    def _ours(self, pid):
        return _alive(pid) and self.script in _cmdline(pid)

    def _start(self, timeout):
        if _accepts(self.host, self.port):
            sys.exit(f"cannot start the server: {self.host}:{self.port} is in use by another process")
        os.makedirs(self.state_dir, exist_ok=True)
        with open(self.log_file, "ab") as out:
            process = subprocess.Popen(
                [sys.executable, "-u", self.script, *self.args],
                cwd=self.state_dir, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        write_atomic(self.pid_file, f"{process.pid}\n")
        deadline = time.monotonic() + timeout
        while not _accepts(self.host, self.port):
            if process.poll() is not None or time.monotonic() > deadline:
                _kill(process.pid, 2.0)
                os.unlink(self.pid_file)
                sys.exit(f"the server did not come up on {self.host}:{self.port}; its log:\n{_tail(self.log_file)}")
            time.sleep(0.05)
        log(f"started the server (pid {process.pid}) on {self.host}:{self.port}")


def argument(args, name):
    """The value of option `name` in a server's arguments (as running() gives them)."""
    return args[args.index(name) + 1] if name in args[:-1] else None


def write_atomic(path, text):
    """Replace `path` whole: a reader never sees half a file."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _accepts(host, port):
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _read_pid(path):
    try:
        with open(path) as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def _pids():
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]


def _cwd(pid):
    try:
        return os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return None


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            # A killed server's zombie lingers until init reaps it.
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return []


def _kill(pid, timeout):
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 2.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if not _alive(pid):
            return


def _tail(path, lines=20):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return "(no log)"
