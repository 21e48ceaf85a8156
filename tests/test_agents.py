"""Machine and unit agents: presence, re-registration after session expiry, watching
assignments, clean exit on SIGTERM."""

import os
import signal
import subprocess
import sys

import pytest_twisted
from twisted.internet import reactor, task

from ensemble.charm import Charm, bundle_id
from ensemble.home import EnsembleHome
from ensemble.machine.agent import MachineAgent
from ensemble.state import nodes
from ensemble.state.client import NoNode, ZKClient, expire_session
from ensemble.state.service import ServiceStateManager
from ensemble.state.unit import UnitStateManager
from ensemble.unit.agent import UnitAgent

from conftest import SESSION_TIMEOUT, deploy_charm, ensemble_env, make_charm

AGENT = "/machines/machine-0000000000/agent"


async def wait_for(predicate, timeout=10.0):
    deadline = reactor.seconds() + timeout
    while True:
        value = predicate()
        if hasattr(value, "addCallback") or hasattr(value, "__await__"):
            value = await value
        if value:
            return value
        assert reactor.seconds() < deadline, "condition not reached in time"
        await task.deferLater(reactor, 0.05, lambda: None)


async def deploy(client, n=1):
    charm = Charm.load("examples/charms/db")
    bundle = charm.bundle()
    return await ServiceStateManager(client).deploy(
        "db", bundle_id(charm.name, bundle), bundle, {}, {}, n=n, to=0
    )


async def new_client(zk_server, zk_root):
    return await ZKClient(zk_server.address, zk_root, session_timeout=SESSION_TIMEOUT).connect()


@pytest_twisted.ensureDeferred
async def test_machine_agent_presence_and_assignments(env_client, zk_server, zk_root):
    agent = MachineAgent(await new_client(zk_server, zk_root), 0, manage_bridge=False)
    await agent.start()
    try:
        data, stat = await env_client.get(AGENT)
        info = nodes.load(data, AGENT)
        assert info["pid"] == os.getpid() and stat.ephemeral_owner == agent.client.session_id
        await deploy(env_client, n=2)
        await wait_for(lambda: agent.assigned == ["db/0", "db/1"])
        await UnitStateManager(env_client).remove_unit("db/1")
        await wait_for(lambda: agent.assigned == ["db/0"])
    finally:
        await agent.stop()
    assert await env_client.exists(AGENT) is None, "presence outlived a clean stop"


@pytest_twisted.ensureDeferred
async def test_machine_agent_reregisters_after_session_expiry(env_client, zk_server, zk_root):
    agent = MachineAgent(await new_client(zk_server, zk_root), 0, manage_bridge=False)
    await agent.start()
    try:
        first_session = agent.client.session_id
        await expire_session(agent.client)
        await wait_for(lambda: agent.registrations == 2, timeout=SESSION_TIMEOUT * 5)
        stat = await env_client.exists(AGENT)
        assert stat is not None and stat.ephemeral_owner == agent.client.session_id != first_session
        # Its watch came back with the session: new assignments still reach it.
        await deploy(env_client)
        await wait_for(lambda: agent.assigned == ["db/0"])
    finally:
        await agent.stop()


@pytest_twisted.ensureDeferred
async def test_unit_agent_presence_and_expiry(env_client, zk_server, zk_root, tmp_path):
    await deploy_charm(env_client, make_charm(tmp_path / "charm", name="db"))
    agent = UnitAgent(
        await new_client(zk_server, zk_root), "db/0",
        unit_dir=str(tmp_path / "unit"), charm_dir=str(tmp_path / "c"), log_dir=str(tmp_path / "log"),
    )
    await agent.start()
    try:
        assert await env_client.exists("/units/db-0/agent") is not None
        await wait_for(lambda: agent.unit.data.get("state") == "started")
        await expire_session(agent.client)
        await wait_for(lambda: agent.registrations == 2, timeout=SESSION_TIMEOUT * 5)
        assert await env_client.exists("/units/db-0/agent") is not None
    finally:
        await agent.stop()
    assert await env_client.exists("/units/db-0/agent") is None


