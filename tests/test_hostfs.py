"""Host tools never trust what a unit can write or run: ensemble/hostfs.py against
links, FIFOs, devices, huge files and a file swapped under it; the machine agent's
log tail and `ensemble debug-log` (real ZooKeeper, no containers) on such files; and
LXC's monitor told from processes that only take its title. The same on real units
is in test_host_trust.py."""

import os
import resource
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time

import pytest
import pytest_twisted

from ensemble import hostfs
from ensemble.errors import UnsafeFile
from ensemble.machine.container.driver import LXCDriver
from ensemble.machine.deploy import agent_log_tail
from ensemble.machine.reconcilers.units import AGENT_REPORT_TIMEOUT
from ensemble.machine.agent import MachineAgent
from ensemble.state.unit import ERROR

from conftest import deploy_charm, ensemble_env
from test_cli import one_line_error
from test_reconcile import Host, clock  # noqa: F401 (a fixture)

SECRET = "s3cret-of-the-host-7f1c"
DB = "examples/charms/db"


@pytest.fixture
def secret(tmp_path):
    """A root-only host file, long, with the secret at its start and end."""
    path = tmp_path / "host-secret"
    path.write_text(SECRET + "\n" + "x" * 20000 + "\n" + SECRET + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture
def unit_dir(tmp_path):
    """A unit's log directory below the host's: (root, the unit's directory)."""
    root = tmp_path / "units"
    (root / "db-0").mkdir(parents=True)
    return root, root / "db-0"


def refusal(path):
    return f"{path} is not a regular file the unit wrote: refusing to read it"


def with_timeout(function, seconds=5):
    """function() in a thread: its result, or fail if it does not return in time (an
    open of a FIFO never does)."""
    result = {}

    def run():
        try:
            result["value"] = function()
        except BaseException as e:  # handed to the test
            result["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{function} did not return within {seconds}s"
    if "error" in result:
        raise result["error"]
    return result["value"]


# -- the module ------------------------------------------------------------------------

def test_a_regular_file_is_read(unit_dir):
    root, unit = unit_dir
    (unit / "db-0.log").write_text("one\ntwo\nthree\n")
    assert hostfs.read_tail(str(root), "db-0/db-0.log") == (b"one\ntwo\nthree\n", 0)
    assert hostfs.tail_lines(str(root), "db-0/db-0.log", 2) == ("two\nthree\n", 14, False)
    assert hostfs.tail_lines(str(root), "db-0/db-0.log", 0) == ("one\ntwo\nthree\n", 14, False)
    with pytest.raises(FileNotFoundError):
        hostfs.read_tail(str(root), "db-0/agent.log")
    with pytest.raises(ValueError):
        hostfs.read_tail(str(root), "db-0/../db-0/db-0.log")


def test_a_link_at_the_end_is_refused_even_dangling(unit_dir, secret):
    root, unit = unit_dir
    (unit / "db-0.log").symlink_to(secret)
    (unit / "agent.log").symlink_to(unit / "nowhere")
    for name in ("db-0.log", "agent.log"):
        with pytest.raises(UnsafeFile) as caught:
            hostfs.read_tail(str(root), f"db-0/{name}")
        assert str(caught.value) == refusal(unit / name)


def test_a_linked_directory_on_the_way_is_refused(unit_dir, secret):
    root, unit = unit_dir
    (unit / "sub").symlink_to(secret.parent)
    with pytest.raises(UnsafeFile):
        hostfs.read_tail(str(root), f"db-0/sub/{secret.name}")
    # The unit's own directory as a link (here the host's own doing, still refused).
    (root / "db-1").symlink_to(unit)
    (unit / "db-1.log").write_text("fine\n")
    with pytest.raises(UnsafeFile):
        hostfs.read_tail(str(root), "db-1/db-1.log")


def test_fifos_devices_and_directories_are_refused_without_blocking(unit_dir):
    root, unit = unit_dir
    os.mkfifo(unit / "fifo.log")
    os.mknod(unit / "zero.log", stat.S_IFCHR | 0o666, os.makedev(1, 5))  # /dev/zero's numbers
    (unit / "dir.log").mkdir()
    (unit / "link-zero.log").symlink_to("/dev/zero")
    try:
        for name in ("fifo.log", "zero.log", "dir.log", "link-zero.log"):
            with pytest.raises(UnsafeFile) as caught:
                with_timeout(lambda: hostfs.read_tail(str(root), f"db-0/{name}"))
            assert str(caught.value) == refusal(unit / name)
    finally:
        # Release a reader a broken implementation left blocked on the FIFO.
        os.close(os.open(unit / "fifo.log", os.O_RDWR | os.O_NONBLOCK))


def test_a_huge_file_is_read_as_a_bounded_tail(unit_dir):
    root, unit = unit_dir
    log = unit / "db-0.log"
    with open(log, "wb") as f:
        f.truncate(64 << 30)  # sparse: 64 GiB that take no room
        f.seek(0, os.SEEK_END)
        f.write(b"before\nlast line\n")
    data, begin = hostfs.read_tail(str(root), "db-0/db-0.log", limit=1 << 20)
    assert len(data) == 1 << 20 and begin == (64 << 30) + 17 - (1 << 20)
    text, end, cut = hostfs.tail_lines(str(root), "db-0/db-0.log", 1)
    assert (text, end, cut) == ("last line\n", (64 << 30) + 17, False)
    # All lines: those within the last TAIL_LIMIT bytes, less the first (cut) one.
    assert hostfs.tail_lines(str(root), "db-0/db-0.log", 0) == ("last line\n", (64 << 30) + 17, True)
    # Followed from an offset far behind: only the last `limit` bytes.
    data, begin = hostfs.read_tail(str(root), "db-0/db-0.log", limit=4096, start=10)
    assert len(data) == 4096 and data.endswith(b"last line\n")
    # A file now shorter than the offset was truncated: read from its start.
    log.write_text("new\n")
    assert hostfs.read_tail(str(root), "db-0/db-0.log", start=1000) == (b"new\n", 0)


def test_a_file_swapped_for_a_link_after_the_check_is_not_followed(unit_dir, secret, monkeypatch):
    root, unit = unit_dir
    log = unit / "db-0.log"
    log.write_text("the unit's own line\n")
    swapped = []

    def check_then_swap(real):
        def check(*args, **kwargs):
            result = real(*args, **kwargs)
            if not swapped:  # the file has been looked at: now the unit swaps it for a link
                (unit / "swap").symlink_to(secret)
                os.replace(unit / "swap", log)
                swapped.append(True)
            return result
        return check

    for name in ("stat", "lstat", "fstat"):
        monkeypatch.setattr(hostfs.os, name, check_then_swap(getattr(os, name)))
    try:
        data, _ = hostfs.read_tail(str(root), "db-0/db-0.log")
    except UnsafeFile:
        data = b""  # refusing is fine too; reading the host's file is not
    assert swapped and log.is_symlink()
    assert data == b"the unit's own line\n"


def test_own_directory_gives_the_directory_itself_never_a_link(tmp_path, secret):
    root = tmp_path / "units"
    root.mkdir()
    hostfs.own_directory(str(root), "db-0", 100000, 100000)
    st = os.lstat(root / "db-0")
    assert stat.S_ISDIR(st.st_mode) and (st.st_uid, st.st_gid) == (100000, 100000)
    (root / "db-1").symlink_to(secret.parent)
    with pytest.raises(UnsafeFile) as caught:
        hostfs.own_directory(str(root), "db-1", 100000, 100000)
    assert str(caught.value) == f"{root / 'db-1'} is not a directory: refusing to use it"
    assert os.stat(secret.parent).st_uid == 0 and os.stat(secret).st_uid == 0


# -- the machine agent's log tail --------------------------------------------------------

def test_agent_log_tail_reads_its_log_and_refuses_anything_else(unit_dir, secret):
    root, unit = unit_dir
    agent_log = unit / "agent.log"
    assert agent_log_tail(str(root), "db/0") == f"no log at {agent_log}"
    agent_log.write_text("a\nb\nc\nd\n")
    assert agent_log_tail(str(root), "db/0") == "b | c | d"
    agent_log.unlink()
    for plant in (lambda: agent_log.symlink_to(secret), lambda: agent_log.symlink_to("/dev/zero"),
                  lambda: os.mkfifo(agent_log)):
        plant()
        try:
            assert with_timeout(lambda: agent_log_tail(str(root), "db/0")) == refusal(agent_log)
        finally:
            if stat.S_ISFIFO(os.lstat(agent_log).st_mode):
                os.close(os.open(agent_log, os.O_RDWR | os.O_NONBLOCK))
            agent_log.unlink()


@pytest_twisted.ensureDeferred
async def test_a_silent_agent_whose_log_is_a_link_shows_the_refusal_not_the_file(clock, tmp_path, secret):
    host = Host(clock, tmp_path)
    await host.setup()
    await deploy_charm(host.admin, host.charm, "db")
    (host.log_dir / "db-0").mkdir(parents=True)
    (host.log_dir / "db-0" / "agent.log").symlink_to(secret)
    await host.start_agent()
    host.tick(int(AGENT_REPORT_TIMEOUT / MachineAgent.resync_interval) + 1)
    unit = await host.unit("db/0")
    assert unit.state == ERROR
    # The error is the unit's own to read: no byte of the host's file in it.
    assert SECRET not in unit.data["error"]
    assert unit.data["error"].endswith(refusal(host.log_dir / "db-0" / "agent.log"))
    await host.agent.stop()


# -- ensemble debug-log ----------------------------------------------------------------

MEMORY_CAP = 2 << 30  # address space of the CLI: a runaway read fails rather than take the machine's


def run_capped(*args, env, timeout=60):
    """Run the CLI with its address space capped: (exit status, stdout, stderr, max RSS in MiB)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "ensemble", *map(str, args)], env=env, stdout=out, stderr=err,
            stdin=subprocess.DEVNULL, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP,) * 2),
        )
        deadline = time.monotonic() + timeout
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                process.kill()
                os.wait4(process.pid, 0)
                pytest.fail(f"ensemble {' '.join(map(str, args))} did not finish within {timeout}s")
            time.sleep(0.02)
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        return process.returncode, out.read().decode(), err.read().decode(), usage.ru_maxrss // 1024


class Result:
    def __init__(self, code, stdout, stderr):
        self.returncode, self.stdout, self.stderr = code, stdout, stderr


@pytest.fixture
def debug_env(tmp_path, zk_spec, env_client):
    """An environment (no agents) with unit db/0; its log directory on this host."""
    env = ensemble_env(tmp_path / "home", zk_spec)
    code, _, err, _ = run_capped("deploy", DB, "--to", "0", env=env)
    assert code == 0, err
    unit = tmp_path / "home" / "logs" / "units" / "db-0"
    unit.mkdir(parents=True)
    return env, unit


def test_debug_log_prints_the_tail_of_the_units_log(debug_env):
    env, unit = debug_env
    code, out, err, _ = run_capped("debug-log", "db/0", env=env)
    assert (code, out, err) == (0, "", "")  # its hooks have not run yet
    (unit / "db-0.log").write_text("".join(f"line {i}\n" for i in range(300)))
    code, out, err, _ = run_capped("debug-log", "db/0", "-n", "3", env=env)
    assert (code, out, err) == (0, "db/0 | line 297\ndb/0 | line 298\ndb/0 | line 299\n", "")
    code, out, _, _ = run_capped("debug-log", "db/0", env=env)
    assert out.splitlines() == [f"db/0 | line {i}" for i in range(200, 300)]
    code, _, err, _ = run_capped("debug-log", "db/0", "-n", "-3", env=env)
    assert one_line_error(Result(code, "", err)) == "invalid -n -3: give a number of lines, or 0 for all"


@pytest.mark.parametrize("plant", ["secret", "dev-zero", "fifo", "device"])
def test_debug_log_refuses_what_the_unit_put_in_place_of_its_log(debug_env, secret, plant):
    env, unit = debug_env
    log = unit / "db-0.log"
    if plant == "secret":
        log.symlink_to(secret)
    elif plant == "dev-zero":
        log.symlink_to("/dev/zero")
    elif plant == "fifo":
        os.mkfifo(log)
    else:
        os.mknod(log, stat.S_IFCHR | 0o666, os.makedev(1, 5))
    try:
        code, out, err, rss = run_capped("debug-log", "db/0", "-n", "0", env=env, timeout=30)
    finally:
        if plant == "fifo":
            os.close(os.open(log, os.O_RDWR | os.O_NONBLOCK))
    assert one_line_error(Result(code, out, err)) == refusal(log)
    assert SECRET not in out + err and out == ""
    assert rss < 300, f"{rss} MiB"


def test_debug_log_of_a_huge_log_reads_a_bounded_tail(debug_env):
    env, unit = debug_env
    with open(unit / "db-0.log", "wb") as f:
        f.truncate(64 << 30)
        f.seek(0, os.SEEK_END)
        f.write(b"".join(b"line %d\n" % i for i in range(10)))
    code, out, err, rss = run_capped("debug-log", "db/0", "-n", "2", env=env)
    assert (code, out, err) == (0, "db/0 | line 8\ndb/0 | line 9\n", "")
    code, out, err, rss = run_capped("debug-log", "db/0", "-n", "0", env=env)
    assert code == 0 and out.endswith("db/0 | line 9\n") and len(out) <= hostfs.TAIL_LIMIT
    assert err == f"(earlier output of {unit / 'db-0.log'} left out: showing its last 4 MiB)\n"
    assert rss < 300, f"{rss} MiB"


def test_debug_log_follow_refuses_a_link_with_one_line_and_goes_on(debug_env, secret):
    env, unit = debug_env
    log = unit / "db-0.log"
    log.write_text("first\n")
    follower = subprocess.Popen(
        [sys.executable, "-m", "ensemble", "debug-log", "-f", "db/0"], env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP,) * 2),
    )
    try:
        assert follower.stdout.readline() == "db/0 | first\n"
        with open(log, "a") as f:
            f.write("second\n")
        assert follower.stdout.readline() == "db/0 | second\n"
        (unit / "swap").symlink_to(secret)
        os.replace(unit / "swap", log)
        # Said once; the unit's other file (and any other log) is still followed.
        assert follower.stderr.readline() == f"({refusal(log)}; following the others)\n"
        with open(unit / "agent.log", "a") as f:
            f.write("2026-12-02 14:00:00,000 INFO ensemble.unit: still followed\n")
        assert follower.stdout.readline() == "db/0 | 2026-12-02 14:00:00,000 INFO ensemble.unit: still followed\n"
    finally:
        follower.terminate()
        out, err = follower.communicate(timeout=30)
    assert SECRET not in out + err and out == ""


# -- LXC's monitor -----------------------------------------------------------------------

def _titled(title, *prefix):
    """A sleeping process whose command line starts with `title`, run through `prefix`."""
    process = subprocess.Popen([*prefix, "bash", "-c", f'exec -a "{title}" sleep 300'],
                               stdin=subprocess.DEVNULL, start_new_session=True)
    return process


def _find(title):
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                    if f.read().startswith(title.encode() + b"\0"):
                        found.append(int(entry.name))
            except OSError:
                pass
    return found


@pytest_twisted.ensureDeferred
async def test_a_monitors_title_alone_does_not_make_a_monitor(tmp_path):
    driver = LXCDriver(str(tmp_path / "lxc"), template=None)
    title = f"[lxc monitor] {driver.lxc_path} ensemble-test-db-0"
    fakes = [
        # A unit's process as seen from the host: an unprivileged host id...
        _titled(title, "setpriv", "--reuid=100000", "--regid=100000", "--clear-groups", "--"),
        # ...or (no user namespace) root, but in its container's pid namespace.
        _titled(title, "unshare", "--pid", "--fork", "--mount-proc", "--"),
    ]
    real = None
    try:
        while len(_find(title)) < 2:
            time.sleep(0.02)
        monitor = await driver._monitor("ensemble-test-db-0")
        assert monitor.pids() == [] and not monitor.alive()
        monitor.close()
        # Root in our user and pid namespaces: what LXC's monitor is (a stand-in here).
        real = _titled(title)
        while len(_find(title)) < 3:
            time.sleep(0.02)
        monitor = await driver._monitor("ensemble-test-db-0")
        try:
            assert monitor.pids() == [real.pid] and monitor.alive()
            real.kill()
            real.wait()
            assert not monitor.alive()
        finally:
            monitor.close()
    finally:
        for process in fakes + ([real] if real else []):
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait()
