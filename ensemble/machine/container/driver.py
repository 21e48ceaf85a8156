"""LXC containers for units: create (an overlayfs snapshot of the template), start,
stop, destroy, list, exec, state.

Every lxc-* command runs through Twisted's process API; nothing blocks the reactor but
quick file operations. Each driver has its own lxc path (a machine agent's, under its
ENSEMBLE_HOME), so several simulated hosts can share one machine.

With `netns`, the lxc commands run inside that network namespace (the veth's host side
lands there, next to the bridge), and in a mount namespace whose /sys is that network
namespace's: LXC looks bridges up in /sys/class/net, which `nsenter --net` alone leaves
showing the caller's interfaces. One helper process per driver holds that namespace
pair (`close()` ends it; it also dies with the driver's process). Starts that need
mounts of their own (a user namespace's root filesystem, paths its root cannot reach)
go through one stage server per driver (stage.py), started where the lxc commands run.
"""

import dataclasses
import errno
import json
import logging
import math
import os
import re
import select
import signal
import stat
import sys
import time
from typing import Optional, Sequence

import netaddr
from twisted.internet import defer, error, protocol, task, threads

from ensemble import limits
from ensemble.errors import EnsembleError, InvalidName, InvalidValue
from ensemble.machine.container import config as lxc_config
from ensemble.machine.container import cgroups as machine_cgroups, disk as unit_disk
from ensemble.machine.container.names import validate_container_name, validate_hostname, veth_name
from ensemble.network.ipam import valid_mac
from ensemble.machine.container import stage as stage_script
from ensemble.machine.container.id_range_store import HostIdRangeStore
from ensemble.machine.container.id_ranges import IdRange, IdRangeError, require_granted
from ensemble.machine.container.template import remove_tree, shift_owners
from ensemble.network.netns import host_argv, validate_netns_name
from ensemble.searchable import make_searchable, unsearchable

log = logging.getLogger("ensemble.container")

PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CGROUP_DIRS = ("lxc.payload.{}", "lxc.monitor.{}", "lxc.pivot.{}")
CGROUP_WAIT = 5.0  # seconds for LXC's monitor to leave its cgroups after a stop
_IFNAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,15}\Z")


class ContainerError(EnsembleError):
    pass


class ContainerNotFound(ContainerError):
    def __init__(self, name):
        super().__init__(f"container {name} not found")


class ContainerExists(ContainerError):
    def __init__(self, name):
        super().__init__(f"container {name} already exists")


STAGE_FILE = "stage.json"
# Every container's root filesystem and lower layer, in the mount namespace its start
# makes (stage.py): the same mountpoints for all, each namespace seeing its own.
STAGE_ROOTFS, STAGE_LOWER = lxc_config.STAGE_ROOTFS, lxc_config.STAGE_LOWER
# spec.idmap for a range of the container's own from the host's pool: claimed when it
# is created, freed when it is destroyed.
OWN_RANGE = "own"


STAGE_SERVER = [sys.executable, "-I", "-S", stage_script.__file__, "--serve"]
AGENT_STARTER = [sys.executable, "-P", "-m", "ensemble.machine.container.agent_starter"]


def _stage_plan(container):
    """The path of the container's stage plan, checked, or None if it has none."""
    path = os.path.join(container, STAGE_FILE)
    try:
        with open(path) as f:
            plan = json.load(f)
    except FileNotFoundError:
        return None
    if isinstance(plan, list):  # written before plans had a root filesystem
        plan = {"binds": plan, "rootfs": None}
    targets = [target for _, target in plan.get("binds") or ()]
    rootfs = plan.get("rootfs")
    if rootfs:
        if (rootfs.get("target"), rootfs.get("lower_target")) != (STAGE_ROOTFS, STAGE_LOWER):
            raise ContainerError(f"{path}: the root filesystem is not staged at {STAGE_ROOTFS}")
    for target in targets:
        # Only under the stage directory: the file is ours, but a mount is a mount.
        if not os.path.normpath(target).startswith(lxc_config.STAGE_DIR + "/"):
            raise ContainerError(f"{path}: bind target {target!r} is outside {lxc_config.STAGE_DIR}")
    make_searchable(lxc_config.STAGE_DIR, "/run")
    return path


def _require_searchable(path, uid):
    """LXC checks that a user-namespaced container's root can search its lxc path."""
    blocked = unsearchable(path, uid, uid)
    if blocked is not None:
        raise ContainerError(
            f"{blocked} (mode {stat.S_IMODE(os.stat(blocked).st_mode):04o}) cannot be searched by host id "
            f"{uid}, the root of unprivileged containers: keep the lxc path outside such directories"
        )


