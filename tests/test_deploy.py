"""Units deployed into real LXC containers by the machine agent of a real local
environment (bootstrap on this host, a bridge of the test's own network, ZooKeeper on
the bridge address): the mission's flow, end to end."""

import contextlib
import itertools
import json
import os
import shlex
import signal
import time
import urllib.request

import pytest
import pytest_twisted
import yaml
from twisted.internet import reactor, task

from ensemble import local, process
from ensemble.home import EnsembleHome
from ensemble.machine.container.driver import LXCDriver
from ensemble.machine.content import agent_python
from ensemble.machine.container.template import Template
from ensemble.state.network import ZooKeeperAddressStore

from conftest import ensemble_env, make_charm, run_ensemble

DB, WEB = "examples/charms/db", "examples/charms/web"
# urllib would otherwise honour any http_proxy in the environment.
HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))
# Parallel test runs on one machine each give their own ENSEMBLE_TEST_NET_OFFSET, so
# their environments' networks differ.
_networks = itertools.count(int(os.environ.get("ENSEMBLE_TEST_NET_OFFSET", "1")))


class Environment:
    """A bootstrapped local environment owned by one test."""

    def __init__(self, home):
        self.home = home
        # A /16 of its own per environment, so runs and parallel environments never clash.
        self.network = f"10.{160 + next(_networks) % 60}.0.0/16"
        self.env = ensemble_env(home, ENSEMBLE_CONNECT_TIMEOUT="10")

    def cli(self, *args, check=True):
        result = run_ensemble(*args, env=self.env, timeout=120)
        if check:
            assert result.returncode == 0, result.stderr
        return result

    def status(self):
        return json.loads(self.cli("status", "--format", "json").stdout)

    def units(self):
        return {n: u for s in self.status()["services"].values() for n, u in s["units"].items()}

    @property
    def config(self):
        return yaml.safe_load((self.home / "environment.yaml").read_text())

    def driver(self):
        return LXCDriver(os.path.join(EnsembleHome(str(self.home)).lxc_dir, "machine-0"), Template())

    async def client(self):
        return await local.admin_client(EnsembleHome(str(self.home)))

    def agent_pid(self):
        return int((self.home / "run" / "machine-0.pid").read_text())


@contextlib.contextmanager
def bootstrapped(home):
    """A bootstrapped Environment in `home`, destroyed afterwards, even if what the
    fixture does with it first fails (a module's own fixture, when its tests can share
    one: each bootstrap costs seconds)."""
    env = Environment(home)
    try:
        env.cli("bootstrap", "--network", env.network)
        yield env
    finally:
        if EnsembleHome(str(home)).exists():
            result = env.cli("destroy-environment", "-y", check=False)
            assert result.returncode == 0, result.stderr


@pytest.fixture
def environment(tmp_path):
    with bootstrapped(tmp_path / "home") as env:
        yield env


async def until(check, timeout=120.0, what="condition"):
    deadline = reactor.seconds() + timeout
    while True:
        value = check()
        if hasattr(value, "__await__"):
            value = await value
        if value:
            return value
        assert reactor.seconds() < deadline, f"{what} not reached in {timeout:g}s"
        await task.deferLater(reactor, 0.25, lambda: None)


def states(env):
    return {name: unit["agent-state"] for name, unit in env.units().items()}


async def all_started(env, names):
    await until(lambda: states(env) == {n: "started" for n in names}, what=f"{names} started")
    return env.units()


async def sh(driver, container, script):
    code, out, err = await driver.exec(container, ["/bin/sh", "-c", script], timeout=30)
    return code, out.decode(), err.decode()


# Inside a unit: set fields (JSON) of a unit node with $ENSEMBLE_AUTH's credential.
ZK_WRITE = (
    "import json, sys; from twisted.internet import defer, task; from ensemble import connection; "
    "from ensemble.state import nodes; from ensemble.state.client import NoAuth\n"
    "async def main(reactor):\n"
    "    client = await connection.connect()\n"
    "    try:\n"
    "        await nodes.update(client, sys.argv[1], nodes.merge(json.loads(sys.argv[2]))); print('changed')\n"
    "    except NoAuth:\n"
    "        print('NoAuth')\n"
    "    await client.close()\n"
    "task.react(lambda r: defer.ensureDeferred(main(r)))"
)


