"""Fail closed: a machine whose units' isolation cannot be put in place (firewall,
bridge, id range, credentials, limits) starts no unit, says why on the machine, and
starts them by itself once the cause is fixed. On the in-memory fakes and a Clock
(the nftables binding replaced by tests/fakes.py's FakeNftables), plus one test on a
real ZooKeeper for a credential it really refuses. Real LXC: test_safeguards_lxc.py."""

import sys

import pytest
import pytest_twisted
from twisted.internet import defer, task

from ensemble import connection
from ensemble.charm import Charm, bundle_id
from ensemble.machine import host as hosts
from ensemble.machine import safeguards
from ensemble.machine.agent import MachineAgent
from ensemble.machine.container import config
from ensemble.machine.container.config import HostCgroups
from ensemble.machine.container.id_ranges import POOL
from ensemble.machine.reconcilers.id_range import IdRangeReconciler
from ensemble.network import bridge
from ensemble.network.bridge import BridgeError
from ensemble.state import auth
from ensemble.state.environment import initialize
from ensemble.state.machine import MachineStateManager
from ensemble.state.service import ServiceStateManager
from ensemble.state.unit import PENDING, UnitStateManager, unit_path
from ensemble.status import collect

from conftest import SESSION_TIMEOUT, deploy_charm, eventually, make_charm
from fakes import FakeContainerDriver, FakeNftables, FakeTemplate
from test_reconcile import Host

REFUSED_BATCH = "Error: Could not process rule: No such file or directory"


@pytest.fixture
def clock(monkeypatch):
    # A Clock has no threads: the agent's blocking work (a unit's log directory given
    # to its ids) runs inline.
    monkeypatch.setattr(hosts.Host, "in_thread", lambda self, f, *args: defer.maybeDeferred(f, *args))
    return task.Clock()


@pytest.fixture
def nftables(monkeypatch):
    """A working binding in sys.modules, and the agent's blocking work run inline (a
    Clock has no threads)."""
    monkeypatch.setattr(hosts.Host, "in_thread", lambda self, f, *args: defer.maybeDeferred(f, *args))
    binding = FakeNftables()
    monkeypatch.setitem(sys.modules, "nftables", binding.module)
    return binding


@pytest.fixture
def id_files(tmp_path, monkeypatch):
    """/etc/subuid and /etc/subgid as the id range check reads them, granting root the
    units' range."""
    files = [tmp_path / "subuid", tmp_path / "subgid"]
    for f in files:
        f.write_text(POOL.subid_line() + "\n")
    monkeypatch.setattr(IdRangeReconciler, "files", tuple(str(f) for f in files))
    return files


async def machine_data(host):
    return (await MachineStateManager(host.admin).get_machine(0)).data


async def shown(host):
    """What `ensemble status` shows as the machine's security-error (None: nothing)."""
    return (await collect(host.admin))["machines"][0].get(safeguards.FIELD)


def running(host):
    return {name for name, c in host.driver.containers.items() if c.state == "RUNNING"}


async def assert_waiting(host, *units):
    """`units` have their addresses, no container, and are still pending."""
    for name in units:
        unit = await host.unit(name)
        assert unit.state == PENDING and "error" not in unit.data
        assert unit.data.get("private-address")
        assert host.container(name) not in host.driver.containers


