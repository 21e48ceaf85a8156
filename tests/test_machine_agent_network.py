"""The machine agent's addresses: leased subnet, bridge, published unit addresses,
release on removal, leaks after a restart, exhaustion as a unit or machine error."""

import pytest_twisted
from twisted.internet import defer

from ensemble.charm import Charm, bundle_id
from ensemble.machine.agent import MachineAgent
from ensemble.network.bridge import bridge_state
from ensemble.state.client import ZKClient
from ensemble.state.environment import initialize
from ensemble.state.machine import MachineStateManager
from ensemble.state.network import ZooKeeperAddressStore
from ensemble.state.service import ServiceStateManager
from ensemble.state.unit import UnitStateManager
from ensemble.status import collect

from conftest import SESSION_TIMEOUT, eventually
from fakes import FakeContainerDriver
from netns import temporary_netns


async def deploy(client, name="db", n=1):
    charm = Charm.load("examples/charms/db")
    bundle = charm.bundle()
    await ServiceStateManager(client).deploy(name, bundle_id(charm.name, bundle), bundle, {}, {}, n=n, to=0)


async def start_agent(zk_server, zk_root, netns):
    client = await ZKClient(zk_server.address, zk_root, session_timeout=SESSION_TIMEOUT).connect()
    agent = MachineAgent(client, 0, netns=netns)
    await agent.start()
    return agent


async def addresses(client):
    status = await collect(client)
    return {
        unit: entry.get("private-address")
        for service in status["services"].values()
        for unit, entry in service["units"].items()
    }


@pytest_twisted.ensureDeferred
async def test_units_get_distinct_addresses_and_removal_frees_them(env_client, zk_server, zk_root):
    with temporary_netns() as ns:
        agent = await start_agent(zk_server, zk_root, ns)
        try:
            machine = (await collect(env_client))["machines"][0]
            assert machine["subnet"] == "10.77.0.0/24"
            assert bridge_state(agent.bridge, ns)["addresses"] == ["10.77.0.1/24"]

            await deploy(env_client, n=3)
            published = await eventually(
                lambda: _all_addressed(env_client, ["db/0", "db/1", "db/2"])
            )
            assert published == {"db/0": "10.77.0.2", "db/1": "10.77.0.3", "db/2": "10.77.0.4"}

            await UnitStateManager(env_client).remove_unit("db/1")
            await eventually(lambda: _gone(env_client, "/units/db-1"))
            store = ZooKeeperAddressStore(env_client, 0)
            assert sorted(await store.taken()) == ["10.77.0.2", "10.77.0.4"]

            # Machine re-use: the next unit gets a fresh address, not the one just freed.
            await ServiceStateManager(env_client).add_units("db", to=0)
            published = await eventually(lambda: _all_addressed(env_client, ["db/0", "db/2", "db/3"]))
            assert published["db/3"] == "10.77.0.5"

            await ServiceStateManager(env_client).destroy_service("db")
            await eventually(lambda: _gone(env_client, "/services/db"))
            assert await store.taken() == []
        finally:
            await agent.stop()


async def _all_addressed(client, names):
    found = await addresses(client)
    if sorted(found) == sorted(names) and all(found.values()):
        return found
    return None


async def _gone(client, path):
    return await client.exists(path) is None


@pytest_twisted.ensureDeferred
async def test_restart_keeps_addresses_and_frees_what_went_while_down(env_client, zk_server, zk_root):
    with temporary_netns() as ns:
        agent = await start_agent(zk_server, zk_root, ns)
        try:
            await deploy(env_client, n=2)
            before = await eventually(lambda: _all_addressed(env_client, ["db/0", "db/1"]))
        finally:
            await agent.stop()
        # While the agent is down: one unit removed (its address now leaks), one added.
        await UnitStateManager(env_client).remove_unit("db/0")
        await ServiceStateManager(env_client).add_units("db", to=0)
        agent = await start_agent(zk_server, zk_root, ns)
        try:
            after = await eventually(lambda: _all_addressed(env_client, ["db/1", "db/2"]))
            assert after["db/1"] == before["db/1"]
            assert after["db/2"] not in before.values()
            assert await env_client.exists("/units/db-0") is None
            taken = await ZooKeeperAddressStore(env_client, 0).taken()
            assert sorted(taken) == sorted(after.values())
        finally:
            await agent.stop()


