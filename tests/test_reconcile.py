"""Fast tests of the machine agent's convergence: its reconcilers on an in-memory
ZooKeeper, a fake container driver and a Clock (tests/fakes.py). The same behaviour on
real ZooKeeper, LXC and namespaces is in test_deploy.py, test_faults.py and friends."""

import logging

import pytest
import pytest_twisted
from twisted.internet import defer, task

from ensemble.charm import Charm, bundle_id
from ensemble.machine import host as hosts
from ensemble.machine.agent import MachineAgent
from ensemble.machine.container.names import container_name
from ensemble.machine.reconciler import Reconciler
from ensemble.machine.reconcilers.units import AGENT_REPORT_TIMEOUT, SILENT_AGENT_PREFIX
from ensemble.state import client as state_client
from ensemble.state.environment import initialize
from ensemble.state.machine import MachineStateManager
from ensemble.state.service import ServiceStateManager
from ensemble.state.unit import ERROR, PENDING, UnitStateManager

from conftest import deploy_charm, make_charm
from fakes import FakeContainerDriver, FakeTemplate, FakeZooKeeper


class Host:
    """One machine of an in-memory environment, its agent not yet started."""

    def __init__(self, clock, tmp_path, template_rootfs="/", address="127.0.0.1"):
        self.clock = clock
        self.address = address
        self.zookeeper = FakeZooKeeper(clock)
        self.admin = self.zookeeper.client()
        self.driver = FakeContainerDriver(clock=clock)
        self.template = FakeTemplate()
        self.template.rootfs = template_rootfs
        self.log_dir = tmp_path / "unit-logs"
        self.charm = make_charm(tmp_path / "charm")
        self.agent = None

    async def setup(self):
        await initialize(self.admin, "fast")
        await MachineStateManager(self.admin).add_machine(address=self.address)

    async def start_agent(self, client=None, **options):
        """Machine 0's agent, on its own session (`client`) unless given one;
        `options`: MachineAgent's (no bridge unless asked)."""
        options.setdefault("manage_bridge", False)
        self.agent = MachineAgent(
            client or self.zookeeper.client(), 0, self.clock, driver=self.driver, template=self.template,
            unit_log_dir=str(self.log_dir), **options,
        )
        await self.agent.start()
        return self.agent

    async def unit(self, name):
        return await UnitStateManager(self.admin).get_unit(name)

    def container(self, unit):
        return container_name("fast", unit)

    def tick(self, times=1):
        for _ in range(times):
            self.clock.advance(MachineAgent.resync_interval)


async def running_host(clock, tmp_path, units=2):
    """Machine 0 with `units` units of db, its agent started."""
    host = Host(clock, tmp_path)
    await host.setup()
    await deploy_charm(host.admin, host.charm, "db", n=units)
    await host.start_agent()
    return host


@pytest.fixture
def clock(monkeypatch):
    # A Clock has no threads: the agent's blocking work (a removed unit's log given
    # back to root) runs inline.
    monkeypatch.setattr(hosts.Host, "in_thread", lambda self, f, *args: defer.maybeDeferred(f, *args))
    return task.Clock()


@pytest_twisted.ensureDeferred
async def test_assigned_units_get_addresses_and_running_containers(clock, tmp_path):
    host = await running_host(clock, tmp_path, 3)
    # What forks their agents in was started first: the first unit does not wait for it.
    operations = [op for op, _ in host.driver.calls]
    assert operations.index("prepare_agents") < operations.index("create")
    for i, unit in enumerate(["db/0", "db/1", "db/2"]):
        data = (await host.unit(unit)).data
        assert data["private-address"] == f"10.77.0.{i + 2}"
        assert data["container"] == host.container(unit)
        container = host.driver.containers[host.container(unit)]
        assert container.state == "RUNNING" and container.spec.address == data["private-address"]
        assert container.spec.files["/etc/hosts"][0].count(f"{data['private-address']}\tdb-{i}") == 1
    assert host.agent.assigned == ["db/0", "db/1", "db/2"]
    await host.agent.stop()


