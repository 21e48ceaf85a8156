"""Shared fixtures: one real ZooKeeper server per test session, a root node per test."""

import os
import subprocess
import sys
import uuid

import pytest
import pytest_twisted
from kazoo.client import KazooClient

from ensemble.state.client import ZKClient
from ensemble.state.environment import initialize
from ensemble.state.machine import MachineStateManager
from ensemble.zookeeper import ZooKeeperServer

# Small tick so that sessions of killed clients expire in ~1-2 s, not ~10 s.
TICK_MS = 500
SESSION_TIMEOUT = 2.0


@pytest.fixture(scope="session")
def zk_server(tmp_path_factory):
    server = ZooKeeperServer(str(tmp_path_factory.mktemp("zookeeper")), tick_time=TICK_MS)
    server.start()
    # Every test's environment has a root on this one server: a node of the suite's own
    # at `/` tells an admin that `/` is shared, so none closes it to the others
    # (ensemble/state/repair.py closes only a server its environment has to itself).
    # Blocking kazoo, not the reactor: an async fixture may be the first to ask for the
    # server, and the reactor's greenlet cannot block on itself.
    try:
        marker = KazooClient(server.address)
        try:
            marker.start(timeout=30)
            marker.create("/shared-by-the-test-suite", b"")
        finally:
            marker.stop()
            marker.close()
        yield server
    finally:
        server.stop()  # also when marking failed: a server left running outlives the suite


@pytest.fixture
def zk_root():
    return f"/test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def zk_spec(zk_server, zk_root):
    """What --zookeeper / ENSEMBLE_ZOOKEEPER take for this test's root."""
    return f"{zk_server.address}{zk_root}"


@pytest_twisted.async_yield_fixture
async def client(zk_server, zk_root):
    c = await ZKClient(zk_server.address, zk_root, session_timeout=SESSION_TIMEOUT).connect(create_root=True)
    yield c
    await c.close()


@pytest_twisted.async_yield_fixture
async def env_client(client):
    """A client on an initialised environment with machine 0 registered."""
    await initialize(client, "test")
    await MachineStateManager(client).add_machine(address="127.0.0.1")
    yield client


def ensemble_env(home, zk_spec=None, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENSEMBLE_")}
    env["ENSEMBLE_HOME"] = str(home)
    env["ENSEMBLE_CONNECT_TIMEOUT"] = "2"
    env["ENSEMBLE_SESSION_TIMEOUT"] = str(SESSION_TIMEOUT)
    if zk_spec:
        env["ENSEMBLE_ZOOKEEPER"] = zk_spec
    env.update(extra)
    return env


def run_ensemble(*args, env, timeout=60, input=None):
    """Run the CLI as a user would; returns CompletedProcess with text output."""
    return subprocess.run(
        [sys.executable, "-m", "ensemble", *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        input=input,
    )


@pytest.fixture
def cli(tmp_path, zk_spec):
    """Run `ensemble` against this test's root: cli('status') -> CompletedProcess."""
    env = ensemble_env(tmp_path / "home", zk_spec)
    return lambda *args, **kw: run_ensemble(*args, env=env, **kw)


def make_charm(directory, name="probe", hooks=None, config=None, metadata_extra=""):
    """A charm whose hooks are small shell scripts; by default each of install, start
    and stop records that it ran and the environment it got, in $HOME (the unit
    directory). `metadata_extra`: YAML text
    appended to metadata.yaml (e.g. provides/requires/peers)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "metadata.yaml").write_text(f"name: {name}\nsummary: test charm\n" + metadata_extra)
    if config:
        lines = ["options:"] + [f"  {k}: {{type: string, default: '{v}'}}" for k, v in config.items()]
        (directory / "config.yaml").write_text("\n".join(lines) + "\n")
    (directory / "hooks").mkdir(exist_ok=True)
    for hook in sorted({"install", "start", "stop", *(hooks or {})}):
        body = (hooks or {}).get(hook, f'echo "{hook} ran"; env > "$HOME/{hook}.env"')
        path = directory / "hooks" / hook
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(0o755)
    return str(directory)


async def deploy_charm(client, charm_dir, service=None, n=1, to=0, config=None):
    from ensemble.charm import Charm, bundle_id
    from ensemble.state.service import ServiceStateManager

    charm = Charm.load(charm_dir)
    bundle = charm.bundle()
    return await ServiceStateManager(client).deploy(
        service or charm.name, bundle_id(charm.name, bundle), bundle, charm.config(config or {}), {}, n=n, to=to
    )


async def eventually(check, timeout=10.0, interval=0.05):
    """Wait until `await check()` is truthy; return it (fails the test at `timeout`)."""
    from twisted.internet import reactor, task

    deadline = reactor.seconds() + timeout
    while True:
        value = await check()
        if value:
            return value
        assert reactor.seconds() < deadline, "condition not reached in time"
        await task.deferLater(reactor, interval, lambda: None)
