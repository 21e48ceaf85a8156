"""One unit on this machine: its container made, started and published; and torn down.

Every step is safe to repeat, so a reconcile after a crash at any point converges.
"""

import itertools
import logging
import os
import time

import netaddr
from twisted.internet import task

from ensemble import hostfs, log_layout
from ensemble import limits as unit_limits
from ensemble.errors import UnsafeFile
from ensemble.machine.container.config import AGENT_LOG
from ensemble.machine.container.driver import OWN_RANGE, ContainerSpec
from ensemble.machine.container.names import container_name, hostname
from ensemble.machine.content import agent_python, ensemble_mounts, unit_files
from ensemble.names import unit_key
from ensemble.connection import AUTH_VARIABLE, READER_VARIABLE
from ensemble.state.auth import unit_credential, units_reader_of
from ensemble.state.unit import UnitStateManager

log = logging.getLogger("ensemble.machine")

STOP_HOOK_TIMEOUT = 60.0
AGENT_LOG_TAIL = 3
AGENT_LOG_BYTES = 8192
# Inside containers: expire quickly, so a dead unit agent shows as down in seconds.
UNIT_SESSION_TIMEOUT = "4"


def unit_log_path(unit_log_dir, unit_name):
    """The host directory holding a unit's log (hook output and its agent's log)."""
    return os.path.join(unit_log_dir, unit_key(unit_name))




def retire_log_dir(unit_log_dir, unit_name, now=None):
    """Move a torn-down unit's log directory among the removed ones (ensemble.log_layout), given to host root (the
    unit's ids are free for another unit, which must find nothing of this one's); an
    empty one is removed. The new path, or None. Blocking: call through a thread."""
    key = unit_key(unit_name)
    if not os.path.lexists(os.path.join(unit_log_dir, key)):
        return None
    hostfs.own_tree(unit_log_dir, key, 0, 0)
    source = os.path.join(unit_log_dir, key)
    if not os.listdir(source):
        os.rmdir(source)
        return None
    removed = os.path.join(unit_log_dir, log_layout.REMOVED)
    os.makedirs(removed, mode=0o700, exist_ok=True)
    now = time.time() if now is None else now
    stamp = time.strftime(log_layout.REMOVED_TIME, time.localtime(now))
    for n in itertools.count():
        target = os.path.join(removed, f"{key}.{stamp}" + (f".{n}" if n else ""))
        # Checked first: a rename onto an empty directory would replace it.
        if not os.path.lexists(target):
            try:
                os.rename(source, target)
            except OSError as e:
                # The removal must not hang on its log (it is host root's now, as
                # before); a later unit of the name would show these lines as its own.
                log.warning("%s: could not move its log to %s (%s): it stays in %s", unit_name, target,
                            e.strerror, source)
                return None
            # The name holds the second; the time of the move to the millisecond, for
            # debug-log to tell this unit's lines from a new one's made in the same
            # second (unit_logs.removal_keys), is its mtime, which nothing changes after.
            os.utime(target, (now, now))
            return target


def agent_log_tail(unit_log_dir, unit_name, lines=AGENT_LOG_TAIL):
    """The last `lines` lines of the unit agent's log in `unit_log_dir`, on one line.
    The unit writes that file (and may put a link, a FIFO or a device in its place):
    read through ensemble.hostfs, a few KiB at most, as it goes into the unit's status."""
    relative = os.path.join(unit_key(unit_name), os.path.basename(AGENT_LOG))
    path = os.path.join(unit_log_dir, relative)
    try:
        data, _ = hostfs.read_tail(unit_log_dir, relative, AGENT_LOG_BYTES)
    except UnsafeFile as e:
        return str(e)
    except OSError:
        return f"no log at {path}"
    tail = [line.strip() for line in data.decode("utf-8", "replace").splitlines() if line.strip()][-lines:]
    return " | ".join(tail) if tail else f"{path} is empty"


