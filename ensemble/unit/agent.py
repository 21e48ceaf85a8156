"""The unit agent, inside the unit's container: a coordinator over the unit's workers.

- the hook-tool server (ensemble.unit.tools.server) on a unix socket in the unit
  directory: the hooks' only way to the unit's state (the agent holds the only
  ZooKeeper session and credential);
- one HookExecutor that runs every hook of the unit, one at a time;
- the Lifecycle: install, config-changed, start; stop on removal;
- UnitRelations: a HookScheduler per relation, once the unit has started.

It is restarted by the container's supervisor when it dies; charm services keep
running meanwhile, and hooks owed are neither lost nor run twice (see Lifecycle and
HookScheduler).
"""

import logging
import os
import shutil
import sys

from ensemble.agent import BaseAgent
from ensemble.charm import extract_bundle
from ensemble.state.client import ConnectionLost, SessionExpired
from ensemble.state.service import ServiceStateManager
from ensemble.state.unit import DYING, UnitStateManager
from ensemble.unit.executor import HookExecutor
from ensemble.unit.hooks import hook_logger, link_tools
from ensemble.unit.lifecycle import Lifecycle
from ensemble.unit.relations import UnitRelations
from ensemble.unit.state import ZooKeeperHookState
from ensemble.unit.tools.server import HookToolFactory, listen

log = logging.getLogger("ensemble.unit")

DEFAULT_UNIT_DIR = "/var/lib/ensemble/unit"
DEFAULT_CHARM_DIR = "/var/lib/ensemble/charm"
DEFAULT_LOG_DIR = "/var/log/ensemble"
HOOK_SOCKET = ".ensemble.hookcli.sock"  # in the unit directory (pyjuju: .juju.hookcli.sock)
RELATIONS_DIR = "relations"  # in the unit directory: each relation's owed hooks
TOOLS_DIR = ".tools"  # in the unit directory: the hook tools, first on hooks' PATH


class UnitAgent(BaseAgent):
    def __init__(self, client, unit_name, reactor=None, unit_dir=None, charm_dir=None, log_dir=None):
        super().__init__(client, reactor)
        self.unit_name = unit_name
        self.name = f"unit-{unit_name.replace('/', '-')}"
        self.unit_dir = unit_dir or os.environ.get("ENSEMBLE_UNIT_DIR", DEFAULT_UNIT_DIR)
        self.charm_dir = charm_dir or os.environ.get("ENSEMBLE_CHARM_DIR", DEFAULT_CHARM_DIR)
        self.log_dir = log_dir or os.environ.get("ENSEMBLE_LOG_DIR", DEFAULT_LOG_DIR)
        self.unit = None
        self.executor = None
        self.lifecycle = None
        self.relations = None
        self._tools_port = None
        self._watch = None
        self._start_done = False
        self._stop_done = False

    @property
    def log_path(self):
        return os.path.join(self.log_dir, f"{self.unit_name.replace('/', '-')}.log")

    @property
    def socket_path(self):
        return os.path.join(self.unit_dir, HOOK_SOCKET)

    async def register_presence(self, info):
        if self.unit is None:
            self.unit = await UnitStateManager(self.client).get_unit(self.unit_name)
        await self.unit.register_agent(info)

    async def started(self):
        for path in (self.unit_dir, self.log_dir):
            os.makedirs(path, exist_ok=True)
        logger = hook_logger(self.unit_name, self.log_path)
        tools = HookToolFactory(logger)
        self._tools_port = listen(self.reactor, self.socket_path, tools)
        self.relations = UnitRelations(self.client, self.unit, os.path.join(self.unit_dir, RELATIONS_DIR))
        state = ZooKeeperHookState(self.client, self.unit, self.charm_dir, self.relations)
        # The tools' console scripts are in the venv, mounted from the host.
        tools_dir = link_tools(os.path.join(self.unit_dir, TOOLS_DIR), os.path.dirname(sys.executable))
        self.executor = HookExecutor(self.reactor, state, tools, self.socket_path, self.charm_dir, self.unit_dir,
                                     self.log_path, tools_dir, logger)
        self.relations.executor = self.executor
        self.lifecycle = Lifecycle(self.unit, self.executor, self.unit_dir)
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
                    await self.relations.stop()
                    await self.lifecycle.stop()
            elif not self._start_done:
                self._start_done = True
                await self._ensure_charm()
                if await self.lifecycle.start():
                    await self.relations.start()
        except (ConnectionLost, SessionExpired) as e:
            # ZooKeeper went away mid-way: try again on the watch's next delivery
            # (after the reconnection); the marker keeps hooks from running twice.
            log.warning("%s: lost ZooKeeper while acting on the unit (%s); will resume", self.name, e)
            self._start_done = self._stop_done = False

    async def _ensure_charm(self):
        """The service's charm unpacked in the charm directory (once per charm)."""
        service = await ServiceStateManager(self.client).get_service(self.unit.service_name)
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
        if self.relations is not None:
            await self.relations.stop()
        if self._tools_port is not None:
            await self._tools_port.stopListening()