@dataclasses.dataclass
class ContainerSpec:
    name: str
    hostname: str
    address: str
    prefixlen: int
    gateway: str
    bridge: str
    memory: Optional[int] = None       # bytes (or a size such as "512M")
    cpu_weight: Optional[int] = None   # 1..10000, 100 is the default share
    pids: Optional[int] = None
    # bytes: the unit's own filesystem (disk.py) holds its writable layer and the
    # host directories of `disk_binds` (its log directory); None: the host's.
    disk: Optional[int] = None
    disk_binds: Sequence = ()
    mounts: Sequence = ()              # (host_path, container_path, read_only)
    agent_command: Optional[Sequence[str]] = None
    agent_environment: Optional[dict] = None
    # The agent is `PYTHON -m ensemble ARGS` and is forked into the container at each
    # start by the driver's agent starter (agent_starter.py), already imported; runsv
    # runs agent_command only once that one has ended.
    agent_forked: bool = False
    mtu: Optional[int] = None          # the veth's; None: the kernel's default
    # The container's interface's MAC (ipam.unit_mac: the host's bridge accepts only it
    # from the unit's port); None: one LXC makes up at each start.
    mac: Optional[str] = None
    # OWN_RANGE: root inside is the first id of a range of its own from the host's
    # pool (a user namespace); (first host id, count): that range, given; None: root
    # inside is host root, confined by capabilities and seccomp only.
    idmap: Optional[object] = None
    # {absolute path inside: (text, mode)}: files the container starts with, over the
    # template's (its owners those of root inside).
    files: Optional[dict] = None

    def __post_init__(self):
        validate_container_name(self.name)
        validate_hostname(self.hostname)
        try:
            self.prefixlen = int(self.prefixlen)
            network = netaddr.IPNetwork(f"{self.address}/{self.prefixlen}")
            gateway = netaddr.IPAddress(self.gateway)
        except (netaddr.AddrFormatError, ValueError, TypeError):
            raise InvalidValue(f"invalid address {self.address}/{self.prefixlen} or gateway {self.gateway} "
                               f"for container {self.name}")
        if network.version != 4 or not 1 <= self.prefixlen <= 32 or gateway not in network:
            raise InvalidValue(f"gateway {self.gateway} is not in {self.address}/{self.prefixlen} "
                               f"(container {self.name})")
        self.address, self.gateway = str(network.ip), str(gateway)
        if not isinstance(self.bridge, str) or not _IFNAME_RE.match(self.bridge):
            raise InvalidName(f"invalid bridge name {str(self.bridge)[:20]!r}")
        if self.idmap is not None and self.idmap != OWN_RANGE:
            first, count = (int(v) for v in self.idmap)
            if first < 65536 or not 1 <= count <= 65536:
                raise InvalidValue(f"invalid id map {self.idmap!r}: host ids from 65536 up, at most 65536 of them")
            self.idmap = IdRange(first, count)
        if self.mac is not None:
            mac = valid_mac(self.mac)
            if mac is None:
                raise InvalidValue(f"invalid MAC {str(self.mac)[:20]!r} for container {self.name}: "
                                   "use six hex pairs, unicast")
            self.mac = mac
        if self.mtu is not None and not (isinstance(self.mtu, int) and 576 <= self.mtu <= 65535):
            raise InvalidValue(f"invalid MTU {self.mtu!r} for container {self.name}: use 576 to 65535")
        if self.memory is not None:
            self.memory = limits.parse_memory(self.memory)
        if self.cpu_weight is not None:
            self.cpu_weight = limits.parse_cpu_weight(self.cpu_weight)
        if self.pids is not None:
            self.pids = limits.parse_pids(self.pids)
        if self.disk is not None:
            self.disk = limits.parse_disk(self.disk)
        self.disk_binds = tuple(lxc_config._check_path(b, "a disk bind") for b in self.disk_binds)
        mounts = []
        for mount in self.mounts:
            host_path, container_path, read_only = mount
            lxc_config.mount_entry(host_path, container_path, read_only)  # validates
            mounts.append((host_path, container_path, bool(read_only)))
        self.mounts = tuple(mounts)
        files = {}
        for path, (content, mode) in (self.files or {}).items():
            files[_inside_path(path)] = (str(content), int(mode) & 0o7777)
        self.files = files
        if self.agent_command is not None:
            if isinstance(self.agent_command, str) or not self.agent_command:
                raise InvalidValue("the agent command must be a non-empty list of arguments")
            self.agent_command = [str(a) for a in self.agent_command]
            lxc_config.agent_run_script(self.agent_command, self.agent_environment)  # validates
        if self.agent_forked and (self.agent_command or [])[1:lxc_config.ENSEMBLE_ARGS] != ["-m", "ensemble"]:
            raise InvalidValue("a forked agent's command must be: PYTHON -m ensemble ARGS...")


# -- processes ------------------------------------------------------------------------

class _Command(protocol.ProcessProtocol):
    """Collects a command's output; `done` fires with its exit status once it has
    exited and its pipes are drained. A daemon it left behind holding the pipes open
    (a charm's service started through exec) does not keep us waiting: shortly after
    the command exits, our ends of the pipes are closed."""

    DRAIN = 0.1

    def __init__(self, reactor, input=None):
        self.reactor = reactor
        self.input = input
        self.out, self.err = [], []
        self.code = None
        self.timed_out = False
        self.done = defer.Deferred()
        self._drain = None

    def connectionMade(self):
        if self.input:
            self.transport.write(self.input)
        self.transport.closeStdin()

    def outReceived(self, data):
        self.out.append(data)

    def errReceived(self, data):
        self.err.append(data)

    def _status(self, reason):
        code = reason.value.exitCode
        return code if code is not None else 128 + (reason.value.signal or 0)

    def processExited(self, reason):
        self.code = self._status(reason)
        self._drain = self.reactor.callLater(self.DRAIN, self._finish)

    def processEnded(self, reason):
        if self.code is None:
            self.code = self._status(reason)
        self._finish()

    def _finish(self):
        if self._drain is not None and self._drain.active():
            self._drain.cancel()
        if self.done.called:
            return
        self.transport.loseConnection()
        self.done.callback(self.code)


def _reason(stderr, default):
    """One line from an lxc tool's stderr: the first error it reports."""
    lines = [l.strip() for l in stderr.decode("utf-8", "replace").splitlines() if l.strip()]
    for line in lines:
        # "lxc-start: NAME: ../src/lxc/file.c: function: 123 What went wrong"
        match = re.match(r"lxc-[a-z]+: [^:]+: [^:]+: [^:]+: \d+ (.*)", line)
        if match:
            return match.group(1)
    return lines[0] if lines else default