def start_agent_process(tmp_path, zk_spec):
    log = open(tmp_path / "agent.log", "ab")
    return subprocess.Popen(
        [sys.executable, "-m", "ensemble", "machine-agent", "--machine-id", "0", "--no-bridge", "--no-containers"],
        # Long sessions (the server's maximum at this tick): a killed agent's node then
        # lingers >= 10 s, so a takeover well inside that is told apart from waiting.
        env=ensemble_env(tmp_path / "home", zk_spec, ENSEMBLE_SESSION_TIMEOUT="10"),
        stdout=log,
        stderr=log,
    )


@pytest_twisted.ensureDeferred
async def test_agent_process_sigterm_leaves_cleanly_and_sigkill_restart_takes_over(
    env_client, zk_spec, tmp_path
):
    process = start_agent_process(tmp_path, zk_spec)
    try:
        await wait_for(lambda: env_client.exists(AGENT))
        # A second agent for the same machine is refused while the first lives.
        second = subprocess.run(
            [sys.executable, "-m", "ensemble", "machine-agent", "--machine-id", "0", "--no-bridge", "--no-containers"],
            env=ensemble_env(tmp_path / "home", zk_spec),
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert second.returncode == 1
        assert second.stderr.strip().splitlines()[-1] == f"error: an agent for machine 0 is already running (pid {process.pid})"

        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
        # Gone at once (closed session), not after the session timeout.
        assert await env_client.exists(AGENT) is None

        # Killed hard: its ephemeral node lingers, but a restart on this host takes over.
        process = start_agent_process(tmp_path, zk_spec)
        await wait_for(lambda: env_client.exists(AGENT))
        process.kill()
        process.wait()
        assert await env_client.exists(AGENT) is not None
        process = start_agent_process(tmp_path, zk_spec)
        # Well before the old session (10 s) could have expired on its own.
        await wait_for(lambda: _is_pid(env_client, process.pid), timeout=8)
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(timeout=10)
    log = (tmp_path / "agent.log").read_text()
    assert "Traceback" not in log


async def _owner_pid(client):
    try:
        data, _ = await client.get(AGENT)
    except NoNode:  # e.g. deleted by the new agent taking over from the dead one
        return None
    return nodes.load(data, AGENT).get("pid")


async def _is_pid(client, pid):
    return await _owner_pid(client) == pid


@pytest_twisted.ensureDeferred
async def test_unit_agent_command_runs_until_sigterm(env_client, zk_spec, tmp_path):
    await deploy_charm(env_client, make_charm(tmp_path / "charm", name="db"))
    process = subprocess.Popen(
        [sys.executable, "-m", "ensemble", "unit-agent", "--unit", "db/0"],
        env=ensemble_env(
            tmp_path / "home", zk_spec, ENSEMBLE_UNIT_DIR=str(tmp_path / "unit"),
            ENSEMBLE_CHARM_DIR=str(tmp_path / "c"), ENSEMBLE_LOG_DIR=str(tmp_path / "log"),
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        await wait_for(lambda: env_client.exists("/units/db-0/agent"))
        process.send_signal(signal.SIGTERM)
        status = process.wait(timeout=10)
        assert status == 0, process.stdout.read()
        assert await env_client.exists("/units/db-0/agent") is None
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert b"unit-db-0: present" in process.stdout.read()


@pytest_twisted.ensureDeferred
async def test_agents_for_unknown_machine_or_unit_fail_clearly(env_client, zk_spec, tmp_path):
    env = ensemble_env(tmp_path / "home", zk_spec)
    for argv, message in (
        (["machine-agent", "--machine-id", "5"], "error: machine 5 not found"),
        (["unit-agent", "--unit", "db/3"], "error: unit 'db/3' not found"),
        (["unit-agent", "--unit", "../x"], "error: invalid unit name"),
    ):
        result = subprocess.run(
            [sys.executable, "-m", "ensemble", *argv], env=env, capture_output=True, text=True, timeout=30
        )
        assert result.returncode == 1
        assert result.stderr.strip().splitlines()[-1].startswith(message)
        assert "Traceback" not in result.stderr
    # Nothing was made on the host for the machine that does not exist.
    assert not os.path.exists(EnsembleHome(str(tmp_path / "home")).storage_dir)
