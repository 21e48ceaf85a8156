"""Per-agent ZooKeeper credentials and the ACLs the admin gives the tree, on a real
ZooKeeper: each agent may change its own nodes and nothing else."""

import pytest
import pytest_twisted

from ensemble.charm import Charm, bundle_id
from ensemble.errors import InvalidValue
from ensemble.state import auth, nodes
from ensemble.state.client import NoAuth, NodeExists, ZKClient
from ensemble.state.environment import initialize
from ensemble.state.machine import MachineStateManager
from ensemble.state.network import ZooKeeperAddressStore, lease_subnet
from ensemble.state.relation import RelationStateManager
from ensemble.state import presence
from ensemble.state.service import ServiceStateManager
from ensemble.state.unit import UnitStateManager

from conftest import SESSION_TIMEOUT, make_charm

DB, WEB = "examples/charms/db", "examples/charms/web"


async def _connect(zk_server, zk_root, credential, create_root=False, join=True, readers=()):
    """A session as `credential`, set up as the agents' are (auth.join) unless not `join`."""
    client = ZKClient(zk_server.address, zk_root, session_timeout=SESSION_TIMEOUT, credential=credential,
                      readers=readers)
    if credential is not None and credential.user == auth.ADMIN_USER:
        client.default_acl = auth.default_acl(credential, credential.id)
    await client.connect(create_root=create_root)
    if join:
        await auth.join(client)
    return client


async def _deploy(client, charm_dir, to, config=None):
    charm = Charm.load(charm_dir)
    bundle = charm.bundle()
    _, names = await ServiceStateManager(client).deploy(
        charm.name, bundle_id(charm.name, bundle), bundle, charm.config(config or {}), {}, n=1, to=to
    )
    return names[0]


class Secured:
    """An environment with an admin, machines 0 and 1, db/0 on 0 and web/0 on 1."""

    def __init__(self, zk_server, zk_root, admin):
        self.zk_server, self.zk_root, self.admin = zk_server, zk_root, admin
        self.clients = []

    async def as_(self, credential, join=True):
        """A session as `credential`; a unit's is also the units' reader, as its machine
        agent hands it both."""
        unit = credential is not None and credential.user.startswith("unit-")
        readers = [auth.units_reader(auth.machines_reader(self.admin))] if unit else []
        client = await _connect(self.zk_server, self.zk_root, credential, join=join, readers=readers)
        self.clients.append(client)
        return client

    def machine(self, machine_id):
        return auth.machine_credential(self.admin, machine_id)

    def unit(self, machine_id, name):
        return auth.unit_credential(self.machine(machine_id), name)


@pytest_twisted.async_yield_fixture
async def secured(zk_server, zk_root):
    admin = auth.new_admin()
    client = await _connect(zk_server, zk_root, admin, create_root=True)
    env = Secured(zk_server, zk_root, admin)
    env.clients.append(client)
    env.admin_client = client
    await initialize(client, "secured")
    machines = MachineStateManager(client)
    await machines.add_machine(address="10.0.0.1")
    await machines.add_machine(address="10.0.0.2")
    assert await _deploy(client, DB, to=0, config={"port": "7171"}) == "db/0"
    assert await _deploy(client, WEB, to=1) == "web/0"
    # Each machine agent leases its subnet and reserves its unit's address.
    for machine_id, unit, address in ((0, "db/0", "10.77.0.2"), (1, "web/0", "10.77.1.2")):
        agent = await env.as_(env.machine(machine_id))
        subnet = await lease_subnet(agent, machine_id)
        store = ZooKeeperAddressStore(agent, machine_id)
        await store.ensure(subnet)
        await store.take(unit, address)
    yield env
    for c in env.clients:
        await c.close()


async def _refused(operation):
    with pytest.raises(NoAuth):
        await operation


def test_credentials_derive_and_never_show_their_secret():
    admin = auth.new_admin()
    machine = auth.machine_credential(admin, 3)
    assert machine == auth.machine_credential(admin, 3) and machine.user == "machine-3"
    assert machine.secret not in (admin.secret, auth.machine_credential(admin, 4).secret)
    unit = auth.unit_credential(machine, "web/0")
    assert unit.user == "unit-web-0" and unit.secret != machine.secret
    assert admin.secret not in repr(admin) and auth.Credential.parse(str(unit)) == unit
    for bad in ("", "no-colon", "admin:short", "Admin:" + "x" * 20, "admin:" + "x" * 20 + "\n!"):
        with pytest.raises(InvalidValue):
            auth.Credential.parse(bad)


