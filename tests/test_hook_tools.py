"""The hook tools as charms run them: real tool processes (the console scripts, as
pip would write them) against the hook-tool server on a unix socket, on this test's
reactor, backed by an in-memory unit state. Plus the wire protocol: the standard-
library client and Twisted's AMP understand each other, errors included."""

import io
import json
import logging
import os
import socket
import stat
import subprocess
import sys
from collections import namedtuple

import pytest
import pytest_twisted
from twisted.internet import defer, endpoints, reactor, threads
from twisted.protocols import amp

from ensemble.errors import EnsembleError
from ensemble.unit.tools import commands, wire
from ensemble.unit.tools.names import TOOLS
from ensemble.unit.tools.context import CachedHookContext
from ensemble.unit.tools.memory import MemoryState
from ensemble.unit.tools.server import HookToolFactory, listen

Result = namedtuple("Result", "out err status")

UNIT = "wordpress/0"
DB_SETTINGS = {"private-address": "10.0.3.5", "password": "s3cret", "user": "wp"}


def unit_state():
    return MemoryState(
        UNIT,
        relations={"db:0": "db", "db:3": "db", "cache:1": "cache"},
        settings={
            ("db:0", "mysql/0"): DB_SETTINGS,
            ("db:0", "mysql/1"): {"private-address": "10.0.3.7"},
            ("db:0", UNIT): {"private-address": "10.0.3.6"},
            ("db:3", "pg/0"): {"private-address": "10.0.3.9", "database": "wp two"},
            ("db:3", UNIT): {"private-address": "10.0.3.6"},
            ("cache:1", "memcached/0"): {"private-address": "10.0.3.8", "port": "11211"},
        },
        members={"db:0": ["mysql/1", "mysql/0"], "db:3": ["pg/0"], "cache:1": ["memcached/0"]},
        config={"title": "My blog", "port": 8080, "debug": False, "ratio": 0.5, "admin": None},
        addresses={"private-address": "10.0.3.6", "public-address": "192.0.2.10"},
    )


@pytest.fixture(scope="module")
def tools(tmp_path_factory):
    """The tools as console scripts (what pip writes for setup.py's entry points)."""
    bin_dir = tmp_path_factory.mktemp("bin")
    for name, function in TOOLS.items():
        path = bin_dir / name
        path.write_text(
            f"#!{sys.executable}\nimport sys\nfrom ensemble.unit.tools.cli import {function}\n"
            f"if __name__ == '__main__':\n    sys.exit({function}())\n"
        )
        path.chmod(0o755)
    return bin_dir


class Hook:
    """A running hook: its context served under its client id, and its environment."""

    def __init__(self, agent, context, env):
        self.agent = agent
        self.context = context
        self.client_id = agent.factory.add(context)
        self.env = {"JUJU_AGENT_SOCKET": agent.socket, "JUJU_CLIENT_ID": self.client_id, **env}

    def end(self):
        self.agent.factory.remove(self.client_id)

    async def run(self, tool, *args, env=None, drop=()):
        """Run a tool as the hook would: its exit status and output."""
        full = {"PATH": os.environ["PATH"], "LANG": "C.UTF-8", **self.env, **(env or {})}
        for name in drop:
            full.pop(name, None)
        done = await threads.deferToThread(
            subprocess.run, [str(self.agent.tools / tool), *args], env=full, capture_output=True, text=True, timeout=30
        )
        return Result(done.stdout, done.stderr, done.returncode)


class Agent:
    def __init__(self, socket, factory, state, tools):
        self.socket = socket
        self.factory = factory
        self.state = state
        self.tools = tools

    def hook(self, hook="db-relation-changed", relation_id="db:0", remote_unit="mysql/0", members=None,
             broken=False, state=None):
        context = CachedHookContext(state or self.state, hook, relation_id, members, broken)
        env = {"JUJU_UNIT_NAME": UNIT}
        if relation_id:
            env.update(JUJU_RELATION=relation_id.split(":")[0], JUJU_RELATION_ID=relation_id,
                       JUJU_REMOTE_UNIT=remote_unit or "")
        return Hook(self, context, env)