@pytest_twisted.ensureDeferred
async def test_a_new_unit_is_deployed_alone_and_the_tick_looks_at_the_others(clock, tmp_path):
    host = await running_host(clock, tmp_path)
    # Asking LXC which containers run is slow (a process per pass), and a pass's checks
    # of the others would slow the new unit's deploy: it is deployed alone, at once.
    host.driver.delays["running"] = 3.0
    host.driver.calls.clear()
    await ServiceStateManager(host.admin).add_units("db", to=0)
    new = host.container("db/2")
    assert host.driver.containers[new].state == "RUNNING"
    assert (await host.unit("db/2")).data["container"] == new
    assert [c[0] for c in host.driver.calls] == ["state", "create", "start", "start_agent"]
    # The next tick's pass looks at every unit's container, and starts nothing again.
    host.driver.crash(host.container("db/0"))
    host.tick()
    clock.advance(3.0)
    assert ("running", None) in host.driver.calls
    assert [c for c in host.driver.calls if c[0] in ("create", "start")] == [
        ("create", new), ("start", new), ("start", host.container("db/0"))]
    await host.agent.stop()


@pytest.mark.parametrize("held_at", ["list", "running"])
@pytest_twisted.ensureDeferred
async def test_a_unit_added_while_a_pass_runs_is_deployed_at_once_with_its_services_limits(clock, tmp_path, held_at):
    host = await running_host(clock, tmp_path)
    # A tick's pass over the units here, held up listing the containers (before it
    # looks for orphans) or asking LXC which of them run.
    host.driver.delays[held_at] = 3.0
    host.tick()
    assert host.agent.units.busy
    charm = Charm.load(host.charm)
    bundle = charm.bundle()
    await ServiceStateManager(host.admin).deploy(
        "cache", bundle_id(charm.name, bundle), bundle, charm.config({}), {"memory": "256M"}, n=1, to=0)
    new = host.container("cache/0")
    # Not after the pass: now, with its own service's limits (not in the pass's).
    assert host.driver.containers[new].state == "RUNNING"
    assert host.driver.containers[new].spec.memory == 256 * 2**20
    clock.advance(3.0)
    # The pass under way took it for neither an orphan nor a leaving unit; nor does
    # the next tick's (no longer held).
    del host.driver.delays[held_at]
    clock.advance(3.0)
    assert host.driver.containers[new].state == "RUNNING"
    assert (await host.unit("cache/0")).data["container"] == new
    assert [c for c in host.driver.calls if c == ("destroy", new)] == []
    assert host.agent.units.busy is False
    await host.agent.stop()


@pytest_twisted.ensureDeferred
async def test_a_pass_leaves_units_being_deployed_at_once_to_those_deploys(clock, tmp_path):
    host = await running_host(clock, tmp_path)
    # More units added at once than are deployed at a time, their containers' making
    # held: some deploys are under way, the last waits its turn. Meanwhile db/0's stops.
    host.driver.delays["create"] = 30.0
    at_once = host.agent.units.max_concurrent_deploys
    new = [host.container(n) for n in await ServiceStateManager(host.admin).add_units("db", n=at_once + 1, to=0)]
    host.driver.crash(host.container("db/0"))
    host.tick()
    # The tick's pass started db/0 again and is done: it neither waited for the
    # deploys under way nor made the queued unit's container itself.
    assert host.driver.containers[host.container("db/0")].state == "RUNNING"
    assert host.agent.units.busy is False
    def made():
        return sorted(name for op, name in host.driver.calls if op == "create" and name in new)

    assert made() == sorted(new[:at_once])
    clock.advance(30.0)
    clock.advance(30.0)
    assert all(host.driver.containers[n].state == "RUNNING" for n in new)
    assert made() == sorted(new)  # each made once
    await host.agent.stop()


class PortListener:
    """A listener as layer 2 is: told when a unit's container started, before its agent
    may run. Records whether the agent was still waiting then."""

    def __init__(self, driver, fail=False):
        self.driver, self.fail, self.waiting_when_told = driver, fail, {}

    async def unit_addressed(self, unit):
        pass

    async def unit_started(self, unit):
        container = self.driver.containers[container_name("fast", unit.name)]
        self.waiting_when_told[unit.name] = container.agent_waiting
        if self.fail:
            raise RuntimeError("netlink said no")


