"""The fakes of tests/fakes.py are faithful where the project's code can tell.

The project's own state code runs on them; the scenarios marked by the `backend` (and
`store`) fixtures run unchanged on the fakes and on a real ZooKeeper, so that any
divergence between fake and real fails a test; and one test compares, node by node,
the trees both leave behind.
"""

import os

import pytest
import pytest_twisted
from kazoo.exceptions import NoChildrenForEphemeralsError
from twisted.internet import defer, reactor, task

from ensemble.agent import BaseAgent
from ensemble.charm import Charm, bundle_id
from ensemble.errors import MachineBusy, UnitNotFound
from ensemble.machine.agent import MachineAgent
from ensemble.machine.container.driver import ContainerError, ContainerExists, ContainerNotFound, ContainerSpec
from ensemble.network.ipam import AddressesExhausted, AddressTaken, Allocator, UnitHasAddress
from ensemble.state import nodes
from ensemble.state.client import (
    BadVersion,
    ConnectionLost,
    NodeExists,
    NoNode,
    NotEmpty,
    Stat,
    WatchEvent,
    ZKClient,
    expire_session,
)
from ensemble.state.environment import initialize
from ensemble.state.machine import MachineStateManager
from ensemble.state.network import ZooKeeperAddressStore
from ensemble.state.service import ServiceStateManager
from ensemble.state.unit import DYING, UnitStateManager
from ensemble.state.watch import ChildrenWatch, DataWatch

from conftest import SESSION_TIMEOUT
from fakes import (
    FakeContainerDriver, FakeTemplate, FakeZooKeeper, InlineThreadsClock, InMemoryAddressStore, MemoryClient,
)

DB_CHARM = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "charms", "db")


# -- the same scenarios on a fake and on a real ZooKeeper ------------------------------------


class MemoryBackend:
    """Sessions on one FakeZooKeeper. Delivery is synchronous: what a real ZooKeeper
    shows 'eventually' must show here at once."""

    kind = "memory"

    def __init__(self):
        self.clock = task.Clock()
        self.tree = FakeZooKeeper(self.clock)
        self.clients = []
        self.client = self._session()

    def _session(self):
        client = self.tree.client(session_timeout=SESSION_TIMEOUT)
        self.clients.append(client)
        return client

    async def session(self):
        return self._session()

    async def until(self, predicate, timeout=None):
        assert predicate(), "the fake should have delivered this already"

    async def expire(self, client):
        client.expire()

    async def close(self):
        for client in self.clients:
            await client.close()
        assert self.tree.errors == [], "a watch callback or session listener failed"


class ZooKeeperBackend:
    kind = "zookeeper"

    def __init__(self, server, root):
        self.server = server
        self.root = root
        self.clients = []

    async def start(self):
        self.client = await self.session(create_root=True)
        return self

    async def session(self, create_root=False):
        client = await ZKClient(self.server.address, self.root, session_timeout=SESSION_TIMEOUT).connect(
            create_root=create_root
        )
        self.clients.append(client)
        return client

    async def until(self, predicate, timeout=10.0):
        deadline = reactor.seconds() + timeout
        while not predicate():
            assert reactor.seconds() < deadline, "condition not reached in time"
            await task.deferLater(reactor, 0.02, lambda: None)

    async def expire(self, client):
        events = []
        unsubscribe = client.on_session_event(events.append)
        await expire_session(client)
        await self.until(lambda: "new-session" in events, timeout=SESSION_TIMEOUT * 5)
        unsubscribe()

    async def close(self):
        for client in self.clients:
            await client.close()


@pytest_twisted.async_yield_fixture(params=["memory", "zookeeper"])
async def backend(request):
    if request.param == "memory":
        b = MemoryBackend()
    else:
        b = await ZooKeeperBackend(request.getfixturevalue("zk_server"), request.getfixturevalue("zk_root")).start()
    yield b
    await b.close()


async def deploy_db(client, n=1, to=0, name="db"):
    charm = Charm.load(DB_CHARM)
    bundle = charm.bundle()
    return await ServiceStateManager(client).deploy(
        name, bundle_id(charm.name, bundle), bundle, charm.config({}), {}, n=n, to=to
    )