@pytest_twisted.async_yield_fixture
async def agent(tmp_path, tools):
    factory = HookToolFactory()
    path = str(tmp_path / "agent.sock")
    port = listen(reactor, path, factory)
    yield Agent(path, factory, unit_state(), tools)
    await defer.maybeDeferred(port.stopListening)


def one_line_error(result, tool, message):
    assert result.status == 1
    assert result.out == ""
    assert result.err == f"{tool}: error: {message}\n"


# -- the wire: stdlib client <-> Twisted AMP ------------------------------------------


def test_boxes_are_amp_boxes():
    """What the stdlib client encodes, Twisted's AMP parses; and the other way."""
    fields = {"_command": "relation_get", "_ask": "1", "client_id": "c", "port": 80, "data": "é" * 10}
    (parsed,) = amp.parseString(wire.encode_box(fields))
    assert parsed == {k.encode(): (str(v) if isinstance(v, int) else v).encode() for k, v in fields.items()}
    box = amp.AmpBox({b"_answer": b"1", b"data": b'"x"'})
    assert wire.read_box(io.BytesIO(box.serialize())) == {b"_answer": b"1", b"data": b'"x"'}


@pytest_twisted.ensureDeferred
async def test_stdlib_client_calls_the_twisted_server(agent):
    hook = agent.hook()
    answer = await threads.deferToThread(
        wire.call, agent.socket, "relation_get", client_id=hook.client_id, unit_name="mysql/0", setting_name="password"
    )
    assert json.loads(answer["data"]) == "s3cret"


@pytest_twisted.ensureDeferred
async def test_errors_map_back_to_the_stdlib_client(agent):
    hook = agent.hook()
    call = lambda command, **fields: threads.deferToThread(wire.call, agent.socket, command, **fields)  # noqa: E731

    # An EnsembleError in the agent: its message, as is.
    with pytest.raises(wire.RemoteError) as raised:
        await call("relation_get", client_id=hook.client_id, unit_name="mysql/9")
    assert raised.value.code == wire.ERROR_CODE
    assert str(raised.value) == "unit 'mysql/9' is not in relation 'db:0'"
    assert isinstance(raised.value, EnsembleError)

    # A command the agent does not know (a tool newer than its agent).
    with pytest.raises(wire.RemoteError, match="does not know the command 'leader_get'"):
        await call("leader_get", client_id=hook.client_id)

    # A failure that is no EnsembleError (a bug, ZooKeeper gone): one line, and the
    # server goes on serving.
    class Broken(MemoryState):
        async def config(self):
            raise RuntimeError("boom")

    broken = agent.hook(state=Broken(UNIT))
    with pytest.raises(wire.RemoteError, match=r"^the unit agent failed: RuntimeError: boom$"):
        await call("config_get", client_id=broken.client_id)
    answer = await call("unit_get", client_id=hook.client_id, setting_name="private-address")
    assert json.loads(answer["data"]) == "10.0.3.6"


@pytest_twisted.ensureDeferred
async def test_twisted_amp_client_calls_the_server(agent):
    """The server is plain AMP: Twisted's own client and its error mapping work."""
    hook = agent.hook()
    endpoint = endpoints.UNIXClientEndpoint(reactor, agent.socket)
    client = await endpoints.connectProtocol(endpoint, amp.AMP())
    try:
        answer = await client.callRemote(
            commands.RelationGet, client_id=hook.client_id, relation_id="db:3", unit_name="pg/0",
            setting_name=None,
        )
        assert json.loads(answer["data"]) == {"private-address": "10.0.3.9", "database": "wp two"}
        with pytest.raises(EnsembleError, match="^Unit has no setting: 'foo'$"):
            await client.callRemote(commands.UnitGet, client_id=hook.client_id, setting_name="foo")
    finally:
        client.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_values_longer_than_an_amp_value(agent, tmp_path):
    """KEY=@FILE of 200 KB: split over several AMP values both ways."""
    big = "".join(f"line {n} é\n" for n in range(20000))
    assert len(big.encode()) > 3 * wire.MAX_VALUE
    (tmp_path / "big").write_text(big)
    hook = agent.hook()
    assert await hook.run("relation-set", f"cert=@{tmp_path / 'big'}") == Result("", "", 0)
    assert hook.context.changes == {"db:0": {"cert": big}}
    got = await hook.run("relation-get", "cert", UNIT)
    assert got.out == big + "\n"