@pytest_twisted.ensureDeferred
async def test_a_unit_changes_only_its_own_unit(secured):
    web = await secured.as_(secured.unit(1, "web/0"))
    # Its own node, its presence below it, its own service's config: yes.
    await nodes.update(web, "/units/web-0", nodes.merge({"state": "started", "open-ports": ["80/tcp"]}))
    await presence.register(web, "/units/web-0/agent", presence.agent_info(), "web/0")
    assert await presence.alive(web, "/units/web-0/agent")
    assert (await (await ServiceStateManager(web).get_service("web")).get_config())["port"] == 80
    # Another unit, a service, an assignment, an address, a machine: no.
    await _refused(web.set("/units/db-0", nodes.dump({"open-ports": ["22/tcp"]})))
    await _refused(web.create("/units/db-0/agent", b""))
    await _refused(web.set("/services/db", b""))
    await _refused(web.set("/services/web", nodes.dump({"unit-sequence": 0})))
    await _refused(web.set("/services/web/config", b""))
    await _refused(web.create("/services/evil", b""))
    await _refused(web.create("/machines/machine-0000000000/units/web-0", b""))
    await _refused(web.delete("/machines/machine-0000000001/units/web-0"))
    await _refused(web.create("/units/web-1", b""))
    await _refused(web.set("/network/addresses/machine-0000000001/units/web-0", b"10.77.1.99"))
    await _refused(web.create("/network/addresses/machine-0000000001/ips/10.77.1.99", b"web/0"))
    await _refused(web.delete("/network/addresses/machine-0000000000/ips/10.77.0.2"))
    await _refused(web.set("/machines/machine-0000000001", b""))
    await _refused(web.delete("/units/db-0"))
    # Nor its own guard (which would let a machine that does not run it delete it).
    await _refused(web.delete("/units/web-0/guard"))
    # Nor read another service or its config (it may hold secrets), nor change an ACL.
    await _refused(ServiceStateManager(web).get_service("db"))
    await _refused(web.get("/services/db/config"))
    await _refused(web.set_acl("/units/db-0", [auth.WORLD_READ]))
    assert (await UnitStateManager(secured.admin_client).get_unit("db/0")).data.get("open-ports") is None


@pytest_twisted.ensureDeferred
async def test_a_machine_changes_only_its_own_machine_and_units(secured):
    m0 = await secured.as_(secured.machine(0))
    # Its own machine, its unit, its addresses: yes.
    await nodes.update(m0, "/machines/machine-0000000000", nodes.merge({"bridge": "ens-secured"}))
    await nodes.update(m0, "/units/db-0", nodes.merge({"private-address": "10.77.0.2"}))
    assert (await (await ServiceStateManager(m0).get_service("db")).get_config())["port"] == 7171
    # Machine 1, its units, its assignments, its lease and addresses: no.
    await _refused(m0.set("/machines/machine-0000000001", nodes.dump({"address": "10.0.0.66"})))
    await _refused(m0.create("/machines/machine-0000000001/agent", b"", ephemeral=True))
    await _refused(m0.create("/machines/machine-0000000001/units/db-0", b""))
    await _refused(m0.delete("/machines/machine-0000000001/units/web-0"))
    await _refused(m0.set("/units/web-0", nodes.dump({"private-address": "10.77.0.2"})))
    await _refused(m0.set("/network/subnets/10.77.1.0-24", nodes.dump({"machine": 0})))
    await _refused(m0.delete("/network/subnets/10.77.1.0-24"))
    await _refused(m0.create("/network/addresses/machine-0000000001/ips/10.77.1.9", b"db/0"))
    await _refused(m0.delete("/network/addresses/machine-0000000001/units/web-0"))
    await _refused(m0.create("/network/addresses/machine-0000000002", b""))
    # Nor the environment, the machine list, a service, or a service it does not host.
    await _refused(m0.set("/environment", b""))
    await _refused(m0.set("/machines", nodes.dump({"next-id": 0})))
    await _refused(m0.set("/services/db", b""))
    await _refused((await ServiceStateManager(m0).get_service("web")).get_config())
    await _refused(m0.set_acl("/machines/machine-0000000001", [auth.WORLD_READ]))
    # It may delete under /units, /services and /charms (ZooKeeper checks the parent),
    # but not what belongs to services it does not run: their guards stop it.
    web_charm = (await ServiceStateManager(m0).get_service("web")).charm_id
    for path in ("/units/web-0", "/services/web", f"/charms/{web_charm}"):
        await _refused(m0.delete_tree(path))
        assert await m0.exists(path) is not None, path
    # Its own unit it may remove, guard and all (as it does when the unit is done).
    await m0.delete_tree("/units/db-0")
    assert await m0.exists("/units/db-0") is None


