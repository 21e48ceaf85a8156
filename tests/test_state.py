"""State classes over a real ZooKeeper: machines, services, units, assignments, watches."""

import pytest
import pytest_twisted
from twisted.internet import reactor, task

from ensemble.charm import Charm, bundle_id
from ensemble.errors import (
    EnvironmentExists,
    EnvironmentNotInitialized,
    MachineNotFound,
    NoMachines,
    ServiceDying,
    ServiceExists,
    ServiceNotFound,
    UnitNotFound,
)
from ensemble.state import nodes
from ensemble.state.environment import get_environment, initialize
from ensemble.state.machine import MachineStateManager
from ensemble.state.service import ServiceStateManager, place
from ensemble.state.unit import DYING, UnitStateManager

DB = "examples/charms/db"


async def deploy(client, name="db", n=1, to=0, limits=None):
    charm = Charm.load(DB)
    bundle = charm.bundle()
    return await ServiceStateManager(client).deploy(
        name, bundle_id(charm.name, bundle), bundle, charm.config({}), limits or {}, n=n, to=to
    )


async def snapshot(client, path="/"):
    """Every node under `path` with its data: to show that a failure wrote nothing."""
    result = {}
    for child in await client.get_children(path):
        full = f"{path.rstrip('/')}/{child}"
        result[full] = (await client.get(full))[0]
        result.update(await snapshot(client, full))
    return result


async def wait_for(predicate, timeout=10.0):
    deadline = reactor.seconds() + timeout
    while not predicate():
        assert reactor.seconds() < deadline, "condition not reached in time"
        await task.deferLater(reactor, 0.05, lambda: None)


@pytest_twisted.ensureDeferred
async def test_environment_initialises_once(client):
    with pytest.raises(EnvironmentNotInitialized):
        await get_environment(client)
    await initialize(client, "env1", {"cidr": "10.9.0.0/16"})
    settings = await get_environment(client)
    assert settings["name"] == "env1"
    assert settings["network"] == {"cidr": "10.9.0.0/16", "host-prefix": 24, "mode": "host-gw"}
    before = await snapshot(client)
    with pytest.raises(EnvironmentExists):
        await initialize(client, "env2")
    assert await snapshot(client) == before


@pytest_twisted.ensureDeferred
async def test_machine_ids_count_up_and_are_found(env_client):
    machines = MachineStateManager(env_client)
    one = await machines.add_machine(address="192.0.2.1")
    two = await machines.add_machine()
    assert (one.id, two.id) == (1, 2)
    assert await machines.machine_ids() == [0, 1, 2]
    assert (await machines.get_machine(1)).address == "192.0.2.1"
    assert await env_client.exists("/machines/machine-0000000001/units") is not None
    with pytest.raises(MachineNotFound, match="machine 9 not found"):
        await machines.get_machine(9)


@pytest_twisted.ensureDeferred
async def test_deploy_creates_service_units_and_assignments_together(env_client):
    service, names = await deploy(env_client, n=3, limits={"memory": 2**30})
    assert names == ["db/0", "db/1", "db/2"]
    assert service.data["unit-sequence"] == 3
    machine = await MachineStateManager(env_client).get_machine(0)
    assert await machine.assigned_units() == names
    unit = await UnitStateManager(env_client).get_unit("db/2")
    assert (unit.machine_id, unit.state, unit.life) == (0, "pending", "alive")
    stored = await ServiceStateManager(env_client).get_service("db")
    assert stored.limits == {"memory": 2**30}
    assert await stored.get_config() == {"port": 7070, "data-dir": "/var/lib/example-db"}
    assert "config" not in stored.data  # in its own node, readable by fewer
    assert (await stored.charm_bundle()) == Charm.load(DB).bundle()


@pytest_twisted.ensureDeferred
async def test_failed_deploy_writes_nothing(env_client):
    before = await snapshot(env_client)
    with pytest.raises(MachineNotFound):
        await deploy(env_client, to=5)
    assert await snapshot(env_client) == before
    await deploy(env_client)
    before = await snapshot(env_client)
    with pytest.raises(ServiceExists):
        await deploy(env_client)
    assert await snapshot(env_client) == before


@pytest_twisted.ensureDeferred
async def test_add_units_numbers_on_and_never_reuses(env_client):
    await deploy(env_client)
    services = ServiceStateManager(env_client)
    assert await services.add_units("db", n=2) == ["db/1", "db/2"]
    await UnitStateManager(env_client).remove_unit("db/2")
    assert await services.add_units("db") == ["db/3"]
    with pytest.raises(ServiceNotFound):
        await services.add_units("nope")


def test_placement_prefers_fewest_units():
    assert place({0: 3, 1: 0, 2: 1}, 4) == [1, 1, 2, 1]
    assert place({0: 3, 1: 0}, 2, to=0) == [0, 0]
    with pytest.raises(MachineNotFound):
        place({0: 0}, 1, to=4)
    with pytest.raises(NoMachines):
        place({}, 1)


@pytest_twisted.ensureDeferred
async def test_add_unit_without_to_goes_to_the_emptiest_machine(env_client):
    await MachineStateManager(env_client).add_machine()
    await deploy(env_client, n=2, to=0)
    names = await ServiceStateManager(env_client).add_units("db", n=1)
    unit = await UnitStateManager(env_client).get_unit(names[0])
    assert unit.machine_id == 1


