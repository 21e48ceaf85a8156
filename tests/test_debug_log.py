"""`ensemble debug-log` (issue 16): every log of a host merged by time, filtered by
unit, followed, and a unit's incarnations kept apart. Fast tests on files in tmp_path
(ensemble.unit_logs, the hook output's format, the teardown's layout); then a real
local environment (one bootstrap for the module)."""

import os
import re
import subprocess
import sys
import time

import pytest
import pytest_twisted
from twisted.internet import defer, reactor

from ensemble import hostfs, unit_logs
from ensemble.log_layout import REMOVED
from ensemble.machine.deploy import retire_log_dir
from ensemble.unit import hooks
from ensemble.unit.hooks import HookFailed, run_hook

from conftest import ensemble_env, make_charm, run_ensemble
from test_deploy import all_started, bootstrapped, until

TIME = re.compile(r"(?:--- )?(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:,\d{3})?)")


def write(path, *lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write("".join(line + "\n" for line in lines))


def read_all(logs, units=None, removed=False, lines=0):
    out = []
    reading = unit_logs.read(unit_logs.sources(str(logs), units, removed), lambda label, line: out.append(
        unit_logs.format_line(label, line).rstrip("\n")), lines, unit_logs.mentions(units) if units else None)
    return out, reading


@pytest.fixture
def logs(tmp_path):
    """A home's logs: db/0, web/0 and machine-0, with lines in each format."""
    logs = tmp_path / "logs"
    write(logs / "units" / "db-0" / "db-0.log",
          "--- 2026-12-02 14:00:01,100 install hook",
          "2026-12-02 14:00:01,200 install: db installing",
          "2026-12-02 14:00:03 INFO db/0 install: a juju-log line",     # juju-log: to the second
          "2026-12-02 14:00:03,900 install: db installed",
          "--- 2026-12-02 14:00:04,000 install hook exited with status 0")
    write(logs / "units" / "db-0" / "agent.log",
          "2026-12-02 14:00:00,500 INFO ensemble.unit: db agent up",
          # juju-log's copy in the agent's log: shown once, from the hook output's
          "2026-12-02 14:00:03,100 INFO ensemble.unit.hook.db/0: db/0 install: a juju-log line",
          "2026-12-02 14:00:05,000 ERROR ensemble.unit: db agent failed",
          "Traceback (most recent call last):",
          "  File \"x.py\", line 1",
          "ValueError: boom")
    write(logs / "units" / "web-0" / "web-0.log",
          "--- 2026-12-02 14:00:02,000 install hook",
          "2026-12-02 14:00:02,500 install: web installing",
          "2026-12-02 14:00:04,500 install: web installed")
    write(logs / "machine-0.log",
          "2026-12-02 14:00:00,100 INFO ensemble.machine: machine-0: created ens-x-db-0 for db/0",
          "2026-12-02 14:00:00,200 INFO ensemble.machine: machine-0: created ens-x-web-0 for web/0",
          "2026-12-02 14:00:00,300 INFO ensemble.machine: machine-0: db/10 and xdb/0 are other units",
          "2026-12-02 14:00:06,000 ERROR ensemble.machine: machine-0: deploying db/0 failed",
          "Traceback (most recent call last):",
          "RuntimeError: of db/0")
    return logs


# -- the merge -------------------------------------------------------------------------

def test_every_format_of_time_is_read_and_lines_without_one_stay_with_theirs(logs):
    assert unit_logs.line_time(b"2026-12-02 14:00:01,200 install: x") == b"2026-12-02 14:00:01,200"
    assert unit_logs.line_time(b"--- 2026-12-02 14:00:01,100 install hook") == b"2026-12-02 14:00:01,100"
    assert unit_logs.line_time(b"2026-12-02 14:00:03 INFO db/0 install: x") == b"2026-12-02 14:00:03,000"
    assert unit_logs.line_time(b"Traceback (most recent call last):") is None
    out, _ = read_all(logs)
    assert out == [
        "machine-0 | 2026-12-02 14:00:00,100 INFO ensemble.machine: machine-0: created ens-x-db-0 for db/0",
        "machine-0 | 2026-12-02 14:00:00,200 INFO ensemble.machine: machine-0: created ens-x-web-0 for web/0",
        "machine-0 | 2026-12-02 14:00:00,300 INFO ensemble.machine: machine-0: db/10 and xdb/0 are other units",
        "db/0 | 2026-12-02 14:00:00,500 INFO ensemble.unit: db agent up",
        "db/0 | --- 2026-12-02 14:00:01,100 install hook",
        "db/0 | 2026-12-02 14:00:01,200 install: db installing",
        "web/0 | --- 2026-12-02 14:00:02,000 install hook",
        "web/0 | 2026-12-02 14:00:02,500 install: web installing",
        "db/0 | 2026-12-02 14:00:03 INFO db/0 install: a juju-log line",
        "db/0 | 2026-12-02 14:00:03,900 install: db installed",
        "db/0 | --- 2026-12-02 14:00:04,000 install hook exited with status 0",
        "web/0 | 2026-12-02 14:00:04,500 install: web installed",
        "db/0 | 2026-12-02 14:00:05,000 ERROR ensemble.unit: db agent failed",
        "db/0 | Traceback (most recent call last):",
        "db/0 |   File \"x.py\", line 1",
        "db/0 | ValueError: boom",
        "machine-0 | 2026-12-02 14:00:06,000 ERROR ensemble.machine: machine-0: deploying db/0 failed",
        "machine-0 | Traceback (most recent call last):",
        "machine-0 | RuntimeError: of db/0",
    ]
    # -n: the last lines of the merged output, a traceback's lines with theirs.
    last, _ = read_all(logs, lines=5)
    assert last == out[-5:]


def test_a_file_out_of_order_keeps_its_own_order(tmp_path):
    logs = tmp_path / "logs"
    # Second precision (juju-log) after a finer time of the same second: never moved up.
    write(logs / "units" / "db-0" / "db-0.log", "2026-12-02 14:00:01,700 install: first",
          "2026-12-02 14:00:01 INFO db/0 install: second", "2026-12-02 14:00:01,900 install: third")
    write(logs / "units" / "web-0" / "web-0.log", "2026-12-02 14:00:01,800 install: web")
    out, _ = read_all(logs)
    assert [line.rpartition(" ")[2] for line in out] == ["first", "second", "web", "third"]


def test_units_named_get_their_files_and_the_machine_lines_naming_them(logs):
    out, _ = read_all(logs, ["db/0"])
    assert {line.partition(" | ")[0] for line in out} == {"db/0", "machine-0"}
    machine = [line for line in out if line.startswith("machine-0 |")]
    assert machine == [
        "machine-0 | 2026-12-02 14:00:00,100 INFO ensemble.machine: machine-0: created ens-x-db-0 for db/0",
        "machine-0 | 2026-12-02 14:00:06,000 ERROR ensemble.machine: machine-0: deploying db/0 failed",
        "machine-0 | Traceback (most recent call last):",
        "machine-0 | RuntimeError: of db/0",
    ]
    out, _ = read_all(logs, ["web/0"])
    assert [line for line in out if not line.startswith("web/0 |")] == [
        "machine-0 | 2026-12-02 14:00:00,200 INFO ensemble.machine: machine-0: created ens-x-web-0 for web/0"]
    out, _ = read_all(logs, ["db/1"])
    assert out == []


def test_lines_read_and_memory_are_bounded(tmp_path):
    logs = tmp_path / "logs"
    big = logs / "units" / "db-0" / "db-0.log"
    big.parent.mkdir(parents=True)
    with open(big, "wb") as f:
        f.truncate(64 << 30)  # sparse: 64 GiB of NULs before the lines
        f.seek(0, os.SEEK_END)
        f.write(b"".join(b"2026-12-02 14:00:%02d,000 install: line %d\n" % (i, i) for i in range(10)))
    out, reading = read_all(logs, lines=2)
    assert out == ["db/0 | 2026-12-02 14:00:08,000 install: line 8", "db/0 | 2026-12-02 14:00:09,000 install: line 9"]
    assert reading.cut == []
    out, reading = read_all(logs, lines=0)
    assert out[-1].endswith("line 9") and sum(map(len, out)) <= hostfs.TAIL_LIMIT * 2
    assert [s.path for s in reading.cut] == [str(big)]


def test_what_a_unit_put_in_place_of_its_log_is_refused_and_the_rest_shown(logs, tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("2026-12-02 14:00:00,000 the host's secret\n")
    agent = logs / "units" / "db-0" / "agent.log"
    agent.unlink()
    agent.symlink_to(secret)
    out, reading = read_all(logs)
    assert not any("secret" in line for line in out)
    assert [e.path for e in reading.refused] == [str(agent)]
    assert "db/0 | 2026-12-02 14:00:01,200 install: db installing" in out


# -- removed units ---------------------------------------------------------------------

def test_a_unit_made_again_in_the_second_of_the_removal_shows_its_own_lines(tmp_path):
    """The kept directory's name holds the second; its mtime the move's millisecond."""
    units, logs = tmp_path / "logs" / "units", str(tmp_path / "logs")
    write(units / "hello-0" / "hello-0.log", "2026-12-02 14:03:05,100 install: old incarnation")
    when = time.mktime(time.strptime("2026-12-02 14:03:05", "%Y-%m-%d %H:%M:%S"))
    kept = retire_log_dir(str(units), "hello/0", now=when + 0.25)
    write(tmp_path / "logs" / "machine-0.log",
          "2026-12-02 14:03:05,200 INFO ensemble.machine: destroying ens-x-hello-0 of hello/0",
          "2026-12-02 14:03:05,600 INFO ensemble.machine: created ens-x-hello-0 for hello/0")
    since = unit_logs.removal_keys(logs, ["hello/0"])
    assert since == {"hello/0": b"2026-12-02 14:03:05,250"}
    out = []
    unit_logs.read(unit_logs.sources(logs, ["hello/0"]), lambda *item: out.append(item[1].decode()), 0,
                   unit_logs.mentions(["hello/0"], since))
    assert out == ["2026-12-02 14:03:05,600 INFO ensemble.machine: created ens-x-hello-0 for hello/0"]
    # A kept directory touched since: the whole second is the earlier unit's, as before.
    os.utime(kept, (when + 30, when + 30))
    assert unit_logs.removal_keys(logs, ["hello/0"]) == {"hello/0": b"2026-12-02 14:03:05,999"}


def test_a_removed_units_log_goes_out_of_the_way_of_a_new_one(tmp_path):
    units = tmp_path / "logs" / "units"
    write(units / "hello-0" / "hello-0.log", "2026-12-02 14:00:01,000 install: old incarnation")
    when = time.mktime(time.strptime("2026-12-02 14:03:05", "%Y-%m-%d %H:%M:%S"))
    kept = retire_log_dir(str(units), "hello/0", now=when)
    assert kept == str(units / REMOVED / "hello-0.20261202-140305")
    assert not (units / "hello-0").exists()
    st = os.stat(kept)
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (0, 0, 0o700)
    # The same second again: a name of its own.
    write(units / "hello-0" / "hello-0.log", "2026-12-02 14:03:06,000 install: second incarnation")
    assert retire_log_dir(str(units), "hello/0", now=when).endswith("hello-0.20261202-140305.1")
    (units / "hello-0").mkdir()  # made for a unit whose container never ran
    assert retire_log_dir(str(units), "hello/0") is None and not (units / "hello-0").exists()
    assert retire_log_dir(str(units), "hello/0") is None  # again: nothing to do

    write(units / "hello-0" / "hello-0.log", "2026-12-02 14:05:00,000 install: new incarnation")
    out, _ = read_all(tmp_path / "logs", ["hello/0"])
    assert out == ["hello/0 | 2026-12-02 14:05:00,000 install: new incarnation"]
    # The machine agent's lines about a name re-used: the earlier unit's only with --removed.
    logs = str(tmp_path / "logs")
    write(tmp_path / "logs" / "machine-0.log",
          "2026-12-02 14:00:00,000 INFO ensemble.machine: created ens-x-hello-0 for hello/0",
          "2026-12-02 14:03:05,000 INFO ensemble.machine: kept the log of hello/0",
          "2026-12-02 14:04:59,000 INFO ensemble.machine: created ens-x-hello-0 for hello/0")
    since = unit_logs.removal_keys(logs, ["hello/0"])
    assert since == {"hello/0": b"2026-12-02 14:03:05,000"}   # the moves' time, to the ms
    out = []
    unit_logs.read(unit_logs.sources(logs, ["hello/0"]), lambda *item: out.append(item[1].decode()), 0,
                   unit_logs.mentions(["hello/0"], since))
    assert out == ["2026-12-02 14:04:59,000 INFO ensemble.machine: created ens-x-hello-0 for hello/0",
                   "2026-12-02 14:05:00,000 install: new incarnation"]
    (tmp_path / "logs" / "machine-0.log").unlink()
    out, _ = read_all(tmp_path / "logs", ["hello/0"], removed=True)
    assert out == [
        "hello/0 (removed 2026-12-02 14:03:05) | 2026-12-02 14:00:01,000 install: old incarnation",
        "hello/0 (removed 2026-12-02 14:03:05) | 2026-12-02 14:03:06,000 install: second incarnation",
        "hello/0 | 2026-12-02 14:05:00,000 install: new incarnation",
    ]


# -- following -------------------------------------------------------------------------

def test_follow_merges_new_lines_of_every_file_and_of_units_that_appear(logs, tmp_path):
    sources = lambda: unit_logs.sources(str(logs), None, True)  # noqa: E731
    reading = unit_logs.read(sources(), lambda *a: None, 0, whole_lines=True)
    db = logs / "units" / "db-0" / "db-0.log"
    with open(db, "a") as f:
        f.write("2026-12-02 14:01:00,300 config-changed: half a li")  # not ended yet
    err = tmp_path / "err"
    with open(err, "w") as errors:
        follower = unit_logs.Follower(sources, reading.offsets, err=errors)
        assert follower.poll() == []
        with open(db, "a") as f:
            f.write("ne\n")
        write(logs / "machine-0.log", "2026-12-02 14:01:00,100 INFO ensemble.machine: machine-0: created new/0")
        write(logs / "units" / "new-0" / "new-0.log", "2026-12-02 14:01:00,200 install: a new unit",
              "  its continuation")
        got = [unit_logs.format_line(*item).rstrip("\n") for item in follower.poll()]
        assert got == [
            "machine-0 | 2026-12-02 14:01:00,100 INFO ensemble.machine: machine-0: created new/0",
            "new/0 | 2026-12-02 14:01:00,200 install: a new unit",
            "new/0 |   its continuation",
            "db/0 | 2026-12-02 14:01:00,300 config-changed: half a line",
        ]
        # A unit removed meanwhile: its live file goes, its removed copy is not shown again.
        retire_log_dir(str(logs / "units"), "new/0")
        write(logs / "units" / "web-0" / "web-0.log", "2026-12-02 14:02:00,000 stop: web stopping")
        assert [label for label, _ in follower.poll()] == ["web/0"]
        # A link in place of a file: said once, the others still followed.
        agent = logs / "units" / "web-0" / "agent.log"
        agent.symlink_to("/etc/shadow")
        assert follower.poll() == [] and follower.poll() == []
        write(db, "2026-12-02 14:03:00,000 stop: db stopping")
        assert [label for label, _ in follower.poll()] == ["db/0"]
    assert err.read_text() == f"({agent} is not a regular file the unit wrote: refusing to read it; following the others)\n"


# -- the hook output's format ------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_every_hook_output_line_has_its_time_and_hook_and_the_failure_is_as_before(tmp_path):
    charm = make_charm(tmp_path / "charm", hooks={
        "install": "echo one; sleep 0.1; echo two >&2; sleep 0.1; printf 'no end'; sleep 0.2; echo; echo; echo three; exit 3"})
    log = tmp_path / "probe-0.log"
    with pytest.raises(HookFailed) as failed:
        await run_hook(reactor, "install", charm, {"PATH": os.environ["PATH"]}, str(log))
    assert str(failed.value) == "install hook exited with status 3: one | two | no end | three"
    lines = log.read_text().splitlines()
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}"
    assert re.fullmatch(rf"--- {stamp} install hook", lines[0])
    assert re.fullmatch(rf"--- {stamp} install hook exited with status 3", lines[-1])
    body = [re.fullmatch(rf"({stamp}) install: (.*)", line) for line in lines[1:-1]]
    assert all(body), lines
    assert sorted(m.group(2) for m in body) == ["", "no end", "one", "three", "two"]
    times = [unit_logs.line_time(line.encode()) for line in lines]
    assert times == sorted(times)


def test_a_long_line_without_its_end_is_written_in_bounded_pieces(tmp_path):
    log = open(tmp_path / "log", "wb")
    process = hooks._HookProcess(log, defer.Deferred(), "install")
    process.childDataReceived(1, b"x" * (hooks.PARTIAL_LINE_BYTES + 10))
    process.childDataReceived(1, b"y\n")
    log.close()
    lines = (tmp_path / "log").read_bytes().splitlines()
    assert [line.split(b"install: ")[1] for line in lines] == [b"x" * (hooks.PARTIAL_LINE_BYTES + 10), b"y"]


# -- the command on files alone ------------------------------------------------------------

def test_the_command_works_from_the_files_when_the_environment_is_down(logs, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    os.rename(logs, home / "logs")
    env = ensemble_env(home)
    result = run_ensemble("debug-log", "-n", "3", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "machine-0 | 2026-12-02 14:00:06,000 ERROR ensemble.machine: machine-0: deploying db/0 failed",
        "machine-0 | Traceback (most recent call last):",
        "machine-0 | RuntimeError: of db/0",
    ]
    assert "cannot reach the environment" in result.stderr and "showing this host's files only" in result.stderr
    result = run_ensemble("debug-log", "web/0", "nosuch/3", env=env)
    assert result.returncode == 0, result.stderr
    assert {line.partition(" | ")[0] for line in result.stdout.splitlines()} == {"web/0", "machine-0"}
    assert "(no log for nosuch/3 on this host)" in result.stderr.splitlines()
    result = run_ensemble("debug-log", "web", env=env)
    assert result.returncode == 1 and result.stderr.startswith("error: invalid unit name 'web'")
    result = run_ensemble("debug-log", "../db-0", env=env)
    assert result.returncode == 1 and "invalid unit name" in result.stderr


# -- on a real local environment -------------------------------------------------------------

@pytest.fixture(scope="module")
def env(tmp_path_factory):
    with bootstrapped(tmp_path_factory.mktemp("debug-log") / "home") as env:
        yield env


def sources_and_times(output):
    """[(source, time or None, text)] of debug-log's lines."""
    parsed = []
    for line in output.splitlines():
        source, sep, text = line.partition(" | ")
        assert sep, line
        match = TIME.match(text)
        parsed.append((source, match.group(1) if match else None, text))
    return parsed


def chatty(tmp_path, name, hooks=("install",)):
    """A charm whose hooks print five numbered lines, a few tenths of a second apart."""
    body = f'for i in 1 2 3 4 5; do echo "{name} says $i"; sleep 0.3; done'
    return make_charm(tmp_path / name, name=name, hooks={h: body for h in hooks})


@pytest_twisted.ensureDeferred
async def test_two_units_hook_output_is_merged_in_time_order_and_filtered_by_unit(env, tmp_path):
    env.cli("deploy", chatty(tmp_path, "alpha", ("install", "start")), "--to", "0")
    env.cli("deploy", chatty(tmp_path, "beta", ("install", "start")), "--to", "0")
    await all_started(env, ["alpha/0", "beta/0"])
    result = env.cli("debug-log", "alpha/0", "beta/0", "-n", "0")
    lines = sources_and_times(result.stdout)
    assert {source for source, _, _ in lines} == {"alpha/0", "beta/0", "machine-0"}
    times = [t.ljust(23, "0") for _, t, _ in lines if t]
    assert times == sorted(times), result.stdout  # in time order across every file
    # Each unit's own lines, each with the time and the hook it came from, in order.
    for unit in ("alpha", "beta"):
        said = [text for source, _, text in lines if source == f"{unit}/0" and f"{unit} says" in text]
        assert [re.sub(r"^\S+ \S+ ", "", text) for text in said] == \
            [f"{hook}: {unit} says {i}" for hook in ("install", "start") for i in range(1, 6)]
    # Interleaved, not one file after the other: the sources alternate many times.
    changes = sum(1 for a, b in zip(lines, lines[1:]) if a[0] != b[0])
    assert changes >= 4, result.stdout
    assert "cannot reach" not in result.stderr

    alpha = sources_and_times(env.cli("debug-log", "alpha/0", "-n", "0").stdout)
    assert {source for source, _, _ in alpha} == {"alpha/0", "machine-0"}
    # The machine agent's lines are those that name alpha/0 (some name beta/0 too).
    assert all("alpha/0" in text for source, t, text in alpha if source == "machine-0" and t)
    assert not any("beta" in text for source, _, text in alpha if source == "alpha/0")
    assert any("alpha says 5" in text for _, _, text in alpha)
    # -n: the last N lines of that merged output.
    last = env.cli("debug-log", "alpha/0", "-n", "3").stdout.splitlines()
    assert last == env.cli("debug-log", "alpha/0", "-n", "0").stdout.splitlines()[-3:]
    # A unit the environment has on no machine of this host: said on stderr.
    result = env.cli("debug-log", "nosuch/0", check=False)
    assert result.returncode == 1 and result.stderr.strip() == "error: unit 'nosuch/0' not found"


@pytest_twisted.ensureDeferred
async def test_follow_shows_the_hooks_of_a_unit_deployed_after_it_started(env, tmp_path):
    import threading

    follower = subprocess.Popen(
        [sys.executable, "-m", "ensemble", "debug-log", "-f", "-n", "1"], env=env.env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
    )
    seen = []
    reader = threading.Thread(target=lambda: seen.extend(iter(follower.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        await until(lambda: len(seen) >= 1, what="the last line before following")
        env.cli("deploy", chatty(tmp_path, "gamma"), "--to", "0")
        await until(lambda: any(line.startswith("gamma/0 | ") and "install: gamma says 5" in line for line in seen),
                    what="gamma's install hook in the followed output")
        assert follower.poll() is None
    finally:
        follower.terminate()
        follower.wait(timeout=30)
        reader.join(timeout=30)
    gamma = [line for line in seen if line.startswith("gamma/0 | ") and "gamma says" in line]
    assert [line.rpartition(" ")[2] for line in gamma] == ["1\n", "2\n", "3\n", "4\n", "5\n"]


@pytest_twisted.ensureDeferred
async def test_a_re_created_unit_shows_only_its_own_hooks_and_removed_shows_the_old_ones(env, tmp_path):
    first = make_charm(tmp_path / "one", name="hello", hooks={"install": "echo first incarnation"})
    second = make_charm(tmp_path / "two", name="hello", hooks={"install": "echo second incarnation"})
    env.cli("deploy", first, "--to", "0")
    await until(lambda: env.units().get("hello/0", {}).get("agent-state") == "started", what="hello/0 started")
    assert "first incarnation" in env.cli("debug-log", "hello/0").stdout
    env.cli("destroy-service", "hello")
    await until(lambda: "hello" not in env.status()["services"], what="hello gone")
    removed = env.home / "logs" / "units" / "removed"
    (kept,) = [p for p in removed.iterdir() if p.name.startswith("hello-0.")]
    assert {(os.lstat(p).st_uid, os.lstat(p).st_gid) for p in [kept, *kept.iterdir()]} == {(0, 0)}
    result = env.cli("debug-log", "hello/0", "-n", "0")
    assert "hello/0 was removed: --removed shows its logs" in result.stderr
    # At most the machine agent's last lines of the teardown, in the second after the move.
    assert {source for source, _, _ in sources_and_times(result.stdout)} <= {"machine-0"}
    assert "created" not in result.stdout and "incarnation" not in result.stdout

    env.cli("deploy", second, "--to", "0")
    await until(lambda: env.units().get("hello/0", {}).get("agent-state") == "started", what="hello/0 again")
    now = env.cli("debug-log", "hello/0", "-n", "0").stdout
    assert "second incarnation" in now and "first incarnation" not in now
    assert "(removed" not in now
    assert now.count("created ens-") == 1  # the machine agent's lines of this one only
    assert "first incarnation" not in (env.home / "logs" / "units" / "hello-0" / "hello-0.log").read_text()
    both = sources_and_times(env.cli("debug-log", "hello/0", "--removed", "-n", "0").stdout)
    label = re.fullmatch(r"hello-0\.(\d{4})(\d\d)(\d\d)-(\d\d)(\d\d)(\d\d)", kept.name).groups()
    old = "hello/0 (removed {}-{}-{} {}:{}:{})".format(*label)
    assert [source for source, _, text in both if "incarnation" in text] == [old, "hello/0"]
    assert [text.endswith("first incarnation") for source, _, text in both if "incarnation" in text] == [True, False]
    assert {source for source, _, _ in both} == {old, "hello/0", "machine-0"}
