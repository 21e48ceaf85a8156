"""A unit's agent forked into its container by the machine agent's agent starter
(agent_starter.py): confined exactly as one runsv starts, stopped by the container's
stop like one, followed by runsv's own when it ends, run only once the machine agent
lets it, and reaped by its starter even when the machine agent died mid-request (real
LXC and ZooKeeper)."""

import os
import signal

import pytest_twisted

from twisted.internet import reactor, task

from ensemble import process
from ensemble.machine.container.config import AGENT_LOCK, AGENT_LOG
from ensemble.machine.container.driver import OWN_RANGE
from ensemble.machine.container.names import container_name
from ensemble.machine.content import agent_python

from test_containers import lab, template, unprivileged_driver  # noqa: F401 (fixtures)
from test_faults import charm, environment, hooks_ran, deploy_started, unit_agent_pids  # noqa: F401 (fixtures)
from test_deploy import until

NAMESPACES = ("cgroup", "ipc", "mnt", "net", "pid", "user", "uts")
CONFINEMENT = ("Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs",
               "Seccomp", "Seccomp_filters")


def _status(pid):
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def _parent(pid):
    return int(_status(pid)["PPid"])


def _title(pid):
    return b" ".join(process.cmdline(pid)).decode(errors="replace")


def confinement(pid):
    """What a process of a unit is confined by, as the host sees it."""
    status = _status(pid)
    with open(f"/proc/{pid}/cgroup") as f:
        cgroups = f.read()
    with open(f"/proc/{pid}/uid_map") as f:
        uid_map = f.read().split()
    return {
        **{k: status[k] for k in CONFINEMENT},
        **{ns: os.readlink(f"/proc/{pid}/ns/{ns}") for ns in NAMESPACES},
        # liblxc's attach puts a process in a leaf of the container's cgroup2 (its
        # limits those of the container's): the same place.
        "cgroups": cgroups.replace("/.lxc\n", "\n"),
        "uid_map": uid_map,
    }


def open_files(pid):
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            found.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except FileNotFoundError:
            pass
    return found


async def one_agent(unit, parent_is):
    """The unit's one agent, once there is one and `parent_is(its pid)`."""
    def found():
        pids = unit_agent_pids(unit)
        return len(pids) == 1 and parent_is(pids[0])

    await until(found, 30, f"one agent of {unit}")
    return unit_agent_pids(unit)[0]


@pytest_twisted.ensureDeferred
async def test_a_forked_agent_is_confined_as_runsvs_stops_with_its_container_and_runsv_follows_it(
        environment, charm):  # noqa: F811
    env = environment
    await deploy_started(env, charm, 1)
    name = container_name(env.config["name"], "probe/0")
    driver = env.driver()
    try:
        init = await driver.init_pid(name)
    finally:
        await driver.close()

    def forked(pid):
        return "agent_starter" in _title(_parent(pid))

    agent = await one_agent("probe/0", forked)
    # Its container's namespaces, cgroup, ids, seccomp policy and capabilities: the
    # init's, whose capabilities are the bounding set LXC left (nothing more from the
    # user namespace it was forked into without an exec).
    mine, inits = confinement(agent), confinement(init)
    assert {k: mine[k] for k in NAMESPACES} == {k: inits[k] for k in NAMESPACES}
    assert mine["cgroups"] == inits["cgroups"] and mine["uid_map"] == inits["uid_map"]
    assert mine["CapEff"] == mine["CapPrm"] == mine["CapBnd"] == inits["CapBnd"]
    assert mine["CapAmb"] == mine["CapInh"] == "0000000000000000"
    assert mine["Seccomp"] == "2" and mine["Seccomp_filters"] == inits["Seccomp_filters"]
    assert mine["Uid"].split()[0] == inits["Uid"].split()[0] != "0"
    # Nothing of the starter's open: not liblxc's log of the container (a host file),
    # not its pipes to the machine agent. Of the host's files, only the lock the
    # starter passed on (root's, read-only; the container sees it at AGENT_LOCK_INSIDE).
    lock = os.path.join(driver.container_dir(name), AGENT_LOCK)
    paths = {f for f in open_files(agent) if f.startswith("/")}
    assert paths == {"/dev/null", "/var/log/ensemble/agent.log", lock}
    assert hooks_ran(env, "probe/0") == ["install ran", "start ran"]

    # The container's stop reaches it (runsv's script passes TERM on): it leaves cleanly,
    # and the machine agent starts the container again with an agent forked in again.
    agent_log = env.home / "logs" / "units" / "probe-0" / "agent.log"
    stops = agent_log.read_text().count("unit-probe-0: stopped")
    driver = env.driver()
    try:
        await driver.stop(name, timeout=10)
    finally:
        await driver.close()
    assert agent_log.read_text().count("unit-probe-0: stopped") == stops + 1
    again = await one_agent("probe/0", forked)
    assert again != agent
    # A new run of the container: its services are started again (lifecycle.py).
    await until(lambda: hooks_ran(env, "probe/0") == ["install ran", "start ran", "start ran"], 30,
                "the start hook of the container's new run")

    # Killed, it is followed by runsv's own agent, confined exactly alike, which knows
    # the container's run for the same and runs no hook again.
    presences = agent_log.read_text().count("unit-probe-0: present")
    forked_confinement = confinement(again)
    os.kill(again, signal.SIGKILL)
    follower = await one_agent("probe/0", lambda pid: "runsv" in _title(_parent(pid)))
    assert confinement(follower) == forked_confinement
    await until(lambda: agent_log.read_text().count("unit-probe-0: present") == presences + 1, 30,
                "runsv's agent present")
    assert env.units()["probe/0"]["agent-state"] == "started"
    assert hooks_ran(env, "probe/0") == ["install ran", "start ran", "start ran"]


