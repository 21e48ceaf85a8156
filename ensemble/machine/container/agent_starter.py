"""The agent starter: one process per driver that has imported the unit agent once and
starts it in each container that has just started by forking into it with liblxc's
attach (the container's namespaces, cgroup, seccomp policy and capability bounding
set, as `lxc-attach` enters them), instead of a new interpreter importing it all again
inside: ~200 ms of CPU on every deploy's path, and memory every unit held a copy of.

    python -m ensemble.machine.container.agent_starter

Requests on stdin, one JSON object a line, answered in order on stdout:

    {"id", "op": "hold", "lock"}        take the container's agent lock before it starts
    {"id", "op": "attach", "container", "lxc_path", "lock"}
                                        fork its agent in; the lock passes to that agent,
                                        which makes itself ready, then waits for "go"
    {"id", "op": "go", "lock"}          let that agent run (the unit's port is held)
    {"id", "op": "release", "lock"}     let the lock go (the start failed)

answered {"id"} ("attach": with "pid", the agent's host pid, and "load_ms" and
"attach_ms", what liblxc took) or {"id", "error"} ("busy" too: the lock is held by an
agent of the container, forked in or runsv's). The lock is
what the container's runsv script waits on (config.agent_run_script): an agent started
here holds it while it runs, and runsv starts one the usual way once it has ended. Its
stdin closed, or its stdout (the machine agent killed with a request under way), the
starter lets every waiting agent go and exits once they have all ended. A forked agent
waits on a pipe whose other end only the starter holds: "go" closes it, and so does
the starter's end, however it comes.

What the fork carries into a unit is this process's memory: imported modules and the
requests' container names and paths, nothing secret. The agent's credential is read
inside, from the container's own file (config.AGENT_SPEC, 0600, its root's).
"""

import ctypes
import fcntl
import gc
import importlib
import json
import os
import selectors
import signal
import sys
import time
import traceback

import setproctitle

from ensemble.cli import run as run_cli
from ensemble.cli.main import build_parser
from ensemble.machine.container import config as lxc_config

import lxc  # Debian's python3-lxc, linked into the venv by scripts/install

# What a unit agent imports before it reports, imported once here for every agent; the
# reactor only as a module: installed, it would be one epoll instance all agents shared.
PRELOADED = (
    "kazoo.client", "kazoo.handlers.threading", "yaml",
    "twisted.internet.defer", "twisted.internet.epollreactor", "twisted.internet.process",
    "ensemble.cli.agent_commands", "ensemble.unit.agent",
)
for _module in PRELOADED:
    importlib.import_module(_module)
PARSER = build_parser()  # ~4 ms a child would spend, made once

PR_SET_DUMPABLE, PR_CAPBSET_READ, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 4, 23, 47, 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522

libc = ctypes.CDLL(None, use_errno=True)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def _bounding_set():
    caps, cap = 0, 0
    while True:
        present = libc.prctl(PR_CAPBSET_READ, cap, 0, 0, 0)
        if present < 0:  # EINVAL past the kernel's last capability
            return caps
        if present:
            caps |= 1 << cap
        cap += 1


def _keep_only_bounding_set():
    """Permitted and effective capabilities as an exec would leave them to root in the
    container: the bounding set LXC left (lxc.cap.keep), none inheritable or ambient.
    Without an exec nothing trims them: the fork would keep every capability of the
    container's user namespace, mount and the rest among them."""
    caps = _bounding_set()
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    for i in range(2):
        data[i].effective = data[i].permitted = (caps >> (32 * i)) & 0xFFFFFFFF
        data[i].inheritable = 0
    if libc.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset")
    if libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "clearing ambient capabilities")


def _close_all_but(*keep):
    low = 3
    for fd in sorted(keep):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, 1 << 20)


def _agent(request):
    """In the container: the process made like one runsv would start, then the agent,
    once the starter says go."""
    lock_fd, go_fd = request["lock_fd"], request["go_fd"]
    # The starter's: its wake-up pipe would get this process's signals, into whatever
    # file took that number next.
    signal.set_wakeup_fd(-1)
    # The container's user namespace entered without an exec leaves the process not
    # dumpable: its /proc entries would be host root's, unreadable to the agent itself.
    libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)
    _keep_only_bounding_set()
    # Nothing of the starter's: its pipes, liblxc's log of this container (a host file).
    _close_all_but(lock_fd, go_fd)
    os.setsid()
    os.umask(0o022)
    os.chdir("/")
    for signum in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)
    os.makedirs(os.path.dirname(lxc_config.AGENT_LOG), exist_ok=True)
    log_fd = os.open(lxc_config.AGENT_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    null_fd = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null_fd, 0)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(null_fd)
    os.close(log_fd)
    with open(lxc_config.AGENT_SPEC) as f:
        spec = json.load(f)
    os.environ.clear()
    os.environ.update(spec["environment"])
    argv = spec["argv"]
    setproctitle.setproctitle(" ".join(argv))
    sys.argv = list(argv)
    # runsv's script sends the agent its TERM (a container's stop) by this pid.
    with open(lxc_config.FORKED_AGENT_PID, "w") as f:
        f.write(f"{os.getpid()}\n")

    def wait_for_go():
        # Parsed, logging set up: what is left needs the network, which the unit's
        # port is not yet held for (a first SYN lost there waits 1 s for its retry).
        while os.read(go_fd, 1):
            pass
        os.close(go_fd)

    return run_cli(argv[lxc_config.ENSEMBLE_ARGS:], parser=PARSER, ready=wait_for_go)