# -- relation-get ----------------------------------------------------------------------


@pytest.mark.parametrize("args, out", [
    (["password"], "s3cret\n"),
    ([], "{'password': 's3cret', 'private-address': '10.0.3.5', 'user': 'wp'}\n"),
    (["-"], "{'password': 's3cret', 'private-address': '10.0.3.5', 'user': 'wp'}\n"),
    (["--format", "json"], '{"password": "s3cret", "private-address": "10.0.3.5", "user": "wp"}\n'),
    (["--format=json", "password"], '"s3cret"\n'),
    (["unset-key"], "\n"),  # unset: "" (not an error)
    (["unset-key", "--format", "json"], '""\n'),
    (["-", "mysql/1"], "{'private-address': '10.0.3.7'}\n"),
    (["private-address", "mysql/1"], "10.0.3.7\n"),
    (["-r", "db:3", "database", "pg/0"], "wp two\n"),
    (["-r", "db:3", "-", "pg/0", "--format", "json"], '{"database": "wp two", "private-address": "10.0.3.9"}\n'),
    (["--format", "shell"], "VAR_PASSWORD=s3cret\nVAR_PRIVATE_ADDRESS=10.0.3.5\nVAR_USER=wp\n"),
    (["--format", "shell", "password"], "VAR_PASSWORD=s3cret\n"),
    (["-r", "db:3", "--format", "shell", "-", "pg/0"], "VAR_DATABASE='wp two'\nVAR_PRIVATE_ADDRESS=10.0.3.9\n"),
])
@pytest_twisted.ensureDeferred
async def test_relation_get(agent, args, out):
    assert await agent.hook().run("relation-get", *args) == Result(out, "", 0)


@pytest_twisted.ensureDeferred
async def test_relation_get_shell_empties_stale_variables(agent):
    result = await agent.hook().run("relation-get", "--format", "shell", "user", env={"VAR_OLD": "x"})
    assert result.out == "VAR_OLD=\nVAR_USER=wp\n"
    assert "VAR_OLD" in result.err and result.status == 0


@pytest_twisted.ensureDeferred
async def test_relation_get_errors(agent):
    hook = agent.hook()
    one_line_error(await hook.run("relation-get", "-", "mysql/9"), "relation-get",
                   "unit 'mysql/9' is not in relation 'db:0'")
    one_line_error(await hook.run("relation-get", "-r", "db:7", "-", "mysql/0"), "relation-get",
                   "relation 'db:7' not found (relation-ids lists this unit's relations)")
    install = agent.hook("install", relation_id=None)
    one_line_error(await install.run("relation-get", "-", "mysql/0"), "relation-get",
                   "not in a relation hook: give -r RELATION_ID")
    one_line_error(await install.run("relation-get", "-r", "db:0"), "relation-get",
                   "no unit given, and JUJU_REMOTE_UNIT is not set: give UNIT")
    assert (await install.run("relation-get", "-r", "db:0", "user", "mysql/0")).out == "wp\n"


@pytest_twisted.ensureDeferred
async def test_reads_are_cached_for_the_hook(agent):
    hook = agent.hook()
    assert (await hook.run("relation-get", "password")).out == "s3cret\n"
    assert (await hook.run("config-get", "title")).out == "My blog\n"
    assert (await hook.run("unit-get", "public-address")).out == "192.0.2.10\n"
    # Others change the state while the hook runs…
    agent.state.settings["db:0", "mysql/0"]["password"] = "changed"
    agent.state.config_values["title"] = "Changed"
    agent.state.unit_addresses["public-address"] = "192.0.2.99"
    # …the hook sees what it read first, to its end…
    assert (await hook.run("relation-get")).out.startswith("{'password': 's3cret'")
    assert (await hook.run("config-get", "title")).out == "My blog\n"
    assert (await hook.run("unit-get", "public-address")).out == "192.0.2.10\n"
    assert agent.state.reads["settings", "db:0", "mysql/0"] == 1
    assert agent.state.reads["config",] == 1
    assert agent.state.reads["addresses",] == 1
    # …and the next hook reads afresh.
    assert (await agent.hook().run("relation-get", "password")).out == "changed\n"


