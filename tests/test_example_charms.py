"""The example charms db, web and echo: their hooks run for real on this host (servers
on loopback ports), with the real hook tools, as the unit agent runs them
(charm_units.py)."""

import filecmp
import json
import os
import socket
import urllib.error
import urllib.request

import pytest_twisted

from charm_units import CHARMS, charm_environment
from ensemble import process
from ensemble.charm import Charm

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


def db_request(port, *lines):
    """Send each line on one connection; the reply lines."""
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


def read_line(port):
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        return s.makefile().readline()


@pytest_twisted.async_yield_fixture
async def env(tmp_path):
    async with charm_environment(tmp_path) as env:
        yield env


async def started(unit):
    for hook in ("install", "config-changed", "start"):
        await unit.hook(hook)
    return unit


def test_charms_load():
    endpoints = {
        name: {rel: (e["interface"], e["role"]) for rel, e in Charm.load(os.path.join(CHARMS, name)).endpoints.items()
               if rel != "juju-info"}
        for name in ("db", "web", "echo")
    }
    assert endpoints == {"db": {"db": ("kv", "server")}, "web": {"db": ("kv", "client")},
                         "echo": {"ring": ("echo-ring", "peer")}}
    defaults = {name: Charm.load(os.path.join(CHARMS, name)).config({}) for name in ("db", "web", "echo")}
    # Each keeps its state in the system's places, not in its charm directory (which an
    # upgrade replaces): the harness points these into the test's own directory.
    assert defaults == {"db": {"port": 7070, "data-dir": "/var/lib/example-db"},
                        "web": {"port": 80, "state-dir": "/var/lib/example-web"},
                        "echo": {"port": 7000, "state-dir": "/var/lib/example-echo"}}
    # Each charm ships on its own; the two copies of the helpers must not drift apart.
    assert filecmp.cmp(os.path.join(CHARMS, "db/hooks/hooklib.py"), os.path.join(CHARMS, "web/hooks/hooklib.py"),
                       shallow=False)


# -- db ----------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_db_serves_and_persists(env, tmp_path):
    port = free_port()
    data = tmp_path / "data"
    db = await started(env.unit("db", config={"port": port, "data-dir": str(data)}))
    pid = db.pid()
    assert pid and process.alive(pid)
    assert db.state.ports == set()  # related units reach it; nobody else needs to
    # Its pid file and log are kept with its data, not in the charm directory.
    assert sorted(os.listdir(data)) == ["data.json", "server.log", "server.pid"]
    assert (data / "server.pid").read_text() == f"{pid}\n"

    assert db_request(port, "SET color deep  blue", "GET color", "GET nothing") == ["OK", "deep  blue", "ERR no such key"]
    assert db_request(port, "SET doomed x", "DEL doomed", "GET doomed") == ["OK", "OK", "ERR no such key"]
    dump = json.loads(db_request(port, "DUMP")[0])
    assert dump["greeting"] == "hello from db/0" and dump["color"] == "deep  blue"
    assert "color" in db_request(port, "KEYS")[0].split()
    assert json.loads((data / "data.json").read_text())["color"] == "deep  blue"
    assert "seeded" in db.messages.lines[0]

    await db.hook("start")  # already running: the same server
    assert db.pid() == pid

    await db.hook("stop")
    assert not process.alive(pid) and db.pid() is None and not port_open(port)
    await db.hook("stop")  # nothing running is fine

    await db.hook("start")
    assert db.pid() != pid
    assert db_request(port, "GET color") == ["deep  blue"]

    await db.hook("stop")
    await db.hook("install")  # again: the data stays
    await db.hook("start")
    assert db_request(port, "GET color", "GET greeting") == ["deep  blue", "hello from db/0"]


@pytest_twisted.ensureDeferred
async def test_db_publishes_where_it_listens(env, tmp_path):
    port = free_port()
    db = await started(env.unit("db", config={"port": port, "data-dir": str(tmp_path / "data")}))
    web = env.unit("web")
    env.relate("db:0", db, web)
    await env.join("db:0", db, web)
    assert db.settings("db:0") == {"private-address": "127.0.0.1", "host": "127.0.0.1", "port": str(port)}
    assert db.messages.lines[-1] == f"db/0 db-relation-joined: serving web/0 on 127.0.0.1:{port}"
    assert db.state.ports == set()


