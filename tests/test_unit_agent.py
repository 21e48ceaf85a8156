"""The unit agent's hook lifecycle, run on this host with a real ZooKeeper: install then
start with the documented environment, failures as `error` with the reason, the stop
hook on removal, and no hooks re-run by an agent restart within one container run."""

import json
import os
import sys

import pytest_twisted
from twisted.internet import utils

import ensemble.unit.lifecycle as lifecycle_module
from ensemble.state.client import ZKClient
from ensemble.state.unit import UnitStateManager
from ensemble.unit.agent import UnitAgent
from ensemble.unit.tools.names import TOOLS

from conftest import SESSION_TIMEOUT, deploy_charm, make_charm
from conftest import eventually


async def start_agent(zk_server, zk_root, tmp_path, unit="probe/0"):
    client = await ZKClient(zk_server.address, zk_root, session_timeout=SESSION_TIMEOUT).connect()
    agent = UnitAgent(
        client, unit, unit_dir=str(tmp_path / "unit"), charm_dir=str(tmp_path / "charm-copy"),
        log_dir=str(tmp_path / "log"),
    )
    await agent.start()
    return agent


async def unit_state(client, name="probe/0"):
    return (await UnitStateManager(client).get_unit(name)).data


def parse_env(path):
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


@pytest_twisted.ensureDeferred
async def test_install_config_changed_start_with_the_hook_environment(env_client, zk_server, zk_root, tmp_path):
    # A hook that reads its input gets EOF at once, rather than waiting for ever.
    hooks = {
        "install": 'read answer; echo "install ran"; env > "$HOME/install.env"',
        "config-changed": 'echo "config-changed ran"; config-get colour > "$HOME/colour"; pwd > "$HOME/cwd"; '
                          'unit-get private-address > "$HOME/private"; unit-get public-address > "$HOME/public"; '
                          'juju-log -l WARNING "colour is" $(config-get colour); ensemble-log the 2011 name',
    }
    await deploy_charm(env_client, make_charm(tmp_path / "charm", config={"colour": "blue"}, hooks=hooks))
    await (await UnitStateManager(env_client).get_unit("probe/0")).update(**{"private-address": "10.77.0.9"})
    agent = await start_agent(zk_server, zk_root, tmp_path)
    try:
        await eventually(lambda: _state_is(env_client, "started"))
        unit_dir, charm_dir = tmp_path / "unit", tmp_path / "charm-copy"
        env = parse_env(unit_dir / "start.env")
        for prefix in ("JUJU_", "ENSEMBLE_"):
            assert env[f"{prefix}UNIT_NAME"] == "probe/0"
            assert env[f"{prefix}AGENT_SOCKET"] == str(unit_dir / ".ensemble.hookcli.sock")
            assert env[f"{prefix}CLIENT_ID"]
            assert f"{prefix}RELATION" not in env and f"{prefix}REMOTE_UNIT" not in env
        assert env["CHARM_DIR"] == str(charm_dir)
        # The tools come first on PATH, and nothing else from the agent's venv (its python).
        tools_dir = env["PATH"].split(":")[0]
        assert sorted(os.listdir(tools_dir)) == sorted(TOOLS)
        assert os.path.dirname(sys.executable) not in env["PATH"].split(":")
        assert env["DEBIAN_FRONTEND"] == "noninteractive"  # packages' questions are not asked
        # No way to ZooKeeper but the hook tools: no address, no credential, no config dump.
        for gone in ("ENSEMBLE_ZOOKEEPER", "ENSEMBLE_AUTH", "ENSEMBLE_CONFIG", "ENSEMBLE_PRIVATE_ADDRESS"):
            assert gone not in env
        assert parse_env(unit_dir / "install.env")["JUJU_CLIENT_ID"] != env["JUJU_CLIENT_ID"]
        assert (unit_dir / "colour").read_text() == "blue\n"
        assert (unit_dir / "cwd").read_text() == f"{charm_dir}\n"
        assert (unit_dir / "private").read_text() == "10.77.0.9\n"
        assert (unit_dir / "public").read_text() == "10.77.0.9\n"  # no public address known: the private one
        log = (tmp_path / "log" / "probe-0.log").read_text()
        assert log.index("install ran") < log.index("config-changed ran") < log.index("start ran")
        # juju-log goes to the unit's log, among the hook's own output.
        assert log.index("config-changed ran") < log.index("WARNING probe/0 config-changed: colour is blue") < \
            log.index("INFO probe/0 config-changed: the 2011 name") < log.index("start ran")
    finally:
        await agent.stop()


