"""Agent presence: an ephemeral node that exists while the agent's session lives."""

import os
import socket
import time

from twisted.internet import defer, task

from ensemble import __version__
from ensemble.errors import EnsembleError
from ensemble.state import nodes
from ensemble.state.client import NoAuth, NodeExists, NoNode
from ensemble import process


class AgentAlreadyRunning(EnsembleError):
    pass


def agent_info(**extra):
    info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "version": __version__,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    info.update(extra)
    return info


async def register(client, path, info, who, reactor=None, wait=None):
    """Create the ephemeral presence node at `path` for this session.

    A node left by a dead agent on this host is taken over at once; one whose owner
    may be alive elsewhere is waited for until its session expires (at most `wait`
    seconds, default two session timeouts); a live agent here is an error.
    """
    if reactor is None:
        from twisted.internet import reactor
    wait = 2 * client.session_timeout + 2 if wait is None else wait
    deadline = reactor.seconds() + wait
    while True:
        try:
            await client.create(path, nodes.dump(info), ephemeral=True)
            return
        except NodeExists:
            pass
        try:
            data, stat = await client.get(path)
        except NoNode:
            continue
        if stat.ephemeral_owner == client.session_id:
            await client.set(path, nodes.dump(info))
            return
        try:
            other = nodes.load(data, path)
        except EnsembleError:
            other = {}
        same_host = other.get("host") == info["host"]
        other_pid = other.get("pid")
        if same_host and isinstance(other_pid, int) and other_pid != info["pid"]:
            if process.alive(other_pid):
                raise AgentAlreadyRunning(
                    f"an agent for {who} is already running (pid {other_pid})"
                )
            try:
                await client.delete(path, stat.version)
                continue
            except NoNode:
                continue
            except NoAuth:
                # A unit may not delete below its node (its guard is there): its dead
                # agent's node goes when that session expires, as a stranger's would.
                pass
        if reactor.seconds() >= deadline:
            raise AgentAlreadyRunning(
                f"an agent for {who} on {other.get('host', '?')} is still present; is it running?"
            )
        gone = defer.Deferred()
        if await client.exists(path, watch=lambda e: gone.called or gone.callback(None)):
            await defer.DeferredList([gone, task.deferLater(reactor, 1.0, lambda: None)], fireOnOneCallback=True)


async def alive(client, path):
    return await client.exists(path) is not None


async def owner(client, path):
    """The presence node's info ({pid, host, ...}), or None while nobody is present."""
    try:
        data, _ = await client.get(path)
    except NoNode:
        return None
    try:
        return nodes.load(data, path) or {}
    except EnsembleError:
        return {}