@pytest_twisted.ensureDeferred
async def test_a_wrong_secret_or_no_credential_changes_nothing(secured):
    forged = auth.Credential("machine-1", "x" * 32)
    intruder = await secured.as_(forged, join=False)
    await _refused(intruder.set("/machines/machine-0000000001", b""))
    await _refused(auth.join(intruder))  # it may not read the environment either
    anonymous = await secured.as_(None)
    await _refused(anonymous.get("/environment"))  # nobody without a credential reads anything
    await _refused(anonymous.set("/units/db-0", b""))
    await _refused(anonymous.create("/units/evil", b""))
    await _refused(anonymous.get("/services/db/config"))


@pytest_twisted.ensureDeferred
async def test_the_admin_grants_new_units_and_machines_and_takes_back_removed_ones(secured):
    admin = secured.admin_client
    names = await ServiceStateManager(admin).add_units("db", 1, to=1)
    assert names == ["db/1"]
    # db/1 is on machine 1: it and machine 1 may now read db's config; machine 1 may
    # change db/1 (not db/0).
    db1 = await secured.as_(secured.unit(1, "db/1"))
    assert (await (await ServiceStateManager(db1).get_service("db")).get_config())["port"] == 7171
    m1 = await secured.as_(secured.machine(1))
    await nodes.update(m1, "/units/db-1", nodes.merge({"state": "started"}))
    await _refused(m1.set("/units/db-0", b""))
    # A machine added now gets its grants; a removed one loses them.
    machines = MachineStateManager(admin)
    m2_state = await machines.add_machine(address="10.0.0.3")
    m2 = await secured.as_(secured.machine(m2_state.id))
    await lease_subnet(m2, m2_state.id)
    await machines.remove_machine(m2_state.id)
    grants, _ = await admin.get_acl("/network/subnets")
    assert not any(g[2] == secured.machine(2).id for g in grants)
    await _refused(m2.create("/network/subnets/10.77.9.0-24", b""))
    with pytest.raises(NodeExists):
        await admin.create("/units/db-1", b"")  # (the admin can still do anything)


@pytest_twisted.ensureDeferred
async def test_a_machine_reads_what_its_firewall_needs_and_only_the_admin_exposes(secured, tmp_path):
    admin = secured.admin_client
    charm = Charm.load(make_charm(tmp_path / "client", "client", metadata_extra="requires:\n  host: juju-info\n"))
    bundle = charm.bundle()
    await ServiceStateManager(admin).deploy("client", bundle_id("client", bundle), bundle, {}, {}, n=1, to=1,
                                            endpoints=charm.endpoints)
    await RelationStateManager(admin).add_relation("client", "db")
    assert await ServiceStateManager(admin).set_exposed("db", True) is False
    # Machine 0 reads the relations, whether a service is exposed, and the units and
    # address reservations of machine 1 (where related units run).
    m0 = await secured.as_(secured.machine(0))
    assert ["client", "db"] in [r.services for r in await RelationStateManager(m0).get_all_relations()]
    assert (await ServiceStateManager(m0).get_service("db")).exposed
    assert (await UnitStateManager(m0).get_unit("web/0")).machine_id == 1
    assert await ZooKeeperAddressStore(m0, 1).reservations() == {"web/0": "10.77.1.2"}
    # Neither a machine nor a unit may expose a service, or close one.
    await _refused(ServiceStateManager(m0).set_exposed("web", True))
    await _refused(ServiceStateManager(m0).set_exposed("db", False))
    web = await secured.as_(secured.unit(1, "web/0"))
    await _refused(ServiceStateManager(web).set_exposed("web", True))
    assert not (await ServiceStateManager(admin).get_service("web")).exposed