async def state_flow(client):
    """The operator's side of an environment's life, with the project's own code."""
    await initialize(client, "test")
    machines = MachineStateManager(client)
    assert [(await machines.add_machine(address=a)).id for a in ("192.0.2.1", "192.0.2.2")] == [0, 1]
    service, names = await deploy_db(client, n=2, to=0)
    assert names == ["db/0", "db/1"]
    assert await ServiceStateManager(client).add_units("db", to=1) == ["db/2"]
    assert await machines.unit_counts() == {0: 2, 1: 1}
    units = UnitStateManager(client)
    await units.remove_unit("db/1")
    await units.remove_unit("db/1")  # again: already dying
    assert (await units.get_unit("db/1")).life == DYING
    assert await (await machines.get_machine(0)).assigned_units() == ["db/0"]
    with pytest.raises(MachineBusy):
        await machines.remove_machine(1)
    await units.remove_unit("db/2")
    # The agent's part of a removal, then the machine can go.
    await client.delete_tree("/units/db-2")
    await machines.remove_machine(1)
    assert await machines.machine_ids() == [0]
    await (await units.get_unit("db/0")).update(state="started", **{"private-address": "10.77.0.2"})
    return service


@pytest_twisted.ensureDeferred
async def test_state_code_runs_unchanged(backend):
    await state_flow(backend.client)
    unit = await UnitStateManager(backend.client).get_unit("db/0")
    assert (unit.state, unit.data["private-address"], unit.machine_id) == ("started", "10.77.0.2", 0)
    with pytest.raises(UnitNotFound):
        await UnitStateManager(backend.client).get_unit("db/2")
    assert sorted(await backend.client.get_children("/units")) == ["db-0", "db-1"]


@pytest_twisted.ensureDeferred
async def test_errors_versions_and_stats(backend):
    c = backend.client
    assert await c.create("/a", b"1") == "/a"
    data, stat = await c.get("/a")
    assert isinstance(stat, Stat)
    assert (data, stat.version, stat.cversion, stat.num_children, stat.ephemeral_owner) == (b"1", 0, 0, 0, 0)
    assert stat.ctime == stat.mtime
    with pytest.raises(NodeExists):
        await c.create("/a", b"")
    with pytest.raises(NoNode):
        await c.create("/missing/child", b"")
    with pytest.raises(NoNode):
        await c.get("/missing")
    with pytest.raises(NoNode):
        await c.set("/missing", b"")
    with pytest.raises(NoNode):
        await c.delete("/missing")
    assert await c.exists("/missing") is None
    # A stale writer loses.
    other = await backend.session()
    _, seen = await c.get("/a")
    assert (await other.set("/a", b"2", seen.version)).version == 1
    with pytest.raises(BadVersion):
        await c.set("/a", b"3", seen.version)
    assert (await c.get("/a"))[0] == b"2"
    # nodes.update reads again and keeps both writers' fields.
    await c.set("/a", nodes.dump({"x": 1}))
    await nodes.update(other, "/a", nodes.merge({"y": 2}))
    assert await nodes.update(c, "/a", nodes.merge({"x": None, "z": 3})) == {"y": 2, "z": 3}
    # Children: cversion counts creates and deletes; NotEmpty before the last one goes.
    await c.create("/a/b", b"")
    with pytest.raises(BadVersion):
        await c.delete("/a", version=9)  # the version is checked before the children
    with pytest.raises(NotEmpty):
        await c.delete("/a")
    await c.delete("/a/b")
    stat = await c.exists("/a")
    assert (stat.version, stat.cversion, stat.num_children) == (4, 2, 0)
    with pytest.raises(BadVersion):
        await c.delete("/a", version=3)
    await c.delete("/a", version=4)
    # Paths are normalised as kazoo does under a chroot.
    assert await c.create("b", b"") == "/b"
    with pytest.raises(NodeExists):
        await c.create("//b/", b"")
    with pytest.raises(ValueError):
        await c.create("/b/../x", b"")
    with pytest.raises(TypeError):
        await c.create("/s", "text")


