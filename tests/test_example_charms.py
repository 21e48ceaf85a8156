"""The example charms' hooks, run for real on this host against loopback ports."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import pytest_twisted

from ensemble import process
from ensemble.charm import REQUIRED_HOOKS, Charm, bundle_id, extract_bundle
from ensemble.state.service import ServiceStateManager
from ensemble.state.unit import UnitStateManager

CHARMS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "charms")
VENV_BIN = os.path.dirname(sys.executable)
# urllib would otherwise honour any http_proxy in the environment.
HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def cmdline(pid):
    return b" ".join(process.cmdline(pid)).decode(errors="replace")


class Unit:
    """One unit of an example charm: the charm unpacked from its bundle, a unit dir,
    and the hook environment of the contract."""

    def __init__(self, base, charm_name, number, config, zk_spec=None):
        charm = Charm.load(os.path.join(CHARMS, charm_name))
        self.name = f"{charm_name}/{number}"
        self.kind = charm_name
        self.charm_dir = str(base / f"{charm_name}-{number}-charm")
        extract_bundle(charm.bundle(), self.charm_dir)
        self.unit_dir = str(base / f"{charm_name}-{number}-unit")
        os.makedirs(self.unit_dir)
        self.pid_file = os.path.join(self.unit_dir, charm_name, "server.pid")
        self.seen_pids = set()
        self.env = {
            "PATH": f"{VENV_BIN}:/usr/local/bin:/usr/bin:/bin",
            "CHARM_DIR": self.charm_dir,
            "ENSEMBLE_UNIT_NAME": self.name,
            "ENSEMBLE_PRIVATE_ADDRESS": "127.0.0.1",
            "ENSEMBLE_UNIT_DIR": self.unit_dir,
            "ENSEMBLE_CONFIG": json.dumps(charm.config({k: str(v) for k, v in config.items()})),
        }
        if zk_spec:
            self.env["ENSEMBLE_ZOOKEEPER"] = zk_spec

    def hook(self, name, check=True):
        result = subprocess.run(
            [os.path.join(self.charm_dir, "hooks", name)],
            cwd=self.charm_dir, env=self.env, capture_output=True, text=True, timeout=30,
        )
        pid = self.pid()
        if pid:
            self.seen_pids.add(pid)
        if check:
            assert result.returncode == 0, f"{self.name} {name} hook failed:\n{result.stdout}{result.stderr}"
        return result

    def pid(self):
        try:
            with open(self.pid_file) as f:
                return int(f.read())
        except (OSError, ValueError):
            return None

    def cleanup(self):
        """Stop hook, then SIGKILL any server of ours still alive."""
        try:
            self.hook("stop", check=False)
        except subprocess.TimeoutExpired:
            pass
        for pid in self.seen_pids:
            # Only kill a process that is still this unit's server, never a recycled pid.
            if process.alive(pid) and self.unit_dir in cmdline(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def make_unit(tmp_path):
    units = []

    def make(charm_name, config, zk_spec=None, number=0):
        unit = Unit(tmp_path, charm_name, number, config, zk_spec)
        units.append(unit)
        return unit

    yield make
    for unit in reversed(units):
        unit.cleanup()
    for unit in units:
        for pid in unit.seen_pids:
            deadline = time.monotonic() + 3
            while process.alive(pid) and unit.unit_dir in cmdline(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not (process.alive(pid) and unit.unit_dir in cmdline(pid)), f"{unit.name} left pid {pid}"


def db_request(port, *lines):
    """Send each line on one connection; return the reply lines."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        stream = s.makefile("rwb")
        replies = []
        for line in lines:
            stream.write(line.encode() + b"\n")
            stream.flush()
            replies.append(stream.readline().decode().rstrip("\n"))
        return replies