@pytest_twisted.ensureDeferred
async def test_remove_unit_unassigns_and_marks_dying_at_once(env_client):
    await deploy(env_client, n=2)
    units = UnitStateManager(env_client)
    await units.remove_unit("db/0")
    machine = await MachineStateManager(env_client).get_machine(0)
    assert await machine.assigned_units() == ["db/1"]
    assert (await units.get_unit("db/0")).life == DYING
    await units.remove_unit("db/0")  # again: nothing more to do, no error
    with pytest.raises(UnitNotFound):
        await units.remove_unit("db/7")


@pytest_twisted.ensureDeferred
async def test_destroy_service(env_client):
    services = ServiceStateManager(env_client)
    await deploy(env_client, n=2)
    assert sorted(await services.destroy_service("db")) == ["db/0", "db/1"]
    assert (await services.get_service("db")).life == DYING
    machine = await MachineStateManager(env_client).get_machine(0)
    assert await machine.assigned_units() == []
    with pytest.raises(ServiceDying):
        await services.add_units("db")
    with pytest.raises(ServiceDying):
        await deploy(env_client)
    # Once the units are gone (their agent's job), the service goes too.
    assert not await services.remove_service_if_done("db")
    for name in ("db-0", "db-1"):
        await env_client.delete(f"/units/{name}")
    assert await services.remove_service_if_done("db")
    with pytest.raises(ServiceNotFound):
        await services.get_service("db")
    # A service without units goes at once.
    await deploy(env_client, name="other")
    await env_client.delete("/units/other-0")
    await env_client.delete("/machines/machine-0000000000/units/other-0")
    assert await services.destroy_service("other") == []
    with pytest.raises(ServiceNotFound):
        await services.get_service("other")


@pytest_twisted.ensureDeferred
async def test_watch_assigned_units(env_client):
    machine = await MachineStateManager(env_client).get_machine(0)
    seen = []
    watch = await machine.watch_assigned_units(seen.append)
    try:
        assert seen == [[]]
        await deploy(env_client, n=2)
        await wait_for(lambda: seen[-1] == ["db/0", "db/1"])
        await UnitStateManager(env_client).remove_unit("db/0")
        await wait_for(lambda: seen[-1] == ["db/1"])
    finally:
        watch.stop()


@pytest_twisted.ensureDeferred
async def test_watch_unit_state(env_client):
    await deploy(env_client)
    unit = await UnitStateManager(env_client).get_unit("db/0")
    seen = []
    watch = await unit.watch(seen.append)
    try:
        await unit.set_state("started")
        await wait_for(lambda: seen[-1].get("state") == "started")
        await env_client.delete(unit.path)
        await wait_for(lambda: seen[-1] is None)
    finally:
        watch.stop()


@pytest_twisted.ensureDeferred
async def test_concurrent_updates_keep_each_others_fields(env_client):
    await deploy(env_client)
    a = await UnitStateManager(env_client).get_unit("db/0")
    b = await UnitStateManager(env_client).get_unit("db/0")
    await a.update(container="c1")
    await b.update(**{"private-address": "10.0.0.2"})
    data = (await UnitStateManager(env_client).get_unit("db/0")).data
    assert data["container"] == "c1" and data["private-address"] == "10.0.0.2"


@pytest_twisted.ensureDeferred
async def test_malformed_nodes_are_reported_not_fatal(env_client):
    await deploy(env_client, n=2)
    await env_client.set("/units/db-1", b"{not: [valid")
    await env_client.set("/services/db", b"- a list")
    units = {u.name: u for u in await UnitStateManager(env_client).get_all_units()}
    assert units["db/0"].state == "pending"
    assert "not valid YAML" in units["db/1"].data["malformed"]
    services = await ServiceStateManager(env_client).get_all_services()
    assert "expected a mapping" in services[0].data["malformed"]
    with pytest.raises(Exception, match="malformed data at /units/db-1"):
        await nodes.read(env_client, "/units/db-1")


@pytest_twisted.ensureDeferred
async def test_redeploy_while_old_units_linger_is_a_clear_error(env_client):
    await deploy(env_client, n=2)
    # A malformed unit cannot be marked dying; the service must not vanish under it.
    await env_client.set("/units/db-1", b"[broken")
    services = ServiceStateManager(env_client)
    assert await services.destroy_service("db") == ["db/0", "db/1"]
    assert (await services.get_service("db")).life == DYING
    await env_client.delete("/units/db-0")
    await env_client.delete_tree("/services/db")  # as if removed by hand, leaving db/1 behind
    with pytest.raises(ServiceDying):
        await deploy(env_client)


@pytest_twisted.ensureDeferred
async def test_charm_is_removed_with_the_last_service_using_it(env_client):
    await deploy(env_client, name="one")
    await deploy(env_client, name="two")
    charm_id = (await ServiceStateManager(env_client).get_service("one")).charm_id
    services = ServiceStateManager(env_client)
    for name in ("one", "two"):
        await services.destroy_service(name)
        await env_client.delete(f"/units/{name}-0")
        await services.remove_service_if_done(name)
        still_there = await env_client.exists(f"/charms/{charm_id}") is not None
        assert still_there == (name == "one")