@pytest_twisted.ensureDeferred
async def test_transactions_are_all_or_nothing(backend):
    c = backend.client
    await c.create("/taken", b"")
    with pytest.raises(NodeExists):
        await c.transaction().create("/new", b"x").create("/taken", b"").commit()
    with pytest.raises(BadVersion):
        await c.transaction().create("/new", b"x").set("/taken", b"y", version=3).commit()
    with pytest.raises(NoNode):
        await c.transaction().create("/new", b"x").check("/nothing").commit()
    assert await c.exists("/new") is None
    assert (await c.get("/taken"))[0] == b""
    # Later operations see the earlier ones; results per operation.
    results = await (
        c.transaction().create("/p", b"").create("/p/q", b"").set("/p", b"1").check("/p", 1).delete("/p/q").commit()
    )
    assert results[:2] == ["/p", "/p/q"] and results[3:] == [True, True]
    assert isinstance(results[2], Stat) and results[2].version == 1
    stat = await c.exists("/p")
    assert (stat.version, stat.cversion, stat.num_children) == (1, 2, 0)
    assert await c.transaction().commit() == []
    # A failed commit changes no version either.
    with pytest.raises(NotEmpty):
        await c.transaction().set("/p", b"2").create("/p/r", b"").delete("/p").commit()
    assert (await c.exists("/p")).version == 1 and await c.get_children("/p") == []


@pytest_twisted.ensureDeferred
async def test_one_shot_watches_fire_as_zookeeper_fires_them(backend):
    c = backend.client
    writer = await backend.session()
    seen = []

    def watch(tag):
        return lambda event: seen.append((tag, event.type, event.path))

    with pytest.raises(NoNode):
        await c.get("/n", watch=watch("get-missing"))  # leaves no watch
    with pytest.raises(NoNode):
        await c.get_children("/n", watch=watch("children-missing"))
    assert await c.exists("/n", watch=watch("exists-missing")) is None
    await writer.create("/n", b"")
    await backend.until(lambda: len(seen) == 1)
    await c.get("/n", watch=watch("get"))
    await c.get("/n", watch=watch("get-again"))  # each registration fires once
    await c.get_children("/n", watch=watch("children"))
    await writer.set("/n", b"1")
    await backend.until(lambda: len(seen) == 3)
    await writer.set("/n", b"2")  # one-shot: nobody is watching now
    await writer.create("/n/x", b"")
    await backend.until(lambda: len(seen) == 4)
    await c.exists("/n", watch=watch("exists"))
    await c.get_children("/n", watch=watch("children-again"))
    await writer.delete("/n/x")
    await backend.until(lambda: len(seen) == 5)
    await c.get("/n", watch=watch("get-before-delete"))
    await c.get_children("/n", watch=watch("children-before-delete"))
    await writer.delete("/n")
    await backend.until(lambda: len(seen) == 8)
    assert sorted(seen[:1]) + sorted(seen[1:3]) + seen[3:5] + sorted(seen[5:]) == [
        ("exists-missing", "created", "/n"),
        ("get", "changed", "/n"),
        ("get-again", "changed", "/n"),
        ("children", "child", "/n"),
        ("children-again", "child", "/n"),
        ("children-before-delete", "deleted", "/n"),
        ("exists", "deleted", "/n"),
        ("get-before-delete", "deleted", "/n"),
    ]


@pytest_twisted.ensureDeferred
async def test_state_watches_follow_changes(backend):
    c = backend.client
    operator = await backend.session()
    data, children = [], []
    data_watch = await DataWatch(c, "/w", lambda v: data.append(v and v[0])).start()
    children_watch = await ChildrenWatch(c, "/w", children.append).start()
    try:
        assert data == [None] and children == [None]
        await operator.create("/w", b"0")
        await backend.until(lambda: data[-1] == b"0" and children[-1] == [])
        await operator.create("/w/x", b"")
        await operator.create("/w/y", b"")
        await backend.until(lambda: children[-1] == ["x", "y"])
        await operator.set("/w", b"1")
        await backend.until(lambda: data[-1] == b"1")
        await operator.delete_tree("/w")
        await backend.until(lambda: data[-1] is None and children[-1] is None)
    finally:
        data_watch.stop()
        children_watch.stop()
    # The state classes' own watches: a machine's assignments, a unit's node.
    await initialize(operator, "test")
    await MachineStateManager(operator).add_machine()
    assigned, unit_data = [], []
    machine = await MachineStateManager(c).get_machine(0)
    watch = await machine.watch_assigned_units(assigned.append)
    await deploy_db(operator, n=2)
    await backend.until(lambda: assigned[-1] == ["db/0", "db/1"])
    unit_watch = await (await UnitStateManager(c).get_unit("db/1")).watch(unit_data.append)
    await UnitStateManager(operator).remove_unit("db/1")
    await backend.until(lambda: assigned[-1] == ["db/0"] and unit_data[-1]["life"] == DYING)
    watch.stop()
    unit_watch.stop()


