"""`ensemble ssh` on a real local environment: commands and a login shell inside a
unit's container, with the caller's stdio and the command's exit status; and the one
line it says where it cannot. One environment for the whole file: db/0 and db/1 on
machine 0, and remote/0 on a machine no agent runs for (its address is a documentation
address, never contacted)."""

import os
import pty
import re
import select
import signal
import subprocess
import sys

import pytest
import pytest_twisted
from twisted.internet import defer

from ensemble import process

from test_deploy import DB, all_started, bootstrapped, until

REMOTE = "192.0.2.10"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    with bootstrapped(tmp_path_factory.mktemp("ssh") / "home") as environment:
        environment.cli("deploy", DB, "--to", "0")
        environment.cli("add-unit", "db", "--to", "0")
        pytest_twisted.blockon(defer.ensureDeferred(all_started(environment, ["db/0", "db/1"])))
        assert environment.cli("add-machine", "--address", REMOTE).stdout.strip() == "1"
        environment.cli("deploy", DB, "remote", "--to", "1")
        yield environment


def ssh(env, *args, input="", extra_env=None):
    """`ensemble ssh ARGS` with pipes for stdio (stdin: `input`, then end of file)."""
    return subprocess.run(
        [sys.executable, "-m", "ensemble", "ssh", *args], env={**env.env, **(extra_env or {})},
        input=input, capture_output=True, text=True, timeout=120,
    )


def on_terminal(env, argv, answer=None):
    """Run argv with a new terminal as its controlling one (stdin, stdout, stderr); once
    the output shows a root prompt, type `answer`. (All it wrote, its exit status.)"""
    pid, master = pty.fork()
    if pid == 0:
        try:
            os.execvpe(argv[0], argv, {**env.env, "TERM": "xterm-256color"})
        finally:
            os._exit(127)  # never back into pytest
    output = b""
    try:
        while True:
            ready, _, _ = select.select([master], [], [], 120)
            assert ready, f"no output in 120s; so far: {output!r}"  # a hang, not a measure
            try:
                data = os.read(master, 4096)
            except OSError:  # EIO: the terminal's last holder has gone
                break
            if not data:
                break
            output += data
            # Typed once the shell is reading: lxc-attach puts the terminal in raw mode
            # as it starts, which discards what was typed before.
            if answer is not None and b"# " in output:
                os.write(master, answer)
                answer = None
    finally:
        os.close(master)
        _, status = os.waitpid(pid, 0)
    return output.decode(errors="replace"), os.waitstatus_to_exitcode(status)


ENSEMBLE = [sys.executable, "-m", "ensemble"]


def test_a_command_runs_inside_as_root_with_its_output_and_exit_status(env):
    result = ssh(env, "db/0", "--", "sh", "-c", "exit 3")
    assert (result.returncode, result.stdout, result.stderr) == (3, "", "")
    result = ssh(env, "db/0", "--", "sh", "-c", "echo out; echo err >&2; kill -TERM $$")
    assert (result.returncode, result.stdout, result.stderr) == (128 + signal.SIGTERM, "out\n", "err\n")
    # Several words are the command's arguments as they are; `--` may be left out.
    result = ssh(env, "db/0", "printf", "%s|", "a b", "$HOME", "-x")
    assert (result.returncode, result.stdout) == (0, "a b|$HOME|-x|"), result.stderr
    # One word is a command line for the shell inside, run in the unit directory.
    result = ssh(env, "db/0", "echo $HOME $(id -u); pwd")
    assert (result.returncode, result.stdout) == (0, "/root 0\n/var/lib/ensemble/unit\n"), result.stderr


def test_stdio_are_the_commands_in_pipes(env):
    result = ssh(env, "db/0", "cat", input="hello\n")
    assert (result.returncode, result.stdout) == (0, "hello\n"), result.stderr
    result = ssh(env, "db/0", "--", "wc", "-c", input="x" * (1 << 20))
    assert (result.returncode, result.stdout.strip()) == (0, str(1 << 20)), result.stderr
    # A reader that stops early ends the command as it would on the host: by SIGPIPE
    # (which the CLI's Python ignores, and must not hand down).
    with subprocess.Popen([*ENSEMBLE, "ssh", "db/0", "yes"], env=env.env, stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE) as reader:
        assert reader.stdout.read(4) == b"y\ny\n"
        reader.stdout.close()
        assert reader.wait(timeout=120) == 128 + signal.SIGPIPE
        assert reader.stderr.read() == b""


