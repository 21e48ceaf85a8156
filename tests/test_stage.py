"""The stage server (ensemble/machine/container/stage.py --serve) on its own: each
request forked off at once into a mount namespace of its own with the plan's mounts,
answered when its command ends, killed at its timeout; the end of requests lets what
runs finish. (Its idmapped root filesystem is exercised by every unit's start in the
container tests.)"""

import json
import os
import subprocess
import time

import pytest

from ensemble.machine.container.driver import STAGE_SERVER


@pytest.fixture
def server():
    process = subprocess.Popen(STAGE_SERVER, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    yield process
    if process.poll() is None:
        process.kill()
        process.wait()


def send(server, request):
    server.stdin.write((json.dumps(request) + "\n").encode())
    server.stdin.flush()


def answers(server, n):
    return [json.loads(server.stdout.readline()) for _ in range(n)]


@pytest.fixture
def plan(tmp_path):
    """A plan binding a directory of the test's at a target of its own."""
    source, target = tmp_path / "source", tmp_path / "target"
    source.mkdir()
    (source / "note").write_text("bound\n")
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"binds": [[str(source), str(target)]], "rootfs": None}))
    return str(path), target


def test_requests_run_side_by_side_and_are_answered_as_they_end(server, plan):
    path, _ = plan
    started = time.monotonic()
    send(server, {"id": 1, "plan": path, "argv": ["sh", "-c", "sleep 1; echo slow; exit 3"], "timeout": None})
    send(server, {"id": 2, "plan": path, "argv": ["sh", "-c", "echo fast >&2"], "timeout": None})
    first, second = answers(server, 2)
    assert first == {"id": 2, "code": 0, "output": "fast\n", "timed_out": False}
    assert second == {"id": 1, "code": 3, "output": "slow\n", "timed_out": False}
    assert time.monotonic() - started < 5  # one second of sleep, not two in a row


def test_the_plans_mounts_are_seen_by_the_command_alone(server, plan):
    path, target = plan
    send(server, {"id": 1, "plan": path, "argv": ["cat", str(target / "note")], "timeout": None})
    assert answers(server, 1)[0]["output"] == "bound\n"
    with open("/proc/self/mountinfo") as f:
        assert str(target) not in f.read()
    assert not (target / "note").exists()


def test_a_command_past_its_timeout_is_killed_and_said_so(server, plan):
    path, _ = plan
    send(server, {"id": 7, "plan": path, "argv": ["sleep", "30"], "timeout": 0.3})
    (answer,) = answers(server, 1)
    assert answer["id"] == 7 and answer["timed_out"] and answer["code"] == 128 + 9


def test_a_plan_that_cannot_be_staged_fails_with_one_line(server, tmp_path):
    send(server, {"id": 1, "plan": str(tmp_path / "missing.json"), "argv": ["true"], "timeout": None})
    (answer,) = answers(server, 1)
    assert answer["code"] == 127 and answer["output"].startswith("ensemble-stage: ")
    assert answer["output"].count("\n") == 1


def test_the_end_of_requests_lets_what_runs_finish(server, plan):
    path, _ = plan
    send(server, {"id": 1, "plan": path, "argv": ["sh", "-c", "sleep 0.3; echo done"], "timeout": None})
    server.stdin.close()
    assert answers(server, 1)[0]["output"] == "done\n"
    assert server.wait(timeout=5) == 0


def test_a_driver_gone_mid_request_leaves_what_runs_waited_for(server, plan, tmp_path):
    # Its agent killed: the answer of a command that ends finds no reader. The server
    # must still wait for (reap) the commands under way, not end with them orphaned.
    path, _ = plan
    ended = tmp_path / "ended"
    send(server, {"id": 1, "plan": path, "argv": ["true"], "timeout": None})
    send(server, {"id": 2, "plan": path, "argv": ["sh", "-c", f"sleep 1; echo $$ > {ended}"], "timeout": None})
    server.stdout.close()
    time.sleep(0.5)  # the first answered into the closed pipe meanwhile
    assert server.poll() is None and not ended.exists()
    assert server.wait(timeout=10) == 0
    assert ended.exists()