@pytest.mark.parametrize("fail", [False, True])
@pytest_twisted.ensureDeferred
async def test_a_units_agent_runs_only_once_its_port_is_held_and_even_if_holding_it_failed(clock, tmp_path, fail):
    host = Host(clock, tmp_path)
    await host.setup()
    await host.start_agent()
    listener = PortListener(host.driver, fail)
    host.agent.units.listeners.append(listener)
    await deploy_charm(host.admin, host.charm, "db", n=1)
    host.tick()
    new = host.container("db/0")
    assert listener.waiting_when_told == {"db/0": True}
    # Then let go: a failed listener must not leave the agent waiting for ever.
    assert host.driver.containers[new].agent_waiting is False
    calls = [c for c in host.driver.calls if c[0] in ("start", "start_agent")]
    assert calls == [("start", new), ("start_agent", new)]
    await host.agent.stop()


class PortEntry:
    """A listener as the firewall is: told a unit has its address, it loads the unit's
    port entry (once the test fires `loading`), and the gate's start check says
    whether the entry is loaded (`loaded`)."""

    def __init__(self, safeguards):
        self.loading, self.loaded = defer.Deferred(), False
        safeguards.start_checks.append(("port-entry", self.problem))

    async def unit_addressed(self, unit):
        await self.loading

    async def problem(self, client, unit, limits=None):
        return None if self.loaded else "its port's entry is not loaded"


@pytest_twisted.ensureDeferred
async def test_a_new_units_container_is_made_while_its_port_entry_loads_and_started_once_loaded(clock, tmp_path):
    host = Host(clock, tmp_path)
    await host.setup()
    await host.start_agent()
    entry = PortEntry(host.agent.host.safeguards)
    host.agent.units.listeners.insert(0, entry)
    await deploy_charm(host.admin, host.charm, "db", n=1)
    new = host.container("db/0")
    # Made while its entry loads; nothing of it runs.
    assert host.driver.containers[new].state == "STOPPED"
    # Loading done, but the entry is not there (the firewall refused it, say): it
    # waits, made and stopped, with the reason; the gate starts it once it is.
    entry.loading.callback(None)
    assert host.driver.containers[new].state == "STOPPED"
    assert (await host.unit("db/0")).state == PENDING
    assert host.agent.host.safeguards.problems() == {"port-entry": "db/0: its port's entry is not loaded"}
    entry.loaded = True
    host.tick()
    assert host.driver.containers[new].state == "RUNNING"
    assert [c for c in host.driver.calls if c[0] in ("create", "start")] == [("create", new), ("start", new)]
    await host.agent.stop()


@pytest.mark.parametrize("address, public", [("127.0.0.1", None), ("192.0.2.7", "192.0.2.7")])
@pytest_twisted.ensureDeferred
async def test_units_public_address_is_their_machines_unless_loopback(clock, tmp_path, address, public):
    host = Host(clock, tmp_path, address=address)
    await host.setup()
    await deploy_charm(host.admin, host.charm, "db")
    await host.start_agent()
    assert (await host.unit("db/0")).data.get("public-address") == public
    await host.agent.stop()


@pytest.mark.parametrize("drift", ["crash", "orphan", "lost"])
@pytest_twisted.ensureDeferred
async def test_the_resync_tick_repairs_what_changed_behind_the_agents_back(clock, tmp_path, drift):
    host = await running_host(clock, tmp_path)
    name = host.container("db/1")
    if drift == "crash":
        host.driver.crash(name)
    elif drift == "orphan":
        host.driver.containers["ens-fast-ghost-0"] = host.driver.containers[name].__class__(
            host.driver.containers[name].spec, "RUNNING")
    else:
        del host.driver.containers[name]
    starts = sum(c.starts for c in host.driver.containers.values())
    host.tick()
    assert sorted(host.driver.containers) == [host.container("db/0"), name]
    assert all(c.state == "RUNNING" for c in host.driver.containers.values())
    if drift != "orphan":
        assert sum(c.starts for c in host.driver.containers.values()) == starts + 1
    await host.agent.stop()