@pytest_twisted.ensureDeferred
async def test_ephemeral_nodes_vanish_when_the_session_expires(backend):
    operator = backend.client
    agent = await backend.session()
    await initialize(operator, "test")
    machine = await MachineStateManager(operator).add_machine()
    events, children, gone = [], [], []
    agent.on_session_event(events.append)
    await (await MachineStateManager(agent).get_machine(0)).register_agent({"host": "h", "pid": 1})
    stat = await operator.exists(machine.agent_path, watch=lambda e: gone.append(e.type))
    assert stat.ephemeral_owner == agent.session_id != 0
    watch = await ChildrenWatch(agent, machine.units_path, children.append).start()
    old_session = agent.session_id
    await backend.expire(agent)
    await backend.until(lambda: gone == ["deleted"])
    assert [e for e in events if e in ("expired", "new-session")] == ["expired", "new-session"]
    assert events[0] == "suspended"
    assert agent.session_id != old_session and agent.connected
    assert not await machine.agent_alive()
    # The agent's watch came back with the new session.
    await deploy_db(operator)
    await backend.until(lambda: children[-1] == ["db-0"])
    watch.stop()
    # An agent re-registers its presence on the new session.
    presence = PresenceAgent(agent, 0)
    await presence.start()
    await backend.expire(agent)
    await backend.until(lambda: presence.registrations == 2)
    stat = await operator.exists(machine.agent_path)
    assert stat is not None and stat.ephemeral_owner == agent.session_id
    # Closing a session removes its ephemeral nodes at once.
    await agent.close()
    await backend.until(lambda: True)
    assert await operator.exists(machine.agent_path) is None


class PresenceAgent(BaseAgent):
    def __init__(self, client, machine_id):
        super().__init__(client, reactor)
        self.machine_id = machine_id

    async def register_presence(self, info):
        await (await MachineStateManager(self.client).get_machine(self.machine_id)).register_agent(info)


@pytest_twisted.ensureDeferred
async def test_sequence_nodes_ensure_path_and_ephemeral_parents(backend):
    c = backend.client
    await c.create("/z", b"")
    assert await c.create("/z/s-", b"", sequence=True) == "/z/s-0000000000"
    await c.create("/z/x", b"")
    await c.delete("/z/x")
    # Numbered by children ever created, not by cversion (which counts deletes too).
    assert await c.create("/z/s-", b"", sequence=True) == "/z/s-0000000002"
    assert (await c.exists("/z")).cversion == 4
    assert await c.create("/m/n/o", b"d", makepath=True) == "/m/n/o"
    assert (await c.get("/m/n"))[0] == b""
    assert await c.ensure_path("/m/n/o") is True
    assert await c.ensure_path("/q/r") == "/q/r"
    await c.create("/e", b"", ephemeral=True)
    with pytest.raises(NoChildrenForEphemeralsError):
        await c.create("/e/child", b"")
    acl, version = await c.get_acl("/z")
    assert (acl, version) == ([(31, "world", "anyone")], 0)


@pytest_twisted.ensureDeferred
async def test_fake_and_real_leave_the_same_tree(client):
    """The operator's whole flow, node by node: paths, data, versions, child counts."""
    fake = FakeZooKeeper().client()
    for c in (fake, client):
        await state_flow(c)
        await (await UnitStateManager(c).get_unit("db/0")).register_agent({"pid": 1})
    real_tree, fake_tree = await tree_of(client), await tree_of(fake)
    assert sorted(fake_tree) == sorted(real_tree)
    assert fake_tree == real_tree


async def tree_of(client, path="/"):
    data, stat = await client.get(path)
    tree = {path: (data, stat.version, stat.cversion, stat.num_children, stat.ephemeral_owner == client.session_id)}
    for child in await client.get_children(path):
        tree.update(await tree_of(client, f"{path.rstrip('/')}/{child}"))
    return tree


# -- address stores: in memory, ZooKeeper's on the fake, ZooKeeper's on a real server -------------