async def write_as_unit(driver, container, path, fields):
    """'changed' or 'NoAuth': what the unit's own agent credential, used from inside
    its container, could do to `path`."""
    code, out, err = await sh(driver, container, (
        "export $(grep -o 'ENSEMBLE_[A-Z_]*=[^ ]*' /etc/ensemble/service/agent/run); "
        f"{agent_python()} -c {shlex.quote(ZK_WRITE)} {path} {shlex.quote(json.dumps(fields))}"
    ))
    assert code == 0, err
    return out.strip()


@pytest_twisted.ensureDeferred
async def test_two_services_on_one_machine_are_started_connected_and_isolated(environment):
    env = environment
    env.cli("deploy", DB, "--to", "0")
    env.cli("deploy", WEB, "--to", "0")
    env.cli("add-relation", "web", "db")
    units = await all_started(env, ["db/0", "web/0"])
    db, web = units["db/0"], units["web/0"]
    subnet = env.status()["machines"]["0"]["subnet"]
    assert db["private-address"] != web["private-address"]
    assert all(u["private-address"].rsplit(".", 1)[0] == subnet.rsplit(".", 1)[0] for u in (db, web))

    # web found db through the relation and reaches it over TCP: its page holds what it
    # read from the db unit. The test, on the host, reaches web's opened port once web
    # is exposed.
    env.cli("expose", "web")

    async def page():
        try:
            with HTTP.open(f"http://{web['private-address']}/", timeout=10) as response:
                return response.read().decode()
        except OSError:
            return None  # web's relation hooks run after it started
    text = await until(page, what="web serving db's data")
    assert "hello from db/0" in text and f"reading from db/0 at {db['private-address']}:7070" in text

    driver = env.driver()
    try:
        # db listens on a unix socket too, to show web cannot reach it.
        code, _, err = await sh(driver, db["container"], (
            "setsid python3 -c \"import socket,time; s=socket.socket(socket.AF_UNIX); "
            "s.bind('/tmp/db.sock'); s.listen(); time.sleep(600)\" >/dev/null 2>&1 & sleep 0.5; test -S /tmp/db.sock"
        ))
        assert code == 0, err
        code, out, _ = await sh(driver, web["container"], "for f in /proc/[0-9]*/cmdline; do tr '\\0' ' ' < $f; echo; done")
        assert "--unit web/0" in out and "--unit db/0" not in out, out
        assert out.count("/var/lib/ensemble/charm/server.py") == 1, out  # web's own server only
        code, _, _ = await sh(driver, db["container"], "test -e /var/lib/example-db/data.json")
        assert code == 0, "db keeps its data elsewhere: this test would prove nothing"
        code, _, _ = await sh(driver, web["container"], "test -e /var/lib/example-db/data.json")
        assert code != 0, "web sees db's files"
        code, _, _ = await sh(driver, web["container"], "test -e /tmp/db.sock")
        assert code != 0, "web sees db's unix socket"
        # The charms keep their state in the system's places (web its db units in its
        # state-dir): the charm directory, which an upgrade of the charm replaces whole,
        # has nothing newer than the agent's stamp of the charm it unpacked.
        code, out, _ = await sh(driver, web["container"], "cat /var/lib/example-web/backends.json")
        assert code == 0 and '"db/0"' in out, out
        for unit in (db, web):
            code, out, err = await sh(driver, unit["container"],
                                      "find /var/lib/ensemble/charm -newer /var/lib/ensemble/charm/.ensemble-charm")
            assert (code, out) == (0, ""), (out, err)
        code, out, _ = await sh(driver, web["container"], "hostname")
        assert out.strip() == "web-0"
        # Each unit's root is the first id of a range of its own, not host root: its
        # processes, and the logs it writes to its directory the host shares, belong
        # to that id, which is no other unit's.
        ids = {}
        for unit in (db, web):
            ids[unit["container"]] = (await driver.id_range(unit["container"])).first
            init = await driver.init_pid(unit["container"])
            assert os.stat(f"/proc/{init}").st_uid == ids[unit["container"]]
        assert len(set(ids.values())) == 2
        # web's agent's own ZooKeeper credential, used from inside web, may change web's
        # node but not db's.
        assert await write_as_unit(driver, web["container"], "/units/web-0", {"touched": True}) == "changed"
        assert await write_as_unit(driver, web["container"], "/units/db-0", {"touched": True}) == "NoAuth"
        # The charms' servers, the part exposed to the network, do not hold it at all.
        for unit in (db, web):
            code, out, err = await sh(driver, unit["container"], (
                "for p in $(pgrep -f charm/server.py); do tr '\\0' '\\n' < /proc/$p/environ; done"))
            assert code == 0 and "JUJU_UNIT_NAME=" in out, (out, err)
            assert not any(f"{v}=" in out for v in ("ENSEMBLE_AUTH", "ENSEMBLE_READER", "ENSEMBLE_ZOOKEEPER")), out
        assert "touched" not in env.units()["db/0"]
        logs = env.home / "logs" / "units"
        for unit_dir, unit in (("db-0", db), ("web-0", web)):
            files = list((logs / unit_dir).iterdir())
            assert files and all(f.stat().st_uid == ids[unit["container"]] for f in files), files
            # Its directory is open to it alone: another unit's ids cannot read its hooks' output.
            assert os.stat(logs / unit_dir).st_mode & 0o077 == 0
    finally:
        await driver.close()