@pytest_twisted.ensureDeferred
async def test_relation_list_is_the_changes_snapshot(agent):
    """In a relation hook: the members as of its change (mysql/1 not joined yet)."""
    hook = agent.hook(members=["mysql/0"])
    assert (await hook.run("relation-list")).out == "mysql/0\n"
    assert agent.state.reads["members", "db:0"] == 0
    # Another relation's members: read once, then kept.
    assert (await hook.run("relation-list", "-r", "db:3")).out == "pg/0\n"
    agent.state.members["db:3"].append("pg/1")
    assert (await hook.run("relation-list", "-r", "db:3")).out == "pg/0\n"


# -- relation-set ----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_relation_set_is_buffered_and_read_back(agent, tmp_path):
    (tmp_path / "motd").write_text("hello\nworld\n")
    hook = agent.hook()
    result = await hook.run("relation-set", "database=wp", "url=http://x/?a=b", f"motd=@{tmp_path / 'motd'}")
    assert result == Result("", "", 0)
    # Nothing reaches the unit's state: the agent commits `changes` if the hook exits 0.
    assert agent.state.settings["db:0", UNIT] == {"private-address": "10.0.3.6"}
    assert hook.context.changes == {"db:0": {"database": "wp", "url": "http://x/?a=b", "motd": "hello\nworld\n"}}
    # The hook reads its own writes.
    assert (await hook.run("relation-get", "url", UNIT)).out == "http://x/?a=b\n"
    # KEY= and a blank value delete.
    assert (await hook.run("relation-set", "database=", "url=  ", "private-address=")).status == 0
    assert hook.context.changes == {
        "db:0": {"database": None, "url": None, "motd": "hello\nworld\n", "private-address": None}
    }
    assert (await hook.run("relation-get", "-", UNIT, "--format", "json")).out == '{"motd": "hello\\nworld\\n"}\n'
    # -r: another relation's buffer.
    assert (await hook.run("relation-set", "-r", "db:3", "a=b")).status == 0
    assert hook.context.changes["db:3"] == {"a": "b"}
    assert (await hook.run("relation-get", "-r", "db:3", "-", UNIT)).out == "{'a': 'b', 'private-address': '10.0.3.6'}\n"
    # No settings at all: nothing to do.
    assert (await hook.run("relation-set")) == Result("", "", 0)


@pytest_twisted.ensureDeferred
async def test_relation_set_errors(agent, tmp_path):
    hook = agent.hook()
    one_line_error(await hook.run("relation-set", "a=1", "foo"), "relation-set", "Expected `option=value`. Found `foo`")
    one_line_error(await hook.run("relation-set", f"k=@{tmp_path}/missing"), "relation-set",
                   f"No such file or directory: {tmp_path}/missing (argument:k)")
    one_line_error(await hook.run("relation-set", "=v"), "relation-set", "invalid setting name ''")
    one_line_error(await hook.run("relation-set", "-r", "db:9", "a=b"), "relation-set",
                   "relation 'db:9' not found (relation-ids lists this unit's relations)")
    install = agent.hook("install", relation_id=None)
    one_line_error(await install.run("relation-set", "a=b"), "relation-set", "not in a relation hook: give -r RELATION_ID")
    assert hook.context.changes == {} and install.context.changes == {}
    assert (await install.run("relation-set", "-r", "db:0", "a=b")).status == 0
    assert install.context.changes == {"db:0": {"a": "b"}}


@pytest_twisted.ensureDeferred
async def test_broken_relation(agent):
    """-relation-broken: the relation is gone; the unit's own settings only, no writes."""
    del agent.state.relations_by_id["db:0"]
    hook = agent.hook("db-relation-broken", remote_unit="", broken=True)
    assert (await hook.run("relation-get")).out == "{'private-address': '10.0.3.6'}\n"
    assert (await hook.run("relation-list")).out == ""
    one_line_error(await hook.run("relation-get", "-", "mysql/0"), "relation-get",
                   "cannot read other units' settings in broken relation 'db:0'")
    one_line_error(await hook.run("relation-set", "a=b"), "relation-set",
                   "cannot change settings in broken relation 'db:0'")
    assert (await hook.run("relation-ids")).out == "db:3\n"  # the other db relation lives on
    assert (await hook.run("relation-set", "-r", "db:3", "a=b")).status == 0