@pytest_twisted.ensureDeferred
async def test_address_exhaustion_marks_the_unit_and_spares_the_rest(client, zk_server, zk_root):
    await initialize(client, "small", {"cidr": "10.78.0.0/24", "host-prefix": 29})
    await MachineStateManager(client).add_machine(address="127.0.0.1")
    with temporary_netns() as ns:
        agent = await start_agent(zk_server, zk_root, ns)
        try:
            await deploy(client, n=6)  # a /29 holds 5 units

            async def one_error():
                status = (await collect(client))["services"]["db"]["units"]
                errors = {n: u for n, u in status.items() if u["agent-state"] == "error"}
                addressed = [n for n, u in status.items() if u["private-address"]]
                return (errors, addressed) if errors and len(addressed) == 5 else None

            errors, _ = await eventually(one_error)
            (name, entry), = errors.items()
            assert entry["error"] == "no free address in 10.78.0.0/29 (5 in use)"
            # Freeing an address lets the unit in error recover on the next change.
            other = next(n for n in ("db/0", "db/1") if n != name)
            await UnitStateManager(client).remove_unit(other)

            async def recovered():
                unit = await UnitStateManager(client).get_unit(name)
                return unit.state == "pending" and unit.data.get("private-address")

            await eventually(recovered)
        finally:
            await agent.stop()


@pytest_twisted.ensureDeferred
async def test_subnet_exhaustion_is_a_machine_error_in_status(client, zk_server, zk_root):
    await initialize(client, "tiny", {"cidr": "10.79.0.0/24", "host-prefix": 24})
    machines = MachineStateManager(client)
    await machines.add_machine(address="127.0.0.1")
    await machines.add_machine(address="192.0.2.9")
    from ensemble.state.network import lease_subnet

    await lease_subnet(client, 1)  # machine 1 takes the only subnet
    agent_client = await ZKClient(zk_server.address, zk_root, session_timeout=SESSION_TIMEOUT).connect()
    agent = MachineAgent(agent_client, 0, manage_bridge=False)
    agent.lease_retry_delay = 0.2
    started = defer.ensureDeferred(agent.start())
    try:
        async def machine_error():
            return (await collect(client))["machines"][0].get("error")

        assert await eventually(machine_error) == (
            "no free /24 subnet left in 10.79.0.0/24 (1 leased); use a larger --network"
        )
        assert (await collect(client))["machines"][0]["agent"] == "alive"
        await client.delete("/network/subnets/10.79.0.0-24")  # the lease frees up

        async def leased():
            return (await collect(client))["machines"][0]["subnet"]

        assert await eventually(leased) == "10.79.0.0/24"
        assert "error" not in (await collect(client))["machines"][0]
        await started
    finally:
        await agent.stop()


@pytest_twisted.ensureDeferred
async def test_assignment_to_a_missing_unit_does_not_stop_the_others(env_client, zk_server, zk_root):
    await env_client.create("/machines/machine-0000000000/units/ghost-0", b"")
    with temporary_netns() as ns:
        agent = await start_agent(zk_server, zk_root, ns)
        try:
            await deploy(env_client, n=1)
            found = await eventually(lambda: _all_addressed(env_client, ["db/0"]))
            assert found == {"db/0": "10.77.0.2"}
        finally:
            await agent.stop()


class _FailingTemplate:
    """A template whose build fails the first time, as with no mirror reachable."""

    rootfs = "/"  # the host's own: what the agent checks the installation against

    def __init__(self):
        self.calls = 0

    async def ensure(self, progress=None):
        self.calls += 1
        if self.calls == 1:
            from ensemble.machine.container.template import TemplateError

            raise TemplateError("debootstrap failed: could not reach http://deb.debian.org/debian")
        return self


@pytest_twisted.ensureDeferred
async def test_a_failed_template_build_is_a_machine_error_and_retried(env_client, zk_server, zk_root):
    agent_client = await ZKClient(zk_server.address, zk_root, session_timeout=SESSION_TIMEOUT).connect()
    template = _FailingTemplate()
    # The driver is never asked for a container here: the test is about what the agent
    # does around the build.
    agent = MachineAgent(agent_client, 0, manage_bridge=False, driver=FakeContainerDriver(), template=template)
    agent.template_retry_delay = 0.2
    started = defer.ensureDeferred(agent.start())
    try:
        async def machine_error():
            return (await collect(env_client))["machines"][0].get("error")

        assert (await eventually(machine_error)).startswith("container template: debootstrap failed")
        assert (await collect(env_client))["machines"][0]["agent"] == "alive"

        async def cleared():
            return template.calls >= 2 and "error" not in (await collect(env_client))["machines"][0]

        await eventually(cleared)
        await started
    finally:
        await agent.stop()
