"""Which units may reach which, fast: the pure rule (`reachability`) on plain values, and
the machine agent's firewall reconciler on an in-memory ZooKeeper and a Clock, with the
nftables part replaced by a recorder. Real namespaces: tests/test_firewall.py."""

import pytest
import pytest_twisted
from twisted.internet import defer, task

from ensemble.errors import ServiceDying, ServiceNotFound
from ensemble.machine.host import prepare_host
from ensemble.machine.reconcilers.firewall import REPLACE_EVERY, FirewallReconciler, reachability
from ensemble.network.ipam import Allocator
from ensemble.state.environment import initialize
from ensemble.state.machine import MachineStateManager
from ensemble.state.network import ZooKeeperAddressStore, lease_subnet
from ensemble.state.relation import RelationStateManager
from ensemble.state.service import ServiceStateManager
from ensemble.state.unit import UnitStateManager

from conftest import deploy_charm, make_charm
from fakes import FakeZooKeeper

TCP = "tcp"


def both(*pairs):
    return {p for a, b in pairs for p in ((a, b), (b, a))}


def test_related_units_reach_each_other_both_ways_and_nothing_else():
    local = {"db/0": "10.77.0.2", "web/0": "10.77.0.3", "other/0": "10.77.0.4"}
    remote = {"web/1": "10.77.1.2", "db/1": "10.77.1.3", "other/1": "10.77.1.4"}
    openings, related = reachability(local, remote, [["db", "web"]], set(), {"db/0": [(7070, TCP)]})
    assert openings == {}  # db is not exposed
    # Every db-web pair with one end here; db/1 and web/1 are both elsewhere: their
    # machines' firewalls hold that pair.
    assert related == both(("10.77.0.2", "10.77.0.3"), ("10.77.0.2", "10.77.1.2"), ("10.77.0.3", "10.77.1.3"))


def test_a_peer_relation_relates_the_units_of_one_service():
    local = {"db/0": "10.77.0.2", "db/1": "10.77.0.3", "web/0": "10.77.0.4"}
    _, related = reachability(local, {"db/2": "10.77.1.2"}, [["db"]], set(), {})
    assert related == both(("10.77.0.2", "10.77.0.3"), ("10.77.0.2", "10.77.1.2"), ("10.77.0.3", "10.77.1.2"))
    # Without it, units of one service are strangers like any others.
    assert reachability(local, {}, [], set(), {}) == ({}, set())


def test_only_exposed_services_open_their_ports():
    local = {"db/0": "10.77.0.2", "web/0": "10.77.0.3"}
    ports = {"db/0": [(7070, TCP), (7070, TCP), (53, "udp")], "web/0": [(80, TCP)]}
    openings, related = reachability(local, {}, [], {"db"}, ports)
    assert openings == {"10.77.0.2": [(53, "udp"), (7070, TCP)]} and related == set()


def test_addresses_that_are_not_ipv4_are_left_out_and_a_local_unit_is_never_taken_from_elsewhere():
    local = {"db/0": "10.77.0.2", "web/0": "not an address"}
    remote = {"db/0": "10.77.1.9", "web/1": "10.77.1.300", "web/2": ["10.77.1.2"], "web/3": "10.77.1.3"}
    openings, related = reachability(local, remote, [["db", "web"]], {"web"}, {"web/0": [(80, TCP)]})
    assert openings == {} and related == both(("10.77.0.2", "10.77.1.3"))


# -- the reconciler, on fakes ------------------------------------------------------------------


class Recorder:
    """Stands for ensemble.network.firewall.Firewall: keeps what each sync was given."""

    def __init__(self):
        self.syncs = []
        self.ports = []
        self.replace_asked = []

    def sync(self, openings, related=(), ports=None, replace=False):
        self.syncs.append((openings, set(related)))
        self.ports.append(ports)
        self.replace_asked.append(replace)
        return replace or len(self.syncs) == 1  # the first sync loads the tables whole

    @property
    def openings(self):
        return self.syncs[-1][0]

    @property
    def related(self):
        return self.syncs[-1][1]


class Environment:
    """Machine 0 (its firewall reconciler under test) and machine 1, in memory."""

    def __init__(self, clock, tmp_path):
        self.zookeeper = FakeZooKeeper(clock)
        self.clock = clock
        self.admin = self.zookeeper.client()
        self.tmp_path = tmp_path
        self.firewall = None
        self.addresses = {}

    async def setup(self):
        await initialize(self.admin, "fast")
        machines = MachineStateManager(self.admin)
        for address in ("192.0.2.1", "192.0.2.2"):
            await machines.add_machine(address=address)
        charms = {
            "db": make_charm(self.tmp_path / "db", "db",
                             metadata_extra="provides:\n  db: kv\npeers:\n  ring: kv-ring\n"),
            "web": make_charm(self.tmp_path / "web", "web", metadata_extra="requires:\n  db: kv\n"),
            "other": make_charm(self.tmp_path / "other", "other"),
        }
        await deploy_charm(self.admin, charms["db"], n=2, to=0)
        await deploy_charm(self.admin, charms["web"], n=1, to=0)
        await deploy_charm(self.admin, charms["other"], n=1, to=0)
        await ServiceStateManager(self.admin).add_units("web", to=1)
        await ServiceStateManager(self.admin).add_units("db", to=1)
        # Machine 1's agent reserves its units' addresses in its own store.
        agent1 = self.zookeeper.client()
        subnet1 = await lease_subnet(agent1, 1)
        store1 = ZooKeeperAddressStore(agent1, 1)
        await store1.ensure(subnet1)
        self.machine1 = Allocator(store1, subnet1)
        for unit in ("web/1", "db/2"):
            self.addresses[unit] = await self.machine1.allocate(unit)
        # Machine 0's: the reconciler under test.
        agent0 = self.zookeeper.client()
        machine = await MachineStateManager(agent0).get_machine(0)
        host = await prepare_host(agent0, machine, self.clock, await lease_subnet(agent0, 0))
        host.in_thread = lambda f, *args: defer.maybeDeferred(f, *args)
        self.reconciler = FirewallReconciler(host)
        self.firewall = self.reconciler.firewall = Recorder()
        await self.reconciler.start()
        self.units = UnitStateManager(agent0)
        for unit in ("db/0", "db/1", "web/0", "other/0"):
            self.addresses[unit] = await host.allocator.allocate(unit)
            await self.reconciler.unit_addressed(await self.units.get_unit(unit))

    def pairs(self, *pairs):
        return both(*((self.addresses[a], self.addresses[b]) for a, b in pairs))


