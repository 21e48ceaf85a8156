"""Running a charm's hooks: the environment they get, where their output goes, and
what a failure reports."""

import logging
import os
import time
from collections import deque

from twisted.internet import defer, protocol

from ensemble.errors import EnsembleError
from ensemble.unit.tools.names import TOOLS

HOOK_TIMEOUT = 600.0
TAIL_LINES = 5
# A failed hook's last lines go to the unit node (`error`, `relation-errors`), which a
# quota keeps small (ensemble/state/quota.py): each is cut there; the log has it whole.
TAIL_LINE_CHARS = 400


class HookFailed(EnsembleError):
    def __init__(self, hook, status, tail):
        detail = " | ".join(tail) if tail else "no output"
        super().__init__(f"{hook} hook exited with status {status}: {detail}")
        self.hook = hook
        self.status = status


# The prefix of every variable pyjuju gave hooks; each is also given as ENSEMBLE_*, the
# 2011 name that formulas of that year read (ENSEMBLE_REMOTE_UNIT…).
JUJU = "JUJU_"


def hook_logger(unit_name, log_path):
    """The logger of what hooks log with juju-log: into the unit's log, between the
    hooks' own output (where `ensemble debug-log` shows it), and the agent's."""
    logger = logging.getLogger(f"ensemble.unit.hook.{unit_name}")
    if not any(getattr(h, "baseFilename", None) == os.path.abspath(log_path) for h in logger.handlers):
        handler = logging.FileHandler(log_path, delay=True)
        # Milliseconds, as the hooks' own lines have: debug-log merges them by time.
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)  # juju-log -l DEBUG is the charm's to choose
    return logger


def link_tools(directory, scripts_dir):
    """A directory holding the hook tools alone (links to their console scripts in
    `scripts_dir`), for hooks' PATH: the venv they live in also holds a `python3` that
    must not shadow the container's own (charms' Python hooks import what apt installs)."""
    os.makedirs(directory, exist_ok=True)
    for tool in TOOLS:
        link = os.path.join(directory, tool)
        target = os.path.join(scripts_dir, tool)
        if os.path.islink(link) and os.readlink(link) == target:
            continue
        tmp = link + ".new"
        if os.path.lexists(tmp):
            os.unlink(tmp)
        os.symlink(target, tmp)
        os.replace(tmp, link)
    return directory


def hook_environment(unit_name, charm_dir, home, socket_path, client_id, path_prefix, relation=None):
    """Exactly what a hook may rely on (docs/charms.md): pyjuju's variables, no ZooKeeper
    address and no credential (the hook tools reach the unit agent over `socket_path`).
    `relation`: a RelationHook, for a relation hook."""
    env = {
        "PATH": f"{path_prefix}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": home,
        "LANG": "C.UTF-8",
        # Packages installed by hooks must not stop to ask (debconf): nobody answers.
        "DEBIAN_FRONTEND": "noninteractive",
        "APT_LISTCHANGES_FRONTEND": "none",
        "CHARM_DIR": charm_dir,
        "JUJU_UNIT_NAME": unit_name,
        "JUJU_AGENT_SOCKET": socket_path,
        "JUJU_CLIENT_ID": client_id,
    }
    if relation is not None:
        env.update(
            JUJU_RELATION=relation.relation_name,
            JUJU_RELATION_ID=relation.relation_id,
            JUJU_REMOTE_UNIT=relation.remote_unit,
        )
    env.update({"ENSEMBLE_" + k[len(JUJU):]: v for k, v in env.items() if k.startswith(JUJU)})
    return env


def _cut(line):
    text = line.decode(errors="replace").strip()
    return text if len(text) <= TAIL_LINE_CHARS else text[:TAIL_LINE_CHARS] + "…"


def log_time(now=None):
    """`now` as the agents' logging writes its times (local, to the millisecond), so
    `ensemble debug-log` orders hook output among their lines."""
    now = time.time() if now is None else now
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)) + f",{int(now * 1000) % 1000:03d}"