@pytest_twisted.ensureDeferred
async def test_a_removed_unit_loses_its_container_address_and_node(clock, tmp_path):
    host = await running_host(clock, tmp_path)
    await UnitStateManager(host.admin).remove_unit("db/0")
    # Its agent is not alive (no presence): the stop hook is not waited for.
    assert sorted(host.driver.containers) == [host.container("db/1")]
    assert await UnitStateManager(host.admin).unit_names() == ["db/1"]
    assert await host.agent.units.host.allocator.reserved() == {"db/1": "10.77.0.3"}
    await host.agent.stop()


@pytest_twisted.ensureDeferred
async def test_one_units_failure_is_its_error_and_the_others_go_on(clock, tmp_path):
    host = Host(clock, tmp_path)
    await host.setup()
    host.driver.fail("create", host.container("db/1"), times=1)
    await deploy_charm(host.admin, host.charm, "db", n=3)
    await host.start_agent()
    failed = await host.unit("db/1")
    assert failed.state == ERROR and "injected failure: create" in failed.data["error"]
    assert {host.container("db/0"), host.container("db/2")} <= set(host.driver.containers)
    host.tick()  # the failure was once: the next pass makes it
    assert host.driver.containers[host.container("db/1")].state == "RUNNING"
    await host.agent.stop()


@pytest_twisted.ensureDeferred
async def test_a_unit_whose_agent_never_reports_shows_error_with_its_log(clock, tmp_path):
    host = Host(clock, tmp_path)
    await host.setup()
    await deploy_charm(host.admin, host.charm, "db", n=2)
    log = host.log_dir / "db-0" / "agent.log"
    log.parent.mkdir(parents=True)
    log.write_text("starting\n/usr/bin/env: '/opt/venv/bin/python': No such file or directory\n")
    await host.start_agent()
    # db/1's agent reports in time (its presence node, as a real agent makes it).
    unit_agent = host.zookeeper.client()
    await (await UnitStateManager(unit_agent).get_unit("db/1")).register_agent({"pid": 1})
    host.tick(int(AGENT_REPORT_TIMEOUT / MachineAgent.resync_interval) - 1)
    assert (await host.unit("db/0")).state == "pending"  # not yet: it may be slow
    host.tick(2)
    silent = await host.unit("db/0")
    assert silent.state == ERROR
    assert silent.data["error"].startswith(SILENT_AGENT_PREFIX)
    assert silent.data["error"].endswith("starting | /usr/bin/env: '/opt/venv/bin/python': No such file or directory")
    assert (await host.unit("db/1")).state == "pending"  # alive: left alone
    await host.agent.stop()


@pytest_twisted.ensureDeferred
async def test_an_installation_containers_cannot_run_is_refused_at_start(clock, tmp_path):
    empty = tmp_path / "empty-rootfs"
    empty.mkdir()
    host = Host(clock, tmp_path, template_rootfs=str(empty))
    await host.setup()
    await deploy_charm(host.admin, host.charm, "db", n=1)
    await host.start_agent()
    machine = await MachineStateManager(host.admin).get_machine(0)
    assert machine.data["error"].startswith("units cannot run this installation: its python")
    unit = await host.unit("db/0")
    assert unit.state == ERROR and unit.data["error"] == machine.data["error"]
    assert host.driver.containers == {}
    await host.agent.stop()


class Counting(Reconciler):
    def __init__(self, clock):
        super().__init__(host=None)
        self.clock = clock
        self.passes = 0
        self.fail = False

    async def converge(self):
        self.passes += 1
        await task.deferLater(self.clock, 1, lambda: None)
        if self.fail:
            raise RuntimeError("pass failed")


def test_syncs_asked_for_during_a_pass_fold_into_one_more(clock):
    reconciler = Counting(clock)
    first = reconciler.sync()
    waiting = [reconciler.sync() for _ in range(5)]
    assert reconciler.tick() is None  # a pass is running: the tick leaves it be
    clock.advance(1)
    assert first.called and not any(d.called for d in waiting) and reconciler.passes == 2
    clock.advance(1)
    assert all(d.called for d in waiting) and reconciler.passes == 2


