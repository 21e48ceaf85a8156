"""The unit agent's hook lifecycle, run on this host with a real ZooKeeper: install then
start with the documented environment, failures as `error` with the reason, the stop
hook on removal, and no hooks re-run by an agent restart within one container run."""

import json

import pytest_twisted

import ensemble.unit.agent as unit_agent_module
from ensemble.state.client import ZKClient
from ensemble.state.unit import UnitStateManager
from ensemble.unit.agent import UnitAgent

from conftest import SESSION_TIMEOUT, deploy_charm, make_charm
from conftest import eventually


async def start_agent(zk_server, zk_root, tmp_path, unit="probe/0"):
    client = await ZKClient(zk_server.address, zk_root, session_timeout=SESSION_TIMEOUT).connect()
    agent = UnitAgent(
        client, unit, unit_dir=str(tmp_path / "unit"), charm_dir=str(tmp_path / "charm-copy"),
        log_dir=str(tmp_path / "log"), zookeeper=f"{zk_server.address}{zk_root}",
    )
    await agent.start()
    return agent


async def unit_state(client, name="probe/0"):
    return (await UnitStateManager(client).get_unit(name)).data


def parse_env(path):
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


@pytest_twisted.ensureDeferred
async def test_install_then_start_with_the_hook_environment(env_client, zk_server, zk_root, tmp_path):
    # A hook that reads its input gets EOF at once, rather than waiting for ever.
    hooks = {"install": 'read answer; echo "install ran"; env > "$ENSEMBLE_UNIT_DIR/install.env"'}
    await deploy_charm(env_client, make_charm(tmp_path / "charm", config={"colour": "blue"}, hooks=hooks))
    await (await UnitStateManager(env_client).get_unit("probe/0")).update(**{"private-address": "10.77.0.9"})
    agent = await start_agent(zk_server, zk_root, tmp_path)
    try:
        await eventually(lambda: _state_is(env_client, "started"))
        env = parse_env(tmp_path / "unit" / "start.env")
        assert env["ENSEMBLE_UNIT_NAME"] == "probe/0"
        assert env["ENSEMBLE_PRIVATE_ADDRESS"] == "10.77.0.9"
        assert env["CHARM_DIR"] == str(tmp_path / "charm-copy")
        assert env["ENSEMBLE_UNIT_DIR"] == str(tmp_path / "unit")
        assert json.loads(env["ENSEMBLE_CONFIG"]) == {"colour": "blue"}
        assert env["ENSEMBLE_ZOOKEEPER"] == f"{zk_server.address}{zk_root}"
        assert env["DEBIAN_FRONTEND"] == "noninteractive"  # packages' questions are not asked
        assert (tmp_path / "unit" / "install.env").exists()
        log = (tmp_path / "log" / "probe-0.log").read_text()
        assert log.index("install ran") < log.index("start ran")
    finally:
        await agent.stop()


async def _state_is(client, state, name="probe/0"):
    return (await unit_state(client, name)).get("state") == state


@pytest_twisted.ensureDeferred
async def test_failing_install_is_an_error_with_status_and_output(env_client, zk_server, zk_root, tmp_path):
    hooks = {"install": 'echo "fetching"; echo "no such package: frobnicator" >&2; exit 3'}
    await deploy_charm(env_client, make_charm(tmp_path / "charm", hooks=hooks))
    agent = await start_agent(zk_server, zk_root, tmp_path)
    try:
        await eventually(lambda: _state_is(env_client, "error"))
        data = await unit_state(env_client)
        assert data["error"] == "install hook exited with status 3: fetching | no such package: frobnicator"
        assert not (tmp_path / "unit" / "start.env").exists(), "start ran after a failed install"
    finally:
        await agent.stop()


@pytest_twisted.ensureDeferred
async def test_removal_runs_the_stop_hook(env_client, zk_server, zk_root, tmp_path):
    await deploy_charm(env_client, make_charm(tmp_path / "charm"))
    agent = await start_agent(zk_server, zk_root, tmp_path)
    try:
        await eventually(lambda: _state_is(env_client, "started"))
        await UnitStateManager(env_client).remove_unit("probe/0")
        await eventually(lambda: _state_is(env_client, "stopped"))
        assert (tmp_path / "unit" / "stop.env").exists()
    finally:
        await agent.stop()


@pytest_twisted.ensureDeferred
async def test_agent_restart_reruns_no_hook_but_a_container_restart_reruns_start(
    env_client, zk_server, zk_root, tmp_path, monkeypatch
):
    await deploy_charm(env_client, make_charm(tmp_path / "charm", hooks={
        "install": 'echo x >> "$ENSEMBLE_UNIT_DIR/installs"',
        "start": 'echo x >> "$ENSEMBLE_UNIT_DIR/starts"',
    }))
    agent = await start_agent(zk_server, zk_root, tmp_path)
    await eventually(lambda: _state_is(env_client, "started"))
    await agent.stop()
    # The supervisor restarts a crashed agent: same container run, services still up.
    agent = await start_agent(zk_server, zk_root, tmp_path)
    await agent.stop()
    assert (tmp_path / "unit" / "starts").read_text().count("x") == 1
    # The container itself restarted: its services are gone, so start runs again.
    monkeypatch.setattr(unit_agent_module, "container_run_id", lambda: "a-later-run")
    agent = await start_agent(zk_server, zk_root, tmp_path)
    try:
        async def started_twice():
            return await _starts(tmp_path) == 2

        await eventually(started_twice)
        assert (tmp_path / "unit" / "installs").read_text().count("x") == 1
        await eventually(lambda: _state_is(env_client, "started"))
    finally:
        await agent.stop()


async def _starts(tmp_path):
    try:
        return (tmp_path / "unit" / "starts").read_text().count("x")
    except FileNotFoundError:
        return 0
