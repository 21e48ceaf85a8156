"""The unit agent, inside the unit's container: a coordinator over the unit's workers.

- the hook-tool server (ensemble.unit.tools.server) on a unix socket in the unit
  directory: the hooks' only way to the unit's state (the agent holds the only
  ZooKeeper session and credential);
- one HookExecutor that runs every hook of the unit, one at a time;
- the Lifecycle: install, config-changed, start; config-changed when the service's
  config changes, upgrade-charm when its charm does; stop on removal;
- UnitRelations: a HookScheduler per relation, once the unit has started;
- what `ensemble resolved` asks of both, through fields of the unit node.

It is restarted by the container's supervisor when it dies; charm services keep
running meanwhile, and hooks owed are neither lost nor run twice (see Lifecycle and
HookScheduler).
"""

import logging
import os
import sys

from twisted.internet import defer

from ensemble import log_layout
from ensemble.agent import BaseAgent
from ensemble.errors import MalformedState
from ensemble.names import unit_key
from ensemble.state import nodes
from ensemble.state.client import ConnectionLost, SessionExpired
from ensemble.state.nodes import service_path
from ensemble.state.service import config_path
from ensemble.state.unit import DYING, RELATION_RESOLVED, RESOLVED, UnitStateManager
from ensemble.state.watch import DataWatch
from ensemble.unit.charm_dir import CharmDirectory
from ensemble.unit.executor import HookExecutor
from ensemble.unit.hooks import hook_logger, link_tools
from ensemble.unit.lifecycle import Lifecycle, NotInError
from ensemble.unit.relations import UnitRelations
from ensemble.unit.scheduler import RelationNotInError
from ensemble.unit.state import ZooKeeperHookState
from ensemble.unit.tools.server import HookToolFactory, listen
from ensemble.unit.workload import WorkloadReport

log = logging.getLogger("ensemble.unit")

DEFAULT_UNIT_DIR = "/var/lib/ensemble/unit"
DEFAULT_CHARM_DIR = "/var/lib/ensemble/charm"
DEFAULT_LOG_DIR = log_layout.INSIDE
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
        self._service_watches = []
        self._start_done = False
        self._stop_done = False

    @property
    def log_path(self):
        return os.path.join(self.log_dir, log_layout.hook_log(unit_key(self.unit_name)))

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
        self.workload = WorkloadReport(self.unit)
        self.executor = HookExecutor(self.reactor, state, tools, self.socket_path, self.charm_dir, self.unit_dir,
                                     self.log_path, tools_dir, logger, report=self.workload.hook_ended)
        self.relations.executor = self.executor
        charm = CharmDirectory(self.client, self.unit.service_name, self.charm_dir)
        self.lifecycle = Lifecycle(self.unit, self.executor, self.unit_dir, charm, self.reactor,
                                   on_started=self.relations.start, workload=self.workload)
        self._watch = await self.unit.watch(self.unit_changed)

    async def unit_changed(self, data):
        if data is None:
            log.info("%s: unit removed", self.name)
            return
        self.unit.data = data
        # What drives the agent: its own start, the unit becoming dying, and `resolved`.
        # Its own state writes come here too and change nothing.
        # (The watch calls one at a time, folding changes made meanwhile into one call.)
        try:
            if data.get("life") == DYING:
                if not self._stop_done:
                    self._stop_done = True
                    self._stop_following_service()
                    await self.relations.stop()
                    await self.lifecycle.stop()
                return
            if not self._start_done:
                self._start_done = True
                # Followed first: the queue then knows which config its config-changed is for.
                await self._follow_service()
                await self.lifecycle.start()
            await self._act_on_resolved(data)
            self.lifecycle.resume()
        except (ConnectionLost, SessionExpired) as e:
            # ZooKeeper went away mid-way: try again on the watch's next delivery
            # (after the reconnection); the queue keeps hooks from running twice.
            log.warning("%s: lost ZooKeeper while acting on the unit (%s); will resume", self.name, e)
            self._stop_following_service()
            self._start_done = self._stop_done = False

    async def _follow_service(self):
        """Feed the lifecycle the service's config version and charm as they change."""

        def config(value):
            if value is not None:
                self.lifecycle.config_changed(value[1].version)

        def service(value):
            if value is None:
                return
            try:
                charm_id = nodes.load(value[0], self.unit.service_name).get("charm")
            except MalformedState as e:
                log.error("%s: %s", self.name, e)
                return
            if charm_id:
                self.lifecycle.charm_changed(charm_id)

        self._service_watches = await defer.gatherResults([
            defer.ensureDeferred(DataWatch(self.client, config_path(self.unit.service_name), config).start()),
            defer.ensureDeferred(DataWatch(self.client, service_path(self.unit.service_name), service).start()),
        ], consumeErrors=True)

    def _stop_following_service(self):
        for watch in self._service_watches:
            watch.stop()
        self._service_watches = []

    async def _act_on_resolved(self, data):
        """Do what `ensemble resolved` asked. The request is cleared first: a delivery
        of the unit node made meanwhile (the hook's own state writes) must not act on
        it twice, retrying a hook that failed again."""
        request = data.get(RESOLVED)
        relation_requests = data.get(RELATION_RESOLVED)
        if not request and not relation_requests:
            return
        asked = set(relation_requests) if isinstance(relation_requests, dict) else set()

        def clear(current):
            left = {k: v for k, v in (current.get(RELATION_RESOLVED) or {}).items() if k not in asked}
            return {**{k: v for k, v in current.items() if k not in (RESOLVED, RELATION_RESOLVED)},
                    **({RELATION_RESOLVED: left} if left else {})}

        await self.unit.update_with(clear)
        if isinstance(request, dict):
            try:
                self.lifecycle.resolve(retry=request.get("retry") is True)
            except NotInError:
                log.info("%s: resolved asked, but no hook of the unit is in error", self.name)
        for relation_id in sorted(asked):
            try:
                await self.relations.resolve(relation_id, retry=relation_requests[relation_id] is True)
            except RelationNotInError:
                log.info("%s: resolved asked for %s, which is not in error", self.name, relation_id)

    async def stopping(self):
        if self._watch:
            self._watch.stop()
        self._stop_following_service()
        if self.lifecycle is not None:
            await self.lifecycle.halt()
        if self.relations is not None:
            await self.relations.stop()
        if self._tools_port is not None:
            await self._tools_port.stopListening()
