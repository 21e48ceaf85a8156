"""What every agent does: hold a ZooKeeper session, show presence, and come back after
the session expires (ephemeral nodes are gone then; watches re-arm on their own)."""

import logging

from twisted.internet import defer, task

from ensemble.state.presence import AgentAlreadyRunning, agent_info

log = logging.getLogger("ensemble.agent")


class BaseAgent:
    name = "agent"
    retry_delay = 1.0

    def __init__(self, client, reactor=None):
        if reactor is None:
            from twisted.internet import reactor
        self.client = client
        self.reactor = reactor
        self.registrations = 0
        self._unsubscribe = None
        self._stopping = False

    @property
    def stop_requested(self):
        return self._stopping

    async def start(self):
        self._unsubscribe = self.client.on_session_event(self._on_session_event)
        await self.register_presence(agent_info())
        self.registrations += 1
        log.info("%s: present (session 0x%x)", self.name, self.client.session_id)
        await self.started()

    async def register_presence(self, info):
        raise NotImplementedError

    async def started(self):
        """Subclasses start their watches here."""

    async def stopping(self):
        """Subclasses stop their watches here."""

    def _on_session_event(self, event):
        if event == "expired":
            log.warning("%s: ZooKeeper session expired; waiting for a new one", self.name)
        elif event == "suspended":
            log.warning("%s: lost the ZooKeeper connection; reconnecting", self.name)
        elif event == "new-session" and not self._stopping:
            defer.ensureDeferred(self._reregister())

    async def _reregister(self):
        while not self._stopping:
            try:
                await self.register_presence(agent_info())
            except AgentAlreadyRunning:
                raise
            except Exception as e:
                log.warning("%s: re-registering failed (%s); retrying", self.name, e)
                await task.deferLater(self.reactor, self.retry_delay, lambda: None)
                continue
            self.registrations += 1
            log.info("%s: present again (new session 0x%x)", self.name, self.client.session_id)
            return

    async def stop(self):
        """Leave cleanly: stop watching and close the session (presence goes with it)."""
        if self._stopping:
            return
        self._stopping = True
        if self._unsubscribe:
            self._unsubscribe()
        await self.stopping()
        await self.client.close()
        log.info("%s: stopped", self.name)
