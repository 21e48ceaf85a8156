"""The ZooKeeper address source of the name server, against a real ZooKeeper."""

import pytest
import pytest_twisted
from twisted.names import dns

from conftest import SESSION_TIMEOUT, deploy_charm, make_charm
from ensemble.network.dns import NameServer, domain_for
from ensemble.state.client import ZKClient
from ensemble.state.names import NamesUnavailable, ZooKeeperNames
from ensemble.state.unit import UnitStateManager
from test_dns import ADDRESS, addresses, query_udp


async def set_unit(client, name, **fields):
    unit = await UnitStateManager(client).get_unit(name)
    await unit.update(**fields)


async def started(client, name, address):
    await set_unit(client, name, state="started", **{"private-address": address})


@pytest.fixture
def charm(tmp_path):
    return make_charm(tmp_path / "charm", name="db")


@pytest_twisted.ensureDeferred
async def test_a_unit_name_resolves_while_it_has_an_address_and_is_alive(env_client, charm):
    await deploy_charm(env_client, charm, n=2)
    names = ZooKeeperNames(env_client)
    assert await names.addresses("db-0") == []  # there, but no address yet
    await set_unit(env_client, "db/0", **{"private-address": "10.77.0.2"})
    assert await names.addresses("db-0") == ["10.77.0.2"]  # whatever its state
    await UnitStateManager(env_client).remove_unit("db/0")
    assert await names.addresses("db-0") is None
    await env_client.delete_tree("/units/db-0")
    assert await names.addresses("db-0") is None


@pytest_twisted.ensureDeferred
async def test_a_service_name_lists_its_alive_started_units_with_addresses(env_client, charm):
    await deploy_charm(env_client, charm, n=4)
    names = ZooKeeperNames(env_client)
    assert await names.addresses("db") == []  # the service exists; nothing started yet
    await started(env_client, "db/0", "10.77.0.2")
    await set_unit(env_client, "db/1", state="installing", **{"private-address": "10.77.0.3"})
    await set_unit(env_client, "db/2", state="started")  # no address
    await started(env_client, "db/3", "10.77.0.5")
    assert await names.addresses("db") == ["10.77.0.2", "10.77.0.5"]
    await started(env_client, "db/1", "10.77.0.3")
    await UnitStateManager(env_client).remove_unit("db/3")
    assert await names.addresses("db") == ["10.77.0.2", "10.77.0.3"]
    # Another service's units are not this one's, even with a name that starts alike.
    await deploy_charm(env_client, charm, service="db-extra")
    await started(env_client, "db-extra/0", "10.77.0.9")
    assert await names.addresses("db") == ["10.77.0.2", "10.77.0.3"]
    assert await names.addresses("db-extra") == ["10.77.0.9"]


@pytest_twisted.ensureDeferred
async def test_a_unit_hostname_wins_over_a_service_of_that_name(env_client, charm):
    await deploy_charm(env_client, charm, service="db")
    await deploy_charm(env_client, charm, service="db-0")  # its unit db-0/0 is host db-0-0
    await started(env_client, "db/0", "10.77.0.2")
    await started(env_client, "db-0/0", "10.77.0.7")
    names = ZooKeeperNames(env_client)
    assert await names.addresses("db-0") == ["10.77.0.2"]
    assert await names.addresses("db-0-0") == ["10.77.0.7"]
    await UnitStateManager(env_client).remove_unit("db/0")
    assert await names.addresses("db-0") == ["10.77.0.7"]  # the unit is going: the service


@pytest_twisted.ensureDeferred
async def test_unknown_and_malformed_labels_are_none(env_client, charm):
    await deploy_charm(env_client, charm, n=2)
    await started(env_client, "db/1", "10.77.0.3")
    names = ZooKeeperNames(env_client)
    assert await names.addresses("DB-1") == ["10.77.0.3"]  # names are case-insensitive
    for label in (
        "web", "db-9", "db-x", "db-01", "db-1234567890", "a" * 64, "db_1", "db/1", "db.1",
        "../units", "db-1/..", "-1", "", " db-1", "d\xe9-1", None, 7,
    ):
        assert await names.addresses(label) is None, label


@pytest_twisted.ensureDeferred
async def test_a_malformed_unit_node_spoils_only_itself(env_client, charm):
    await deploy_charm(env_client, charm, n=3)
    await started(env_client, "db/0", "10.77.0.2")
    await set_unit(env_client, "db/2", state="started", **{"private-address": ["not", "a", "string"]})
    await env_client.set("/units/db-1", b"{not: [valid")
    names = ZooKeeperNames(env_client)
    assert await names.addresses("db-1") == []
    assert await names.addresses("db-2") == []
    assert await names.addresses("db") == ["10.77.0.2"]


class CountingClient:
    """A client that counts the reads made through it."""

    def __init__(self, client):
        self._client = client
        self.reads = 0
        self.connected = True

    def __getattr__(self, name):
        return getattr(self._client, name)

    def _count(self, method, *args, **kw):
        self.reads += 1
        return getattr(self._client, method)(*args, **kw)

    def get(self, *args, **kw):
        return self._count("get", *args, **kw)

    def get_children(self, *args, **kw):
        return self._count("get_children", *args, **kw)

    def exists(self, *args, **kw):
        return self._count("exists", *args, **kw)


@pytest_twisted.ensureDeferred
async def test_what_a_lookup_costs_in_reads(env_client, charm):
    await deploy_charm(env_client, charm, n=3)
    await started(env_client, "db/0", "10.77.0.2")
    counting = CountingClient(env_client)
    names = ZooKeeperNames(counting)

    async def reads(label):
        before = counting.reads
        await names.addresses(label)
        return counting.reads - before

    assert await reads("db-0") == 1  # an alive unit: its node
    assert await reads("web") == 1  # no such service: its node
    assert await reads("db-9") == 2  # no such unit, nor service "db-9"
    assert await reads("db") == 2 + 3  # the service, the units' list, each of its 3 units
    assert await reads("db_0") == 0


@pytest_twisted.ensureDeferred
async def test_no_connection_is_a_quick_error(zk_server, zk_root):
    client = await ZKClient(zk_server.address, zk_root, session_timeout=SESSION_TIMEOUT).connect(create_root=True)
    await client.close()
    with pytest.raises(NamesUnavailable, match="not connected to ZooKeeper"):
        await ZooKeeperNames(client).addresses("db-0")


@pytest_twisted.ensureDeferred
async def test_the_name_server_answers_from_zookeeper(env_client, charm):
    await deploy_charm(env_client, charm, n=2)
    await started(env_client, "db/0", "10.77.0.2")
    await started(env_client, "db/1", "10.77.0.3")
    server = NameServer(ZooKeeperNames(env_client), ADDRESS, port=0, domain=domain_for("test"))
    await server.start()
    try:
        assert addresses(await query_udp(server, "db-1.test.ensemble.internal")) == ["10.77.0.3"]
        assert addresses(await query_udp(server, "db")) == ["10.77.0.2", "10.77.0.3"]
        assert (await query_udp(server, "web")).rCode == dns.ENAME
    finally:
        await server.stop()