@pytest_twisted.async_yield_fixture
async def env(tmp_path):
    env = Environment(task.Clock(), tmp_path)
    await env.setup()
    yield env
    await env.reconciler.stop()
    assert env.zookeeper.errors == []


@pytest_twisted.ensureDeferred
async def test_relations_and_exposure_apply_at_once_from_watches(env):
    # db's peer relation, from deploy: its units reach each other, here and on machine 1.
    assert env.firewall.related == env.pairs(("db/0", "db/1"), ("db/0", "db/2"), ("db/1", "db/2"))
    assert env.firewall.openings == {}
    await (await UnitStateManager(env.admin).get_unit("db/0")).update(**{"open-ports": ["7070/tcp"]})
    await (await UnitStateManager(env.admin).get_unit("other/0")).update(**{"open-ports": ["9000/tcp"]})
    assert env.firewall.openings == {}  # opened, but neither service is exposed

    relations = RelationStateManager(env.admin)
    await relations.add_relation("web", "db")
    peers = env.pairs(("db/0", "db/1"), ("db/0", "db/2"), ("db/1", "db/2"))
    web_db = env.pairs(("web/0", "db/0"), ("web/0", "db/1"), ("web/0", "db/2"), ("web/1", "db/0"), ("web/1", "db/1"))
    assert env.firewall.related == peers | web_db

    services = ServiceStateManager(env.admin)
    assert await services.set_exposed("db", True) is False
    assert env.firewall.openings == {env.addresses["db/0"]: [(7070, TCP)]}
    assert await services.set_exposed("db", True) is True  # already: no change
    assert (await services.get_service("db")).exposed

    # Machine 1 adds a web unit: its reservation shows here without a tick.
    await services.add_units("web", to=1)
    env.addresses["web/2"] = await env.machine1.allocate("web/2")
    assert env.firewall.related >= env.pairs(("web/2", "db/0"), ("web/2", "db/1"))

    passes = len(env.firewall.syncs)
    await relations.remove_relation("web", "db")
    assert env.firewall.related == peers
    await services.set_exposed("db", False)
    assert env.firewall.openings == {}
    assert len(env.firewall.syncs) == passes + 2  # each change one pass, no clock needed


@pytest_twisted.ensureDeferred
async def test_a_leaving_unit_loses_its_paths_before_its_address_is_freed(env):
    await ServiceStateManager(env.admin).set_exposed("db", True)
    await (await UnitStateManager(env.admin).get_unit("db/1")).update(**{"open-ports": ["7070/tcp"]})
    assert env.addresses["db/1"] in env.firewall.openings
    await env.reconciler.unit_leaving("db/1")
    assert env.addresses["db/1"] not in env.firewall.openings
    assert env.firewall.related == env.pairs(("db/0", "db/2"))
    # Its address is still reserved (the container goes first): the tick keeps it out.
    env.clock.advance(5)
    await env.reconciler.tick()
    assert env.firewall.related == env.pairs(("db/0", "db/2"))


@pytest_twisted.ensureDeferred
async def test_a_tick_replaces_the_tables_whole_once_a_minute_and_other_passes_change_them(env):
    async def a_minute_of_ticks():
        """Whether the tick a second before the minute, and the one at it, asked."""
        asked = []
        for step in (REPLACE_EVERY - 1, 1):
            env.clock.advance(step)
            await env.reconciler.tick()
            asked.append(env.firewall.replace_asked[-1])
        return asked

    # Every pass of the set-up (the first, each unit addressed) changed the tables.
    assert env.firewall.replace_asked and not any(env.firewall.replace_asked)
    assert await a_minute_of_ticks() == [False, True]
    await RelationStateManager(env.admin).add_relation("web", "db")
    assert env.firewall.replace_asked[-1] is False  # a watch's pass
    # A minute from the last replace, not from the first.
    assert await a_minute_of_ticks() == [False, True]


@pytest_twisted.ensureDeferred
async def test_destroying_a_service_takes_its_relations_out(env):
    await RelationStateManager(env.admin).add_relation("web", "db")
    await ServiceStateManager(env.admin).destroy_service("web")
    assert env.firewall.related == env.pairs(("db/0", "db/1"), ("db/0", "db/2"), ("db/1", "db/2"))


@pytest_twisted.ensureDeferred
async def test_expose_refuses_missing_and_dying_services(env):
    services = ServiceStateManager(env.admin)
    with pytest.raises(ServiceNotFound):
        await services.set_exposed("nosuch", True)
    await services.set_exposed("other", True)
    assert await services.set_exposed("other", False) is True
    # Unexposed, the node is as before: no field left behind.
    assert "exposed" not in (await services.get_service("other")).data
    await services.destroy_service("other")
    with pytest.raises(ServiceDying):
        await services.set_exposed("other", True)
