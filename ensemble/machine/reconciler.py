"""The shape every concern of a machine agent has: started once, synced whenever
ZooKeeper or the agent's resync tick says so, stopped once.

A sync converges what is on the host to what ZooKeeper says, and is safe to repeat.
Syncs of one reconciler never overlap: one asked for while another runs is folded
into a single pass after it, so a burst of watch events costs at most two passes.
"""

import logging

from twisted.internet import defer
from twisted.python.failure import Failure

from ensemble.state.client import count_requests

log = logging.getLogger("ensemble.machine")

SLOW_PASS = 0.25  # seconds: a pass that took longer is logged


class Reconciler:
    name = "reconciler"

    def __init__(self, host):
        self.host = host
        self.stopping = False
        self._running = None      # the pass in progress
        self._waiting = []        # callers waiting for the pass after it

    async def start(self):
        """Set up watches and make the first pass."""
        await self.sync()

    async def converge(self):
        """One pass: make the host match ZooKeeper. Subclasses implement it."""
        raise NotImplementedError

    @property
    def busy(self):
        """True while a pass runs."""
        return self._running is not None

    def sync(self):
        """A Deferred that fires once a pass that began after this call has finished
        (with that pass's failure, if it failed)."""
        if self.stopping:
            return defer.succeed(None)
        waiter = defer.Deferred()
        if self._running is None:
            self._run([waiter])
        else:
            self._waiting.append(waiter)
        return waiter

    def _run(self, waiters):
        counted = []
        self._running = defer.ensureDeferred(self._pass(counted))
        self._running.addBoth(self._finished, waiters, self._now(), counted)

    async def _pass(self, counted):
        # Counted in this pass's own context: other reconcilers' passes and watch
        # callbacks running meanwhile are not this pass's.
        counted.append(count_requests())
        await self.converge()

    def _now(self):
        reactor = getattr(self.host, "reactor", None)
        return reactor.seconds() if reactor is not None else None

    def _finished(self, result, waiters, began=None, counted=()):
        self._running = None
        self._log_pass(began, counted[0][0] if counted else None)
        for waiter in waiters:
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(None)
        queued, self._waiting = self._waiting, []
        if queued:
            if self.stopping:
                for waiter in queued:
                    waiter.callback(None)
            else:
                self._run(queued)
        return None

    def _log_pass(self, began, asked):
        if began is None:
            return
        took = self._now() - began
        name = getattr(self.host, "name", "agent")
        if took >= SLOW_PASS:
            # On a busy host, the figure to watch: a slow pass delays every unit's deploy.
            log.log(logging.WARNING if took >= 1.0 else logging.INFO, "%s: %s pass took %.2fs", name, self.name, took)
        log.debug("%s: %s pass: %.3fs, %s ZooKeeper requests", name, self.name, took, asked)

    async def sync_quietly(self):
        """A sync for a watch's callback: a failed pass is logged, not raised into the
        watch (the next tick tries again); while stopping (the session closing under
        a pass), not even logged."""
        try:
            await self.sync()
        except Exception as e:
            if not self.stopping:
                log.warning("%s: %s pass failed (%s); the next pass tries again",
                            getattr(self.host, "name", "agent"), self.name, e)

    def tick(self):
        """The agent's resync tick: a pass unless one is already running (a busy
        reconciler is already looking)."""
        if self.stopping or self.busy:
            return None
        return self.sync()

    async def stop(self):
        """Stop watching; what runs on the host stays (units survive an agent restart)."""
        self.stopping = True