@pytest.mark.parametrize("fault", ["binding missing", "batch refused"])
@pytest_twisted.ensureDeferred
async def test_no_unit_starts_without_a_firewall_and_all_start_once_it_loads(clock, tmp_path, nftables,
                                                                             monkeypatch, fault):
    host = Host(clock, tmp_path)
    await host.setup()
    await deploy_charm(host.admin, host.charm, "db", n=2)
    if fault == "binding missing":
        monkeypatch.setitem(sys.modules, "nftables", None)  # `import nftables` raises ImportError
        reason = "the nftables Python binding is missing: install the 'python3-nftables' package"
    else:
        nftables.refusal = REFUSED_BATCH
        reason = f"nftables refused the firewall: {REFUSED_BATCH}"
    agent = await host.start_agent(firewall=True)
    await assert_waiting(host, "db/0", "db/1")
    assert host.driver.containers == {} and not any(op in ("create", "start") for op, _ in host.driver.calls)
    assert (await shown(host))["firewall"].startswith(reason)
    host.tick(3)  # each pass tries again, and still nothing starts
    assert host.driver.containers == {}

    # Fixed (the package installed): the agent's next pass loads the firewall, then
    # starts the units. The same agent: no restart.
    monkeypatch.setitem(sys.modules, "nftables", nftables.module)
    nftables.refusal = None
    host.tick()
    assert running(host) == {host.container("db/0"), host.container("db/1")}
    assert await shown(host) is None and safeguards.FIELD not in await machine_data(host)
    assert nftables.batches  # the tables are loaded
    assert host.agent is agent
    await agent.stop()


@pytest_twisted.ensureDeferred
async def test_a_firewall_that_breaks_under_running_units_stops_none_and_starts_none(clock, tmp_path, nftables):
    host = Host(clock, tmp_path)
    await host.setup()
    await deploy_charm(host.admin, host.charm, "db", n=3)
    agent = await host.start_agent(firewall=True)
    assert len(running(host)) == 3
    loaded = len(nftables.batches)

    nftables.refusal = REFUSED_BATCH
    host.tick()  # the firewall's next pass finds it broken
    problem = (await shown(host))["firewall"]
    assert problem.endswith("units running here keep the rules loaded last")
    assert len(running(host)) == 3
    host.driver.crash(host.container("db/0"))
    await ServiceStateManager(host.admin).add_units("db", to=0)
    await UnitStateManager(host.admin).remove_unit("db/2")
    host.tick()
    # Running units keep running (nftables keeps the tables it loaded last: nothing
    # new was loaded); a removal goes on; nothing is started, not even a crashed unit.
    assert len(nftables.batches) == loaded
    assert running(host) == {host.container("db/1")}
    assert host.container("db/2") not in host.driver.containers
    assert host.driver.containers[host.container("db/0")].state == "STOPPED"
    await assert_waiting(host, "db/3")
    assert not [call for call in host.driver.calls if call[0] == "stop"]

    nftables.refusal = None
    host.tick()
    assert running(host) == {host.container(u) for u in ("db/0", "db/1", "db/3")}
    assert await shown(host) is None
    await agent.stop()


class SecuredHost(Host):
    """Machine 0's agent with its credential (the one its admin derives). The tree is
    made open; each test gives the units' nodes the grants it is about."""

    def __init__(self, clock, tmp_path):
        super().__init__(clock, tmp_path)
        self.policy = auth.AdminPolicy(auth.new_admin())

    async def start_agent(self, **options):
        return await super().start_agent(self.zookeeper.client(credential=self.policy.machine(0)), **options)


def closed(admin):
    """A unit node's ACL that grants the admin everything and the others only reading."""
    return [auth.digest(auth.ALL, admin), auth.WORLD_READ]


@pytest.mark.parametrize("whose, grants, reason", [
    ("machine", lambda policy: closed(policy.admin), "their nodes do not let this machine's credential write them"),
    ("unit", lambda policy: [*closed(policy.admin), auth.digest(auth.OWN, policy.machine(0))],
     "their nodes do not let their own credentials write/create them"),
])
@pytest_twisted.ensureDeferred
async def test_units_whose_credentials_their_nodes_refuse_wait(clock, tmp_path, whose, grants, reason):
    host = SecuredHost(clock, tmp_path)
    await host.setup()
    await deploy_charm(host.admin, host.charm, "db", n=2)
    given = {}
    for name in ("db/0", "db/1"):
        given[name], _ = await host.admin.get_acl(unit_path(name))
        await host.admin.set_acl(unit_path(name), grants(host.policy))
    agent = await host.start_agent()
    assert host.driver.containers == {}
    assert await shown(host) == {"credentials": f"db/0, db/1: {reason}"}

    # The admin gives one unit's node its grants back: that one starts, at the next pass.
    await host.admin.set_acl(unit_path("db/1"), given["db/1"])
    host.tick()
    assert running(host) == {host.container("db/1")}
    assert await shown(host) == {"credentials": f"db/0: {reason}"}
    await host.admin.set_acl(unit_path("db/0"), given["db/0"])
    host.tick()
    assert running(host) == {host.container("db/0"), host.container("db/1")}
    assert await shown(host) is None
    await agent.stop()