# -- relation-list, relation-ids --------------------------------------------------------


@pytest.mark.parametrize("tool, args, out", [
    ("relation-list", [], "mysql/0\nmysql/1\n"),
    ("relation-list", ["--format", "json"], '["mysql/0", "mysql/1"]\n'),
    ("relation-list", ["--format", "eval"], 'export JUJU_MEMBERS="mysql/0 mysql/1"\n'),
    ("relation-list", ["-r", "cache:1"], "memcached/0\n"),
    ("relation-ids", [], "db:0\ndb:3\n"),  # $JUJU_RELATION
    ("relation-ids", ["cache"], "cache:1\n"),
    ("relation-ids", ["--format", "json"], '["db:0", "db:3"]\n'),
    ("relation-ids", ["website"], ""),
    ("relation-ids", ["website", "--format", "json"], "[]\n"),
])
@pytest_twisted.ensureDeferred
async def test_relation_list_and_ids(agent, tool, args, out):
    assert await agent.hook().run(tool, *args) == Result(out, "", 0)


@pytest_twisted.ensureDeferred
async def test_relation_list_empty_and_ids_without_a_name(agent):
    agent.state.members["db:0"] = []
    hook = agent.hook()
    assert (await hook.run("relation-list")).out == ""
    assert (await hook.run("relation-list", "--format", "eval")).out == 'export JUJU_MEMBERS=""\n'
    install = agent.hook("install", relation_id=None)
    one_line_error(await install.run("relation-ids"), "relation-ids",
                   "relation name must be specified (JUJU_RELATION is not set)")
    one_line_error(await install.run("relation-list"), "relation-list", "not in a relation hook: give -r RELATION_ID")


# -- config-get, unit-get -------------------------------------------------------------


@pytest.mark.parametrize("args, out", [
    (["title"], "My blog\n"),
    (["port"], "8080\n"),
    (["debug"], "False\n"),
    (["ratio"], "0.5\n"),
    (["admin"], ""),  # no value and no default: nothing, not an error
    (["nonesuch"], ""),
    (["admin", "--format", "json"], "null\n"),
    (["debug", "--format", "json"], "false\n"),
    (["title", "--format", "json"], '"My blog"\n'),
    ([], "{'debug': False, 'port': 8080, 'ratio': 0.5, 'title': 'My blog'}\n"),
    (["--format", "json"], '{"debug": false, "port": 8080, "ratio": 0.5, "title": "My blog"}\n'),
])
@pytest_twisted.ensureDeferred
async def test_config_get(agent, args, out):
    assert await agent.hook("config-changed", relation_id=None).run("config-get", *args) == Result(out, "", 0)


@pytest_twisted.ensureDeferred
async def test_unit_get(agent):
    hook = agent.hook("install", relation_id=None)
    assert await hook.run("unit-get", "private-address") == Result("10.0.3.6\n", "", 0)
    assert await hook.run("unit-get", "public-address") == Result("192.0.2.10\n", "", 0)
    assert await hook.run("unit-get", "public-address", "--format", "json") == Result('"192.0.2.10"\n', "", 0)
    one_line_error(await hook.run("unit-get", "foo"), "unit-get", "Unit has no setting: 'foo'")
    assert (await hook.run("unit-get")).status == 2
    # No public address known (no cloud): the private one.
    agent.state.unit_addresses["public-address"] = None
    assert (await agent.hook("start", relation_id=None).run("unit-get", "public-address")).out == "10.0.3.6\n"


# -- ports -----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_ports_change_at_once(agent):
    hook = agent.hook("start", relation_id=None)
    assert await hook.run("open-port", "80") == Result("", "", 0)
    assert await hook.run("open-port", "53/UDP") == Result("", "", 0)
    assert agent.state.ports == {(80, "tcp"), (53, "udp")}  # the hook has not ended
    assert await hook.run("close-port", "80/tcp") == Result("", "", 0)
    assert agent.state.ports == {(53, "udp")}