def _log_reason(path, offset):
    """The first error LXC logged after `offset`, without its source location."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            text = f.read(1 << 20).decode("utf-8", "replace")
    except OSError:
        return None
    for line in text.splitlines():
        # "lxc-start NAME 2026... ERROR    network - ../src/lxc/network.c:fn:711 - [errno text - ]What"
        match = re.search(r" ERROR\s+\S+ - \S+:\d+ - (.*)", line)
        if match:
            return match.group(1).rsplit(" - ", 1)[-1].strip()
    return None


class _NetnsHelper(protocol.ProcessProtocol):
    """A sleeping process in network namespace `netns` and in a mount namespace with
    that network namespace's sysfs (and the host's cgroup mounts)."""

    def __init__(self, netns):
        self.netns = netns
        self.ready = defer.Deferred()
        self.ended = defer.Deferred()
        self.pid = None
        self.alive = False
        self.err = b""

    def argv(self):
        return [
            "setpriv", "--pdeathsig", "KILL", "--",
            *host_argv(self.netns, ["sh", "-c", "echo ready; exec sleep infinity"]),
        ]

    def connectionMade(self):
        self.pid = self.transport.pid
        self.alive = True
        self.transport.closeStdin()

    def outReceived(self, data):
        if not self.ready.called and b"ready" in data:
            self.ready.callback(self.pid)

    def errReceived(self, data):
        self.err += data

    def processEnded(self, reason):
        self.alive = False
        if not self.ready.called:
            message = self.err.decode("utf-8", "replace").strip().splitlines()
            self.ready.errback(ContainerError(
                f"cannot enter network namespace {self.netns}: {message[-1] if message else reason.value}"
            ))
        self.ended.callback(None)

    def prefix(self):
        return ["nsenter", f"--net=/proc/{self.pid}/ns/net", f"--mount=/proc/{self.pid}/ns/mnt", "--"]

    def same_netns(self):
        try:
            target = os.stat(f"/run/netns/{self.netns}")
            mine = os.stat(f"/proc/{self.pid}/ns/net")
        except OSError:
            return False
        return (target.st_dev, target.st_ino) == (mine.st_dev, mine.st_ino)


class _JsonLinesHelper(protocol.ProcessProtocol):
    """A helper process of one driver that answers JSON-line requests, each answer
    naming its request's "id". `prefix`: where it was started (the driver's namespaces)."""

    name = "helper"

    def __init__(self, prefix):
        self.prefix = prefix
        self.alive = False
        self.waiting = {}  # request id -> Deferred of its answer
        self.next_id = 0
        self.buffer = b""
        self.err = b""

    def connectionMade(self):
        self.alive = True

    def outReceived(self, data):
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        for line in lines:
            answer = json.loads(line)
            waiter = self.waiting.pop(answer["id"], None)
            if waiter is not None:
                waiter.callback(answer)

    def errReceived(self, data):
        self.err = (self.err + data)[-4096:]

    def processEnded(self, reason):
        self.alive = False
        waiting, self.waiting = self.waiting, {}
        why = _reason(self.err, str(reason.value))
        for waiter in waiting.values():
            waiter.errback(ContainerError(f"the {self.name} ended: {why}"))

    def request(self, **request):
        """Deferred of the answer to `request`."""
        self.next_id += 1
        waiter = self.waiting[self.next_id] = defer.Deferred()
        self.transport.write(json.dumps({"id": self.next_id, **request}).encode() + b"\n")
        return waiter

    def end(self):
        # Its stdin closed, it exits; what it started runs on.
        if self.alive:
            self.transport.closeStdin()


class _Stager(_JsonLinesHelper):
    """stage.py --serve: runs a command in a mount namespace of its own holding what a
    plan mounts (see stage.py), a fork per run instead of an interpreter's start."""

    name = "stage helper"

    def run(self, plan_path, argv, timeout):
        """Deferred (exit status, output, timed out) of `argv` run staged by the plan."""
        answer = self.request(plan=plan_path, argv=list(argv), timeout=timeout)
        return answer.addCallback(lambda a: (a["code"], a["output"].encode(), a["timed_out"]))


class _AgentStarter(_JsonLinesHelper):
    """agent_starter.py: forks the already imported unit agent into started containers."""

    name = "agent starter"


# -- the driver -----------------------------------------------------------------------