@pytest_twisted.ensureDeferred
async def test_db_config_changed_moves_the_server(env, tmp_path):
    old_port, new_port = free_port(), free_port()
    db = await started(env.unit("db", config={"port": old_port, "data-dir": str(tmp_path / "one")}))
    web = env.unit("web")
    env.relate("db:0", db, web)
    await env.join("db:0", db, web)
    assert db_request(old_port, "SET where one") == ["OK"]
    old_pid = db.pid()

    db.state.config_values.update({"port": new_port, "data-dir": str(tmp_path / "two")})
    await db.hook("config-changed")
    assert not port_open(old_port) and not process.alive(old_pid)
    # A new data directory is seeded anew; the old one keeps its data.
    assert db_request(new_port, "GET where", "GET greeting") == ["ERR no such key", "hello from db/0"]
    assert json.loads((tmp_path / "one" / "data.json").read_text())["where"] == "one"
    assert db.settings("db:0")["port"] == str(new_port)  # the client is told
    # Its pid file moved with it; the old directory keeps its data and log.
    assert sorted(os.listdir(tmp_path / "one")) == ["data.json", "server.log"]
    assert (tmp_path / "two" / "server.pid").read_text() == f"{db.pid()}\n"

    pid = db.pid()
    await db.hook("config-changed")  # nothing changed: the same server
    assert db.pid() == pid


@pytest_twisted.ensureDeferred
async def test_db_config_changed_before_start_starts_nothing(env, tmp_path):
    port = free_port()
    db = env.unit("db", config={"port": port, "data-dir": str(tmp_path / "data")})
    await db.hook("install")
    await db.hook("config-changed")
    assert db.pid() is None and not port_open(port)
    assert (tmp_path / "data" / "data.json").exists()


# -- web ---------------------------------------------------------------------------------


async def db_and_web(env, tmp_path):
    db_port, web_port = free_port(), free_port()
    db = await started(env.unit("db", config={"port": db_port, "data-dir": str(tmp_path / "data")}))
    web = await started(env.unit("web", config={"port": web_port, "state-dir": str(tmp_path / "web")}))
    return db, web, db_port, web_port


@pytest_twisted.ensureDeferred
async def test_web_shows_db_through_the_relation(env, tmp_path):
    db, web, db_port, web_port = await db_and_web(env, tmp_path)
    assert web.state.ports == {(web_port, "tcp")}
    assert fetch(web_port, "/health") == (200, "ok\n")
    status, body = fetch(web_port)
    assert status == 503 and "no db relation" in body, body

    assert db_request(db_port, "SET dish fish & <chips>") == ["OK"]
    env.relate("db:0", db, web)
    await env.join("db:0", db, web)
    await env.join("db:0", web, db)
    status, body = fetch(web_port)
    assert status == 200, body
    assert "hello from db/0" in body
    assert "fish &amp; &lt;chips&gt;" in body and "<chips>" not in body
    assert f"Served by web unit web/0, reading from db/0 at 127.0.0.1:{db_port}." in body
    assert web.messages.lines[-1] == f"web/0 db-relation-changed: reading from db/0 at 127.0.0.1:{db_port}"
    # Its state is in its state-dir, not in the charm directory.
    state = tmp_path / "web"
    assert sorted(os.listdir(state)) == ["backends.json", "server.log", "server.pid"]
    assert json.loads((state / "backends.json").read_text()) == {"db:0": {"db/0": {"host": "127.0.0.1", "port": db_port}}}
    assert (state / "server.pid").read_text() == f"{web.pid()}\n"

    await db.hook("stop")
    status, body = fetch(web_port)
    assert status == 503 and f"db/0 at 127.0.0.1:{db_port}" in body, body
    await db.hook("start")
    assert fetch(web_port)[0] == 200

    await env.depart("db:0", web, db)
    status, body = fetch(web_port)
    assert status == 503 and "no db relation" in body, body


@pytest_twisted.ensureDeferred
async def test_web_waits_quietly_for_the_db_to_say_where_it_is(env, tmp_path):
    """The scheduler may run web's hooks before db's -joined: nothing to use yet."""
    db, web, db_port, web_port = await db_and_web(env, tmp_path)
    env.relate("db:0", db, web)
    result = await web.hook("db-relation-changed", "db:0", "db/0")
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert fetch(web_port)[0] == 503

    await db.hook("db-relation-joined", "db:0", "web/0")
    await web.hook("db-relation-changed", "db:0", "db/0")
    assert fetch(web_port)[0] == 200
    pid = web.pid()
    await web.hook("db-relation-changed", "db:0", "db/0")  # again: nothing new, no restart
    assert web.pid() == pid


@pytest_twisted.ensureDeferred
async def test_web_forgets_a_broken_relation(env, tmp_path):
    db, web, db_port, web_port = await db_and_web(env, tmp_path)
    env.relate("db:0", db, web)
    await env.join("db:0", db, web)
    await env.join("db:0", web, db)
    assert fetch(web_port)[0] == 200
    await env.break_("db:0", web)
    status, body = fetch(web_port)
    assert status == 503 and "no db relation" in body, body