@pytest_twisted.ensureDeferred
async def test_no_unit_starts_while_root_lacks_the_units_id_range(clock, tmp_path, id_files):
    for f in id_files:
        f.write_text("root:200000:65536\n")  # another range: not the units'
    host = Host(clock, tmp_path)
    await host.setup()
    await deploy_charm(host.admin, host.charm, "db", n=1)
    agent = await host.start_agent()
    await assert_waiting(host, "db/0")
    assert (await shown(host))["id-range"].startswith(
        f"{id_files[0]} does not grant root host ids {POOL.first}-{POOL.last}, the ids of units' containers")

    id_files[0].write_text(POOL.subid_line() + "\n")  # scripts/install run again
    host.tick()
    assert "db/0" not in str(await shown(host))
    assert (await shown(host))["id-range"].startswith(f"{id_files[1]} does not grant")
    assert host.driver.containers == {}
    id_files[1].write_text(POOL.subid_line() + "\n")
    host.tick()
    assert running(host) == {host.container("db/0")} and await shown(host) is None
    await agent.stop()


@pytest_twisted.ensureDeferred
async def test_no_unit_starts_until_the_bridge_can_be_made(clock, tmp_path, nftables, monkeypatch):
    made = []

    def ensure_bridge(name, subnet, netns=None, mtu=None):
        if not made:
            raise BridgeError(f"cannot create bridge {name}: (1, 'Operation not permitted')")
        made.append(name)

    monkeypatch.setattr(bridge, "ensure_bridge", ensure_bridge)
    host = Host(clock, tmp_path)
    await host.setup()
    await deploy_charm(host.admin, host.charm, "db", n=1)
    # Before, a bridge that could not be made ended the agent: now it waits and says why.
    agent = await host.start_agent(manage_bridge=True)
    await assert_waiting(host, "db/0")
    assert await shown(host) == {"bridge": "cannot create bridge ens-fast: (1, 'Operation not permitted')"}
    made.append("fixed")
    host.tick()
    assert running(host) == {host.container("db/0")} and await shown(host) is None
    host.tick()
    assert made[1:] == ["ens-fast", "ens-fast"]  # made again on every pass, as it may have gone
    await agent.stop()


@pytest_twisted.ensureDeferred
async def test_a_unit_whose_limits_this_host_cannot_enforce_waits(clock, tmp_path, monkeypatch):
    monkeypatch.setattr(config, "_host_cgroups", HostCgroups([]))  # no controllers at all
    host = Host(clock, tmp_path)
    await host.setup()
    await deploy_charm(host.admin, host.charm, "db", n=1)
    charm = Charm.load(host.charm)
    await ServiceStateManager(host.admin).deploy(
        "capped", bundle_id(charm.name, charm.bundle()), charm.bundle(), charm.config({}), {"pids": 100}, n=1, to=0)
    agent = await host.start_agent()
    # Every unit has limits (its service's, else the defaults): none starts on a host
    # that cannot enforce them, and each shows what it lacks.
    assert running(host) == set()
    await assert_waiting(host, "capped/0")
    await assert_waiting(host, "db/0")
    no_memory = "memory limit 1073741824 not enforced: no memory cgroup controller on this host"
    assert await shown(host) == {"limits": (
        f"capped/0: {no_memory}; pids limit 100 not enforced: no pids cgroup controller on this host; "
        f"db/0: {no_memory}; pids limit 1024 not enforced: no pids cgroup controller on this host")}
    monkeypatch.setattr(config, "_host_cgroups", None)  # read again: this host's own
    if not config.host_cgroups().has("pids"):
        pytest.skip("this host has no pids controller")
    host.tick()
    assert running(host) == {host.container("db/0"), host.container("capped/0")}
    assert await shown(host) is None
    await agent.stop()