@pytest_twisted.ensureDeferred
async def test_a_forked_agent_readies_itself_but_runs_only_once_let_or_once_its_starter_is_gone(
        unprivileged_driver, lab):  # noqa: F811
    driver = unprivileged_driver
    # Nothing listens there (the lab's own bridge): the agent says so at once, once it runs.
    zookeeper = {"ENSEMBLE_ZOOKEEPER": f"{lab.gateway}:9", "ENSEMBLE_CONNECT_TIMEOUT": "1"}
    specs = [lab.spec(unit, idmap=OWN_RANGE, agent_forked=True, agent_environment=zookeeper,
                      agent_command=[agent_python(), "-m", "ensemble", "unit-agent", "--unit", unit])
             for unit in ("web/0", "web/1")]
    for spec in specs:
        await driver.create(spec)
        await driver.start(spec.name, agent=False)
    logs = [os.path.join(driver.rootfs_delta(spec.name), AGENT_LOG.lstrip("/")) for spec in specs]

    def logged(path):
        try:
            with open(path) as f:
                return f.read()
        except FileNotFoundError:
            return ""

    # Forked in at the start, titled as its agent (its command parsed), and waiting:
    # it has not tried to reach ZooKeeper, not even after a while.
    await until(lambda: all(len(unit_agent_pids(u)) == 1 for u in ("web/0", "web/1")), 30, "both agents forked in")
    assert all("agent_starter" in _title(_parent(unit_agent_pids(u)[0])) for u in ("web/0", "web/1"))
    await task.deferLater(reactor, 1.5, lambda: None)
    assert [logged(path) for path in logs] == ["", ""]

    # Let go, the first runs; the second runs once its starter has ended (the driver
    # closed: the machine agent gone), and not before.
    await driver.start_agent(specs[0].name)
    await until(lambda: "cannot reach ZooKeeper" in logged(logs[0]), 30, "the first agent's attempt")
    assert logged(logs[1]) == ""
    await driver.close()
    await until(lambda: "cannot reach ZooKeeper" in logged(logs[1]), 30, "the second agent's attempt")


@pytest_twisted.ensureDeferred
async def test_a_starter_whose_machine_agent_died_mid_request_still_reaps_its_agent(
        unprivileged_driver, lab):  # noqa: F811
    driver = unprivileged_driver
    # An address on the lab's bridge that nobody has: the agent waits in its connect.
    zookeeper = {"ENSEMBLE_ZOOKEEPER": f"{lab.gateway.rpartition('.')[0]}.250:2181", "ENSEMBLE_CONNECT_TIMEOUT": "300"}
    spec = lab.spec("web/0", idmap=OWN_RANGE, agent_forked=True, agent_environment=zookeeper,
                    agent_command=[agent_python(), "-m", "ensemble", "unit-agent", "--unit", "web/0"])
    await driver.create(spec)
    await driver.start(spec.name)
    agent = await one_agent("web/0", lambda pid: "agent_starter" in _title(_parent(pid)))
    starter = _parent(agent)
    # The machine agent killed with a request under way: the answer finds no reader.
    driver._starter.transport.closeChildFD(1)
    await task.deferLater(reactor, 0.1, lambda: None)  # closed by the reactor's next turn
    driver._starter.request(op="release", lock="/nonexistent").addErrback(lambda _: None)
    await task.deferLater(reactor, 1, lambda: None)
    # The starter lives on as its agent's parent, and reaps it when the container stops
    # (left to the host's init, it could stay a zombie, and the container with it).
    assert _parent(agent) == starter
    await driver.stop(spec.name)
    await until(lambda: not os.path.exists(f"/proc/{agent}"), 30, "the agent reaped")
    await until(lambda: not os.path.exists(f"/proc/{starter}"), 30, "the starter ended after its last agent")
