"""The unit agent, inside the unit's container: presence, the charm's hooks, and the
unit's state (pending -> installing -> started, or error with the reason; stopping ->
stopped on removal).

It is restarted by the container's supervisor when it dies; charm services keep
running meanwhile. Whether they are still running is told by the container's own
start time: a restarted agent in the same container run does not run hooks again,
one in a restarted container runs `start` again (not `install`).
"""

import logging
import os
import shutil
import sys

from ensemble.agent import BaseAgent
from ensemble.charm import extract_bundle
from ensemble.state.client import ConnectionLost, SessionExpired
from ensemble.state.service import ServiceStateManager
from ensemble.state.unit import DYING, ERROR, INSTALLING, STARTED, UnitStateManager
from ensemble.unit.hooks import HookFailed, hook_environment, run_hook
from ensemble.unit.ports import read_ports

log = logging.getLogger("ensemble.unit")

STOPPED = "stopped"
DEFAULT_UNIT_DIR = "/var/lib/ensemble/unit"
DEFAULT_CHARM_DIR = "/var/lib/ensemble/charm"
DEFAULT_LOG_DIR = "/var/log/ensemble"


def container_run_id():
    """Changes whenever the container (its PID 1) starts again."""
    try:
        with open("/proc/1/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return "unknown"


class UnitAgent(BaseAgent):
    def __init__(self, client, unit_name, reactor=None, unit_dir=None, charm_dir=None, log_dir=None, zookeeper=""):
        super().__init__(client, reactor)
        self.unit_name = unit_name
        self.name = f"unit-{unit_name.replace('/', '-')}"
        self.unit_dir = unit_dir or os.environ.get("ENSEMBLE_UNIT_DIR", DEFAULT_UNIT_DIR)
        self.charm_dir = charm_dir or os.environ.get("ENSEMBLE_CHARM_DIR", DEFAULT_CHARM_DIR)
        self.log_dir = log_dir or os.environ.get("ENSEMBLE_LOG_DIR", DEFAULT_LOG_DIR)
        self.zookeeper = zookeeper
        self.unit = None
        self._watch = None
        self._start_done = False
        self._stop_done = False

    @property
    def log_path(self):
        return os.path.join(self.log_dir, f"{self.unit_name.replace('/', '-')}.log")

    @property
    def _marker(self):
        return os.path.join(self.unit_dir, ".ensemble-state")

    async def register_presence(self, info):
        if self.unit is None:
            self.unit = await UnitStateManager(self.client).get_unit(self.unit_name)
        await self.unit.register_agent(info)

    async def started(self):
        for path in (self.unit_dir, self.log_dir):
            os.makedirs(path, exist_ok=True)
        self._watch = await self.unit.watch(self.unit_changed)

    async def unit_changed(self, data):
        if data is None:
            log.info("%s: unit removed", self.name)
            return
        self.unit.data = data
        # Only two things drive the agent: its own start, and the unit becoming dying.
        # Reacting to every change would mean reacting to its own state writes.
        # (The watch calls one at a time, folding changes made meanwhile into one call.)
        try:
            if data.get("life") == DYING:
                if not self._stop_done:
                    self._stop_done = True
                    await self.stop_unit()
            elif not self._start_done:
                self._start_done = True
                await self.start_unit()
        except (ConnectionLost, SessionExpired) as e:
            # ZooKeeper went away mid-way: try again on the watch's next delivery
            # (after the reconnection); the marker keeps hooks from running twice.
            log.warning("%s: lost ZooKeeper while acting on the unit (%s); will resume", self.name, e)
            self._start_done = self._stop_done = False

    # -- lifecycle ---------------------------------------------------------------------

    def _read_marker(self):
        try:
            with open(self._marker) as f:
                return dict(line.strip().split("=", 1) for line in f if "=" in line)
        except OSError:
            return {}

    def _write_marker(self, **fields):
        state = {**self._read_marker(), **fields}
        tmp = self._marker + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(f"{k}={v}\n" for k, v in sorted(state.items()))
        os.replace(tmp, self._marker)

    async def start_unit(self):
        marker = self._read_marker()
        run_id = container_run_id()
        if marker.get("started-in") == run_id:
            # The hooks ran in this container run; at most the report is missing (the
            # connection dropped before it was written).
            if self.unit.state != STARTED:
                await self.unit.update(state=STARTED, error=None)
            log.info("%s: charm already started in this container run", self.name)
            return
        if marker.get("failed-in") == run_id:
            return  # a failure stays until the unit is removed or the container restarts
        try:
            env = await self._hook_environment()
            if marker.get("installed") != "yes":
                await self.unit.update(state=INSTALLING, error=None)
                await run_hook(self.reactor, "install", self.charm_dir, env, self.log_path)
                self._write_marker(installed="yes")
                # Ports opened at install are in the firewall before the service starts.
                await self._publish_ports()
            await run_hook(self.reactor, "start", self.charm_dir, env, self.log_path)
        except HookFailed as e:
            log.error("%s: %s", self.name, e)
            self._write_marker(**{"failed-in": run_id})
            await self.unit.update(state=ERROR, error=str(e))
            return
        except (ConnectionLost, SessionExpired):
            raise  # not the charm's fault: resumed once ZooKeeper is back
        except Exception as e:
            log.exception("%s: preparing hooks failed", self.name)
            self._write_marker(**{"failed-in": run_id})
            await self.unit.update(state=ERROR, error=f"unit agent: {e}")
            return
        self._write_marker(**{"started-in": run_id})
        await self.unit.update(state=STARTED, error=None, **{"open-ports": read_ports(self.unit_dir)})
        log.info("%s: started", self.name)

    async def _publish_ports(self):
        ports = read_ports(self.unit_dir)
        if ports != (self.unit.data.get("open-ports") or []):
            await self.unit.update(**{"open-ports": ports})

    async def stop_unit(self):
        if self.unit.state == STOPPED:
            return
        await self.unit.update(state="stopping")
        try:
            env = await self._hook_environment()
            await run_hook(self.reactor, "stop", self.charm_dir, env, self.log_path)
        except Exception as e:
            # Removal goes on regardless: the container is destroyed next.
            log.error("%s: %s", self.name, e)
        await self.unit.update(state=STOPPED)
        log.info("%s: stopped", self.name)

    async def _hook_environment(self):
        service = await ServiceStateManager(self.client).get_service(self.unit.service_name)
        await self._ensure_charm(service)
        return hook_environment(
            self.unit_name,
            self.unit.data.get("private-address"),
            self.charm_dir,
            self.unit_dir,
            await service.get_config(),
            self.zookeeper,
            # Where `ensemble` itself is, so hooks can call `ensemble service-addresses`.
            os.path.dirname(sys.executable),
            str(self.client.credential) if self.client.credential else None,
        )

    async def _ensure_charm(self, service):
        stamp = os.path.join(self.charm_dir, ".ensemble-charm")
        try:
            with open(stamp) as f:
                if f.read().strip() == service.charm_id:
                    return
        except OSError:
            pass
        bundle = await service.charm_bundle()
        staging = self.charm_dir + ".new"
        shutil.rmtree(staging, ignore_errors=True)
        extract_bundle(bundle, staging)
        with open(os.path.join(staging, ".ensemble-charm"), "w") as f:
            f.write(service.charm_id + "\n")
        shutil.rmtree(self.charm_dir, ignore_errors=True)
        os.replace(staging, self.charm_dir)

    async def stopping(self):
        if self._watch:
            self._watch.stop()
