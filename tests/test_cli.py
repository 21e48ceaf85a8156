"""Every CLI command, as a user runs it, against a real ZooKeeper; bad input gets one
line, exit status 1, and leaves ZooKeeper exactly as it was."""

import json
import os
import shutil

import pytest
import pytest_twisted
import yaml

from ensemble.zookeeper import free_port

from conftest import ensemble_env, run_ensemble
from test_state import snapshot

DB = "examples/charms/db"
WEB = "examples/charms/web"
COMMANDS = [
    "bootstrap", "create-environment", "add-machine", "deploy", "add-unit", "remove-unit", "destroy-service", "status",
    "service-addresses", "destroy-environment", "machine-agent", "unit-agent", "expose", "unexpose",
]


def one_line_error(result, status=1):
    assert result.returncode == status, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0][len("error: "):]


def status(cli):
    result = cli("status", "--format", "json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, tmp_path):
    result = run_ensemble(command, "--help", env=ensemble_env(tmp_path))
    assert result.returncode == 0
    assert f"usage: ensemble {command}" in result.stdout


@pytest_twisted.ensureDeferred
async def test_deploy_add_remove_and_status(env_client, cli):
    result = cli("deploy", DB, "--to", "0", "-n", "2", "--memory", "512M", "--cpu-weight", "200", "--pids", "256")
    assert result.returncode == 0, result.stderr
    assert "db/0, db/1" in result.stdout
    result = cli("deploy", WEB, "front", "--to", "0", "--config", "port=8080")
    assert result.returncode == 0, result.stderr

    assert cli("add-machine", "--address", "192.0.2.10").stdout.strip() == "1"
    result = cli("add-unit", "front")  # goes to the emptier machine 1
    assert result.returncode == 0 and "front/1" in result.stdout
    result = cli("add-unit", "db", "--to", "1", "-n", "2")
    assert result.returncode == 0 and "db/2, db/3" in result.stdout

    report = status(cli)
    assert report["environment"] == "test"
    assert report["machines"]["1"] == {"address": "192.0.2.10", "subnet": None, "agent": "down"}
    db = report["services"]["db"]
    assert db["limits"] == {"memory": "512M", "cpu-weight": 200, "pids": 256}
    assert db["config"] == {}  # only what was set: `ensemble get` shows the defaults too
    assert db["charm"].startswith("db-")
    assert {n: u["machine"] for n, u in db["units"].items()} == {"db/0": 0, "db/1": 0, "db/2": 1, "db/3": 1}
    assert db["units"]["db/0"]["agent-state"] == "pending"
    front = report["services"]["front"]
    assert front["config"] == {"port": 8080}
    assert front["units"]["front/1"]["machine"] == 1

    result = cli("remove-unit", "db/0", "db/3")
    assert result.returncode == 0, result.stderr
    units = status(cli)["services"]["db"]["units"]
    assert units["db/0"]["life"] == "dying" and "life" not in units["db/1"]
    assert await env_client.exists("/machines/machine-0000000000/units/db-0") is None

    result = cli("destroy-service", "front")
    assert result.returncode == 0 and "front/0, front/1" in result.stdout
    assert status(cli)["services"]["front"]["life"] == "dying"

    yaml_report = yaml.safe_load(cli("status").stdout)
    assert yaml_report["services"]["db"]["units"]["db/2"]["machine"] == 1


@pytest_twisted.ensureDeferred
async def test_service_addresses_lists_started_units_only(env_client, cli):
    assert cli("deploy", DB, "--to", "0", "-n", "3").returncode == 0
    from ensemble.state.unit import UnitStateManager

    units = UnitStateManager(env_client)
    for name, state, address in (("db/0", "started", "10.77.0.3"), ("db/1", "installing", "10.77.0.4"),
                                 ("db/2", "started", "10.77.0.2")):
        await (await units.get_unit(name)).update(**{"state": state, "private-address": address})
    result = cli("service-addresses", "db")
    assert result.stdout.split() == ["10.77.0.3", "10.77.0.2"]


@pytest_twisted.ensureDeferred
async def test_expose_and_unexpose_show_in_status(env_client, cli):
    assert cli("deploy", DB, "--to", "0").returncode == 0
    assert "exposed" not in status(cli)["services"]["db"]
    assert cli("expose", "db").stdout == "exposed service db\n"
    assert status(cli)["services"]["db"]["exposed"] is True
    assert cli("expose", "db").stdout == "service db is already exposed\n"
    assert cli("unexpose", "db").stdout == "unexposed service db\n"
    assert cli("unexpose", "db").stdout == "service db is not exposed\n"
    assert "exposed" not in status(cli)["services"]["db"]
    assert cli("destroy-service", "db").returncode == 0  # its unit waits for machine 0's agent
    assert one_line_error(cli("expose", "db")) == "service 'db' is being destroyed"


def broken_charm(tmp_path, kind):
    path = tmp_path / f"charm-{kind}"
    shutil.copytree(DB, path)
    if kind == "no-metadata":
        os.unlink(path / "metadata.yaml")
    elif kind == "metadata-list":
        (path / "metadata.yaml").write_text("- name: db\n")
    elif kind == "metadata-bad-yaml":
        (path / "metadata.yaml").write_text("name: [db\n")
    elif kind == "bad-name":
        (path / "metadata.yaml").write_text("name: ../etc\n")
    elif kind == "hooks-not-a-directory":
        shutil.rmtree(path / "hooks")
        (path / "hooks").write_text("")
    elif kind == "bad-type":
        (path / "config.yaml").write_text("options:\n  port: {type: list, default: [1]}\n")
    elif kind == "bad-float-default":
        (path / "config.yaml").write_text("options:\n  ratio: {type: float, default: half}\n")
    elif kind == "config-options-list":
        (path / "config.yaml").write_text("options:\n  - port\n")
    elif kind == "bad-peers":
        (path / "metadata.yaml").write_text("name: db\nsummary: s\ndescription: d\npeers: [ring]\n")
    elif kind == "too-big":
        (path / "payload.bin").write_bytes(os.urandom(600 * 1024))
    elif kind == "bad-default":
        (path / "config.yaml").write_text("options:\n  port: {type: int, default: eighty}\n")
    return str(path)


LONG = "a" * 41
BAD_INPUT = [
    (["add-unit", "nosuch"], "service 'nosuch' not found"),
    (["destroy-service", "nosuch"], "service 'nosuch' not found"),
    (["remove-unit", "db/9"], "unit 'db/9' not found"),
    (["remove-unit", "db/0", "db/9"], "unit 'db/9' not found"),
    (["add-unit", "db", "--to", "9"], "machine 9 not found"),
    (["deploy", WEB, "--to", "9"], "machine 9 not found"),
    (["deploy", WEB, "--to", "../0"], "invalid machine id"),
    (["deploy", DB], "service 'db' already exists"),
    (["deploy", WEB, "Web"], "invalid service name 'Web'"),
    (["deploy", WEB, "../../etc"], "invalid service name"),
    (["deploy", WEB, "web;rm -rf /"], "invalid service name"),
    (["add-unit", "$(reboot)"], "invalid service name"),
    (["remove-unit", "db/0;ls"], "invalid unit name"),
    (["remove-unit", "db/" + "9" * 30], "invalid unit name"),
    (["add-machine", "--address", "10.0.0.1;ls"], "invalid address"),
    (["deploy", WEB, LONG], "at most 40 characters"),
    (["add-unit", "$(reboot)"], "invalid service name"),
    (["remove-unit", "db"], "invalid unit name 'db'"),
    (["remove-unit", "db/x"], "invalid unit name"),
    (["remove-unit", "db/01"], "invalid unit name"),
    (["remove-unit", "../db/0"], "invalid unit name"),
    (["deploy", WEB, "--memory", "lots"], "invalid memory size 'lots'"),
    (["deploy", WEB, "--memory", "1K"], "below the minimum"),
    (["deploy", WEB, "--cpu-weight", "0"], "cpu weight"),
    (["deploy", WEB, "--pids", "x"], "pids limit"),
    (["deploy", WEB, "--config", "nosuch=1"], "has no option 'nosuch'"),
    (["deploy", WEB, "--config", "port=eighty"], "must be an integer"),
    (["deploy", WEB, "--config", "novalue"], "use KEY=VALUE"),
    (["deploy", WEB, "-n", "0"], "-n must be"),
    (["deploy", "/nonexistent/charm"], "does not exist"),
    (["add-machine", "--address", "300.1.1.1"], "invalid address"),
    (["create-environment", "--name", "x"], "an environment already exists"),
    (["create-environment", "--name", "x/y"], "invalid environment name"),
    (["create-environment", "--name", "x", "--network", "10.1.0.0/33"], "invalid network"),
    (["create-environment", "--name", "x", "--units-zookeeper", "10.77.0.1:2181/other"], "the root is the environment's"),
    (["create-environment", "--name", "x", "--units-zookeeper", "10.77.0.1"], "invalid ZooKeeper address"),
    (["create-environment", "--name", "y", "--package-mirror", "ftp://mirror/debian"], "--package-mirror must be"),
    (["create-environment", "--name", "y", "--package-proxy", "http://a b"], "--package-proxy must be"),
    (["create-environment", "--name", "y", "--package-proxy", "http://proxy:40000"], "ports above 32767"),
    (["create-environment", "--name", "y", "--no-package-cache", "--package-mirror", "http://m/debian"],
     "cannot be given with"),
    (["expose", "nosuch"], "service 'nosuch' not found"),
    (["unexpose", "nosuch"], "service 'nosuch' not found"),
    (["expose", "Web"], "invalid service name 'Web'"),
]
# What argparse refuses: the same one line, with exit status 2.
USAGE_INPUT = [
    (["create-environment", "--name", "x", "--network-mode", "fan"], "invalid choice: 'fan'"),
    (["expose"], "the following arguments are required"),
    (["deploy"], "the following arguments are required"),
    (["frobnicate"], "invalid choice"),
]


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("argv,message", BAD_INPUT, ids=[" ".join(a) for a, _ in BAD_INPUT])
async def test_bad_input_is_one_line_and_writes_nothing(env_client, cli, argv, message):
    assert cli("deploy", DB, "--to", "0").returncode == 0
    before = await snapshot(env_client)
    assert message in one_line_error(cli(*argv))
    assert await snapshot(env_client) == before


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("argv,message", USAGE_INPUT, ids=[" ".join(a) for a, _ in USAGE_INPUT])
async def test_usage_errors_are_one_line_and_write_nothing(env_client, cli, argv, message):
    assert cli("deploy", DB, "--to", "0").returncode == 0
    before = await snapshot(env_client)
    assert message in one_line_error(cli(*argv), status=2)
    assert await snapshot(env_client) == before


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(
    "kind,message",
    [
        ("no-metadata", "has no metadata.yaml"),
        ("metadata-list", "must be a YAML mapping"),
        ("metadata-bad-yaml", "is not valid YAML"),
        ("bad-name", "'name' must be"),
        ("hooks-not-a-directory", "hooks must be a directory"),
        ("bad-type", "option 'port' has type 'list'; use one of string, int, float, boolean"),
        ("bad-float-default", "the default of option 'ratio' is not a float"),
        ("config-options-list", "'options' must be a mapping"),
        ("bad-peers", "'peers' must be a mapping"),
        ("too-big", "the limit is 512 KiB"),
        ("bad-default", "the default of option 'port' is not a int"),
    ],
)
async def test_bad_charms_are_refused(env_client, cli, tmp_path, kind, message):
    before = await snapshot(env_client)
    assert message in one_line_error(cli("deploy", broken_charm(tmp_path, kind), "svc"))
    assert await snapshot(env_client) == before


def test_unreachable_zookeeper_names_the_address(tmp_path):
    port = free_port()
    env = ensemble_env(tmp_path, f"127.0.0.1:{port}", ENSEMBLE_CONNECT_TIMEOUT="1")
    message = one_line_error(run_ensemble("status", env=env, timeout=20))
    assert message == f"cannot reach ZooKeeper at 127.0.0.1:{port} (waited 1s)"


def test_no_environment_is_a_clear_error(tmp_path):
    env = ensemble_env(tmp_path / "empty-home")
    for argv in (["status"], ["add-unit", "db"], ["destroy-environment", "-y"]):
        message = one_line_error(run_ensemble(*argv, env=env))
        assert message.startswith(f"no environment in {tmp_path / 'empty-home'}")


def test_uninitialised_root_is_a_clear_error(zk_spec, tmp_path):
    env = ensemble_env(tmp_path, zk_spec)
    assert "no ensemble environment at" in one_line_error(run_ensemble("status", env=env))


def test_bad_zookeeper_spec(tmp_path):
    env = ensemble_env(tmp_path, "localhost")
    assert "invalid ZooKeeper address 'localhost'" in one_line_error(run_ensemble("status", env=env))


def admin_env(tmp_path, zk_spec):
    """An environment for commands run as an admin known to the test (create-environment
    takes the admin's credential from $ENSEMBLE_AUTH), and that credential."""
    from ensemble.state import auth

    admin = auth.new_admin()
    return ensemble_env(tmp_path / "home", zk_spec, ENSEMBLE_AUTH=str(admin)), admin


@pytest_twisted.ensureDeferred
async def test_create_environment_records_mode_and_units_zookeeper(client, tmp_path, zk_spec):
    from ensemble.state.environment import get_environment

    env, admin = admin_env(tmp_path, zk_spec)
    result = run_ensemble("create-environment", "--name", "multi", "--network", "10.88.0.0/16", "--network-mode",
                          "vxlan", "--units-zookeeper", "10.88.0.1:2181", env=env)
    assert result.returncode == 0, result.stderr
    assert "created environment multi" in result.stdout and "(10.88.0.0/16, vxlan)" in result.stdout
    await client.add_credential(admin)  # nobody else may read the environment
    environment = await get_environment(client)
    assert environment["network"] == {"cidr": "10.88.0.0/16", "host-prefix": 24, "mode": "vxlan"}
    assert environment["units-zookeeper"] == "10.88.0.1:2181"
    assert status(lambda *a: run_ensemble(*a, env=env))["network"]["mode"] == "vxlan"


def test_create_environment_needs_a_zookeeper(tmp_path):
    result = run_ensemble("create-environment", "--name", "x", env=ensemble_env(tmp_path))
    assert "needs --zookeeper" in one_line_error(result)


@pytest_twisted.ensureDeferred
async def test_create_environment_makes_an_admin_whose_credential_the_commands_need(tmp_path, zk_spec, client):
    from ensemble.state import auth

    anonymous = ensemble_env(tmp_path / "home", zk_spec)
    result = run_ensemble("create-environment", "--name", "guarded", env=anonymous)
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip().splitlines()[-1]
    assert line.startswith("admin credential") and "ENSEMBLE_AUTH=admin:" in line
    admin = dict(anonymous, ENSEMBLE_AUTH=line.rpartition("ENSEMBLE_AUTH=")[2])
    # Without it: a one-line refusal, and nothing changed.
    assert "ZooKeeper refused" in one_line_error(run_ensemble("add-machine", env=anonymous))
    await client.add_credential(auth.Credential.parse(admin["ENSEMBLE_AUTH"]))
    assert await client.get_children("/machines") == []
    # With it: the machine is added, and its agent's credential can be printed.
    assert run_ensemble("add-machine", env=admin).stdout.strip() == "0"
    printed = run_ensemble("machine-credential", "0", env=admin).stdout.strip()
    assert printed.startswith("machine-0:") and len(printed) > 30
    assert printed == run_ensemble("machine-credential", "0", env=admin).stdout.strip()  # derived, stable
    assert "machine 1 not found" in one_line_error(run_ensemble("machine-credential", "1", env=admin)).lower()
    assert "needs the admin's credential" in one_line_error(
        run_ensemble("machine-credential", "0", env=dict(anonymous, ENSEMBLE_AUTH=printed)))
    # An agent started with another machine's credential refuses to run.
    result = run_ensemble("machine-agent", "--machine-id", "1", "--no-containers", "--no-bridge",
                          env=dict(anonymous, ENSEMBLE_AUTH=printed))
    assert "is machine-0's credential, not machine-1's" in one_line_error(result)
    # And one with no credential at all is told where to get one.
    result = run_ensemble("machine-agent", "--machine-id", "0", "--no-containers", "--no-bridge", env=anonymous)
    assert result.returncode == 1 and "Traceback" not in result.stderr  # (agents log to stderr too)
    assert result.stderr.strip().splitlines()[-1] == (
        "error: this environment has credentials: run the agent with $ENSEMBLE_AUTH set to what "
        "'ensemble machine-credential 0' prints")
    # Nobody without it reads the environment's status either; the admin does.
    assert "ZooKeeper refused: this session has no credential" in one_line_error(run_ensemble("status", env=anonymous))
    assert status(lambda *a: run_ensemble(*a, env=admin))["machines"]["0"]["agent"] == "down"


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("options,recorded", [
    ([], {"enabled": True, "mirror": None, "proxy": None}),
    (["--package-mirror", "http://mirror.internal/debian", "--package-proxy", "http://proxy.internal:3128"],
     {"enabled": True, "mirror": "http://mirror.internal/debian", "proxy": "http://proxy.internal:3128"}),
    (["--no-package-cache"], {"enabled": False, "mirror": None, "proxy": None}),
])
async def test_the_package_cache_settings_are_recorded_in_the_environment(client, tmp_path, zk_spec, options,
                                                                          recorded):
    env, admin = admin_env(tmp_path, zk_spec)
    result = run_ensemble("create-environment", "--name", "pkgs", *options, env=env)
    assert result.returncode == 0, result.stderr
    from ensemble.state.environment import get_environment

    await client.add_credential(admin)
    assert (await get_environment(client))["package-cache"] == recorded