@pytest_twisted.async_yield_fixture(params=["in-memory", "zookeeper-store-on-fake", "zookeeper-store-on-real"])
async def stores(request):
    """(store, a second handle on the same reservations, as another agent would hold)."""
    if request.param == "in-memory":
        store = InMemoryAddressStore()
        yield store, store
        return
    if request.param == "zookeeper-store-on-fake":
        tree = FakeZooKeeper()
        one, two = tree.client(), tree.client()
    else:
        server, root = request.getfixturevalue("zk_server"), request.getfixturevalue("zk_root")
        one = await ZKClient(server.address, root, session_timeout=SESSION_TIMEOUT).connect(create_root=True)
        two = await ZKClient(server.address, root, session_timeout=SESSION_TIMEOUT).connect()
    await initialize(one, "test")
    await MachineStateManager(one).add_machine()
    yield ZooKeeperAddressStore(one, 0), ZooKeeperAddressStore(two, 0)
    await one.close()
    await two.close()


SUBNET = "10.0.0.0/29"  # .2 to .6 for units


@pytest_twisted.ensureDeferred
async def test_allocator_round_robin_lost_race_and_exhaustion(stores):
    store, elsewhere = stores
    with pytest.raises(NoNode):
        await store.ticket()  # nothing before ensure()
    assert await store.reservation("a/0") is None
    await store.ensure(SUBNET)
    allocator = Allocator(store, SUBNET)
    assert [await allocator.allocate(u) for u in ("a/0", "b/0", "c/0")] == ["10.0.0.2", "10.0.0.3", "10.0.0.4"]
    assert await allocator.release("b/0") == "10.0.0.3"
    assert await allocator.release("b/0") is None
    # Round-robin: the address just freed is not the next one handed out.
    assert await allocator.allocate("d/0") == "10.0.0.5"
    assert await allocator.allocate("a/0") == "10.0.0.2"
    # Another agent takes the address this allocator aims at next, behind its back.
    await elsewhere.take("x/0", "10.0.0.6")
    assert await allocator.allocate("e/0") == "10.0.0.3"
    assert allocator.collisions == 1
    with pytest.raises(AddressesExhausted):
        await allocator.allocate("f/0")
    # The store's own answers.
    with pytest.raises(UnitHasAddress) as has:
        await elsewhere.take("a/0", "10.0.0.9")
    assert has.value.address == "10.0.0.2"
    with pytest.raises(UnitHasAddress):
        await elsewhere.take("a/0", "10.0.0.4")  # the unit's reservation is checked first
    with pytest.raises(AddressTaken):
        await elsewhere.take("z/0", "10.0.0.4")
    assert sorted(await store.taken()) == ["10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5", "10.0.0.6"]
    # The allocator's view misses x/0 until it reads the store again.
    assert await allocator.reconcile({"a/0", "c/0"}) == {"d/0": "10.0.0.5", "e/0": "10.0.0.3"}
    await allocator.refresh()
    assert await allocator.reserved() == {"a/0": "10.0.0.2", "c/0": "10.0.0.4", "x/0": "10.0.0.6"}
    assert await elsewhere.reservations() == await allocator.reserved()


# -- what only the fakes have: clocks, crashes, injected failures ---------------------------------


@pytest_twisted.ensureDeferred
async def test_stat_times_come_from_the_clock():
    clock = task.Clock()
    clock.advance(100)
    c = FakeZooKeeper(clock).client()
    await c.create("/n", b"")
    clock.advance(2.5)
    stat = await c.set("/n", b"1")
    assert (stat.ctime, stat.mtime) == (100.0, 102.5)


@pytest_twisted.ensureDeferred
async def test_a_killed_session_ends_a_session_timeout_later():
    clock = task.Clock()
    tree = FakeZooKeeper(clock)
    operator, agent = tree.client(), tree.client(session_timeout=4.0)
    await agent.create("/presence", b"", ephemeral=True)
    agent.kill()
    with pytest.raises(ConnectionLost):
        await agent.get("/presence")
    clock.advance(3.9)
    assert await operator.exists("/presence") is not None
    clock.advance(0.1)
    assert await operator.exists("/presence") is None