@pytest.mark.parametrize("tool", ["open-port", "close-port"])
@pytest.mark.parametrize("arg, message", [
    ("0", "Invalid port, must be from 1 to 65535, got 0"),
    ("65536", "Invalid port, must be from 1 to 65535, got 65536"),
    ("http", "Invalid port, must be an integer, got 'http'"),
    ("80/icmp", "Invalid protocol, must be 'tcp' or 'udp', got 'icmp'"),
    ("80/udp/x", "Invalid format for port/protocol, got '80/udp/x'"),
])
@pytest_twisted.ensureDeferred
async def test_port_argument_errors(agent, tool, arg, message):
    result = await agent.hook("start", relation_id=None).run(tool, arg)
    assert result.status == 2 and result.out == ""
    assert result.err.startswith(f"usage: {tool}")
    assert result.err.endswith(f"{tool}: error: argument PORT[/PROTOCOL]: {message}\n")
    assert agent.state.ports == set()


# -- the log ---------------------------------------------------------------------------


@pytest.mark.parametrize("tool", ["juju-log", "ensemble-log"])
@pytest_twisted.ensureDeferred
async def test_log(agent, caplog, tool):
    caplog.set_level(logging.DEBUG, logger="ensemble.unit.hook")
    hook = agent.hook("install", relation_id=None)
    assert await hook.run(tool, "installing", "the", "thing") == Result("", "", 0)
    assert await hook.run(tool, "-l", "WARNING", "disk", "low") == Result("", "", 0)
    assert await hook.run(tool, "-l", "debug", "details") == Result("", "", 0)
    assert await hook.run(tool, "-l", "15", "level fifteen") == Result("", "", 0)
    bogus = await hook.run(tool, "-l", "loud", "what level?")
    assert bogus == Result("", f"{tool}: warning: unknown level 'loud', logged at INFO\n", 0)
    # Without a client id (juju-log needs none), or a stale one: logged all the same.
    assert await hook.run(tool, "from a daemon", drop=["JUJU_CLIENT_ID"]) == Result("", "", 0)
    hook.end()
    assert await hook.run(tool, "after the hook") == Result("", "", 0)
    records = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "ensemble.unit.hook"]
    assert records == [
        (20, f"{UNIT} install: installing the thing"),
        (30, f"{UNIT} install: disk low"),
        (10, f"{UNIT} install: details"),
        (15, f"{UNIT} install: level fifteen"),
        (20, f"{UNIT} install: what level?"),
        (20, "from a daemon"),
        (20, "after the hook"),
    ]


# -- what every tool shares ------------------------------------------------------------

EVERY_CALL = [
    ("relation-get", ["password"]), ("relation-set", ["a=b"]), ("relation-list", []), ("relation-ids", []),
    ("config-get", []), ("unit-get", ["private-address"]), ("open-port", ["80"]), ("close-port", ["80"]),
]


@pytest.mark.parametrize("tool, args", EVERY_CALL + [("juju-log", ["hi"]), ("ensemble-log", ["hi"])])
@pytest_twisted.ensureDeferred
async def test_no_socket(agent, tool, args):
    result = await agent.hook().run(tool, *args, drop=["JUJU_AGENT_SOCKET"])
    assert result.status == 2 and result.out == ""
    usage, message = result.err.splitlines()[0], result.err.splitlines()[-1]
    assert usage.startswith(f"usage: {tool} ") and message == "No JUJU_AGENT_SOCKET/-s option found"


@pytest.mark.parametrize("tool, args", EVERY_CALL)
@pytest_twisted.ensureDeferred
async def test_no_client_id(agent, tool, args):
    result = await agent.hook().run(tool, *args, drop=["JUJU_CLIENT_ID"])
    assert result.status == 2 and result.out == ""
    assert result.err.startswith(f"usage: {tool} ")
    assert result.err.endswith("\nNo JUJU_CLIENT_ID/--client_id option found\n")


@pytest.mark.parametrize("tool, args", EVERY_CALL)
@pytest_twisted.ensureDeferred
async def test_outside_a_hook(agent, tool, args):
    """A tool run after its hook ended (by a daemon the hook started) gets no context."""
    hook = agent.hook()
    hook.end()
    one_line_error(await hook.run(tool, *args), tool,
                   f"no hook is running with client id {hook.client_id!r}: hook tools work only while a hook runs")


@pytest.mark.parametrize("tool, args", EVERY_CALL + [("juju-log", ["hi"])])
@pytest_twisted.ensureDeferred
async def test_agent_not_listening(agent, tool, args, tmp_path):
    missing = str(tmp_path / "gone.sock")
    one_line_error(await agent.hook().run(tool, *args, env={"JUJU_AGENT_SOCKET": missing}), tool,
                   f"cannot reach the unit agent at {missing}: No such file or directory")


