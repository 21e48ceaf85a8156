"""Units of the example charms, run on this host the way the unit agent runs them: each
hook a process in the charm directory with the agent's hook environment, calling the
real hook tools (processes too) against a hook-tool server on a unix socket. Each
unit's state is a MemoryState that the test fills as the agent would; every unit's
relation settings live in one shared dict, as they live in ZooKeeper.

    async with charm_environment(tmp_path) as env:
        db = env.unit("db", config={"port": 7070})
        await db.hook("install")
"""

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
import types

from twisted.internet import defer, reactor, threads

from ensemble import process
from ensemble.charm import Charm, extract_bundle
from ensemble.unit.hooks import hook_environment, link_tools
from ensemble.unit.tools.context import CachedHookContext
from ensemble.unit.tools.memory import MemoryState
from ensemble.unit.tools.server import HookToolFactory, listen

CHARMS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "charms")
VENV_BIN = os.path.dirname(sys.executable)
ADDRESS = "127.0.0.1"
HOOK_TIMEOUT = 60


class Messages(logging.Handler):
    """What a unit's hooks logged with juju-log."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


class Unit:
    def __init__(self, env, charm_name, number, config, extra_env, path_first):
        charm = Charm.load(os.path.join(CHARMS, charm_name))
        self.env = env
        self.name = f"{charm.name}/{number}"
        self.home = os.path.join(env.base, f"{charm.name}-{number}")
        self.charm_dir = os.path.join(self.home, "charm")
        extract_bundle(charm.bundle(), self.charm_dir)
        values = {key: option.get("default") for key, option in charm.options.items()}
        values.update(charm.config({key: str(value) for key, value in (config or {}).items()}))
        self.state = MemoryState(self.name, config=values,
                                 addresses={"private-address": ADDRESS, "public-address": None})
        self.state.settings = env.settings
        self.extra_env = dict(extra_env or {})
        self.path_first = list(path_first or [])
        self.messages = Messages()
        self.logger = logging.getLogger(f"charm-units.{self.name}")
        self.logger.propagate = False
        self.logger.setLevel(logging.DEBUG)
        self.logger.addHandler(self.messages)
        self.pid_files = [os.path.join(self.charm_dir, "run", name) for name in ("server.pid", "echo.pid")]
        self.seen_pids = set()

    def environment(self, client_id, relation_id, remote_unit):
        """The unit agent's hook environment, `path_first` and `extra_env` added."""
        relation = None
        if relation_id:
            relation = types.SimpleNamespace(relation_name=relation_id.partition(":")[0], relation_id=relation_id,
                                             remote_unit=remote_unit or "")
        env = hook_environment(self.name, self.charm_dir, self.home, self.env.socket, client_id,
                               ":".join([*self.path_first, self.env.tools]), relation)
        env.update(self.extra_env)
        return env

    async def hook(self, hook, relation_id=None, remote_unit=None, broken=False, check=True):
        """Run hooks/<hook> as the agent does; after exit 0 its relation settings are
        committed. A missing hook is success (None)."""
        path = os.path.join(self.charm_dir, "hooks", hook)
        if not os.path.exists(path):
            return None
        # relation-list shows the members as of the change, as the agent's scheduler has them.
        members = sorted(self.state.members.get(relation_id, [])) if relation_id and not broken else None
        context = CachedHookContext(self.state, hook, relation_id, members, broken=broken, logger=self.logger)
        with self.env.factory.hook(context) as client_id:
            result = await threads.deferToThread(
                subprocess.run, [path], cwd=self.charm_dir, env=self.environment(client_id, relation_id, remote_unit),
                stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=HOOK_TIMEOUT,
            )
        self._track_pids()
        if result.returncode == 0:
            self._commit(context.changes)
        if check:
            assert result.returncode == 0, f"{self.name} {hook} failed:\n{result.stdout}{result.stderr}"
        return result

    def _commit(self, changes):
        for relation_id, writes in changes.items():
            node = self.env.settings.setdefault((relation_id, self.name), {})
            for key, value in writes.items():
                if value is None:
                    node.pop(key, None)
                else:
                    node[key] = value

    def settings(self, relation_id):
        """A copy of this unit's settings in the relation, as committed."""
        return dict(self.env.settings.get((relation_id, self.name), {}))

    def pid(self):
        for path in self.pid_files:
            try:
                with open(path) as f:
                    return int(f.read())
            except (OSError, ValueError):
                continue
        return None

    def _track_pids(self):
        pid = self.pid()
        if pid:
            self.seen_pids.add(pid)

    def ours(self, pid):
        """Whether pid is alive and still one of this unit's processes (pids get recycled)."""
        return process.alive(pid) and self.charm_dir.encode() in b" ".join(process.cmdline(pid))

    async def cleanup(self):
        """Stop hook, then SIGKILL whatever server of ours still runs; each by its pid."""
        try:
            await self.hook("stop", check=False)
        except subprocess.TimeoutExpired:
            pass
        for pid in self.seen_pids:
            if self.ours(pid):
                os.kill(pid, signal.SIGKILL)
        self.logger.removeHandler(self.messages)

    def leftovers(self):
        deadline = time.monotonic() + 3
        while any(self.ours(pid) for pid in self.seen_pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        return [pid for pid in self.seen_pids if self.ours(pid)]


class Environment:
    def __init__(self, base, factory, socket_path, tools):
        self.base = str(base)
        self.factory = factory
        self.socket = socket_path
        self.tools = tools
        self.settings = {}  # (relation id, unit) -> settings: every unit's view of ZooKeeper
        self.units = []

    def unit(self, charm_name, number=0, config=None, extra_env=None, path_first=None):
        """A unit of examples/charms/<charm_name>; `extra_env` is added to its hooks'
        environment, `path_first` directories go first on their PATH (fake commands)."""
        unit = Unit(self, charm_name, number, config, extra_env, path_first)
        self.units.append(unit)
        return unit

    def relate(self, relation_id, *units):
        """Make the relation known to each unit, each unit's private-address published
        in it (the agent does so before any remote hook runs), and each the others'
        member."""
        for unit in units:
            unit.state.relations_by_id[relation_id] = relation_id.partition(":")[0]
            self.settings[(relation_id, unit.name)] = {"private-address": ADDRESS}
            unit.state.members[relation_id] = [other.name for other in units if other is not unit]

    async def join(self, relation_id, unit, remote):
        """-joined then -changed, as the agent's scheduler runs them."""
        await unit.hook(f"{relation_id.partition(':')[0]}-relation-joined", relation_id, remote.name)
        await unit.hook(f"{relation_id.partition(':')[0]}-relation-changed", relation_id, remote.name)

    async def depart(self, relation_id, unit, remote):
        unit.state.members[relation_id].remove(remote.name)
        await unit.hook(f"{relation_id.partition(':')[0]}-relation-departed", relation_id, remote.name)

    async def break_(self, relation_id, unit):
        """The relation was removed: only -broken runs, with no remote unit."""
        del unit.state.relations_by_id[relation_id]
        unit.state.members.pop(relation_id, None)
        await unit.hook(f"{relation_id.partition(':')[0]}-relation-broken", relation_id, "", broken=True)


@contextlib.asynccontextmanager
async def charm_environment(base):
    base = os.path.join(str(base), "units")
    os.makedirs(base)
    factory = HookToolFactory()
    socket_path = os.path.join(base, "agent.sock")
    port = listen(reactor, socket_path, factory)
    # The agent's directory of the hook tools alone: links to the venv's console scripts.
    env = Environment(base, factory, socket_path, link_tools(os.path.join(base, "tools"), VENV_BIN))
    try:
        yield env
    finally:
        for unit in reversed(env.units):
            await unit.cleanup()
        await defer.maybeDeferred(port.stopListening)
    left = {unit.name: unit.leftovers() for unit in env.units if unit.leftovers()}
    assert not left, f"processes left running: {left}"