@pytest_twisted.ensureDeferred
async def test_remove_unit_frees_the_machine_for_the_next_unit(environment):
    env = environment
    env.cli("deploy", DB, "--to", "0")
    first = (await all_started(env, ["db/0"]))["db/0"]
    driver = env.driver()
    ids = await driver.id_range(first["container"])
    assert ids is not None
    env.cli("remove-unit", "db/0")
    await until(lambda: env.units() == {}, what="db/0 removed")
    client = await env.client()
    try:
        assert await driver.list() == []
        assert await ZooKeeperAddressStore(client, 0).taken() == []
        # Its id range is free, and nothing in the environment's home (containers,
        # logs) is owned by it: a unit given that range later finds nothing of db/0's.
        assert await driver.id_range(first["container"]) is None
        owned = [os.path.join(d, n) for d, dirs, files in os.walk(env.home) for n in dirs + files
                 if ids.first <= os.lstat(os.path.join(d, n)).st_uid < ids.first + ids.count]
        assert owned == []
        # Its log stays, host root's, out of the way of a later db/0 (debug-log --removed).
        assert not (env.home / "logs" / "units" / "db-0").exists()
        assert len(list((env.home / "logs" / "units" / "removed").glob("db-0.*"))) == 1
        env.cli("add-unit", "db", "--to", "0")
        second = (await all_started(env, ["db/1"]))["db/1"]
        assert second["container"] != first["container"]
        assert await driver.list() == [second["container"]]
        # A fresh container: the new unit's data, nothing of the old unit's.
        code, _, _ = await sh(driver, second["container"], (
            "grep -q db/1 /var/lib/example-db/data.json && ! grep -q db/0 /var/lib/example-db/data.json"))
        assert code == 0
    finally:
        await client.close()
        await driver.close()


@pytest_twisted.ensureDeferred
async def test_agent_killed_mid_deploy_converges_on_restart(environment):
    env = environment
    env.cli("deploy", DB, "--to", "0", "-n", "3")
    time.sleep(0.3)  # mid-deploy
    os.kill(env.agent_pid(), signal.SIGKILL)
    # While it is down: one unit removed, another added.
    env.cli("remove-unit", "db/1")
    env.cli("add-unit", "db", "--to", "0")
    restarted = env.cli("bootstrap")
    assert "restarted environment" in restarted.stdout
    await all_started(env, ["db/0", "db/2", "db/3"])
    driver = env.driver()
    client = await env.client()
    try:
        units = env.units()

        async def converged():
            containers = sorted(await driver.list())
            taken = sorted(await ZooKeeperAddressStore(client, 0).taken())
            return containers == sorted(u["container"] for u in units.values()) and taken == sorted(
                u["private-address"] for u in units.values()
            )

        await until(converged, timeout=30, what="containers and addresses matching the units")
    finally:
        await client.close()
        await driver.close()


@pytest_twisted.ensureDeferred
async def test_failing_install_hook_is_an_error_and_spares_the_others(environment, tmp_path):
    env = environment
    broken = make_charm(tmp_path / "broken", name="broken", hooks={"install": "echo cannot install >&2; exit 7"})
    env.cli("deploy", broken, "--to", "0")
    env.cli("deploy", DB, "--to", "0")
    await until(lambda: states(env) == {"broken/0": "error", "db/0": "started"}, what="broken in error, db started")
    assert env.units()["broken/0"]["error"] == "install hook exited with status 7: cannot install"
    log = env.cli("debug-log", "broken/0").stdout
    assert "cannot install" in log and "install hook exited with status 7" in log