@pytest_twisted.ensureDeferred
async def test_options_and_env_names(agent, tmp_path):
    hook = agent.hook()
    # -s and --client-id instead of the environment.
    explicit = await hook.run("relation-get", "-s", agent.socket, "--client-id", hook.client_id, "user",
                              drop=["JUJU_AGENT_SOCKET", "JUJU_CLIENT_ID"])
    assert explicit == Result("wp\n", "", 0)
    # The ENSEMBLE_* names of the variables.
    ensemble_names = await hook.run(
        "relation-get", "user",
        env={"ENSEMBLE_AGENT_SOCKET": agent.socket, "ENSEMBLE_CLIENT_ID": hook.client_id,
             "ENSEMBLE_REMOTE_UNIT": "mysql/0"},
        drop=["JUJU_AGENT_SOCKET", "JUJU_CLIENT_ID", "JUJU_REMOTE_UNIT"],
    )
    assert ensemble_names == Result("wp\n", "", 0)
    # -o FILE; pyjuju's log options are accepted.
    out = tmp_path / "out.json"
    assert await hook.run("relation-list", "-o", str(out), "--format", "json", "--log-level", "DEBUG",
                          "--log-file", str(tmp_path / "tool.log")) == Result("", "", 0)
    assert out.read_text() == '["mysql/0", "mysql/1"]\n'
    # A format the tool does not have: argparse's error, before any call.
    bad = await hook.run("relation-set", "--format", "yaml", "a=b")
    assert bad.status == 2 and "invalid choice: 'yaml'" in bad.err
    assert hook.context.changes == {}


@pytest_twisted.ensureDeferred
async def test_socket_is_the_owners_and_a_stale_one_is_replaced(tmp_path):
    path = str(tmp_path / "agent.sock")
    port = listen(reactor, path, HookToolFactory())
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    finally:
        await defer.maybeDeferred(port.stopListening)
    # An agent killed without cleaning up leaves its socket and lock (pid gone).
    leftover = socket.socket(socket.AF_UNIX)
    leftover.bind(path)
    leftover.close()
    os.symlink("999999999", path + ".lock")
    port = listen(reactor, path, HookToolFactory())
    await defer.maybeDeferred(port.stopListening)


# -- the context, directly -------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_concurrent_first_reads_agree():
    """Two tools of one hook reading the same node at once (a hook may run tools in
    the background): both, and every later read, get the same settings."""
    reads = []

    class Slow(MemoryState):
        async def relation_settings(self, relation_id, unit):
            answer = defer.Deferred()
            reads.append(answer)
            return await answer

    context = CachedHookContext(Slow(UNIT), "db-relation-changed", "db:0")
    first = defer.ensureDeferred(context.relation_get(None, "mysql/0", "password"))
    second = defer.ensureDeferred(context.relation_get(None, "mysql/0", "password"))
    assert len(reads) == 2
    reads[1].callback({"password": "newer"})  # the later read finishes first
    reads[0].callback({"password": "older"})
    assert [await first, await second] == ["newer", "newer"]
    assert await context.relation_get(None, "mysql/0", "password") == "newer"
    assert len(reads) == 2


def test_tools_import_no_twisted():
    """The tools' start-up cost is the point of the stdlib client: keep Twisted out."""
    check = (
        "import sys; import ensemble.unit.tools.cli; "
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('twisted', 'zope', 'yaml', 'kazoo')); "
        "print(loaded)"
    )
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True)
    assert done.stdout == "[]\n"


def test_every_tool_is_a_console_script_of_the_installed_package():
    # setup.py reads TOOLS from its file, before the package is installed.
    from importlib.metadata import distribution

    scripts = {e.name: e.value for e in distribution("ensemble").entry_points if e.group == "console_scripts"}
    assert {name: scripts.get(name) for name in TOOLS} == {
        name: f"ensemble.unit.tools.cli:{function}" for name, function in TOOLS.items()
    }
    for name in TOOLS:
        assert os.access(os.path.join(os.path.dirname(sys.executable), name), os.X_OK), name
