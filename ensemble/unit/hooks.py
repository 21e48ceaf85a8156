"""Running a charm's hooks: the environment they get, where their output goes, and
what a failure reports."""

import json
import os
import time
from collections import deque

from twisted.internet import defer, protocol

from ensemble.errors import EnsembleError

HOOK_TIMEOUT = 600.0
TAIL_LINES = 5


class HookFailed(EnsembleError):
    def __init__(self, hook, status, tail):
        detail = " | ".join(tail) if tail else "no output"
        super().__init__(f"{hook} hook exited with status {status}: {detail}")
        self.hook = hook
        self.status = status


def hook_environment(unit_name, private_address, charm_dir, unit_dir, config, zookeeper, path_prefix, auth=None):
    """Exactly what a hook may rely on (docs/charms.md). `auth`: the unit's ZooKeeper
    credential, for the `ensemble` commands hooks run."""
    return {
        **({"ENSEMBLE_AUTH": auth} if auth else {}),
        "PATH": f"{path_prefix}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": unit_dir,
        "LANG": "C.UTF-8",
        # Packages installed by hooks must not stop to ask (debconf): nobody answers.
        "DEBIAN_FRONTEND": "noninteractive",
        "APT_LISTCHANGES_FRONTEND": "none",
        "CHARM_DIR": charm_dir,
        "ENSEMBLE_UNIT_NAME": unit_name,
        "ENSEMBLE_PRIVATE_ADDRESS": private_address or "",
        "ENSEMBLE_UNIT_DIR": unit_dir,
        "ENSEMBLE_CONFIG": json.dumps(config, sort_keys=True),
        "ENSEMBLE_ZOOKEEPER": zookeeper,
    }


class _HookProcess(protocol.ProcessProtocol):
    def __init__(self, log_file, done):
        self.log_file = log_file
        self.tail = deque(maxlen=TAIL_LINES)
        self._partial = b""
        self.done = done

    def connectionMade(self):
        # Nothing to read: a hook (or a package's script) that asks gets EOF, not a wait.
        self.transport.closeStdin()

    def outReceived(self, data):
        self.log_file.write(data)
        self.log_file.flush()
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            if line.strip():
                self.tail.append(line.decode(errors="replace").strip())

    errReceived = outReceived

    def processEnded(self, reason):
        if self._partial.strip():
            self.tail.append(self._partial.decode(errors="replace").strip())
        self.done.callback(reason.value.exitCode if reason.value.exitCode is not None else -1)


async def run_hook(reactor, hook, charm_dir, env, log_path, timeout=HOOK_TIMEOUT):
    """Run hooks/<hook> with `env`, appending its output to `log_path`; raise HookFailed
    with its exit status and last lines unless it exits 0."""
    path = os.path.join(charm_dir, "hooks", hook)
    with open(log_path, "ab") as log_file:
        log_file.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {hook} hook\n".encode())
        log_file.flush()
        if not os.access(path, os.X_OK):
            log_file.write(f"{path} is missing or not executable\n".encode())
            raise HookFailed(hook, 127, [f"hooks/{hook} is missing or not executable"])
        done = defer.Deferred()
        process = _HookProcess(log_file, done)
        transport = reactor.spawnProcess(process, path, [path], env=env, path=charm_dir)
        timer = reactor.callLater(timeout, _kill, transport)
        status = await done
        if timer.active():
            timer.cancel()
        else:
            process.tail.append(f"killed after {timeout:g}s")
        log_file.write(f"--- {hook} hook exited with status {status}\n".encode())
    if status != 0:
        raise HookFailed(hook, status, list(process.tail))


def _kill(transport):
    try:
        transport.signalProcess("KILL")
    except Exception:
        pass