class LXCDriver:
    def __init__(self, lxc_path, template, netns=None, reactor=None, id_ranges=None):
        """`id_ranges`: where containers with OWN_RANGE claim their ids (default:
        the host's store, shared by every environment on the host)."""
        # Resolved: LXC names a container's command socket after the lxc path as given,
        # so every command must name the same one, whatever link the caller went through.
        self.lxc_path = os.path.realpath(lxc_path)
        self.template = template
        self.netns = None if netns is None else validate_netns_name(netns)
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.id_ranges = id_ranges or HostIdRangeStore()
        self._helper = None
        self._helper_starting = None
        self._stager = None
        self._starter = None
        self._agents_waiting = {}  # container -> (its starter, its lock, the attach answer): start_agent() owed
        self._creating = set()  # containers create() is making now: a directory without config is theirs
        # Every container of this lxc path (this machine) has its cgroups below this
        # one; the limits reconciler sets `cgroup_caps` ({memory, pids}), which each
        # start puts back on it if it was made anew (cgroups.py).
        self.cgroup = machine_cgroups.MachineCgroup(machine_cgroups.parent_name(self.lxc_path), lxc_path=self.lxc_path)
        self.cgroup_caps = {}

    def __repr__(self):
        return f"LXCDriver({self.lxc_path!r}, netns={self.netns!r})"

    # -- paths ------------------------------------------------------------------------

    def container_dir(self, name):
        return os.path.join(self.lxc_path, validate_container_name(name))

    def config_path(self, name):
        return os.path.join(self.container_dir(name), "config")

    def log_path(self, name):
        return os.path.join(self.container_dir(name), "lxc.log")

    def rootfs_delta(self, name):
        return os.path.join(self.container_dir(name), "overlay", "delta")

    def cgroup_dirs(self, name):
        """This container's cgroup directories on the host (existing or not): below
        this machine's parent cgroup, and where containers made before there was one
        had them."""
        validate_container_name(name)
        return [
            os.path.join(h.base, parent, pattern.format(name))
            for h in lxc_config.host_cgroups().hierarchies
            for parent in (self.cgroup.name, "")
            for pattern in CGROUP_DIRS
        ]

    def payload_cgroup(self, name, controller):
        """The host directory of the container's cgroup for `controller`, or None."""
        h = lxc_config.host_cgroups().hierarchy(controller)
        if h is None:
            return None
        payload = f"lxc.payload.{validate_container_name(name)}"
        nested = os.path.join(h.base, self.cgroup.name, payload)
        legacy = os.path.join(h.base, payload)
        return legacy if not os.path.isdir(nested) and os.path.isdir(legacy) else nested

    # -- running commands -------------------------------------------------------------

    async def command_prefix(self):
        """The argv prefix that runs a command where this driver's lxc commands run
        (in its netns and that netns's sysfs); [] without a netns."""
        return list(await self._prefix())

    async def _prefix(self):
        if self.netns is None:
            return []
        helper = self._helper
        if helper is None or not helper.alive or not helper.same_netns():
            helper = await self._ensure_helper()
        return helper.prefix()

    async def _ensure_helper(self):
        """Start the namespace helper once, however many callers ask at the same time."""
        if self._helper_starting is not None:
            waiter = defer.Deferred()
            self._helper_starting.append(waiter)
            return await waiter
        self._helper_starting = waiters = []
        try:
            helper = await self._start_helper()
        except Exception as e:
            self._helper_starting = None
            for waiter in waiters:
                waiter.errback(e)
            raise
        self._helper_starting = None
        for waiter in waiters:
            waiter.callback(helper)
        return helper

    async def _start_helper(self):
        if not os.path.exists(f"/run/netns/{self.netns}"):
            raise ContainerError(f"network namespace {self.netns} does not exist")
        old = self._helper
        if old is not None and old.alive:
            await self._kill_helper(old)
        helper = _NetnsHelper(self.netns)
        argv = helper.argv()
        self.reactor.spawnProcess(helper, argv[0], argv, env={"PATH": PATH})
        timeout = self.reactor.callLater(10, lambda: helper.alive and os.kill(helper.pid, signal.SIGKILL))
        try:
            await helper.ready
        finally:
            if timeout.active():
                timeout.cancel()
        self._helper = helper
        return helper

    async def _kill_helper(self, helper):
        if helper.alive:
            try:
                os.kill(helper.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            await helper.ended

    async def close(self):
        """End the namespace helper (drivers with a netns). Idempotent."""
        if self._helper_starting is not None:
            try:
                await self._ensure_helper()
            except Exception:
                pass
        for helper in (self._stager, self._starter):
            if helper is not None:
                helper.end()
        self._stager = self._starter = None
        if self._helper is not None:
            await self._kill_helper(self._helper)
            self._helper = None
        if not await self.list():
            try:
                self.cgroup.remove()  # only where it is empty
            except machine_cgroups.CgroupError as e:
                log.warning("%s", e)

    async def _run_staged(self, plan_path, argv, timeout):
        """(exit status, output, timed out) of `argv` run staged by the plan at
        `plan_path` (in the netns if any), by this driver's stage server."""
        stager = await self._json_helper("_stager", _Stager, STAGE_SERVER)
        return await stager.run(plan_path, argv, timeout)

    async def _json_helper(self, attribute, kind, argv):
        """The helper this driver keeps in `attribute` if it runs where the lxc commands
        run now, else a new one of `kind` there."""
        prefix = await self._prefix()
        # Read after the wait: starts side by side share the one made first.
        helper = getattr(self, attribute)
        if helper is not None and helper.alive and helper.prefix == prefix:
            return helper
        # Started where the lxc commands run; made anew with the namespace helper.
        if helper is not None:
            helper.end()
        helper = kind(prefix)
        argv = prefix + argv
        try:
            self.reactor.spawnProcess(helper, argv[0], argv, env={"PATH": PATH})
        except OSError as e:
            raise ContainerError(f"cannot run the {helper.name}: {e}")
        setattr(self, attribute, helper)
        return helper

    async def _run(self, argv, input=None, timeout=None):
        """(exit status, stdout, stderr) of an lxc command (in the netns if any)."""
        argv = (await self._prefix()) + list(argv)
        command = _Command(self.reactor, input)
        try:
            self.reactor.spawnProcess(command, argv[0], argv, env={"PATH": PATH})
        except OSError as e:
            raise ContainerError(f"cannot run {argv[0]}: {e}")
        timer = None
        if timeout is not None:
            def expire():
                try:
                    command.transport.signalProcess("KILL")
                except error.ProcessExitedAlready:
                    pass
                command.timed_out = True
            timer = self.reactor.callLater(timeout, expire)
        try:
            await command.done
        finally:
            if timer is not None and timer.active():
                timer.cancel()
        return command.code, b"".join(command.out), b"".join(command.err), command.timed_out

    def _lxc(self, tool, name, *args):
        return [tool, "-n", name, "-P", self.lxc_path, *args]

    def _require(self, name):
        if not os.path.isfile(self.config_path(name)):
            raise ContainerNotFound(name)

    # -- operations -------------------------------------------------------------------

    async def create(self, spec):
        """Clone the template (an overlayfs snapshot: an empty upper directory over
        the template's rootfs; with a user namespace, over the template seen through an
        idmapped mount at start), claim its own id range (OWN_RANGE), make its disk,
        render the config, the stage plan and the service directory. A directory a
        create cut short left (no config: it is written last) is undone first."""
        if not isinstance(spec, ContainerSpec):
            raise TypeError("create() takes a ContainerSpec")
        name = spec.name
        if name in self._creating:
            raise ContainerExists(name)
        self._creating.add(name)
        try:
            return await self._create(spec)
        finally:
            self._creating.discard(name)

    async def _create(self, spec):
        name = spec.name
        container = self.container_dir(name)
        if not self.template.exists():
            raise ContainerError(f"no container template {self.template.name} in {self.template.cache_dir} "
                                 "(ensure() it first)")
        os.makedirs(self.lxc_path, exist_ok=True)
        if os.path.isdir(container) and not os.path.lexists(self.config_path(name)):
            # The agent was killed in the middle of a create (the cleanup below never
            # ran): without this, the unit could never be made again.
            log.warning("container %s: undoing a create that was cut short", name)
            await self.destroy(name)
        try:
            os.mkdir(container, 0o750)
        except FileExistsError:
            raise ContainerExists(name)
        try:
            service = os.path.join(container, lxc_config.SERVICE_DIR)
            os.mkdir(service, 0o755)  # marks the directory as ours for list()/destroy()
            if spec.disk:
                # Before anything is written into the writable layer: it is the image's.
                await self._make_disk(container, spec)
            for relative, (content, mode) in lxc_config.service_files(spec).items():
                path = os.path.join(service, relative)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                _write(path, content, mode)
            os.makedirs(os.path.join(service, "service"), exist_ok=True)
            etc = os.path.join(container, "overlay", "delta", "etc")
            os.makedirs(etc, 0o755)
            os.chmod(os.path.dirname(etc), 0o755)
            # What LXC's own templates do: the file agrees with lxc.uts.name.
            _write(os.path.join(etc, "hostname"), f"{spec.hostname}\n", 0o644)
            for path, (content, mode) in spec.files.items():
                target = os.path.join(container, "overlay", "delta", path.lstrip("/"))
                _make_dirs(os.path.dirname(target), os.path.join(container, "overlay", "delta"))
                _write(target, content, mode)
            plan = {"binds": [], "rootfs": None}
            if spec.idmap:
                ids = spec.idmap
                if ids == OWN_RANGE:
                    ids = await threads.deferToThread(self._claim_ids, container)
                    spec = dataclasses.replace(spec, idmap=ids)
                require_granted(*ids)
                _require_searchable(self.lxc_path, ids.first)
                # Root inside is ids.first on the host: its writable layer and service
                # directory are its own. The container's directory is open to its group
                # alone: another unit's ids cannot reach a file of this one's.
                shift_owners(os.path.join(container, "overlay", "delta"), *ids)
                shift_owners(service, *ids)
                os.chown(container, 0, ids.first)
                os.chmod(container, 0o750)
                # overlayfs's own, used with the mounter's (host root's) credentials.
                os.mkdir(os.path.join(container, "overlay", "work"), 0o700)
                plan["rootfs"] = {
                    "lower": self.template.rootfs, "lower_target": STAGE_LOWER, "target": STAGE_ROOTFS,
                    "upper": os.path.join(container, "overlay", "delta"),
                    "work": os.path.join(container, "overlay", "work"),
                    "first": ids.first, "count": ids.count,
                }
            plan["binds"] = lxc_config.stage_binds(spec, container)
            if plan["binds"] or plan["rootfs"]:
                _write(os.path.join(container, STAGE_FILE), json.dumps(plan), 0o640)
            _write(os.path.join(container, lxc_config.SECCOMP_FILE), lxc_config.SECCOMP_PROFILE, 0o644)
            if spec.agent_forked:
                # Host root's: the starter opens it as host root, by a path none of
                # whose components the unit can replace.
                _write(os.path.join(container, lxc_config.AGENT_LOCK), "", 0o644)
            text = lxc_config.render(spec, container, self.template.rootfs, veth_name(name),
                                     cgroup_parent=self.cgroup.name)
            _write(os.path.join(container, "config.tmp"), text, 0o640)
            os.rename(os.path.join(container, "config.tmp"), os.path.join(container, "config"))
        except BaseException:
            await self._release_disk(container)
            remove_tree(container)
            await threads.deferToThread(self.id_ranges.release, container)
            raise
        log.debug("created container %s in %s", name, self.lxc_path)
        return container

    async def start(self, name, timeout=10, agent=True):
        """Start and wait until RUNNING (lxc-start -d returns once it is); then fork
        its agent in if its spec says so (ContainerSpec.agent_forked). With `agent`
        False, that agent makes itself ready meanwhile and waits, and nothing else of
        the unit's runs, until start_agent(name): the caller has the container's
        network to finish first."""
        self._require(name)
        lock = os.path.join(self.container_dir(name), lxc_config.AGENT_LOCK)
        starter = None
        if os.path.isfile(lock):
            # Held from before the start: runsv's script, which starts with it, waits.
            try:
                starter = await self._json_helper("_starter", _AgentStarter, AGENT_STARTER)
                answer = await starter.request(op="hold", lock=lock)
            except ContainerError as e:
                answer = {"error": str(e)}
            if "error" in answer:
                if answer.get("busy"):
                    log.debug("container %s: its agent runs already", name)
                else:
                    log.warning("container %s: runsv will start its agent (not forked in): %s", name, answer["error"])
                starter = None
        try:
            await self._start(name, timeout)
        except BaseException:
            if starter is not None and starter.alive:
                # Not waited for: a starter that ends meanwhile lets go of it as well.
                starter.request(op="release", lock=lock).addErrback(lambda _: None)
            raise
        if starter is not None:
            # Forked in now, not awaited: it readies itself while the caller holds the
            # unit's port, then waits for start_agent's go.
            attached = starter.request(op="attach", container=name, lxc_path=self.lxc_path, lock=lock)
            self._agents_waiting[name] = (starter, lock, attached)
            if agent:
                await self.start_agent(name)

    async def prepare_agents(self):
        """The agent starter started ahead of the first unit's start, which would wait
        otherwise for its imports (~0.2-0.4 s)."""
        try:
            await self._json_helper("_starter", _AgentStarter, AGENT_STARTER)
        except ContainerError as e:
            log.warning("%s: runsv will start agents (not forked in)", e)

    async def start_agent(self, name):
        """Let run the agent a start(agent=False) forked in; nothing if none waits. If
        it could not be forked in, its lock was let go and runsv's script starts it."""
        starter, lock, attached = self._agents_waiting.pop(name, (None, None, None))
        if starter is None:
            return
        try:
            answer = await attached
        except ContainerError as e:
            answer = {"error": str(e)}
        if "error" in answer:
            log.warning("container %s: cannot fork its agent in, runsv starts it: %s", name, answer["error"])
            return
        log.debug("container %s: agent forked in, host pid %s (config loaded in %s ms, attached in %s ms)",
                  name, answer["pid"], answer.get("load_ms"), answer.get("attach_ms"))
        try:
            await starter.request(op="go", lock=lock)
        except ContainerError as e:
            # The starter's end of the agent's pipe went with it: the agent runs anyway.
            log.warning("container %s: %s", name, e)

    async def _start(self, name, timeout):
        log_path = self.log_path(name)
        try:
            log_offset = os.path.getsize(log_path)
        except OSError:
            log_offset = 0
        await self._prepare_start(name)
        argv = self._lxc("lxc-start", name, "-d")
        plan = _stage_plan(self.container_dir(name))
        if plan:
            code, err, timed_out = await self._run_staged(plan, argv, timeout)
        else:
            code, _, err, timed_out = await self._run(argv, timeout=timeout)
        if timed_out:
            raise ContainerError(f"container {name} did not start within {timeout:g}s (log: {log_path})")
        if code != 0:
            reason = _reason(err, f"lxc-start exited with {code}")
            if "already running" in reason:
                return
            # The daemonised start reports only that it aborted; the cause is in the log.
            reason = _log_reason(log_path, log_offset) or reason
            raise ContainerError(f"cannot start container {name}: {reason} (log: {log_path})")

    async def stop(self, name, timeout=10):
        """Ask PID 1 to stop (SIGTERM: runsv stops the agent and exits), kill
        everything after `timeout` seconds."""
        self._require(name)
        code, _, err, timed_out = await self._run(
            self._lxc("lxc-stop", name, "-t", str(max(0, math.ceil(timeout)))), timeout=timeout + 20
        )
        if timed_out:
            raise ContainerError(f"container {name} did not stop")
        if code == 2 or code == 0:  # 2: it was not running
            return
        reason = _reason(err, f"lxc-stop exited with {code}")
        if "not running" in reason:
            return
        raise ContainerError(f"cannot stop container {name}: {reason} (log: {self.log_path(name)})")

    async def destroy(self, name, timeout=10):
        """Stop if running, remove the container's directory (config, overlay delta,
        service directory, log), its cgroup directories and its host veth. Idempotent."""
        container = self.container_dir(name)
        # Found before the stop, while LXC still reports the container's init.
        monitor = await self._monitor(name)
        try:
            if os.path.exists(os.path.join(container, "config")):
                try:
                    await self.stop(name, timeout)
                except ContainerError as e:
                    log.warning("destroying container %s: %s", name, e)
            if os.path.exists(container):
                if self._running_anyway(name):
                    raise ContainerError(f"cannot destroy container {name}: it is still running")
                await self._release_disk(container)
                await threads.deferToThread(remove_tree, container)
            # Nothing on disk is its any more: its ids are free for another unit.
            await threads.deferToThread(self.id_ranges.release, container)
            await self._remove_cgroups(name, monitor)
        finally:
            monitor.close()
        await threads.deferToThread(_remove_link, veth_name(name), self.netns)
        log.debug("destroyed container %s in %s", name, self.lxc_path)

    # -- the machine's parent cgroup and the unit's own filesystem (cgroups.py, disk.py) --

    async def _make_disk(self, container, spec):
        def make():
            unit_disk.make_image(self.lxc_path, container, spec.disk)
            unit_disk.write_binds(container, spec.disk_binds)
            unit_disk.ensure_mounted(container, spec.disk_binds)
        try:
            await threads.deferToThread(make)
        except (unit_disk.DiskError, OSError) as e:
            raise ContainerError(f"cannot make the disk of container {spec.name}: {e}")
        await self._disk_in_helper(container, "ensure")

    async def _prepare_start(self, name):
        """What a start needs besides LXC: the machine's parent cgroup with its caps
        (LXC would make it without), and the unit's filesystem mounted (after a reboot,
        or where an agent restarted in a mount namespace of its own)."""
        try:
            self.cgroup.ensure(**self.cgroup_caps)
        except machine_cgroups.CgroupError as e:
            raise ContainerError(f"cannot start container {name}: {e}")
        container = self.container_dir(name)
        if os.path.exists(os.path.join(container, unit_disk.IMAGE)):
            try:
                await threads.deferToThread(
                    lambda: unit_disk.ensure_mounted(container, unit_disk.read_binds(container)))
            except (unit_disk.DiskError, OSError) as e:
                raise ContainerError(f"cannot mount the disk of container {name}: {e}")
            await self._disk_in_helper(container, "ensure")

    async def _disk_in_helper(self, container, action):
        """The same in the network namespace helper's mount namespace, where LXC runs
        (this host's root mount is private: mounts made here after the helper started
        do not reach it). Its mounts are read from the host; mount(8) and umount(8),
        run there through one shell, do only what is missing."""
        if self.netns is None:
            return
        await self._prefix()
        helper = self._helper
        if helper is None or not helper.alive:
            return
        mountinfo = f"/proc/{helper.pid}/mountinfo"
        commands = await threads.deferToThread(unit_disk.helper_commands, container, action, mountinfo)
        if not commands:
            return
        code, _, err, _ = await self._run(["/bin/sh", "-c", "set -e; " + "; ".join(commands)], timeout=30)
        if code != 0:
            raise ContainerError(f"cannot {action} the disk of {os.path.basename(container)} in network namespace "
                                 f"{self.netns}: {err.decode(errors='replace').strip()}")

    async def _release_disk(self, container):
        if not os.path.exists(os.path.join(container, unit_disk.IMAGE)):
            return
        try:
            await self._disk_in_helper(container, "release")
        except ContainerError as e:
            log.warning("%s", e)
        await threads.deferToThread(
            lambda: unit_disk.release(container, unit_disk.read_binds(container), keep_binds=True))

    def _claim_ids(self, container):
        # Its directory exists first: what release_orphans frees never has one.
        self.id_ranges.release_orphans(self.lxc_path)
        return self.id_ranges.claim(container)

    async def id_range(self, name):
        """The IdRange the container claimed from the host's pool, or None."""
        return await threads.deferToThread(self.id_ranges.owned_by, self.container_dir(name))

    def _running_anyway(self, name):
        payload = self.payload_cgroup(name, "pids") or self.payload_cgroup(name, "memory")
        try:
            with open(os.path.join(payload, "cgroup.procs")) as f:
                return bool(f.read().strip())
        except (OSError, TypeError):
            return False

    async def _remove_cgroups(self, name, monitor):
        """Remove the container's cgroup directories once LXC's `monitor` for it has
        gone (it moves itself to lxc.pivot.<name> on the way out, so the set of
        directories can change until then)."""
        deadline = time.monotonic() + CGROUP_WAIT
        while True:
            busy = [d for d in self.cgroup_dirs(name) if os.path.isdir(d) and not _rmdir_cgroup(d)]
            if not busy and not monitor.alive():
                if not any(os.path.isdir(d) for d in self.cgroup_dirs(name)):
                    return
                continue
            if time.monotonic() > deadline:
                what = busy[0] if busy else f"LXC's monitor for {name} (pid {monitor.pids()[0]})"
                raise ContainerError(f"cannot remove the cgroups of container {name}: {what} is still busy")
            await task.deferLater(self.reactor, 0.02, lambda: None)

    async def _monitor(self, name):
        """LXC's monitor process for this container (none if it has none), held by
        pidfd. Known by what a unit cannot forge (its processes show in the host's /proc
        under any title they like): the parent of the init pid LXC reports, root in our
        user and pid namespaces. A stopped container's monitor may still be on its way
        out: then processes with its title, with those same credentials."""
        try:
            init = await self.init_pid(name)
        except ContainerError:  # no such container (any more)
            init = None
        if init is not None:
            parent = _parent_pid(init)
            if parent is not None:
                monitor = _Processes([parent])
                # Still init's parent once held: the pidfd is not a recycled pid's.
                if monitor.pids() == [parent] and _parent_pid(init) == parent and _host_root(parent):
                    return monitor
                monitor.close()
        title = f"[lxc monitor] {self.lxc_path} {name}".encode()
        # Credentials first: reading a command line waits on that process's memory.
        return _Processes(pid for pid in _pids() if _host_root(pid) and _title(pid, len(title)) == title)

    async def list(self):
        """Names of this lxc path's containers made by ensemble."""
        try:
            entries = list(os.scandir(self.lxc_path))
        except FileNotFoundError:
            return []
        names = []
        for entry in entries:
            try:
                validate_container_name(entry.name)
            except InvalidName:
                continue
            if entry.is_dir(follow_symlinks=False) and _is_ours(entry.path):
                names.append(entry.name)
        return sorted(names)

    async def running(self):
        """Names of this lxc path's running containers, in one command (not one per
        container): the machine agent asks on every pass."""
        code, out, err, _ = await self._run(["lxc-ls", "-P", self.lxc_path, "--running", "-1"], timeout=30)
        if code != 0:
            raise ContainerError(f"cannot list running containers in {self.lxc_path}: {_reason(err, code)}")
        return set(out.decode().split()) & set(await self.list())

    async def state(self, name):
        """'RUNNING', 'STOPPED', ... or None if there is no such container."""
        if not os.path.isfile(self.config_path(name)):
            return None
        code, out, err, _ = await self._run(self._lxc("lxc-info", name, "-s", "-H"), timeout=30)
        if code != 0:
            if not os.path.isfile(self.config_path(name)):
                return None
            raise ContainerError(f"cannot get the state of container {name}: {_reason(err, code)}")
        return out.decode().strip() or None

    async def init_pid(self, name):
        """The host pid of the container's PID 1, or None if it is not running."""
        self._require(name)
        code, out, _, _ = await self._run(self._lxc("lxc-info", name, "-p", "-H"), timeout=30)
        text = out.decode().strip()
        return int(text) if code == 0 and text.isdigit() else None

    async def exec(self, name, argv, env=None, timeout=None, input=None):
        """Run argv inside (clean environment plus `env`): (exit status, stdout, stderr).
        With `timeout`, the command is killed after that many seconds and
        ContainerError is raised."""
        self._require(name)
        if isinstance(argv, str) or not argv:
            raise ValueError("exec() takes a non-empty list of arguments")
        command = self._attach(name, env)
        inner = [str(a) for a in argv]
        if timeout is not None:
            inner = ["/usr/bin/timeout", "-s", "KILL", f"{timeout:g}"] + inner
        started = time.monotonic()
        code, out, err, timed_out = await self._run(
            command + ["--"] + inner, input=input, timeout=None if timeout is None else timeout + 5
        )
        if timeout is not None and (timed_out or (code == 137 and time.monotonic() - started >= timeout)):
            raise ContainerError(f"{argv[0]} timed out after {timeout:g}s in container {name}")
        if code != 0 and err.startswith(f"lxc-attach: {name}:".encode()):
            reason = _reason(err, "")
            if "init pid" in reason or "not running" in reason:
                raise ContainerError(f"cannot run {argv[0]} in container {name}: it is not running")
        return code, out, err

    async def attach_argv(self, name, argv, env=None):
        """The command line that runs argv inside as exec() does, for a caller that runs
        it itself with its own stdio (lxc-attach gives the container a pty for those that
        are terminals). With a netns it goes through the namespace helper: run it before
        close(), from this process."""
        self._require(name)
        if isinstance(argv, str) or not argv:
            raise ValueError("attach_argv() takes a non-empty list of arguments")
        return (await self._prefix()) + self._attach(name, env) + ["--"] + [str(a) for a in argv]

    def _attach(self, name, env):
        command = self._lxc("lxc-attach", name, "--clear-env")
        for key, value in (env or {}).items():
            if not key or "=" in key:
                raise ValueError(f"invalid environment variable {key!r}")
            command += ["-v", f"{key}={value}"]
        return command


_INSIDE_RE = re.compile(r"/[A-Za-z0-9_.+@/-]+\Z")


def _inside_path(path):
    """A file path inside a container, checked before it becomes a host path."""
    normal = os.path.normpath(str(path))
    if not _INSIDE_RE.match(normal) or normal != path or "/../" in f"{normal}/" or normal == "/":
        raise InvalidValue(f"invalid path inside a container: {str(path)[:60]!r}")
    return normal


def _make_dirs(path, top):
    """mkdir -p below `top` with mode 0755 (what the template's directories have)."""
    if os.path.isdir(path) or path == top:
        return
    _make_dirs(os.path.dirname(path), top)
    os.mkdir(path, 0o755)


def _write(path, content, mode):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(content)
    os.chmod(path, mode)


def _is_ours(path):
    try:
        with open(os.path.join(path, "config")) as f:
            if f.readline().rstrip("\n") == lxc_config.MARKER:
                return True
    except OSError:
        pass
    return os.path.isdir(os.path.join(path, lxc_config.SERVICE_DIR))


class _Processes:
    """Processes held by pidfd, so a pid recycled after one exits is not taken for it."""

    def __init__(self, pids):
        self._fds = {}
        for pid in pids:
            try:
                self._fds[pid] = os.pidfd_open(pid)
            except ProcessLookupError:
                pass

    def pids(self):
        return sorted(self._fds)

    def alive(self):
        """Whether any of them has not exited yet (a pidfd polls readable once it has)."""
        poll = select.poll()
        for fd in self._fds.values():
            poll.register(fd, select.POLLIN)
        return len(poll.poll(0)) < len(self._fds)

    def close(self):
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}


