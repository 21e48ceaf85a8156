"""The hook-tool server: the unit agent's end of the tools' unix socket. Each AMP
command is answered from the HookContext that its client id names (the hook that runs
the tool); the server itself keeps no state of the unit's.

    factory = HookToolFactory()
    port = listen(reactor, socket_path, factory)
    with factory.hook(context) as client_id:   # JUJU_CLIENT_ID of the hook
        ...run the hook...
    # the context no longer answers: now commit context.changes if the hook exited 0
"""

import contextlib
import json
import logging
import secrets

from twisted.internet import defer, protocol
from twisted.protocols import amp

from ensemble.errors import EnsembleError
from ensemble.unit.tools import commands
from ensemble.unit.tools.context import HookToolError

log = logging.getLogger("ensemble.unit.tools")


class NoHookRunning(HookToolError):
    def __init__(self, client_id):
        super().__init__(f"no hook is running with client id {client_id!r}: hook tools work only while a hook runs")


def _answers(command, needs_context=True):
    """Make an `async def` method the responder of `command`: it is called with the
    context of the call's client id (None for an unknown one when `needs_context` is
    false), and any failure reaches the tool as one line."""

    def decorate(method):
        def responder(self, client_id, **arguments):
            return defer.ensureDeferred(self._answer(command, method, client_id, needs_context, arguments))

        responder.__name__ = method.__name__
        responder.__doc__ = method.__doc__
        return command.responder(responder)

    return decorate


class HookToolProtocol(amp.AMP):
    """One tool's connection."""

    async def _answer(self, command, method, client_id, needs_context, arguments):
        context = self.factory.context(client_id)
        if context is None and needs_context:
            raise NoHookRunning(client_id)
        try:
            return await method(self, context, **arguments) or {}
        except EnsembleError:
            raise
        except Exception as e:
            # A bug, or the agent's own trouble (ZooKeeper lost…): the hook gets one line,
            # the agent's log the traceback.
            log.exception("hook tool %s failed", command.commandName.decode())
            raise HookToolError(f"the unit agent failed: {type(e).__name__}: {e}") from e

    @_answers(commands.RelationGet)
    async def relation_get(self, context, relation_id, unit_name, setting_name):
        value = await context.relation_get(relation_id or None, unit_name or None, setting_name or None)
        return {"data": json.dumps(value)}

    @_answers(commands.RelationSet)
    async def relation_set(self, context, relation_id, json_blob):
        try:
            settings = json.loads(json_blob)
        except ValueError:
            settings = None
        if not isinstance(settings, dict):
            raise HookToolError("relation_set takes a JSON object of settings")
        await context.relation_set(relation_id or None, settings)

    @_answers(commands.RelationIds)
    async def relation_ids(self, context, relation_name):
        return {"ids": json.dumps(await context.relation_ids(relation_name or None))}

    @_answers(commands.RelationList)
    async def relation_list(self, context, relation_id):
        return {"members": json.dumps(await context.relation_list(relation_id or None))}

    @_answers(commands.ConfigGet)
    async def config_get(self, context, option_name):
        return {"data": json.dumps(await context.config_get(option_name or None))}

    @_answers(commands.UnitGet)
    async def unit_get(self, context, setting_name):
        return {"data": json.dumps(await context.unit_get(setting_name))}

    @_answers(commands.OpenPort)
    async def open_port(self, context, port, proto):
        await context.open_port(port, proto)

    @_answers(commands.ClosePort)
    async def close_port(self, context, port, proto):
        await context.close_port(port, proto)

    @_answers(commands.Log, needs_context=False)
    async def log(self, context, level, message):
        if context is not None:
            context.log(level, message)
        else:
            # A daemon a hook started, after the hook ended: still the unit's to log.
            self.factory.logger.log(level, "%s", message)


class HookToolFactory(protocol.ServerFactory):
    """The running hooks' contexts, by client id, and the protocol that serves them."""

    protocol = HookToolProtocol

    def __init__(self, logger=None):
        self.logger = logger or logging.getLogger("ensemble.unit.hook")
        self._contexts = {}

    def add(self, context, client_id=None):
        """Serve `context` to tools run with the returned client id."""
        client_id = client_id or secrets.token_hex(8)
        self._contexts[client_id] = context
        return client_id

    def remove(self, client_id):
        """Stop serving a context: later calls with its client id fail."""
        self._contexts.pop(client_id, None)

    def context(self, client_id):
        return self._contexts.get(client_id) if client_id else None

    @contextlib.contextmanager
    def hook(self, context, client_id=None):
        """Serve `context` for the block (the hook's run); yields the client id."""
        client_id = self.add(context, client_id)
        try:
            yield client_id
        finally:
            self.remove(client_id)


def listen(reactor, path, factory):
    """Listen on the unix socket `path`, for its owner only (the agent and its hooks
    run as root; a daemon run as another user gets no hook tools). A socket left by a
    dead agent is replaced; one of a live agent is an error (Twisted's pid lock)."""
    return reactor.listenUNIX(path, factory, mode=0o600, wantPID=True)
