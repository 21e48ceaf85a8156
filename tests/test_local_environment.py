"""A local environment in ENSEMBLE_HOME: bootstrap, status, restart, destroy-environment."""

import glob
import json
import os
import signal
import time

from ensemble.home import EnsembleHome
from ensemble.machine.container.cgroups import parent_name
from ensemble.machine.container.id_ranges import POOL
from ensemble.process import alive as process_alive

from conftest import ensemble_env, run_ensemble
from test_cli import one_line_error

DB = "examples/charms/db"


def processes_of(home):
    """Pids of every process started with this ENSEMBLE_HOME or running from it."""
    marker_env = f"ENSEMBLE_HOME={home}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                environ = f.read().split(b"\0")
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if marker_env in environ or str(home).encode() in cmdline:
            if process_alive(int(entry)):
                found.append(int(entry))
    return found


def unit_id_map(env):
    """(first host id, count) of db/0's container in the environment, once it runs."""
    status = json.loads(run_ensemble("status", "--format", "json", env=env).stdout)
    unit = status["services"].get("db", {}).get("units", {}).get("db/0", {})
    if unit.get("agent-state") != "started":
        return None
    config = os.path.join(EnsembleHome(env["ENSEMBLE_HOME"]).lxc_dir, "machine-0", unit["container"], "config")
    with open(config) as f:
        line = next(line for line in f if line.startswith("lxc.idmap = u 0 "))
    return tuple(int(v) for v in line.split()[-2:])


def wait_until(check, timeout=30.0):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.2)


def test_bootstrap_status_destroy_leaves_nothing(tmp_path):
    home = tmp_path / "home"
    env = ensemble_env(home)
    try:
        result = run_ensemble("bootstrap", "--network", "10.88.0.0/16", env=env)
        assert result.returncode == 0, result.stderr
        assert "bootstrapped environment local-" in result.stdout
        storage = EnsembleHome(str(home)).storage_dir
        assert f"containers (lxc path): {storage}/lxc/machine-0" in result.stdout
        # The admin credential is in the config: readable by its owner only.
        assert (home / "environment.yaml").stat().st_mode & 0o777 == 0o600
        assert "admin-secret" in (home / "environment.yaml").read_text()
        status = json.loads(run_ensemble("status", "--format", "json", env=env).stdout)
        assert status["machines"]["0"]["agent"] == "alive"
        assert status["network"]["cidr"] == "10.88.0.0/16"
        assert run_ensemble("deploy", DB, "--to", "0", env=env).returncode == 0
        assert processes_of(home), "bootstrap started no process"

        # A second bootstrap of a live environment is an error, not a second environment.
        message = one_line_error(run_ensemble("bootstrap", env=env))
        assert "is already running" in message
        assert len(list((home / "zookeeper").glob("zookeeper.pid"))) == 1
    finally:
        result = run_ensemble("destroy-environment", "--yes", env=env)
    assert result.returncode == 0, result.stderr
    assert "destroyed environment" in result.stdout
    assert processes_of(home) == []
    assert not home.exists()
    assert not os.path.exists(storage)
    message = one_line_error(run_ensemble("status", env=env))
    assert message.startswith(f"no environment in {home}")
    assert one_line_error(run_ensemble("deploy", DB, env=env)).startswith("no environment")
    assert one_line_error(run_ensemble("destroy-environment", "-y", env=env)).startswith("no environment")
    assert one_line_error(run_ensemble("add-unit", "db", env=env)).startswith("no environment")
    assert not home.exists()


def test_two_environments_side_by_side(tmp_path):
    envs = [ensemble_env(tmp_path / name) for name in ("one", "two")]
    try:
        for env, network in zip(envs, ("10.201.0.0/16", "10.202.0.0/16")):
            result = run_ensemble("bootstrap", "--network", network, env=env)
            assert result.returncode == 0, result.stderr
        assert run_ensemble("deploy", DB, "--to", "0", env=envs[0]).returncode == 0
        first, second = (json.loads(run_ensemble("status", "--format", "json", env=e).stdout) for e in envs)
        assert first["environment"] != second["environment"]
        assert "db" in first["services"] and second["services"] == {}
        # A unit in each: their roots are different host ids, from the one pool of the host.
        assert run_ensemble("deploy", DB, "--to", "0", env=envs[1]).returncode == 0
        maps = [wait_until(lambda env=env: unit_id_map(env), timeout=120) for env in envs]
        assert maps[0] != maps[1], maps
        for first_id, count in maps:
            assert count == 65536 and first_id >= POOL.first and first_id + count - 1 <= POOL.last
    finally:
        for env in envs:
            run_ensemble("destroy-environment", "-y", env=env)
    assert processes_of(tmp_path / "one") == [] and processes_of(tmp_path / "two") == []