def test_a_failed_pass_reaches_its_callers_and_the_next_pass_still_runs(clock):
    reconciler = Counting(clock)
    reconciler.fail = True
    failed = reconciler.sync()
    clock.advance(1)
    errors = []
    failed.addErrback(errors.append)
    assert errors and errors[0].check(RuntimeError)
    reconciler.fail = False
    done = reconciler.tick()
    clock.advance(1)
    assert done.called and reconciler.passes == 2
    stopped = defer.ensureDeferred(reconciler.stop())
    assert stopped.called and reconciler.sync().called and reconciler.passes == 2


def test_a_pass_a_watch_asked_for_fails_into_the_log_not_the_watch(clock, caplog):
    reconciler = Counting(clock)
    reconciler.fail = True
    watched = defer.ensureDeferred(reconciler.sync_quietly())
    clock.advance(1)
    assert watched.called and watched.result is None
    assert "pass failed (pass failed)" in caplog.text
    caplog.clear()
    reconciler.stopping = False
    stopping = defer.ensureDeferred(reconciler.sync_quietly())
    reconciler.stopping = True  # the session closes under the pass: nothing to report
    clock.advance(1)
    assert stopping.called and "pass failed" not in caplog.text


def test_a_slow_pass_is_logged_with_how_long_it_took(clock, caplog):
    class Host:
        name = "machine-7"
        reactor = clock

    class Asking(Counting):
        async def converge(self):
            state_client._COUNTED.get()[0] += 3  # as three requests through a session would
            await super().converge()

    caplog.set_level(logging.DEBUG, logger="ensemble.machine")
    reconciler = Asking(clock)
    reconciler.host = Host()
    reconciler.sync()
    clock.advance(1)  # a 1 s pass: the goal's limit, a warning
    assert [(r.levelname, r.getMessage()) for r in caplog.records if "pass" in r.getMessage()] == [
        ("WARNING", "machine-7: reconciler pass took 1.00s"),
        ("DEBUG", "machine-7: reconciler pass: 1.000s, 3 ZooKeeper requests"),
    ]


class SlowTemplate(FakeTemplate):
    """A build that reports progress until the test lets it finish."""

    def __init__(self):
        super().__init__()
        self.progress = None
        self.done = defer.Deferred()

    async def ensure(self, progress=None):
        self.progress = progress
        await self.done


@pytest_twisted.ensureDeferred
async def test_a_template_build_shows_its_progress_on_the_machine_until_done(clock, tmp_path):
    host = Host(clock, tmp_path)
    await host.setup()
    host.template = SlowTemplate()
    starting = defer.ensureDeferred(host.start_agent())
    machines = MachineStateManager(host.admin)
    host.template.progress("stage 1 of 10: checking the release")
    shown = (await machines.get_machine(0)).data["template"]
    assert shown == {"state": "building", "progress": "stage 1 of 10: checking the release"}
    host.template.progress("I: Retrieving adduser 3.134")  # the log's, not status's
    clock.advance(1)
    host.template.progress("stage 4 of 10: downloading packages: 1 of 125 packages (45.6 MB)")
    assert (await machines.get_machine(0)).data["template"]["progress"] == "stage 1 of 10: checking the release"
    clock.advance(1)  # at most one write every two seconds; then the latest line
    assert (await machines.get_machine(0)).data["template"]["progress"] == (
        "stage 4 of 10: downloading packages: 1 of 125 packages (45.6 MB)")
    host.template.progress("stage 9 of 10: unpacking the base system: 37 of 37 packages")
    clock.advance(1.5)
    assert (await machines.get_machine(0)).data["template"]["progress"].startswith("stage 4 of 10")
    clock.advance(0.5)  # a short last stage still shows
    assert (await machines.get_machine(0)).data["template"]["progress"].startswith("stage 9 of 10")
    host.template.done.callback(None)
    await starting
    assert "template" not in (await machines.get_machine(0)).data
    await host.agent.stop()