class UnitDeployer:
    """Deploys and tears down units' containers for one machine agent."""

    # What a unit gets where its service sets no limit: ensemble.limits.DEFAULTS (None)
    # or a dict of the same keys.
    default_limits = None

    def __init__(self, host, driver, unit_log_dir=None, name_domain=None, apt_proxy=None):
        """`host`: the machine agent's Host. What the host offers its units: its name
        server's search domain (None: no name server) and apt's configuration for its
        package cache (None: no cache)."""
        self.host = host
        self.client = host.client
        self.reactor = host.reactor
        self.driver = driver
        self.unit_log_dir = unit_log_dir
        self.name_domain = name_domain
        self.apt_proxy = apt_proxy

    def container_for(self, unit_name):
        return container_name(self.host.environment["name"], unit_name)

    def spec(self, unit, address, limits):
        """The container `unit` gets: its address, its service's `limits`, its agent."""
        # The service's own limits, and the defaults for what it does not set.
        service_limits = unit_limits.effective(limits, self.default_limits)
        name = self.container_for(unit.name)
        mounts = list(ensemble_mounts())
        if self.unit_log_dir:
            # Each unit its own directory: a shared one would let units read each other's
            # logs. Given to the unit's root once its container has its ids (deploy).
            log_dir = unit_log_path(self.unit_log_dir, unit.name)
            os.makedirs(self.unit_log_dir, exist_ok=True)
            hostfs.own_directory(self.unit_log_dir, unit_key(unit.name), 0, 0, 0o755)
            mounts.append((log_dir, log_layout.INSIDE, False))
        network = netaddr.IPNetwork(self.host.subnet)
        gateway = self.host.gateway
        name_server = gateway if self.name_domain is not None else None
        reader = units_reader_of(self.client)
        return ContainerSpec(
            name=name,
            hostname=hostname(unit.name),
            address=address,
            prefixlen=network.prefixlen,
            gateway=gateway,
            files=unit_files(hostname(unit.name), address, name_server, self.name_domain, self.apt_proxy),
            bridge=self.host.bridge,
            memory=service_limits.get("memory"),
            cpu_weight=service_limits.get("cpu-weight"),
            pids=service_limits.get("pids"),
            disk=service_limits.get("disk"),
            # Its log directory is on its own filesystem too: a unit that logs without
            # end fills its disk, not the host's.
            disk_binds=[log_dir] if self.unit_log_dir else [],
            mtu=self.host.mtu,
            mac=self.host.allocator.mac(unit.name, address),
            idmap=OWN_RANGE,
            mounts=mounts,
            agent_command=[agent_python(), "-m", "ensemble", "unit-agent", "--unit", unit.name],
            # Forked in from the machine's starter, already imported (agent_starter.py).
            agent_forked=True,
            agent_environment={
                "ENSEMBLE_ZOOKEEPER": self.host.unit_zookeeper,
                "ENSEMBLE_SESSION_TIMEOUT": UNIT_SESSION_TIMEOUT,
                "ENSEMBLE_CONNECT_TIMEOUT": "30",
                # Its own credential, derived from this machine's: it may change only its
                # own unit node. (Readable in the container only, by the unit's root.)
                **({AUTH_VARIABLE: str(unit_credential(self.client.credential, unit.name))}
                   if self.client.credential else {}),
                # ...and the units' reader, for what every unit reads.
                **({READER_VARIABLE: str(reader)} if reader else {}),
            },
        )

    async def make(self, unit, address, limits, running=None):
        """Make the unit's container exist, stopped if it was not there; its state
        ('RUNNING', 'STOPPED', ...). Idempotent. `running`: the names known to be
        running now, if the caller asked already."""
        name = self.container_for(unit.name)
        if running is not None and name in running:
            return "RUNNING"
        state = await self.driver.state(name)
        if state is None:
            await self.driver.create(self.spec(unit, address, limits))
            ids = await self.driver.id_range(name)
            if self.unit_log_dir and ids:
                # Written by the unit's root, which is not host root, and by no other
                # unit; what an earlier container of this unit wrote there is its too.
                await self.host.in_thread(hostfs.own_tree, self.unit_log_dir, unit_key(unit.name),
                                          ids.first, ids.first)
            log.info("created %s for %s at %s (host ids %s-%s)", name, unit.name, address,
                     *((ids.first, ids.first + ids.count - 1) if ids else ("-", "-")))
            state = "STOPPED"
        return state

    async def run(self, unit, state):
        """Start the unit's container unless `state` (make()'s) says it runs; publish
        its name. True if it was (re)started now: its agent then waits for
        start_agent(), which the caller owes it once the unit's port is held."""
        name = self.container_for(unit.name)
        started = state != "RUNNING"
        if started:
            await self.driver.start(name, agent=False)
            log.info("started %s", name)
        try:
            if unit.data.get("container") != name:
                await unit.update(container=name)
        except BaseException:
            if started:
                await self.start_agent(unit.name)
            raise
        return started

    async def start_agent(self, unit_name):
        """Let the unit's agent run (after run() started its container)."""
        await self.driver.start_agent(self.container_for(unit_name))

    def agent_log_tail(self, unit_name, lines=AGENT_LOG_TAIL):
        """The last lines of the unit agent's log, on one line, as the host sees it."""
        if not self.unit_log_dir:
            return "its log is not kept on this host"
        return agent_log_tail(self.unit_log_dir, unit_name, lines)

    async def teardown(self, unit_name):
        """Give the unit's stop hook a chance, then destroy its container. Idempotent."""
        name = self.container_for(unit_name)
        if await self.driver.state(name) == "RUNNING":
            await self._wait_for_stop_hook(unit_name)
        await self.driver.destroy(name)
        if self.unit_log_dir:
            # Its log stays for the operator (`debug-log --removed`), out of the way of a
            # later unit of the same name. The container is gone, so what it held is
            # all here now (disk.release kept it).
            kept = await self.host.in_thread(retire_log_dir, self.unit_log_dir, unit_name)
            if kept:
                log.info("kept the log of %s in %s", unit_name, kept)
        log.info("destroyed %s of %s", name, unit_name)

    async def _wait_for_stop_hook(self, unit_name):
        # The unit agent sees the unit dying and runs the stop hook; it reports
        # "stopped". A dead or wedged agent must not hold the removal up for ever.
        units = UnitStateManager(self.client)
        deadline = self.reactor.seconds() + STOP_HOOK_TIMEOUT
        while self.reactor.seconds() < deadline:
            try:
                unit = await units.get_unit(unit_name)
            except Exception:
                return
            if unit.state == "stopped" or not await unit.agent_alive():
                return
            await task.deferLater(self.reactor, 0.2, lambda: None)
        log.warning("%s: stop hook did not report within %gs; destroying anyway", unit_name, STOP_HOOK_TIMEOUT)