def _in_container(request):
    # Run by liblxc's attach in the child; its return is the exit status.
    try:
        status = _agent(request)
    except BaseException:
        traceback.print_exc()
        status = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    return status


class Starter:
    def __init__(self):
        self.held = {}     # lock path -> fd holding it
        self.waiting = {}  # lock path -> the pipe end its forked agent waits on

    def hold(self, request):
        path = request["lock"]
        # The lock is the host's file in the container's directory (root's, 0644): no
        # component of the path is the unit's to replace.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # BlockingIOError: held, by an agent or by this starter already
            os.close(fd)
            raise
        self.held[path] = fd
        return {}

    def release(self, request):
        fd = self.held.pop(request["lock"], None)
        if fd is not None:
            os.close(fd)
        return {}

    def go(self, request):
        fd = self.waiting.pop(request["lock"], None)
        if fd is not None:
            os.close(fd)
        return {}

    def attach(self, request):
        lock = request["lock"]
        if lock not in self.held:
            raise RuntimeError(f"{lock} is not held")
        try:
            began = time.monotonic()
            container = lxc.Container(request["container"], request["lxc_path"])
            if not container.running:
                raise RuntimeError(f"container {request['container']} is not running")
            loaded = time.monotonic()
            # What the fork shares with the starter stays shared: a collection in the
            # agent would otherwise write to every object's header, copying its page.
            # (The starter's own collections go on as before once it has forked.)
            gc.freeze()
            go_r, go_w = os.pipe2(os.O_CLOEXEC)
            try:
                pid = container.attach(_in_container, {"lock_fd": self.held[lock], "go_fd": go_r},
                                       env_policy=lxc.LXC_ATTACH_CLEAR_ENV)
            finally:
                gc.unfreeze()
                os.close(go_r)
            if pid <= 0:
                os.close(go_w)
                raise RuntimeError(f"liblxc could not attach to container {request['container']} "
                                   "(its lxc.log says why)")
            self.go(request)  # an agent of an earlier start of it waits no more
            self.waiting[lock] = go_w
            done = time.monotonic()
            return {"pid": pid, "load_ms": round((loaded - began) * 1000, 1),
                    "attach_ms": round((done - loaded) * 1000, 1)}
        finally:
            self.release(request)


def _reap():
    # The agents are this process's children (liblxc's attach), and each must be reaped
    # at once: its container's init cannot finish exiting (a stop) while a process of
    # its pid namespace is left. Never while attaching: liblxc waits for its own then.
    # True while some are left.
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return False
        if pid == 0:
            return True


def serve(stdin=0, stdout=1):
    """Answer requests until stdin closes (or stdout does: the machine agent is gone),
    then reap the agents until none is left: an orphan would be reaped by the host's
    init, if at all, and a container whose agent is left a zombie does not stop.
    Single-threaded on purpose: liblxc forks this process, and a thread's lock held at
    that moment would stay held in the unit."""
    starter = Starter()
    ops = {"hold": starter.hold, "attach": starter.attach, "go": starter.go, "release": starter.release}

    def asked_no_more():
        # Every lock let go (runsv's script starts the agent of a start left half
        # done) and every waiting agent let run: nobody is left to say go.
        selector.unregister(stdin)
        for lock in list(starter.held):
            starter.release({"lock": lock})
        for lock in list(starter.waiting):
            starter.go({"lock": lock})

    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    # SA_RESTART: liblxc's own waits and reads during an attach go on through it.
    signal.siginterrupt(signal.SIGCHLD, False)
    selector = selectors.DefaultSelector()
    selector.register(stdin, selectors.EVENT_READ)
    selector.register(wake_r, selectors.EVENT_READ)
    buffer = b""
    while True:
        ready = {key.fd for key, _ in selector.select()}
        if wake_r in ready:
            while True:
                try:
                    if not os.read(wake_r, 4096):
                        break
                except BlockingIOError:
                    break
            if not _reap() and stdin not in selector.get_map():
                return
        if stdin not in ready:
            continue
        data = os.read(stdin, 65536)
        if not data:
            asked_no_more()
            if not _reap():
                return
            continue
        buffer += data
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            request = json.loads(line)
            try:
                answer = ops[request["op"]](request)
            except BlockingIOError:
                # hold: an agent of the container (forked or runsv's) holds the lock.
                answer = {"error": "the agent's lock is held: its agent runs", "busy": True}
            except Exception as e:
                answer = {"error": f"{type(e).__name__}: {e}"}
            answer["id"] = request["id"]
            try:
                # Unbuffered: a buffered answer would be copied into the next fork.
                os.write(stdout, json.dumps(answer).encode() + b"\n")
            except BrokenPipeError:
                # The machine agent was killed with this request under way: what is
                # left of its requests goes unanswered, and the agents here still
                # need reaping (ending here would leave them to the host's init).
                asked_no_more()
                break
        if not _reap() and stdin not in selector.get_map():
            return


if __name__ == "__main__":
    if "twisted.internet.reactor" in sys.modules:
        sys.exit("agent starter: a reactor is installed, and every agent forked would share it")
    # Here, while the environment is there to find: setproctitle takes the argv and
    # environment area it writes titles over; an agent's is cleared by the attach.
    setproctitle.setproctitle(setproctitle.getproctitle())
    serve()