@pytest_twisted.ensureDeferred
async def test_a_killed_unit_agent_is_restarted_and_reports_started(environment):
    env = environment
    env.cli("deploy", DB, "--to", "0")
    container = (await all_started(env, ["db/0"]))["db/0"]["container"]
    driver = env.driver()
    client = await env.client()
    try:
        code, out, _ = await sh(driver, container, "cat /etc/ensemble/service/agent/supervise/pid")
        old_pid = out.strip()
        assert code == 0 and old_pid.isdigit()
        code, out, _ = await sh(driver, container, "cat /var/lib/example-db/server.pid")
        server_pid = out.strip()
        assert code == 0 and server_pid.isdigit(), out
        await sh(driver, container, f"kill -9 {old_pid}")

        async def new_agent():
            code, out, _ = await sh(driver, container, "cat /etc/ensemble/service/agent/supervise/pid")
            return code == 0 and out.strip() not in ("", old_pid)

        await until(new_agent, timeout=30, what="a new unit agent")
        await until(lambda: env.units()["db/0"]["agent"] == "alive", timeout=30, what="agent alive")
        assert env.units()["db/0"]["agent-state"] == "started"
        # The charm's service kept running through the agent's restart.
        code, _, _ = await sh(driver, container, f"kill -0 {server_pid}")
        assert code == 0
    finally:
        await client.close()
        await driver.close()


@pytest_twisted.ensureDeferred
async def test_a_stopped_container_is_started_again(environment):
    env = environment
    env.cli("deploy", DB, "--to", "0")
    container = (await all_started(env, ["db/0"]))["db/0"]["container"]
    driver = env.driver()
    try:
        ids = await driver.id_range(container)
        await driver.stop(container)
        await until(lambda: driver.state(container), what="container state")
        await until(
            lambda: _running(driver, container), timeout=30, what="the container running again"
        )
        await until(lambda: env.units()["db/0"]["agent"] == "alive", timeout=30, what="agent alive")
        assert env.units()["db/0"]["agent-state"] == "started"
        # Started again (as after a host's reboot) with the same ids: its files are still its own.
        assert await driver.id_range(container) == ids
        assert os.stat(f"/proc/{await driver.init_pid(container)}").st_uid == ids.first
    finally:
        await driver.close()


async def _running(driver, container):
    return await driver.state(container) == "RUNNING"


@pytest_twisted.ensureDeferred
async def test_units_survive_an_agent_restart_untouched(environment):
    env = environment
    env.cli("deploy", DB, "--to", "0")
    container = (await all_started(env, ["db/0"]))["db/0"]["container"]
    driver = env.driver()
    try:
        init_before = await driver.init_pid(container)
        ids = await driver.id_range(container)
        pid = env.agent_pid()
        os.kill(pid, signal.SIGTERM)
        await until(lambda: not process.alive(pid), timeout=20, what="agent exit")
        assert await driver.state(container) == "RUNNING"
        assert env.status()["machines"]["0"]["agent"] == "down"
        assert env.units()["db/0"]["agent-state"] == "started"
        env.cli("bootstrap")  # restarts the machine agent
        await until(lambda: env.status()["machines"]["0"]["agent"] == "alive", what="agent back")
        await task.deferLater(reactor, 2, lambda: None)  # a reconcile pass
        assert await driver.init_pid(container) == init_before, "the container was restarted"
        assert await driver.list() == [container]
        assert await driver.id_range(container) == ids, "the unit's ids changed"
    finally:
        await driver.close()



@pytest_twisted.ensureDeferred
async def test_service_limits_reach_the_units_cgroup(environment):
    env = environment
    env.cli("deploy", DB, "--to", "0", "--memory", "256M", "--cpu-weight", "200", "--pids", "300")
    container = (await all_started(env, ["db/0"]))["db/0"]["container"]
    driver = env.driver()
    try:
        memory = driver.payload_cgroup(container, "memory")
        with open(os.path.join(memory, "memory.limit_in_bytes")) as f:
            assert int(f.read()) == 256 * 2**20
        with open(os.path.join(driver.payload_cgroup(container, "cpu"), "cpu.shares")) as f:
            assert int(f.read()) == 2048  # weight 200 of the default 100, as shares of 1024
        pids = driver.payload_cgroup(container, "pids")
        if pids:
            with open(os.path.join(pids, "pids.max")) as f:
                assert f.read().strip() == "300"
    finally:
        await driver.close()
