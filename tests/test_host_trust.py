"""Host tools never trust a unit's files or processes, on real units of a local
environment: root in a unit puts links (to a host file, to the environment's admin
secret, to /dev/zero) and a FIFO in place of its logs, and runs processes titled as
another unit's LXC monitor. The host's tools refuse the
files with one line and wait only for LXC's real monitor."""

import os
import shlex
import stat

import pytest_twisted

from ensemble.machine.container.driver import _parent_pid
from ensemble.machine.content import agent_python
from ensemble.machine.deploy import agent_log_tail

from conftest import make_charm
from test_deploy import all_started, environment, sh, until  # noqa: F401 (a fixture)
from test_hostfs import SECRET, Result, refusal, run_capped, with_timeout
from test_cli import one_line_error


def _proc_titles():
    """{pid: command line} of every process on the host."""
    found = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                    found[int(entry.name)] = f.read().rstrip(b"\0").replace(b"\0", b" ").decode("utf-8", "replace")
            except OSError:
                pass
    return found


@pytest_twisted.ensureDeferred
async def test_links_and_fifos_a_unit_puts_in_place_of_its_logs_are_refused(environment, tmp_path):
    env = environment
    secret = tmp_path / "host-secret"
    secret.write_text(SECRET + "\n" + "x" * 20000 + "\n" + SECRET + "\n")
    secret.chmod(0o600)
    admin_secret = env.config["admin-secret"]
    env.cli("deploy", make_charm(tmp_path / "probe"), "--to", "0")
    container = (await all_started(env, ["probe/0"]))["probe/0"]["container"]
    logs = env.home / "logs" / "units"
    log, agent_log = logs / "probe-0" / "probe-0.log", logs / "probe-0" / "agent.log"
    assert "install ran" in env.cli("debug-log", "probe/0").stdout
    driver = env.driver()
    try:
        plants = {
            "a host file": f"ln -sf {shlex.quote(str(secret))} {{}}",
            "the environment's admin secret": f"ln -sf {shlex.quote(str(env.home / 'environment.yaml'))} {{}}",
            "/dev/zero": "ln -sf /dev/zero {}",
            "a FIFO": "rm -f {} && mkfifo {}",
        }
        for what, plant in plants.items():
            for path in ("/var/log/ensemble/probe-0.log", "/var/log/ensemble/agent.log"):
                code, _, err = await sh(driver, container, plant.format(path, path))
                assert code == 0, (what, err)
            try:
                code, out, err, rss = run_capped("debug-log", "probe/0", "-n", "0", env=env.env, timeout=30)
                # Both refused in one line; what is shown is the machine agent's alone.
                assert one_line_error(Result(code, out, err)) == f"{refusal(log)} (and {agent_log}, the same)", what
                assert not [line for line in out.splitlines() if not line.startswith("machine-0 | ")], what
                assert SECRET not in out + err and admin_secret not in out + err, what
                assert rss < 300, (what, f"{rss} MiB")
                # What the machine agent puts in the unit's status when its agent is silent.
                tail = with_timeout(lambda: agent_log_tail(str(logs), "probe/0"))
                assert tail == refusal(agent_log), what
            finally:
                for path in (log, agent_log):
                    if stat.S_ISFIFO(os.lstat(path).st_mode):  # release a reader left blocked
                        os.close(os.open(path, os.O_RDWR | os.O_NONBLOCK))
        # A regular file of its own is shown as before.
        code, _, err = await sh(driver, container, (
            "rm -f /var/log/ensemble/probe-0.log && echo mine > /var/log/ensemble/probe-0.log"))
        assert code == 0, err
        result = env.cli("debug-log", "probe/0", check=False)
        assert [line for line in result.stdout.splitlines() if line.startswith("probe/0 | ")] == ["probe/0 | mine"]
        assert one_line_error(result) == refusal(agent_log)  # still a FIFO
    finally:
        await driver.close()


@pytest_twisted.ensureDeferred
async def test_a_process_titled_as_another_units_monitor_does_not_hold_up_its_removal(environment, tmp_path):
    env = environment
    env.cli("deploy", make_charm(tmp_path / "probe"), "--to", "0", "-n", "2")
    units = await all_started(env, ["probe/0", "probe/1"])
    faker, victim = units["probe/0"]["container"], units["probe/1"]["container"]
    driver = env.driver()
    try:
        title = f"[lxc monitor] {driver.lxc_path} {victim}"
        prctl = "import ctypes, time; ctypes.CDLL(None).prctl(15, b'[lxc monitor]', 0, 0, 0); time.sleep(1000)"
        fake = f"exec -a {shlex.quote(title)} {shlex.quote('/tmp/[lxc monitor]')} 1000"
        # Root in probe/0: a command line that is the monitor's title (exec -a) and a
        # comm that is its name (the binary's name; and prctl(PR_SET_NAME) in another).
        code, _, err = await sh(driver, faker, (
            "cp /bin/sleep '/tmp/[lxc monitor]' && "
            f"setsid -f bash -c {shlex.quote(fake)} </dev/null >/dev/null 2>&1 && "
            f"setsid -f {agent_python()} -c {shlex.quote(prctl)} </dev/null >/dev/null 2>&1"
        ))
        assert code == 0, err
        fakes = await until(lambda: [p for p, t in _proc_titles().items() if t == f"{title} 1000"],
                            timeout=30, what="the fake monitor")
        with open(f"/proc/{fakes[0]}/comm") as f:
            assert f.read().strip() == "[lxc monitor]"
        # LXC's real monitor: init's parent, with the same title, and only it.
        monitor = await driver._monitor(victim)
        try:
            assert len(monitor.pids()) == 1 and monitor.pids()[0] not in fakes
            assert _parent_pid(await driver.init_pid(victim)) == monitor.pids()[0]
            assert _proc_titles()[monitor.pids()[0]] == title
        finally:
            monitor.close()

        env.cli("remove-unit", "probe/1")
        await until(lambda: list(env.units()) == ["probe/0"], timeout=60, what="probe/1 removed")
        await until(lambda: _gone(driver, victim), timeout=30, what=f"{victim} destroyed")
        # Its cgroups went too, once its real monitor had exited; the fakes are untouched.
        assert [d for d in driver.cgroup_dirs(victim) if os.path.exists(d)] == []
        assert _proc_titles().get(fakes[0]) == f"{title} 1000"
    finally:
        await driver.close()


async def _gone(driver, name):
    return name not in await driver.list()