def test_a_required_layer_holds_until_its_first_report_without_showing(clock):
    machine = type("Machine", (), {"id": 0, "data": {}})()
    guards = safeguards.Safeguards(type("Host", (), {"name": "machine-0", "machine": machine})())
    guards.stopping = True  # no publishing: this is about the gate alone
    guards.require("firewall")
    guards.require("bridge")
    assert guards.refusal("db/0") == "bridge: not checked yet" and guards.problems() == {}
    opened = []
    guards.opened.append(lambda: opened.append(True))
    guards.report("bridge", None)
    assert guards.refusal() == "firewall: not checked yet" and not opened
    guards.report("firewall", "no binding")
    assert guards.problems() == {"firewall": "no binding"}
    guards.report("limits", "too much", unit="db/0")
    guards.report("firewall", None)
    assert opened == [True] and guards.refusal() is None
    assert guards.refusal("db/0") == "limits: too much" and guards.held("db/0") and not guards.held("db/1")
    guards.forget("db/0")
    assert guards.refusal("db/0") is None and guards.problems() == {}


# -- on a real ZooKeeper ---------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_units_whose_nodes_zookeeper_closes_to_this_machine_start_none(zk_server, zk_root, tmp_path):
    """For real: db/0's node refuses this machine's writes from the start (NoAuth); db/1's
    is closed to it after its container ran, and the container is then lost."""
    from twisted.internet import reactor

    admin_credential = auth.new_admin()
    policy = auth.AdminPolicy(admin_credential)
    spec = f"{zk_server.address}{zk_root}"
    admin = await connection.connect(spec, session_timeout=SESSION_TIMEOUT, credential=admin_credential,
                                     create_root=True)
    agent_client = agent = None
    try:
        await initialize(admin, "secured")
        await MachineStateManager(admin).add_machine(address="127.0.0.1")
        await deploy_charm(admin, make_charm(tmp_path / "charm"), "db", n=2)
        given = {name: (await admin.get_acl(unit_path(name)))[0] for name in ("db/0", "db/1")}
        await admin.set_acl(unit_path("db/0"), closed(admin_credential))
        # As the CLI's machine-agent connects.
        agent_client = await connection.connect(spec, session_timeout=SESSION_TIMEOUT, credential=policy.machine(0))
        driver = FakeContainerDriver()
        agent = MachineAgent(agent_client, 0, manage_bridge=False, driver=driver, template=FakeTemplate(),
                             unit_log_dir=str(tmp_path / "logs"))
        agent.resync_interval = 0.2
        await agent.start()
        db0, db1 = (agent.units.deployer.container_for(u) for u in ("db/0", "db/1"))

        async def machine_shows():
            return (await collect(admin))["machines"][0].get(safeguards.FIELD)

        assert await eventually(machine_shows) == {"credentials": f"db/0: {safeguards.REFUSED}"}
        assert await driver.running() == {db1}

        # db/1 has its address and container already: nothing the agent writes fails
        # until after a start, so only the gate keeps its container from starting.
        await admin.set_acl(unit_path("db/1"), closed(admin_credential))
        del driver.containers[db1]

        async def both_held():
            return "db/1" in str(await machine_shows())

        await eventually(both_held)
        assert await machine_shows() == {"credentials": (
            f"db/0: {safeguards.REFUSED}; db/1: their nodes do not let this machine's credential write them")}
        await task.deferLater(reactor, 3 * agent.resync_interval, lambda: None)
        assert driver.containers == {}

        for name in ("db/0", "db/1"):
            await admin.set_acl(unit_path(name), given[name])

        async def all_running():
            return await driver.running() == {db0, db1} and await machine_shows() is None

        await eventually(all_running)
    finally:
        if agent is not None:
            await agent.stop()
        elif agent_client is not None:
            await agent_client.close()
        await admin.close()