def test_bootstrap_restarts_a_stopped_environment_with_its_state(tmp_path):
    home = tmp_path / "home"
    env = ensemble_env(home)
    try:
        assert run_ensemble("bootstrap", env=env).returncode == 0
        assert run_ensemble("deploy", DB, "--to", "0", env=env).returncode == 0
        # As after a host reboot: every process of the environment gone at once.
        for pid in processes_of(home):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass  # a short-lived child that ended by itself, or with its parent
        result = run_ensemble("bootstrap", env=env)
        assert result.returncode == 0, result.stderr
        assert "restarted environment" in result.stdout
        status = json.loads(run_ensemble("status", "--format", "json", env=env).stdout)
        assert status["machines"]["0"]["agent"] == "alive"
        assert list(status["services"]["db"]["units"]) == ["db/0"]
    finally:
        run_ensemble("destroy-environment", "-y", env=env)
    assert processes_of(home) == []


def test_bad_bootstrap_input_leaves_nothing(tmp_path):
    home = tmp_path / "home"
    env = ensemble_env(home)
    for argv, message in (
        (["--network", "10.0.0.0/25"], "smaller than one host subnet"),
        (["--network", "banana"], "invalid network"),
        (["--network", "10.0.0.1/16"], "host bits are set"),
        (["--name", "Bad_Name"], "invalid environment name"),
        (["--name", "../../etc"], "invalid environment name"),
        (["--network", "127.0.0.0/8"], "overlaps 127.0.0.0/8, which this host already uses"),
        (["--zookeeper-servers", "2"], "must be 1, 3, 5 or 7"),
    ):
        assert message in one_line_error(run_ensemble("bootstrap", *argv, env=env))
        assert not home.exists()


def test_bootstrap_restarts_a_dead_agent_and_refuses_changed_settings(tmp_path):
    home = tmp_path / "home"
    env = ensemble_env(home)
    # The machine's parent cgroup, made by its agent at its start (no unit needed).
    cgroup = parent_name(os.path.join(EnsembleHome(str(home)).lxc_dir, "machine-0"))
    try:
        assert run_ensemble("bootstrap", "--network", "10.203.0.0/16", env=env).returncode == 0
        agent = int((home / "run" / "machine-0.pid").read_text())
        os.kill(agent, signal.SIGKILL)
        message = one_line_error(run_ensemble("bootstrap", "--network", "10.204.0.0/16", env=env))
        assert "uses 10.203.0.0/16; --network is for new environments" in message
        message = one_line_error(run_ensemble("bootstrap", "--package-mirror", "http://m.internal/debian", env=env))
        assert "the package cache options are for new ones" in message
        result = run_ensemble("bootstrap", env=env)
        assert result.returncode == 0 and "restarted environment" in result.stdout, result.stderr
        status = json.loads(run_ensemble("status", "--format", "json", env=env).stdout)
        assert status["machines"]["0"]["agent"] == "alive"
        # The agent's name server and cache go with it, and status says so.
        os.kill(int((home / "run" / "machine-0.pid").read_text()), signal.SIGKILL)

        def down():
            machine = json.loads(run_ensemble("status", "--format", "json", env=env).stdout)["machines"]["0"]
            return machine["agent"] == "down" and machine

        machine = wait_until(down)
        assert machine["package-cache"]["state"] == machine["name-server"]["state"] == "down"
        assert glob.glob(f"/sys/fs/cgroup/*/{cgroup}")
    finally:
        run_ensemble("destroy-environment", "-y", env=env)
    assert processes_of(home) == []
    # Its agent was killed, so its driver never closed: the destroy removes it.
    assert glob.glob(f"/sys/fs/cgroup/*/{cgroup}") == []