@pytest_twisted.ensureDeferred
async def test_web_uses_the_next_db_unit_when_one_departs(env, tmp_path):
    db, web, db_port, web_port = await db_and_web(env, tmp_path)
    other_port = free_port()
    other = await started(env.unit("db", 1, config={"port": other_port, "data-dir": str(tmp_path / "other")}))
    env.relate("db:0", db, other, web)
    for unit in (db, other):
        await env.join("db:0", unit, web)
        await env.join("db:0", web, unit)
    assert "reading from db/0" in fetch(web_port)[1]
    await env.depart("db:0", web, db)
    status, body = fetch(web_port)
    assert status == 200 and "hello from db/1" in body and "reading from db/1" in body, body


@pytest_twisted.ensureDeferred
async def test_servers_and_relations_outlive_a_new_charm_directory(env, tmp_path):
    """An upgrade of the charm replaces the charm directory whole: the running servers
    are still found by their pid files, and web still knows its db units."""
    db, web, db_port, web_port = await db_and_web(env, tmp_path)
    env.relate("db:0", db, web)
    await env.join("db:0", db, web)
    await env.join("db:0", web, db)
    pids = db.pid(), web.pid()
    db.replace_charm()
    web.replace_charm()
    for unit in (db, web):
        for hook in ("config-changed", "start"):
            await unit.hook(hook)  # the same servers: none started beside them
    assert (db.pid(), web.pid()) == pids and all(process.alive(pid) for pid in pids)
    status, body = fetch(web_port)
    assert status == 200 and "reading from db/0" in body, body

    await env.depart("db:0", web, db)
    assert fetch(web_port)[0] == 503
    for unit, pid in zip((db, web), pids):
        await unit.hook("stop")
        assert not process.alive(pid) and unit.pid() is None
    assert not port_open(db_port) and not port_open(web_port)


@pytest_twisted.ensureDeferred
async def test_web_config_changed_moves_its_state(env, tmp_path):
    db, web, db_port, web_port = await db_and_web(env, tmp_path)
    env.relate("db:0", db, web)
    await env.join("db:0", db, web)
    await env.join("db:0", web, db)
    old_pid = web.pid()
    web.state.config_values["state-dir"] = str(tmp_path / "moved")
    await web.hook("config-changed")
    assert not process.alive(old_pid) and web.pid() != old_pid
    # The server reads the db units from the new directory, which has them all.
    status, body = fetch(web_port)
    assert status == 200 and "reading from db/0" in body, body
    assert sorted(os.listdir(tmp_path / "moved")) == ["backends.json", "server.log", "server.pid"]
    assert sorted(os.listdir(tmp_path / "web")) == ["server.log"]
    assert web.state.ports == {(web_port, "tcp")}

    await env.depart("db:0", web, db)  # the relation hooks use the new one too
    assert fetch(web_port)[0] == 503


@pytest_twisted.ensureDeferred
async def test_web_config_changed_moves_the_port(env, tmp_path):
    web = await started(env.unit("web", config={"port": free_port()}))
    old_port, new_port = web.state.config_values["port"], free_port()
    web.state.config_values["port"] = new_port
    await web.hook("config-changed")
    assert not port_open(old_port) and fetch(new_port, "/health") == (200, "ok\n")
    assert web.state.ports == {(new_port, "tcp")}


# -- echo --------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_echo_peers_reach_each_other(env, tmp_path):
    ports = [free_port(), free_port()]
    units = [await started(env.unit("echo", n, config={"port": ports[n], "state-dir": str(tmp_path / f"echo-{n}")}))
             for n in range(2)]
    for n, unit in enumerate(units):
        assert read_line(ports[n]) == f"echo/{n}\n"
        assert unit.state.ports == {(ports[n], "tcp")}
        assert sorted(os.listdir(tmp_path / f"echo-{n}")) == ["echo.log", "echo.pid"]

    env.relate("ring:0", *units)
    first, second = units
    await env.join("ring:0", first, second)  # second has not said its port yet
    assert first.messages.lines == []
    await env.join("ring:0", second, first)
    await first.hook("ring-relation-changed", "ring:0", "echo/1")
    assert second.settings("ring:0") == {"private-address": "127.0.0.1", "port": str(ports[1])}
    assert first.messages.lines == [f"echo/0 ring-relation-changed: peer echo/1 at 127.0.0.1:{ports[1]}: echo/1"]
    assert second.messages.lines == [f"echo/1 ring-relation-changed: peer echo/0 at 127.0.0.1:{ports[0]}: echo/0"]

    pid = first.pid()
    await first.hook("start")  # running: the same server
    assert first.pid() == pid
    first.replace_charm()  # an upgrade of the charm: the server is still found
    await first.hook("start")
    assert first.pid() == pid
    await first.hook("stop")
    assert not port_open(ports[0]) and not process.alive(pid)