@pytest_twisted.ensureDeferred
async def test_a_charm_without_hooks_starts_and_a_tool_outside_a_hook_fails(env_client, zk_server, zk_root,
                                                                            tmp_path):
    charm = make_charm(tmp_path / "charm")
    for hook in ("install", "start", "stop"):
        os.unlink(os.path.join(charm, "hooks", hook))
    await deploy_charm(env_client, charm)
    agent = await start_agent(zk_server, zk_root, tmp_path)
    try:
        await eventually(lambda: _state_is(env_client, "started"))
        # What a daemon a hook started would run after the hook: no context to answer it.
        env = {"PATH": os.environ["PATH"], "JUJU_AGENT_SOCKET": agent.socket_path, "JUJU_CLIENT_ID": "gone"}
        result = await utils.getProcessOutputAndValue(
            os.path.join(os.path.dirname(sys.executable), "config-get"), [], env=env)
        out, err, code = result
        assert code == 1 and out == b""
        assert err.decode().count("\n") == 1 and "no hook is running" in err.decode()
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
        "install": 'echo x >> "$HOME/installs"',
        "start": 'echo x >> "$HOME/starts"',
    }))
    agent = await start_agent(zk_server, zk_root, tmp_path)
    await eventually(lambda: _state_is(env_client, "started"))
    await agent.stop()
    # The supervisor restarts a crashed agent: same container run, services still up.
    agent = await start_agent(zk_server, zk_root, tmp_path)
    await agent.stop()
    assert (tmp_path / "unit" / "starts").read_text().count("x") == 1
    # The container itself restarted: its services are gone, so start runs again.
    monkeypatch.setattr(lifecycle_module, "container_run_id", lambda: "a-later-run")
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


@pytest_twisted.ensureDeferred
async def test_config_get_types_and_defaults_as_pyjuju(env_client, zk_server, zk_root, tmp_path):
    charm = make_charm(tmp_path / "charm", hooks={"config-changed": '''
for option in title port ratio debug unset; do echo "$option=[$(config-get $option)]"; done > "$HOME/smart"
config-get --format json > "$HOME/all.json"
config-get unset --format json > "$HOME/unset.json"
'''})
    with open(os.path.join(charm, "config.yaml"), "w") as f:
        f.write("options:\n"
                "  title: {type: string, default: My blog, description: shown on every page}\n"
                "  port: {type: int, default: 80}\n"
                "  ratio: {type: float, default: 0.5}\n"
                "  debug: {type: boolean, default: false}\n"
                "  unset: {type: string}\n")
    await deploy_charm(env_client, charm, config={"port": "8080"})
    agent = await start_agent(zk_server, zk_root, tmp_path)
    try:
        await eventually(lambda: _state_is(env_client, "started"))
        unit_dir = tmp_path / "unit"
        assert (unit_dir / "smart").read_text().splitlines() == [
            "title=[My blog]", "port=[8080]", "ratio=[0.5]", "debug=[False]", "unset=[]"]
        assert json.loads((unit_dir / "all.json").read_text()) == {
            "title": "My blog", "port": 8080, "ratio": 0.5, "debug": False}
        assert (unit_dir / "unset.json").read_text() == "null\n"
    finally:
        await agent.stop()


@pytest_twisted.ensureDeferred
async def test_a_hook_that_is_not_executable_fails_the_unit_with_why(env_client, zk_server, zk_root, tmp_path):
    charm = make_charm(tmp_path / "charm")
    os.chmod(os.path.join(charm, "hooks", "start"), 0o644)
    await deploy_charm(env_client, charm)
    agent = await start_agent(zk_server, zk_root, tmp_path)
    try:
        await eventually(lambda: _state_is(env_client, "error"))
        assert (await unit_state(env_client))["error"] == "start hook exited with status 126: hooks/start is not executable"
    finally:
        await agent.stop()


@pytest_twisted.ensureDeferred
async def test_a_hook_is_spawned_in_its_charm_directory_without_a_fork_of_the_agent(tmp_path, monkeypatch):
    # A fork copies the agent's page tables and runs Python in the child: 5-10 ms a hook.
    from twisted.internet import reactor

    from ensemble.unit.hooks import run_hook

    charm = make_charm(tmp_path / "charm", hooks={"install": 'pwd > "$OUT"'})
    spawned, forked = [], []
    real_spawn, real_fork = os.posix_spawnp, os.fork
    monkeypatch.setattr(os, "posix_spawnp", lambda path, *a, **kw: spawned.append(path) or real_spawn(path, *a, **kw))
    monkeypatch.setattr(os, "fork", lambda: forked.append(True) or real_fork())
    here = os.getcwd()
    out = tmp_path / "cwd"
    await run_hook(reactor, "install", str(charm), {"PATH": os.environ["PATH"], "OUT": str(out)},
                   str(tmp_path / "hook.log"))
    assert spawned == [os.path.join(str(charm), "hooks", "install")] and forked == []
    assert out.read_text().strip() == os.path.realpath(charm)
    assert os.getcwd() == here
