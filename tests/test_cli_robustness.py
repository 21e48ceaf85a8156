"""Regressions: a running agent survives garbage collection, an interrupted command
fails, bad settings are one-line errors, a mistyped root is left uncreated."""

import signal
import socket
import subprocess
import sys
import time

import pytest_twisted

from conftest import ensemble_env, run_ensemble
from test_agents import wait_for
from test_cli import one_line_error

# Collect garbage on nearly every allocation: a coroutine nothing refers to dies at once.
AGGRESSIVE_GC = "import gc, sys; gc.set_threshold(1, 1, 1); from ensemble.cli import main; sys.argv[0] = 'ensemble'; main()"


@pytest_twisted.ensureDeferred
async def test_machine_agent_survives_garbage_collection(env_client, zk_spec, tmp_path):
    agent = subprocess.Popen(
        [sys.executable, "-c", AGGRESSIVE_GC, "machine-agent", "--machine-id", "0", "--no-bridge", "--no-containers"],
        env=ensemble_env(tmp_path / "home", zk_spec),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        await wait_for(lambda: env_client.exists("/machines/machine-0000000000/agent"))
        time.sleep(2)
        assert agent.poll() is None, agent.stdout.read()
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(timeout=15) == 0
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
    output = agent.stdout.read()
    assert "error:" not in output and "Traceback" not in output


def test_an_interrupted_command_fails(tmp_path):
    # A server that accepts and never answers: the command waits for it.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    port = silent.getsockname()[1]
    try:
        env = ensemble_env(tmp_path, f"127.0.0.1:{port}", ENSEMBLE_CONNECT_TIMEOUT="30")
        command = subprocess.Popen(
            [sys.executable, "-m", "ensemble", "status"], env=env, stderr=subprocess.PIPE, text=True
        )
        time.sleep(1.5)
        command.send_signal(signal.SIGINT)
        assert command.wait(timeout=15) == 130  # as a shell reports a process SIGINT killed
        assert command.stderr.read().strip().splitlines()[-1] == "error: interrupted"
    finally:
        silent.close()


def test_bad_timeout_settings_are_one_line_errors(tmp_path, zk_spec):
    env = ensemble_env(tmp_path, zk_spec, ENSEMBLE_CONNECT_TIMEOUT="soon")
    assert one_line_error(run_ensemble("status", env=env)) == (
        "ENSEMBLE_CONNECT_TIMEOUT must be a number of seconds, not 'soon'"
    )


@pytest_twisted.ensureDeferred
async def test_a_mistyped_root_is_not_created(client, zk_server, tmp_path):
    env = ensemble_env(tmp_path, f"{zk_server.address}/no-such-root")
    for argv in (["status"], ["service-addresses", "db"], ["add-unit", "db"]):
        assert "no ensemble environment at" in one_line_error(run_ensemble(*argv, env=env))
    # The test's own client is chrooted elsewhere; look from the top.
    from ensemble.state.client import ZKClient

    top = await ZKClient(zk_server.address, "").connect()
    try:
        assert await top.exists("/no-such-root") is None
    finally:
        await top.close()


@pytest_twisted.ensureDeferred
async def test_remove_machine_command(env_client, cli):
    assert cli("add-machine").stdout.strip() == "1"
    assert cli("deploy", "examples/charms/db", "--to", "1").returncode == 0
    assert "still has units: db/0" in one_line_error(cli("remove-machine", "1"))
    assert cli("remove-unit", "db/0").returncode == 0
    # Unassigned, but its teardown is the (stopped) agent's job: removing now would strand it.
    assert "still removing units: db/0" in one_line_error(cli("remove-machine", "1"))
    await env_client.delete("/units/db-0")
    result = cli("remove-machine", "1")
    assert result.returncode == 0 and result.stdout.strip() == "removed machine 1"
    assert "machine 1 not found" in one_line_error(cli("remove-machine", "1"))
    assert "invalid machine id" in one_line_error(cli("remove-machine", "one"))