def _pids():
    return [int(e.name) for e in os.scandir("/proc") if e.name.isdigit()]


def _title(pid, size):
    """The first `size` bytes of a process's command line, NULs stripped."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read(size + 1).rstrip(b"\0")
    except OSError:
        return b""


def _parent_pid(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("PPid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _host_root(pid):
    """Whether process `pid` is root in our user namespace and lives in our pid
    namespace: true of LXC's monitor, never of a unit's process (those live in their
    container's pid namespace, and their root is an unprivileged host id)."""
    try:
        for kind in ("pid", "user"):
            theirs, ours = os.stat(f"/proc/{pid}/ns/{kind}"), os.stat(f"/proc/self/ns/{kind}")
            if (theirs.st_dev, theirs.st_ino) != (ours.st_dev, ours.st_ino):
                return False
        with open(f"/proc/{pid}/status") as f:
            # Name (the first line) is the process's to choose, but the kernel escapes
            # newlines in it: a line starting with Uid: is the kernel's.
            for line in f:
                if line.startswith("Uid:"):
                    return line.split()[1:3] == ["0", "0"]
    except (OSError, IndexError):
        pass
    return False


def _rmdir_cgroup(path):
    """Remove a cgroup directory and the cgroups below it; False while busy."""
    try:
        children = [e.path for e in os.scandir(path) if e.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return True
    for child in children:
        if not _rmdir_cgroup(child):
            return False
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        if e.errno == errno.EBUSY:
            return False
        raise ContainerError(f"cannot remove cgroup {path}: {e.strerror}")
    return True


def _remove_link(name, netns):
    """Delete interface `name` (in `netns`) if it is still there."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    if netns is not None and not os.path.exists(f"/run/netns/{netns}"):
        return False
    ipr = IPRoute(netns=netns, flags=0) if netns else IPRoute()
    try:
        found = ipr.link_lookup(ifname=name)
        if not found:
            return False
        try:
            ipr.link("del", index=found[0])
        except NetlinkError as e:
            if e.code != errno.ENODEV:
                raise ContainerError(f"cannot remove veth {name}: {e}")
        return True
    finally:
        ipr.close()