@pytest_twisted.ensureDeferred
async def test_callbacks_run_one_at_a_time_and_their_failures_are_kept():
    tree = FakeZooKeeper()
    c = tree.client()
    await c.create("/n", b"")
    order = []

    def first(event):
        order.append("first begins")
        # Its own change queues the next event until it returns.
        c.set("/n", b"again")
        order.append("first ends")

    await c.get("/n", watch=first)
    await c.get("/n", watch=lambda e: order.append("second"))
    await c.set("/n", b"1")
    assert order == ["first begins", "first ends", "second"]
    await c.get("/n", watch=lambda e: 1 / 0)
    await c.set("/n", b"2")
    assert len(tree.errors) == 1 and tree.errors[0].check(ZeroDivisionError)


def spec(name, address="10.0.0.2"):
    return ContainerSpec(name=name, hostname=name, address=address, prefixlen=24, gateway="10.0.0.1", bridge="br-test")


@pytest_twisted.ensureDeferred
async def test_container_driver_fake():
    clock = task.Clock()
    driver = FakeContainerDriver(clock=clock)
    with pytest.raises(TypeError):
        await driver.create({"name": "a"})
    await driver.create(spec("a"))
    with pytest.raises(ContainerExists):
        await driver.create(spec("a"))
    assert (await driver.state("a"), await driver.state("b")) == ("STOPPED", None)
    with pytest.raises(ContainerNotFound):
        await driver.start("b")
    await driver.start("a")
    await driver.start("a")
    assert await driver.running() == {"a"} and driver.containers["a"].starts == 1
    assert await driver.exec("a", ["true"]) == (0, b"", b"")
    driver.crash("a")
    assert await driver.state("a") == "STOPPED"
    with pytest.raises(ContainerError, match="not running"):
        await driver.exec("a", ["true"])
    driver.fail("start", "a", times=1)
    with pytest.raises(ContainerError, match="injected"):
        await driver.start("a")
    await driver.start("a")
    driver.fail("destroy")
    with pytest.raises(ContainerError):
        await driver.destroy("a")
    driver.heal()
    driver.delays["destroy"] = 2.0
    d = defer.ensureDeferred(driver.destroy("a"))
    assert not d.called and await driver.list() == ["a"]
    clock.advance(2.0)
    assert d.called and await driver.list() == []
    del driver.delays["destroy"]
    await driver.destroy("a")  # idempotent
    assert driver.containers == {} and ("create", "a") in driver.calls


@pytest_twisted.ensureDeferred
async def test_machine_agent_converges_on_the_fakes_with_a_clock():
    """What the fakes are for: a whole machine agent, no ZooKeeper, no LXC, no waiting."""
    clock = InlineThreadsClock()
    tree = FakeZooKeeper(clock)
    operator = tree.client()
    await initialize(operator, "test")
    await MachineStateManager(operator).add_machine(address="192.0.2.1")
    driver = FakeContainerDriver(clock=clock)
    agent = MachineAgent(tree.client(), 0, reactor=clock, manage_bridge=False, driver=driver, template=FakeTemplate())
    await agent.start()
    try:
        await deploy_db(operator, n=2)
        deployer = agent.units.deployer
        first, second = deployer.container_for("db/0"), deployer.container_for("db/1")
        assert await driver.running() == {first, second}
        unit = await UnitStateManager(operator).get_unit("db/0")
        assert (unit.data["private-address"], unit.data["container"]) == ("10.77.0.2", first)
        assert driver.containers[first].spec.address == "10.77.0.2"
        # A container that dies behind the agent's back is started on the next tick.
        driver.crash(first)
        clock.advance(agent.resync_interval)
        assert driver.containers[first].state == "RUNNING" and driver.containers[first].starts == 2
        # A failing start marks the unit, and a later tick recovers.
        driver.crash(second)
        driver.fail("start", second, times=1)
        clock.advance(agent.resync_interval)
        assert (await UnitStateManager(operator).get_unit("db/1")).state == "error"
        clock.advance(agent.resync_interval)
        assert driver.containers[second].state == "RUNNING"
        # Removal: container destroyed, address freed, unit node gone.
        await UnitStateManager(operator).remove_unit("db/0")
        assert first not in driver.containers
        assert await operator.exists("/units/db-0") is None
        assert await agent.units.host.allocator.reserved() == {"db/1": "10.77.0.3"}
        # An expired session: presence comes back, and so does the assignments watch.
        agent.client.expire()
        assert agent.registrations == 2
        assert await ServiceStateManager(operator).add_units("db") == ["db/2"]
        assert deployer.container_for("db/2") in await driver.running()
    finally:
        await agent.stop()
    assert tree.errors == []
