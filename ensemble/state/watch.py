"""Persistent watches built from ZooKeeper's one-shot ones.

A watch calls `callback(value)` with the current value at start and after every change,
one call at a time: changes that arrive while the callback runs are folded into one
more call with the latest value. A disconnect drops ZooKeeper's watches (kazoo fires
them with a session event); the watch re-arms itself and re-reads once connected again.
"""

import inspect
import logging

from twisted.internet import defer

from ensemble.state.client import ConnectionLost, NoNode, SessionExpired, WatchEvent

log = logging.getLogger("ensemble.watch")


class _Watch:
    def __init__(self, client, path, callback):
        self.client = client
        self.path = path
        self._callback = callback
        self._stopped = False
        self._running = False
        self._pending = None
        self._has_pending = False
        self._armed = False
        self._unsubscribe = client.on_session_event(self._on_session)

    async def start(self):
        await self._refresh()
        return self

    def stop(self):
        self._stopped = True
        self._unsubscribe()

    def _on_session(self, event):
        if event in ("connected", "new-session") and not self._armed and not self._stopped:
            defer.ensureDeferred(self._refresh())

    def _fired(self, event):
        self._armed = False
        if self._stopped:
            return
        if event.type == WatchEvent.SESSION:
            # Re-armed by _on_session once a connection is back.
            if self.client.connected:
                defer.ensureDeferred(self._refresh())
            return
        defer.ensureDeferred(self._refresh())

    async def _refresh(self):
        if self._stopped or self._armed:
            return
        self._armed = True
        try:
            value = await self._read()
        except (ConnectionLost, SessionExpired):
            self._armed = False
            return
        except Exception:
            self._armed = False
            log.exception("watch on %s failed to read", self.path)
            return
        await self._deliver(value)

    async def _deliver(self, value):
        if self._running:
            self._pending, self._has_pending = value, True
            return
        self._running = True
        try:
            while not self._stopped:
                try:
                    result = self._callback(value)
                    if inspect.isawaitable(result):
                        await result
                except Exception:
                    log.exception("watch callback on %s failed", self.path)
                if not self._has_pending:
                    break
                value, self._pending, self._has_pending = self._pending, None, False
        finally:
            self._running = False


class ChildrenWatch(_Watch):
    """Children names of a node (sorted), or with `stat` (names, the node's Stat as of
    those names); None while the node does not exist."""

    def __init__(self, client, path, callback, stat=False):
        super().__init__(client, path, callback)
        self._stat = stat

    async def _read(self):
        try:
            return await self._children()
        except NoNode:
            stat = await self.client.exists(self.path, watch=self._fired)
            if stat is not None:
                # Created between the two calls.
                return await self._children()
            return None

    async def _children(self):
        if self._stat:
            names, stat = await self.client.get_children(self.path, watch=self._fired, stat=True)
            return sorted(names), stat
        return sorted(await self.client.get_children(self.path, watch=self._fired))


class DataWatch(_Watch):
    """(data, Stat) of a node; None while it does not exist."""

    async def _read(self):
        try:
            return await self.client.get(self.path, watch=self._fired)
        except NoNode:
            stat = await self.client.exists(self.path, watch=self._fired)
            if stat is not None:
                return await self.client.get(self.path)
            return None