def test_it_is_in_that_units_container_with_roots_own_environment(env):
    units = env.units()
    for unit, other in (("db/0", "db/1"), ("db/1", "db/0")):
        result = ssh(env, unit, "cat", "/etc/hostname")
        assert result.stdout == unit.replace("/", "-") + "\n", result.stderr
        result = ssh(env, unit, "--", "ip", "-4", "-o", "addr", "show", "dev", "eth0")
        assert f" {units[unit]['private-address']}/" in result.stdout, result.stdout
        result = ssh(env, unit, "--", "ps", "ax", "-o", "args")
        assert f"--unit {unit}" in result.stdout and f"--unit {other}" not in result.stdout, result.stdout
    # Root inside is the unit's own unprivileged range, not the host's root.
    result = ssh(env, "db/0", "cat", "/proc/self/uid_map")
    inside, host, _ = result.stdout.split()
    assert inside == "0" and int(host) >= 65536, result.stdout
    # Of the caller's environment, only TERM goes in.
    result = ssh(env, "db/0", "env", extra_env={"TERM": "vt100", "SSH_TEST_HOST_ONLY": "1"})
    inside = dict(line.split("=", 1) for line in result.stdout.splitlines())
    assert inside.keys() <= {"PATH", "HOME", "USER", "LOGNAME", "LANG", "TERM", "PWD", "container"}, inside
    assert (inside["HOME"], inside["LANG"], inside["TERM"]) == ("/root", "C.UTF-8", "vt100"), inside


def test_without_a_command_a_login_shell_on_the_callers_terminal(env):
    output, status = on_terminal(env, [*ENSEMBLE, "ssh", "db/0"], answer=b"tty; echo $((6*7)); exit 5\n")
    assert "root@db-0:/var/lib/ensemble/unit# " in output, output
    # The answers, not the echo of what was typed (which has no "42").
    assert re.search(r"/dev/pts/\d+\r*\n42\r*\n", output), output
    assert status == 5
    # A pipe into a command whose output is a terminal: stdin stays the pipe.
    output, status = on_terminal(env, ["sh", "-c", "echo piped | \"$@\"", "sh", *ENSEMBLE, "ssh", "db/0", "cat"])
    assert (output.strip(), status) == ("piped", 0)


def test_errors_say_in_one_line_why_and_where(env):
    cases = [
        (("db/9", "true"), "error: unit 'db/9' not found"),
        (("db", "true"), "error: invalid unit name 'db': use SERVICE/N, e.g. web/0 (N at most 9 digits)"),
        (("remote/0", "true"), f"error: unit remote/0 runs on machine 1 at {REMOTE}, whose containers are not "
                               f"on this host: run 'ensemble ssh remote/0' there"),
    ]
    for args, message in cases:
        result = ssh(env, *args)
        assert (result.returncode, result.stdout, result.stderr) == (1, "", message + "\n")
    assert env.units()["remote/0"]["agent-state"] == "pending"


@pytest_twisted.ensureDeferred
async def test_a_unit_whose_container_is_not_running_is_refused(env):
    container = env.units()["db/1"]["container"]
    driver = env.driver()
    pid = env.agent_pid()
    try:
        # With machine 0's agent stopped, a new unit gets no container and a stopped one
        # is not started again (the agent would, within seconds).
        os.kill(pid, signal.SIGTERM)
        await until(lambda: not process.alive(pid), timeout=30, what="the agent's exit")
        env.cli("add-unit", "db", "--to", "0")
        result = ssh(env, "db/2", "true")
        assert (result.returncode, result.stderr) == (
            1, "error: unit db/2 has no container on this host (it is pending; see 'ensemble status')\n")
        await driver.stop(container)
        result = ssh(env, "db/1", "true")
        assert (result.returncode, result.stderr) == (
            1, f"error: the container of unit db/1 ({container}) is stopped, not running\n")
    finally:
        env.cli("remove-unit", "db/2", check=False)
        env.cli("bootstrap")  # starts machine 0's agent again, which starts db/1 again

        async def running():
            return await driver.state(container) == "RUNNING"

        await until(running, what="db/1's container running again")
        await driver.close()
    result = ssh(env, "db/1", "hostname")
    assert (result.returncode, result.stdout) == (0, "db-1\n"), result.stderr