# A line this long without its end is written as it is: the log, not this process,
# holds what a hook prints.
PARTIAL_LINE_BYTES = 64 << 10


class _HookProcess(protocol.ProcessProtocol):
    def __init__(self, log_file, done, hook=""):
        self.log_file = log_file
        self.tail = deque(maxlen=TAIL_LINES)
        self._partial = b""
        self.done = done
        self._prefix = f" {hook}: ".encode()
        # Per stream: a line is written whole, with the time its first bytes came, so
        # stdout and stderr lines never splice into one.
        self._pending = {1: [b"", None], 2: [b"", None]}

    def connectionMade(self):
        # Nothing to read: a hook (or a package's script) that asks gets EOF, not a wait.
        self.transport.closeStdin()

    def _write(self, fd, data):
        pending = self._pending[fd]
        now = log_time()
        lines = (pending[0] + data).split(b"\n")
        pending[0] = lines.pop()
        out = []
        for line in lines:
            out.append((pending[1] or now).encode() + self._prefix + line + b"\n")
            pending[1] = None
        if pending[0] and pending[1] is None:
            pending[1] = now
        if len(pending[0]) >= PARTIAL_LINE_BYTES:
            out.append(pending[1].encode() + self._prefix + pending[0] + b"\n")
            pending[0], pending[1] = b"", None
        if out:
            self.log_file.write(b"".join(out))
            self.log_file.flush()

    def _flush(self):
        for fd, (partial, _) in self._pending.items():
            if partial:
                self._write(fd, b"\n")

    def childDataReceived(self, fd, data):
        self._write(fd if fd in self._pending else 2, data)
        # The tail as it always was: both streams, one partial line between them.
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            if line.strip():
                self.tail.append(_cut(line))

    def processEnded(self, reason):
        self._flush()
        if self._partial.strip():
            self.tail.append(_cut(self._partial))
        self.done.callback(reason.value.exitCode if reason.value.exitCode is not None else -1)


def hook_path(charm_dir, hook):
    return os.path.join(charm_dir, "hooks", hook)


async def run_hook(reactor, hook, charm_dir, env, log_path, timeout=HOOK_TIMEOUT):
    """Run hooks/<hook> with `env` in the charm directory, appending its output to
    `log_path`; raise HookFailed with its exit status and last lines unless it exits 0.
    The caller has checked that the hook exists (a missing hook is success)."""
    path = hook_path(charm_dir, hook)
    with open(log_path, "ab") as log_file:
        # Every line has its time (as the agents' logs have): debug-log merges by it.
        log_file.write(f"--- {log_time()} {hook} hook\n".encode())
        log_file.flush()
        if not os.access(path, os.X_OK):
            log_file.write(f"{log_time()} {hook}: {path} is not executable\n".encode())
            raise HookFailed(hook, 126, [f"hooks/{hook} is not executable"])
        done = defer.Deferred()
        process = _HookProcess(log_file, done, hook)
        transport = _spawn_in(reactor, charm_dir, process, path, env)
        timer = reactor.callLater(timeout, _kill, transport)
        status = await done
        if timer.active():
            timer.cancel()
        else:
            process.tail.append(f"killed after {timeout:g}s")
        log_file.write(f"--- {log_time()} {hook} hook exited with status {status}\n".encode())
    if status != 0:
        raise HookFailed(hook, status, list(process.tail))


def _spawn_in(reactor, directory, process, path, env):
    """spawnProcess of `path` in `directory`, with posix_spawn: Twisted forks instead
    for a child given a directory of its own (`path=`), and a fork copies the agent's
    page tables and runs Python in the child before the exec (5-10 ms a hook, against
    ~1). So the child inherits it: the agent's own for the moment of the spawn."""
    here = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.chdir(directory)
        try:
            return reactor.spawnProcess(process, path, [path], env=env)
        finally:
            os.fchdir(here)
    finally:
        os.close(here)


def _kill(transport):
    try:
        transport.signalProcess("KILL")
    except Exception:
        pass
