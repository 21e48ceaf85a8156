"""Units of the example charms, run on this host the way the unit agent runs them: each
hook a process in the charm directory with the agent's hook environment, calling the
real hook tools (processes too) against a hook-tool server on a unix socket. Each
unit's state is a MemoryState that the test fills as the agent would; every unit's
relation settings live in one shared dict, as they live in ZooKeeper.

    async with charm_environment(tmp_path) as env:
        db = env.unit("db", config={"port": 7070})
        await db.hook("install")

The options naming the system's places a unit keeps its state in (`data-dir`,
`state-dir`: any whose default is an absolute path) get a directory of the test's own
unless the test gives one. A unit keeps nothing in its charm directory, which an
upgrade of the charm replaces whole: after every hook it must hold exactly what was
unpacked.
"""

import contextlib
import hashlib
import logging
import os
import shutil
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
        self.charm_name = charm_name
        self.name = f"{charm.name}/{number}"
        self.home = os.path.join(env.base, f"{charm.name}-{number}")
        self.charm_dir = os.path.join(self.home, "charm")
        extract_bundle(charm.bundle(), self.charm_dir)
        self.unpacked = snapshot(self.charm_dir)
        config = config or {}
        values = charm.config({key: str(value) for key, value in config.items()})  # defaults applied
        # Stand-ins for /var/lib/…: a test's hooks never write the host's system places.
        self.system_dir = os.path.join(env.base, "system", f"{charm.name}-{number}")
        values.update({key: os.path.join(self.system_dir, key) for key, value in values.items()
                       if key not in config and isinstance(value, str) and value.startswith("/")})
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
        self.seen_pids = set()

    @property
    def pid_files(self):
        """Where the charms keep their server's pid file: db in its data-dir, web and
        echo in their state-dir (as configured now)."""
        return [os.path.join(self.state.config_values[key], name)
                for key in ("data-dir", "state-dir") if key in self.state.config_values
                for name in ("server.pid", "echo.pid")]

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
        self.check_charm_dir(hook)
        return result

    def replace_charm(self):
        """What the agent does with a new charm (upgrade-charm): unpack it beside the
        charm directory, remove the old directory whole, put the new one in its place.
        Whatever a unit kept in there is gone."""
        staging = self.charm_dir + ".new"
        extract_bundle(Charm.load(os.path.join(CHARMS, self.charm_name)).bundle(), staging)
        shutil.rmtree(self.charm_dir)
        os.replace(staging, self.charm_dir)
        self.unpacked = snapshot(self.charm_dir)

    def check_charm_dir(self, hook):
        """The hook left the charm directory as unpacked: it keeps no state there."""
        now = snapshot(self.charm_dir)
        changes = sorted(
            [f"+ {path}" for path in now.keys() - self.unpacked.keys()]
            + [f"- {path}" for path in self.unpacked.keys() - now.keys()]
            + [f"~ {path}" for path in now.keys() & self.unpacked.keys() if now[path] != self.unpacked[path]]
        )
        assert not changes, f"{self.name} {hook} changed its charm directory:\n" + "\n".join(changes)

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
        """Stop hook, then SIGKILL whatever server of ours still runs; each by its pid.
        Returns why the stop hook must fail the test (it wrote into the charm
        directory), or None."""
        failure = None
        try:
            await self.hook("stop", check=False)
        except subprocess.TimeoutExpired:
            pass
        except AssertionError as e:
            failure = str(e)
        for pid in self.seen_pids:
            if self.ours(pid):
                os.kill(pid, signal.SIGKILL)
        self.logger.removeHandler(self.messages)
        return failure

    def leftovers(self):
        deadline = time.monotonic() + 3
        while any(self.ours(pid) for pid in self.seen_pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        return [pid for pid in self.seen_pids if self.ours(pid)]


def snapshot(directory):
    """{relative path: what it is} of everything in `directory`."""
    entries = {}
    for root, dirs, files in os.walk(directory):
        for name in dirs + files:
            path = os.path.join(root, name)
            info = os.lstat(path)
            if os.path.islink(path):
                what = ("link", os.readlink(path))
            elif os.path.isdir(path):
                what = ("dir", info.st_mode)
            else:
                with open(path, "rb") as f:
                    what = ("file", info.st_mode, hashlib.sha256(f.read()).hexdigest())
            entries[os.path.relpath(path, directory)] = what
    return entries


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
    failures = []
    try:
        yield env
    finally:
        for unit in reversed(env.units):
            failures.append(await unit.cleanup())
        await defer.maybeDeferred(port.stopListening)
    left = {unit.name: unit.leftovers() for unit in env.units if unit.leftovers()}
    assert not left, f"processes left running: {left}"
    failures = [failure for failure in failures if failure]
    assert not failures, "\n".join(failures)
