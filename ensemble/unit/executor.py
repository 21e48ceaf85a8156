"""The unit's hook executor: every hook of the unit, relation or not, runs here, one at
a time, in the order asked (FIFO), as in pyjuju.

For each hook it serves a fresh CachedHookContext to the hook tools (under a client id
of that hook alone), runs the hook with the hook environment, and commits the relation
settings the hook set only if it exited 0. A hook the charm does not ship is success.
"""

import logging
import os

from twisted.internet import defer

from ensemble.unit.hooks import HookFailed, hook_environment, hook_path, run_hook
from ensemble.unit.tools.context import CachedHookContext

log = logging.getLogger("ensemble.unit")


class HookExecutor:
    def __init__(self, reactor, state, tools, socket_path, charm_dir, home, log_path, path_prefix, logger=None,
                 report=None):
        """`state`: the unit's ZooKeeperHookState (or any HookState with `commit`);
        `tools`: the HookToolFactory serving `socket_path`; `logger`: where juju-log
        goes; `report(hook name, exit status)`: called after every hook that ran."""
        self.reactor = reactor
        self.state = state
        self.tools = tools
        self.socket_path = socket_path
        self.charm_dir = charm_dir
        self.home = home
        self.log_path = log_path
        self.path_prefix = path_prefix
        self.logger = logger
        self.report = report
        self._lock = defer.DeferredLock()  # its waiters are served in order: FIFO

    async def run(self, hook, relation=None):
        """Run `hook` (a name like 'install'), or the RelationHook `relation`; raises
        HookFailed (or the agent's own error) if it did not succeed."""
        name = relation.name if relation is not None else hook
        await self._lock.acquire()
        try:
            await self._run(name, relation)
        finally:
            self._lock.release()

    async def exclusive(self, action):
        """Await `action()` while no hook runs (replacing the charm directory a hook
        runs from, say); returns its result."""
        await self._lock.acquire()
        try:
            return await action()
        finally:
            self._lock.release()

    async def _run(self, name, relation):
        if not os.path.lexists(hook_path(self.charm_dir, name)):
            log.debug("%s: the charm has no %s hook", self.state.unit_name, name)
            return
        context = CachedHookContext(
            self.state, name,
            relation_id=relation.relation_id if relation else None,
            members=relation.members if relation else None,
            broken=relation is not None and relation.kind == "broken",
            logger=self.logger,
        )
        try:
            with self.tools.hook(context) as client_id:
                env = hook_environment(self.state.unit_name, self.charm_dir, self.home, self.socket_path, client_id,
                                       self.path_prefix, relation)
                await run_hook(self.reactor, name, self.charm_dir, env, self.log_path)
        except HookFailed as e:
            self._report(name, e.status)
            raise
        # Past the block the context answers no tool: what it holds is final.
        await self.state.commit(context.changes)
        self._report(name, 0)

    def _report(self, name, status):
        if self.report is not None:
            self.report(name, status)