def fetch(port, path="/"):
    """(status, body) of an HTTP GET, errors included."""
    try:
        with HTTP.open(f"http://127.0.0.1:{port}{path}", timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


async def deploy_db(client, port, started):
    charm = Charm.load(os.path.join(CHARMS, "db"))
    bundle = charm.bundle()
    await ServiceStateManager(client).deploy(
        "db", bundle_id(charm.name, bundle), bundle, charm.config({"port": str(port)}), {}, n=1, to=0
    )
    unit = await UnitStateManager(client).get_unit("db/0")
    fields = {"private-address": "127.0.0.1"}
    if started:
        fields["state"] = "started"
    await unit.update(**fields)
    return unit


def test_example_charms_load():
    for name in ("db", "web"):
        charm = Charm.load(os.path.join(CHARMS, name))
        assert charm.name == name
        for key in ("summary", "description"):
            assert charm.metadata.get(key)
        for hook in REQUIRED_HOOKS:
            assert os.access(os.path.join(charm.directory, "hooks", hook), os.X_OK)
    assert Charm.load(os.path.join(CHARMS, "db")).config({}) == {"port": 7070}
    assert Charm.load(os.path.join(CHARMS, "web")).config({}) == {"db": "db", "db-port": 7070, "port": 80}


def test_db_serves_and_persists(make_unit):
    port = free_port()
    db = make_unit("db", {"port": port})
    data_file = os.path.join(db.unit_dir, "db", "data.json")
    db.hook("install")
    db.hook("start")
    pid = db.pid()
    assert pid and process.alive(pid)

    assert db_request(port, "SET color deep  blue", "GET color", "GET nothing") == [
        "OK", "deep  blue", "ERR no such key"
    ]
    assert db_request(port, "SET doomed x", "DEL doomed", "GET doomed") == ["OK", "OK", "ERR no such key"]
    dump = json.loads(db_request(port, "DUMP")[0])
    assert dump["greeting"] == "hello from db/0"
    assert dump["color"] == "deep  blue"
    assert "color" in db_request(port, "KEYS")[0].split()
    with open(data_file) as f:
        assert json.load(f)["color"] == "deep  blue"

    db.hook("start")  # already running: same server
    assert db.pid() == pid

    db.hook("stop")
    assert not process.alive(pid)
    assert db.pid() is None
    assert not port_open(port)
    db.hook("stop")  # nothing running is fine

    db.hook("start")
    assert db.pid() != pid
    assert db_request(port, "GET color") == ["deep  blue"]

    db.hook("stop")
    db.hook("install")
    with open(data_file) as f:
        assert json.load(f)["color"] == "deep  blue"
    db.hook("start")
    assert db_request(port, "GET color", "GET greeting") == ["deep  blue", "hello from db/0"]


@pytest_twisted.ensureDeferred
async def test_web_shows_db(env_client, zk_spec, make_unit):
    db_port, web_port = free_port(), free_port()
    db = make_unit("db", {"port": db_port})
    db.hook("install")
    db.hook("start")
    await deploy_db(env_client, db_port, started=True)
    assert db_request(db_port, "SET dish fish & <chips>") == ["OK"]

    web = make_unit("web", {"db": "db", "db-port": db_port, "port": web_port}, zk_spec)
    web.hook("install")
    web.hook("start")
    assert fetch(web_port, "/health") == (200, "ok\n")

    status, body = fetch(web_port)
    assert status == 200, body
    assert "hello from db/0" in body
    assert "fish &amp; &lt;chips&gt;" in body and "<chips>" not in body
    assert "web/0" in body and f"127.0.0.1:{db_port}" in body

    db.hook("stop")
    status, body = fetch(web_port)
    assert status == 503, body
    assert "unreachable" in body

    db.hook("start")  # a failed read re-resolves, so the db is found again at once
    status, body = fetch(web_port)
    assert status == 200 and "fish &amp; &lt;chips&gt;" in body, body


@pytest_twisted.ensureDeferred
async def test_web_503_until_db_started(env_client, zk_spec, make_unit):
    db_port, web_port = free_port(), free_port()
    # The db server runs, but its unit is not `started`, so web must not use it.
    db = make_unit("db", {"port": db_port})
    db.hook("install")
    db.hook("start")
    unit = await deploy_db(env_client, db_port, started=False)

    web = make_unit("web", {"db": "db", "db-port": db_port, "port": web_port}, zk_spec)
    web.hook("install")
    web.hook("start")
    status, body = fetch(web_port)
    assert status == 503, body
    assert "no unit of service 'db' is started" in body

    await unit.update(state="started")
    status, body = fetch(web_port)
    assert status == 200 and "hello from db/0" in body, body
