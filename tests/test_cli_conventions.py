"""The CLI's conventions (exit statuses, a closed pipe, --help) and the commands that
wait: deploy/add-unit --wait, status --watch; and remove-machine --force."""

import argparse
import importlib
import json
import logging
import os
import select
import signal
import subprocess
import sys
import tempfile

import pytest
import pytest_twisted

from ensemble.state.unit import UnitStateManager

from conftest import ensemble_env, eventually, make_charm
from test_cli import one_line_error
from test_deploy import environment  # noqa: F401 (a fixture)

cli_main = importlib.import_module("ensemble.cli.main")  # (ensemble.cli.main is also the function)

DB, WEB = "examples/charms/db", "examples/charms/web"
def start(args, env, **kw):
    return subprocess.Popen([sys.executable, "-m", "ensemble", *map(str, args)], env=env, text=True, **kw)


def start_unbuffered(args, env):
    """A command whose output `read_line` reads as it comes (a buffered reader would
    take in more than a line, which select() then no longer sees)."""
    return subprocess.Popen([sys.executable, "-m", "ensemble", *map(str, args)], env=env, bufsize=0,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def into_closed_pipe(args, env):
    """Run a command whose stdout is a pipe nobody reads: (pid, status, stderr)."""
    read, write = os.pipe()
    os.close(read)
    try:
        command = start(args, env, stdout=write, stderr=subprocess.PIPE)
    finally:
        os.close(write)
    _, err = command.communicate(timeout=60)
    return command.pid, command.returncode, err


def crash_file(pid):
    return os.path.join(tempfile.gettempdir(), f"ensemble-crash-{pid}.log")


def read_line(stream, timeout=30):
    """The next line the command wrote (to an unbuffered pipe); fails the test if none comes."""
    line = b""
    while not line.endswith(b"\n"):
        ready, _, _ = select.select([stream], [], [], timeout)
        assert ready, "no output"
        byte = stream.read(1)
        if not byte:
            break
        line += byte
    return line.decode()


def read_document(stream):
    """One JSON status --watch printed (it ends with a lone closing brace)."""
    lines = []
    while not lines or lines[-1] != "}\n":
        line = read_line(stream)
        assert line, "output ended"
        lines.append(line)
    return json.loads("".join(lines))


# A closed pipe


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("buffered", [True, False])
async def test_a_closed_pipe_ends_status_quietly(env_client, zk_spec, tmp_path, buffered):
    # Buffered, the status fits in stdout's buffer and fails only in the last flush, at
    # exit; unbuffered, its print fails while the command runs.
    env = ensemble_env(tmp_path / "home", zk_spec)
    env.pop("PYTHONUNBUFFERED", None)
    if not buffered:
        env["PYTHONUNBUFFERED"] = "1"
    pid, status, err = into_closed_pipe(["status"], env)
    assert (status, err) == (141, "")
    assert not os.path.exists(crash_file(pid))


@pytest_twisted.ensureDeferred
async def test_a_closed_pipe_ends_status_watch_quietly(env_client, zk_spec, tmp_path):
    # --watch flushes each status: it fails while the command runs.
    pid, status, err = into_closed_pipe(["status", "--watch", "0.1"], ensemble_env(tmp_path / "home", zk_spec))
    assert (status, err) == (141, "")
    assert not os.path.exists(crash_file(pid))


@pytest.mark.parametrize("buffered", [True, False])
@pytest.mark.parametrize("argv", [["deploy", "--help"], ["--version"]])
def test_a_closed_pipe_ends_help_quietly(tmp_path, argv, buffered):
    # Before any reactor, and argparse ends these with SystemExit.
    env = ensemble_env(tmp_path)
    env.pop("PYTHONUNBUFFERED", None)
    if not buffered:
        env["PYTHONUNBUFFERED"] = "1"
    pid, status, err = into_closed_pipe(argv, env)
    assert (status, err) == (141, "")


# Exit statuses


@pytest.mark.parametrize("argv, help_of", [
    (["frob"], "ensemble"),
    (["deploy"], "ensemble deploy"),
    (["status", "--format", "xml"], "ensemble status"),
    (["add-unit", "db", "--bogus"], "ensemble add-unit"),
    (["add-unit", "db", "-n", "two"], "ensemble add-unit"),
    (["deploy", DB, "--timeout", "5"], "ensemble deploy"),
])
def test_usage_errors_exit_2(cli, argv, help_of):
    result = cli(*argv)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and lines[0].endswith(f"(see '{help_of} --help')")


def test_other_errors_still_exit_1(cli):
    assert one_line_error(cli("deploy", DB, "--wait", "--timeout", "0")).startswith("--timeout must be")


def test_an_agents_log_level_comes_from_the_environment(monkeypatch, capsys):
    monkeypatch.setenv("ENSEMBLE_LOG_LEVEL", "loud")
    assert cli_main.run(["unit-agent", "--unit", "db/0", "--zookeeper", "127.0.0.1:1"]) == 1
    assert capsys.readouterr().err == (
        "error: $ENSEMBLE_LOG_LEVEL must be one of DEBUG, INFO, WARNING, ERROR, not 'loud'\n")
    assert cli_main._log_level(" debug") == logging.DEBUG


@pytest.mark.parametrize("asked, ours, libraries", [("DEBUG", "DEBUG", "INFO"), ("WARNING", "WARNING", "WARNING")])
def test_an_agents_log_level_is_ensembles_own(asked, ours, libraries):
    """At DEBUG pyroute2 formats every netlink message it reads: agents keep other
    libraries at INFO, whatever $ENSEMBLE_LOG_LEVEL asks of their own loggers."""
    probe = (
        "import argparse, importlib, logging\n"
        "main = importlib.import_module('ensemble.cli.main')\n"
        "main._configure_logging(argparse.Namespace(command='machine-agent', verbose=False))\n"
        "level = lambda name: logging.getLevelName(logging.getLogger(name).getEffectiveLevel())\n"
        "print(level('ensemble.machine'), level('pyroute2.netlink.core'), level('ensemble.kazoo'))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                            env=dict(os.environ, ENSEMBLE_LOG_LEVEL=asked))
    assert result.stdout.split() == [ours, libraries, max(asked, "WARNING", key=logging.getLevelName)]


def test_interrupt_before_the_reactor_runs_exits_130(monkeypatch, capsys):
    def interrupted():
        raise KeyboardInterrupt()

    monkeypatch.setattr(cli_main, "build_parser", interrupted)
    assert cli_main.run(["status"]) == 130
    assert capsys.readouterr().err == "error: interrupted\n"


@pytest_twisted.ensureDeferred
async def test_interrupt_while_waiting_for_units_exits_130(env_client, zk_spec, tmp_path):
    command = start_unbuffered(["deploy", DB, "--to", "0", "--wait"], ensemble_env(tmp_path / "home", zk_spec))
    try:
        assert read_line(command.stdout).startswith("deployed service db")
        command.send_signal(signal.SIGINT)
        _, err = command.communicate(timeout=30)
    finally:
        if command.poll() is None:
            command.kill()
    assert (command.returncode, err) == (130, b"error: interrupted\n")


# --help


def _subcommands():
    parser = cli_main.build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return commands.choices


def test_every_argument_says_what_it_is():
    undocumented = [
        f"{name} {action.dest}"
        for name, sub in _subcommands().items()
        for action in sub._actions
        if not isinstance(action, argparse._HelpAction) and not action.help
    ]
    assert undocumented == []


def test_every_commands_help_shows_examples():
    import argparse

    from ensemble.cli.main import build_parser

    (commands,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    assert len(commands.choices) >= 24
    for name, parser in commands.choices.items():
        examples = parser.format_help().split("\nexamples:\n", 1)[1:]
        lines = examples[0].splitlines() if examples else []
        assert lines and all(line.startswith("  ") and "ensemble " in line for line in lines), name


# deploy/add-unit --wait


async def _units_exist(client, names):
    return all([await client.exists(f"/units/{n.replace('/', '-')}") for n in names])


@pytest_twisted.ensureDeferred
async def test_deploy_wait_reports_each_unit_and_fails_on_an_error(env_client, zk_spec, tmp_path):
    command = start(["deploy", DB, "--to", "0", "-n", "3", "--wait"], ensemble_env(tmp_path / "home", zk_spec),
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        await eventually(lambda: _units_exist(env_client, ["db/0", "db/1", "db/2"]), timeout=30)
        units = UnitStateManager(env_client)
        await (await units.get_unit("db/0")).update(state="installing")
        await (await units.get_unit("db/0")).update(state="started")
        await (await units.get_unit("db/1")).update(state="error",
                                                     error="install hook exited with status 1: no\nspace")
        assert command.poll() is None  # db/2 is still pending
        await env_client.delete_tree("/units/db-2")
        out, err = command.communicate(timeout=30)
    finally:
        if command.poll() is None:
            command.kill()
    assert out.splitlines()[1:] == [
        "db/0 started, db/1 error (install hook exited with status 1: no space), db/2 removed"]
    assert command.returncode == 1
    assert err == "error: db/1: install hook exited with status 1: no space; db/2: removed\n"


@pytest_twisted.ensureDeferred
async def test_add_unit_wait_succeeds_once_all_started(env_client, zk_spec, tmp_path):
    env = ensemble_env(tmp_path / "home", zk_spec)
    assert start(["deploy", DB, "--to", "0"], env, stdout=subprocess.DEVNULL).wait(timeout=60) == 0
    command = start(["add-unit", "db", "-n", "2", "--wait"], env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        await eventually(lambda: _units_exist(env_client, ["db/1", "db/2"]), timeout=30)
        units = UnitStateManager(env_client)
        for name in ("db/2", "db/1"):
            await (await units.get_unit(name)).update(state="started")
        out, err = command.communicate(timeout=30)
    finally:
        if command.poll() is None:
            command.kill()
    assert (command.returncode, err) == (0, "")
    assert out.splitlines() == ["added db/1, db/2", "db/1 started, db/2 started"]


@pytest_twisted.ensureDeferred
async def test_wait_times_out_with_what_each_unit_is_doing(env_client, cli):
    result = cli("deploy", DB, "--to", "0", "-n", "2", "--wait", "--timeout", "0.5")
    assert result.stdout.splitlines()[1] == "db/0 pending, db/1 pending"
    assert one_line_error(result) == "db/0, db/1 not started after 0.5s (db/0: pending, db/1: pending)"


# status --watch


@pytest_twisted.ensureDeferred
async def test_status_watch_prints_again_on_change_until_interrupted(env_client, zk_spec, tmp_path):
    command = start_unbuffered(["status", "--watch", "0.1", "--format", "json"],
                               ensemble_env(tmp_path / "home", zk_spec))
    try:
        assert set(read_document(command.stdout)["machines"]) == {"0"}
        from ensemble.state.machine import MachineStateManager

        await MachineStateManager(env_client).add_machine(address="192.0.2.7")
        assert read_line(command.stdout) == "---\n"
        assert set(read_document(command.stdout)["machines"]) == {"0", "1"}
        command.send_signal(signal.SIGINT)
        out, err = command.communicate(timeout=30)
    finally:
        if command.poll() is None:
            command.kill()
    assert (command.returncode, err, out) == (130, b"error: interrupted\n", b"")


def test_status_watch_needs_a_positive_interval(cli):
    assert one_line_error(cli("status", "--watch", "0")) == "--watch takes a number of seconds above 0, not 0"


# remove-machine --force


async def _nodes_named(client, path, name):
    """Paths below `path` whose last part is `name`."""
    found = []
    for child in await client.get_children(path):
        below = f"{path.rstrip('/')}/{child}"
        if child == name:
            found.append(below)
        found += await _nodes_named(client, below, name)
    return found


@pytest_twisted.ensureDeferred
async def test_remove_machine_force_removes_what_its_dead_agent_would_have(env_client, cli):
    assert cli("add-machine").stdout.strip() == "1"
    assert cli("deploy", DB, "--to", "1", "-n", "2").returncode == 0
    assert cli("deploy", WEB, "--to", "0").returncode == 0
    assert cli("add-relation", "web", "db").returncode == 0
    # What its agent made before it died: an address, a settings node, a member.
    from ensemble.state.network import ZooKeeperAddressStore

    store = ZooKeeperAddressStore(env_client, 1)
    await store.ensure("10.77.1.0/24")
    await store.take("db/0", "10.77.1.2")
    relation = (await env_client.get_children("/relations"))[0]
    await env_client.create(f"/relations/{relation}/server/db-0", b"")
    assert len(await _nodes_named(env_client, "/", "db-0")) > 1

    assert cli("remove-unit", "db/0").returncode == 0
    message = one_line_error(cli("remove-machine", "1"))
    assert "still has units: db/1" in message and "--force" in message

    # Not while its agent runs.
    await env_client.create("/machines/machine-0000000001/agent", b"{}", ephemeral=True)
    assert "agent is running" in one_line_error(cli("remove-machine", "--force", "1"))
    await env_client.delete("/machines/machine-0000000001/agent")

    result = cli("remove-machine", "--force", "1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["removed units db/0, db/1 (in place of machine 1's agent)", "removed machine 1"]
    for unit in ("db-0", "db-1"):
        assert await _nodes_named(env_client, "/", unit) == []
    assert await env_client.exists("/machines/machine-0000000001") is None
    assert "machine-0000000001" not in await env_client.get_children("/network/addresses")
    # The service stays (its units went, as remove-unit's do); web's side is untouched.
    assert await env_client.exists("/services/db") is not None
    assert await env_client.exists(f"/relations/{relation}/settings/web-0") is not None


@pytest_twisted.ensureDeferred
async def test_remove_machine_force_finishes_a_destroyed_service(env_client, cli):
    assert cli("add-machine").stdout.strip() == "1"
    assert cli("deploy", DB, "--to", "1").returncode == 0
    assert cli("destroy-service", "db").returncode == 0
    assert "still removing units: db/0" in one_line_error(cli("remove-machine", "1"))
    result = cli("remove-machine", "--force", "1")
    assert result.returncode == 0, result.stderr
    assert await env_client.exists("/services/db") is None
    assert await env_client.get_children("/charms") == []


# In a real local environment


@pytest_twisted.ensureDeferred
async def test_wait_and_force_in_a_real_environment(environment, tmp_path):  # noqa: F811 (the fixture)
    env = environment
    broken = make_charm(tmp_path / "broken", name="broken", hooks={"install": "echo 'no disk for data' >&2; exit 1"})
    result = env.cli("deploy", broken, "--to", "0", "--wait", "--timeout", "100", check=False)
    message = one_line_error(result)
    assert message.startswith("broken/0: install hook exited with status 1: ") and "no disk for data" in message
    assert result.stdout.splitlines()[-1].startswith("broken/0 error (install hook exited with status 1: ")

    result = env.cli("deploy", DB, "--to", "0", "--wait", "--timeout", "100")
    assert result.stdout.splitlines() == ["deployed service db (db): db/0", "db/0 started"]
    # Machine 0's agent runs: it removes its own units.
    assert "agent is running" in one_line_error(env.cli("remove-machine", "--force", "0", check=False))

    # A machine whose agent never runs, and a unit that was once on it.
    machine = env.cli("add-machine", "--address", "192.0.2.10").stdout.strip()
    env.cli("add-unit", "db", "--to", machine)
    env.cli("remove-unit", "db/1")
    assert "--force" in one_line_error(env.cli("remove-machine", machine, check=False))
    result = env.cli("remove-machine", "--force", machine)
    assert result.stdout.splitlines() == [f"removed units db/1 (in place of machine {machine}'s agent)",
                                          f"removed machine {machine}"]
    client = await env.client()
    try:
        assert await _nodes_named(client, "/", "db-1") == []
        assert await client.exists("/units/db-0") is not None
    finally:
        await client.close()
    assert set(env.status()["machines"]) == {"0"}
