"""ZooKeeper closed to the unauthenticated, and to units beyond what each needs: every
node of a real server walked with one unit's credential and with none; the write
quotas; the connection limit and the four-letter words (issue 15, section 4).

Each test gets a ZooKeeper of its own: an environment closes `/` to its admin, which
the session's shared server must not be."""

import select
import socket
import time

import pytest
import pytest_twisted
from kazoo.exceptions import BadArgumentsError, NoChildrenForEphemeralsError

from ensemble.charm import Charm, bundle_id
from ensemble.errors import SettingsTooLarge
from ensemble.state import auth, nodes, presence, quota
from ensemble.state.client import BadVersion, NoAuth, NodeExists, QuotaExceeded, ZKClient
from ensemble.state.environment import initialize
from ensemble.state.machine import MachineStateManager
from ensemble.state.network import ZooKeeperAddressStore, lease_subnet
from ensemble.state.relation import RelationStateManager, reader_path, relation_path
from ensemble.state.repair import upgrade
from ensemble.state.service import ServiceStateManager
from ensemble.state.unit import UnitStateManager
from ensemble.zookeeper import FOUR_LETTER_WORDS, MAX_CLIENT_CONNECTIONS, ZooKeeperServer, four_letter

from conftest import SESSION_TIMEOUT, TICK_MS, eventually, make_charm

DB, WEB = "examples/charms/db", "examples/charms/web"
ROOT = "/ensemble"
PEERS = "peers:\n  ring: ring\n"


@pytest.fixture
def server(tmp_path):
    zookeeper = ZooKeeperServer(str(tmp_path / "zookeeper"), tick_time=TICK_MS)
    zookeeper.start()
    yield zookeeper
    zookeeper.stop()


async def _connect(server, credential, root=ROOT, create_root=False, join=True, readers=()):
    client = ZKClient(server.address, root, session_timeout=SESSION_TIMEOUT, credential=credential, readers=readers)
    if credential is not None and credential.user == auth.ADMIN_USER:
        client.default_acl = auth.default_acl(credential, credential.id)
    await client.connect(create_root=create_root)
    if join and root:
        await auth.join(client)
    return client


async def _deploy(client, charm_dir, to, service=None, n=1):
    charm = Charm.load(charm_dir)
    bundle = charm.bundle()
    _, names = await ServiceStateManager(client).deploy(
        service or charm.name, bundle_id(charm.name, bundle), bundle, charm.config({}), {}, n=n, to=to,
        endpoints=charm.endpoints,
    )
    return names


class Environment:
    """Machines 0 and 1; db/0 on 0, web/0 on 1 and web/1 on 0, web related to db;
    other/0 (with a peer relation web is not in) on 0. Both machines' agents have
    leased and reserved; db/0 and web/0 are present and have joined."""

    def __init__(self, server, admin):
        self.server, self.admin = server, admin
        self.units_reader = auth.units_reader(auth.machines_reader(admin))
        self.relations = {}  # key -> its services
        self.clients = []

    async def as_(self, credential, root=ROOT, join=True, reader=True):
        """A session as `credential`; a unit's is also the units' reader, as its machine
        agent hands it both, and the reader of each of its service's relations, as its
        agent joins them (unless not `reader`: an agent started before there were any)."""
        unit = credential is not None and credential.user.startswith("unit-")
        readers = []
        if unit and reader:
            service = credential.user[len("unit-"):].rpartition("-")[0]
            readers = [self.units_reader, *(auth.relation_reader(self.admin, key)
                                            for key, services in self.relations.items() if service in services)]
        client = await _connect(self.server, credential, root, join=join, readers=readers)
        self.clients.append(client)
        return client

    def machine(self, machine_id):
        return auth.machine_credential(self.admin, machine_id)

    def unit(self, machine_id, name):
        return auth.unit_credential(self.machine(machine_id), name)

    async def close(self):
        for client in self.clients:
            await client.close()


async def _environment(server, tmp_path):
    admin = auth.new_admin()
    env = Environment(server, admin)
    env.admin_client = client = await _connect(server, admin, create_root=True)
    env.clients.append(client)
    await initialize(client, "closed")
    machines = MachineStateManager(client)
    await machines.add_machine(address="10.0.0.1")
    await machines.add_machine(address="10.0.0.2")
    assert await _deploy(client, DB, to=0) == ["db/0"]
    assert await _deploy(client, WEB, to=1) == ["web/0"]
    assert await ServiceStateManager(client).add_units("web", 1, to=0) == ["web/1"]
    other = make_charm(tmp_path / "other", "other", metadata_extra=PEERS)
    assert await _deploy(client, other, to=0) == ["other/0"]
    relation, _, _ = await RelationStateManager(client).add_relation("web", "db")
    env.relation = relation.key
    [peer] = await RelationStateManager(client).relations_of("other")
    env.peer = peer.key
    env.relations = {relation.key: {"web", "db"}, peer.key: {"other"}}
    env.web_charm = (await ServiceStateManager(client).get_service("web")).charm_id
    for machine_id, units in ((0, {"db/0": "10.77.0.2", "web/1": "10.77.0.3", "other/0": "10.77.0.4"}),
                              (1, {"web/0": "10.77.1.2"})):
        agent = await env.as_(env.machine(machine_id))
        await (await MachineStateManager(agent).get_machine(machine_id)).register_agent(presence.agent_info())
        store = ZooKeeperAddressStore(agent, machine_id)
        await store.ensure(await lease_subnet(agent, machine_id))
        for unit, address in units.items():
            await store.take(unit, address)
    for machine_id, unit, role in ((0, "db/0", "server"), (1, "web/0", "client")):
        session = await env.as_(env.unit(machine_id, unit))
        await (await UnitStateManager(session).get_unit(unit)).register_agent(presence.agent_info())
        key = unit.replace("/", "-")
        await nodes.update(session, f"/relations/{env.relation}/settings/{key}", nodes.merge({"private-address": "x"}))
        await session.create(f"/relations/{env.relation}/{role}/{key}", b"", ephemeral=True)
    return env


@pytest_twisted.async_yield_fixture
async def environment(server, tmp_path):
    env = await _environment(server, tmp_path)
    yield env
    await env.close()


# -- walking the tree --------------------------------------------------------------------


async def _walk(client, path="/"):
    """Every node on the server, parents first (as the admin, who may list them all)."""
    found = [path]
    for child in sorted(await client.get_children(path)):
        found += await _walk(client, f"{path.rstrip('/')}/{child}")
    return found


async def _may(client, admin, path):
    """What `client` (a session on the whole server) may do to `path`, as ZooKeeper
    answers, without changing anything that stays: 'r' read it, 'w' write its data,
    'c' create a child (an ephemeral probe, removed again), 'd' delete it."""
    may = ""
    try:
        await client.get(path)
        may += "r"
    except NoAuth:
        pass
    try:
        # ZooKeeper checks the ACL before the version: BadVersion means it would write.
        await client.set(path, b"", version=2**31 - 1)
        raise AssertionError(f"wrote {path}")
    except BadVersion:
        may += "w"
    except (NoAuth, BadArgumentsError):
        pass  # (the server's own nodes refuse everyone)
    probe = f"{path.rstrip('/')}/probe"
    try:
        await client.create(probe, b"", ephemeral=True)
        await admin.delete(probe)
        may += "c"
    except (NodeExists, NoChildrenForEphemeralsError, QuotaExceeded):
        may += "c"  # the ACL let it through; the node's kind or its quota did not
    except NoAuth:
        pass
    if path != "/":
        try:
            # Checked against the parent's ACL, then the version: nothing is deleted.
            await client.delete(path, version=2**31 - 1)
            raise AssertionError(f"deleted {path}")
        except BadVersion:
            may += "d"
        except (NoAuth, BadArgumentsError):
            pass
    return may


def _web_may(env):
    """Explicitly, every node web/0's credential may do anything to; nothing else."""
    rel, charm = f"{ROOT}/relations/{env.relation}", f"{ROOT}/charms/{env.web_charm}"
    return {
        f"{ROOT}/environment": "r",                 # the environment's public settings
        f"{ROOT}/relations": "r",                   # which relations there are (their names)
        rel: "r",                                   # its service's relation: who and which roles
        f"{rel}/reader": "r",                       # the reader of its settings
        f"{rel}/client": "rc",                      # its role: it joins here
        f"{rel}/client/web-0": "rwc",               # its membership (ephemeral: no child gets made)
        f"{rel}/server": "r",                       # the other side's members
        f"{rel}/settings/web-0": "rw",              # its own settings
        f"{rel}/settings/web-1": "r",               # those of the units it is related to
        f"{rel}/settings/db-0": "r",
        f"{ROOT}/services/web": "r",                # its service (its charm's id)
        f"{ROOT}/services/web/config": "r",         # and its config
        charm: "r",                                 # its charm
        f"{ROOT}/units/web-0": "rwc",               # its node; its presence below (no delete: guard)
        f"{ROOT}/units/web-0/agent": "rwc",         # its presence (ephemeral)
        "/zookeeper/config": "r",                   # the server's own, read-only for all
    }


NOBODY_MAY = {"/zookeeper/config": "r"}


async def _check_walk(env, expected, who, reader=True):
    admin = await env.admin_client.outside()
    session = await env.as_(who, root="", join=False, reader=reader)
    paths = await _walk(admin)
    assert set(expected) <= set(paths), set(expected) - set(paths)
    seen = {path: await _may(session, admin, path) for path in paths}
    wrong = {path: (may, expected.get(path, "")) for path, may in seen.items() if may != expected.get(path, "")}
    assert not wrong, f"(what it may, what it should) per node: {wrong}"
    return paths


@pytest_twisted.ensureDeferred
async def test_a_unit_may_touch_only_what_its_unit_needs_and_nobody_else_anything(environment):
    env = environment
    paths = await _check_walk(env, _web_may(env), env.unit(1, "web/0"))
    # The walk went everywhere: the server's own nodes, quotas, another relation,
    # presence, reservations and the machines' reader nodes.
    for path in ("/", "/zookeeper", f"/zookeeper/quota{ROOT}/units/web-0/zookeeper_limits",
                 f"{ROOT}/relations/{env.peer}/peer", f"{ROOT}/units/db-0/agent", f"{ROOT}/units/web-0/guard",
                 f"{ROOT}/network/addresses/machine-0000000001/units/web-0",
                 f"{ROOT}/machines/machine-0000000001/reader", f"{ROOT}/relations/{env.relation}/server/db-0"):
        assert path in paths
    await _check_walk(env, NOBODY_MAY, None)


@pytest_twisted.ensureDeferred
async def test_the_units_reader_reads_what_every_unit_reads_and_nothing_else(environment):
    env = environment
    await _check_walk(env, {f"{ROOT}/environment": "r", f"{ROOT}/relations": "r", "/zookeeper/config": "r"},
                      env.units_reader)
    # It is what lets a unit read them: its own credential alone does not.
    bare = await env.as_(env.unit(1, "web/0"), join=False, reader=False)
    for path in ("/environment", "/relations"):
        assert not await _reads(bare, path), path
    # So those nodes name no unit, and units added leave their ACLs as they were.
    before = {path: sorted((await env.admin_client.get_acl(path))[0]) for path in ("/environment", "/relations")}
    assert not any(g[2].startswith("unit-") for acl in before.values() for g in acl)
    await ServiceStateManager(env.admin_client).add_units("web", 3, to=1)
    for path, acl in before.items():
        assert sorted((await env.admin_client.get_acl(path))[0]) == acl, path


@pytest_twisted.ensureDeferred
async def test_an_environment_made_the_old_way_is_closed_by_its_admins_next_connection(environment):
    env = environment
    outside = await env.admin_client.outside()
    # As before: everything open to read, `/` and /zookeeper to all, no quotas, no
    # reader nodes, no acl-version.
    for path in await _walk(outside):
        if path != "/zookeeper/config" and not path.startswith("/zookeeper/quota/"):
            grants, _ = await outside.get_acl(path)
            if path in ("/", "/zookeeper", "/zookeeper/quota"):
                await outside.set_acl(path, [(auth.ALL, "world", "anyone")])
            else:
                await outside.set_acl(path, auth.merged([*grants, auth.WORLD_READ]))
    await outside.delete_tree(f"/zookeeper/quota{ROOT}")
    for machine_id in (0, 1):
        await env.admin_client.delete(auth.reader_path(machine_id))
    await nodes.update(env.admin_client, "/environment", nodes.merge({"acl-version": None, "machines-id": None}))
    # A machine agent that started then: no reader to join yet.
    early = await env.as_(env.machine(1))
    assert (await early.get("/units/db-0"))[0]  # (world-readable still)
    # The admin's next connection puts it right, and the walk says so again.
    admin = await env.as_(env.admin)
    assert await upgrade(admin)
    assert not await upgrade(admin)  # once
    await _check_walk(env, _web_may(env), env.unit(1, "web/0"))
    await _check_walk(env, NOBODY_MAY, None)
    assert await quota.limits_of(admin, "/units/web-0") == {
        "count": -1, "bytes": -1, "byteHardLimit": quota.UNIT_BYTES, "countHardLimit": quota.UNIT_NODES}
    # The machine agent that started before joined the machines' reader once it could.
    await eventually(lambda: _reads(early, "/units/db-0"))


@pytest_twisted.ensureDeferred
async def test_units_of_an_environment_of_acl_version_2_keep_reading_after_its_repair(environment):
    env = environment
    admin = env.admin_client
    # Version 2: a READ grant per unit on the nodes every unit reads, and no units'
    # reader; one of the grants is of a unit long gone.
    units = {"db/0": 0, "web/0": 1, "web/1": 0, "other/0": 0, "gone/0": 0}
    for path in ("/environment", "/relations"):
        policy = auth.AdminPolicy(env.admin)
        await admin.set_acl(path, [*policy.public(), *(auth.digest(auth.READ, u) for u in policy.units(units))])
    await nodes.update(admin, "/environment", nodes.merge({"acl-version": 2}))
    for key in env.relations:  # nor relations' readers
        await admin.delete(reader_path(key))
    assert not await _reads(await env.as_(env.units_reader, join=False), "/environment")
    assert await upgrade(await env.as_(env.admin))
    for path in ("/environment", "/relations"):
        ids = {g[2] for g in (await admin.get_acl(path))[0]}
        assert env.units_reader.id in ids and env.unit(1, "web/0").id in ids, path
        assert env.unit(0, "gone/0").id not in ids, path
    for key in env.relations:
        assert await admin.exists(reader_path(key)) is not None
    # A unit agent started before (no reader) reads what it did; one started now, the same.
    await _check_walk(env, _web_may(env), env.unit(1, "web/0"), reader=False)
    await _check_walk(env, _web_may(env), env.unit(1, "web/0"))


async def _reads(client, path):
    try:
        await client.get(path)
        return True
    except NoAuth:
        return False


@pytest_twisted.ensureDeferred
async def test_machines_read_what_their_agents_need(environment):
    env = environment
    rel = f"/relations/{env.relation}"
    m1 = await env.as_(env.machine(1))
    # Names and the firewall: every unit and service, the relations, leases, the
    # other machine's reservations; whether units are present.
    for path in ("/environment", "/units", "/units/db-0", "/units/other-0", "/services", "/services/db", "/relations",
                 rel, f"/relations/{env.peer}", "/network/subnets", "/network/subnets/10.77.0.0-24",
                 "/network/addresses/machine-0000000000/units/db-0", "/machines/machine-0000000000",
                 "/charms", f"/charms/{env.web_charm}", "/units/web-0/guard"):
        assert await _reads(m1, path), path
    assert await (await UnitStateManager(m1).get_unit("db/0")).agent_alive()
    # Not: config of services it runs none of, relation settings or their reader,
    # another machine's reader, the root, the server's `/` and its quotas.
    for path in ("/services/db/config", f"{rel}/settings/web-0", f"{rel}/reader", "/machines/machine-0000000000/reader"):
        assert not await _reads(m1, path), path
    outside = await env.as_(env.machine(1), root="", join=False)
    for path in ("/", ROOT, "/zookeeper", f"/zookeeper/quota{ROOT}/units/web-0"):
        assert not await _reads(outside, path), path
    assert await _reads(m1, "/services/web/config")  # it runs web/0


# -- what units may write ----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_unit_writing_40_mb_is_refused_within_its_quotas(environment):
    env = environment
    web = await env.as_(env.unit(1, "web/0"))
    rel = f"/relations/{env.relation}"
    megabyte = b"x" * (1024 * 1024 - 4096)  # as much as one request may carry
    written = refused = 0
    targets = ["/units/web-0", "/units/web-0/agent", f"{rel}/settings/web-0"]
    started = time.monotonic()
    for n in range(40):
        try:
            await web.set(targets[n % len(targets)], megabyte)
            written += len(megabyte)
        except QuotaExceeded:
            refused += 1
    assert written == 0 and refused == 40
    assert time.monotonic() - started < 10
    # Within the quotas it writes as before; past them, not a byte.
    await web.set("/units/web-0", b"y" * (quota.UNIT_BYTES // 2))
    with pytest.raises(QuotaExceeded):
        await web.set("/units/web-0/agent", b"y" * (quota.UNIT_BYTES // 2 + 1024))
    await web.set(f"{rel}/settings/web-0", b"z" * (quota.SETTINGS_BYTES - 1024))
    with pytest.raises(QuotaExceeded):
        await web.set(f"{rel}/settings/web-0", b"z" * (quota.SETTINGS_BYTES + 1))
    # Nor more nodes than it needs: its node holds its guard and presence already, and
    # its role's container one member per unit in that role (it made its own).
    with pytest.raises(QuotaExceeded):
        await web.create("/units/web-0/more", b"")
    with pytest.raises(QuotaExceeded):
        await web.create(f"{rel}/client/web-0-data", b"x")  # members hold no data
    await web.create(f"{rel}/client/web-1", b"", ephemeral=True)  # a sibling's name: one slot left
    with pytest.raises(QuotaExceeded):
        await web.create(f"{rel}/client/extra", b"", ephemeral=True)
    usage = await quota.usage(env.admin_client, "/units/web-0")
    assert usage["count"] == quota.UNIT_NODES and usage["bytes"] <= quota.UNIT_BYTES


@pytest_twisted.ensureDeferred
async def test_a_hook_whose_relation_settings_are_too_large_fails_saying_so(environment, tmp_path):
    from ensemble.unit.state import ZooKeeperHookState

    env = environment
    web = await env.as_(env.unit(1, "web/0"))
    unit = await UnitStateManager(web).get_unit("web/0")
    joined = type("Joined", (), {"key": env.relation})()
    index = type("Index", (), {"joined": lambda self: {"db:1": joined}})()
    state = ZooKeeperHookState(web, unit, str(tmp_path), index)
    await state.commit({"db:1": {"fine": "1"}})
    with pytest.raises(SettingsTooLarge, match=r"relation db:1: .* exceed 65536 bytes"):
        await state.commit({"db:1": {"big": "x" * quota.SETTINGS_BYTES}})


@pytest_twisted.ensureDeferred
async def test_new_units_and_relations_get_grants_and_quotas_before_they_exist(environment, tmp_path):
    env = environment
    admin = env.admin_client
    [db1] = await ServiceStateManager(admin).add_units("db", 1, to=1)
    rel = f"/relations/{env.relation}"
    # db/1's quota, and room in db's role container for it.
    assert (await quota.limits_of(admin, "/units/db-1"))["byteHardLimit"] == quota.UNIT_BYTES
    assert (await quota.limits_of(admin, f"{rel}/server"))["countHardLimit"] == 1 + 2
    assert (await quota.limits_of(admin, f"{rel}/settings/db-1"))["byteHardLimit"] == quota.SETTINGS_BYTES
    db = await env.as_(env.unit(1, db1))
    for path in ("/environment", "/relations", rel, f"{rel}/client", f"{rel}/settings/web-0", "/services/db",
                 "/services/db/config", "/units/db-1"):
        assert await _reads(db, path), path
    await db.create(f"{rel}/server/db-1", b"", ephemeral=True)
    assert not await _reads(db, f"/relations/{env.peer}")
    # A relation made now: its units read it (and what they need of it) at once.
    charm = make_charm(tmp_path / "client", "client", metadata_extra="requires:\n  host: juju-info\n")
    [client_unit] = await _deploy(admin, charm, to=1)
    relation, _, _ = await RelationStateManager(admin).add_relation("client", "db")
    env.relations[relation.key] = {"client", "db"}  # (its agent would join its reader)
    client = await env.as_(env.unit(1, client_unit))
    for path in (relation_path(relation.key), f"{relation_path(relation.key)}/settings/db-1",
                 f"{relation_path(relation.key)}/server"):
        assert await _reads(client, path), path
    assert (await quota.limits_of(admin, f"{relation_path(relation.key)}/client"))["countHardLimit"] == 2
    # Units of a removed service leave quotas behind until the admin prunes them.
    await ServiceStateManager(admin).destroy_service("other")
    machine = await env.as_(env.machine(0))
    await machine.delete_tree("/units/other-0")
    dropped = await quota.prune(admin, "/units", await admin.get_children("/units"), 0)
    assert dropped == ["other-0"] and await quota.limits_of(admin, "/units/other-0") is None
    assert await quota.limits_of(admin, f"/relations/{env.peer}/peer") is None  # gone with the relation
    # A removed unit's grants on its service's nodes go with the service's next units.
    await UnitStateManager(admin).remove_unit("web/1")
    await machine.delete_tree("/units/web-1")
    assert await ServiceStateManager(admin).add_units("web", 1, to=1) == ["web/2"]
    for path in ("/services/web", "/services/web/config", f"/charms/{env.web_charm}"):
        ids = [g[2] for g in (await admin.get_acl(path))[0]]
        assert env.unit(0, "web/1").id not in ids and env.unit(1, "web/2").id in ids, path


@pytest_twisted.ensureDeferred
async def test_gone_units_quotas_are_pruned_once_they_outnumber_the_units(environment, monkeypatch):
    from ensemble.state import repair
    from ensemble.state.service import PRUNE_AFTER, prune_unit_quotas

    env = environment
    admin = env.admin_client
    monkeypatch.setattr(repair, "QUOTA_GRACE", 0)  # (no add-unit under way)
    await quota.ensure_all(admin, [quota.unit_limits(f"/units/ghost-{n}") for n in range(PRUNE_AFTER - 1)],
                           acl=auth.AdminPolicy(env.admin).private())
    # One fewer than the threshold: an add-unit does not list the units and quotas.
    assert await prune_unit_quotas(admin) == []
    assert await quota.limits_of(admin, "/units/ghost-0") is not None
    await quota.ensure_all(admin, [quota.unit_limits("/units/ghost-last")], acl=auth.AdminPolicy(env.admin).private())
    dropped = await prune_unit_quotas(admin)
    assert sorted(dropped) == sorted([f"ghost-{n}" for n in range(PRUNE_AFTER - 1)] + ["ghost-last"])
    assert await quota.limits_of(admin, "/units/web-0") is not None  # the live units' stay


@pytest_twisted.ensureDeferred
async def test_an_add_unit_lists_the_units_only_once_one_was_removed_and_drops_its_grants(environment, tmp_path):
    env = environment
    admin = env.admin_client
    machine = await env.as_(env.machine(0))
    # A service in no relation: a relation's own part of an add-unit lists the units.
    assert await _deploy(admin, make_charm(tmp_path / "solo", "solo"), to=0, n=2) == ["solo/0", "solo/1"]
    charm = (await ServiceStateManager(admin).get_service("solo")).charm_id
    listed = []
    get_children = admin.get_children

    def listing(path, *args, **kwargs):
        listed.append(path)
        return get_children(path, *args, **kwargs)

    admin.get_children = listing

    async def add_solo():
        del listed[:]
        [name] = await ServiceStateManager(admin).add_units("solo", 1, to=0)
        return name, "/units" in listed

    async def granted(path):
        return {g[2] for g in (await admin.get_acl(path))[0]}

    # The first add-unit after a deploy lists them (the charm's ACL may be another
    # service's too); then none was removed: no listing, though units were added.
    assert (await add_solo())[1]
    assert not (await add_solo())[1]
    await _deploy(admin, make_charm(tmp_path / "more", "more"), to=1)
    assert not (await add_solo())[1]
    # Units removed, one of another service: the next lists them and drops the grants
    # of solo's removed unit, wherever they are.
    for unit in ("solo/1", "db/0"):
        await UnitStateManager(admin).remove_unit(unit)
        await machine.delete_tree(f"/units/{unit.replace('/', '-')}")
    assert env.unit(0, "solo/1").id in await granted("/services/solo")
    name, listed_units = await add_solo()
    assert listed_units
    for path in ("/services/solo", "/services/solo/config", f"/charms/{charm}"):
        ids = await granted(path)
        assert env.unit(0, "solo/1").id not in ids and env.unit(0, name).id in ids, path
    assert not (await add_solo())[1]
    # A node without the field (written before it existed): its add-unit lists.
    await nodes.update(admin, "/services/solo", nodes.merge({"units-seen": None}))
    assert (await add_solo())[1]
    assert not (await add_solo())[1]


# -- the server ----------------------------------------------------------------------------


def test_the_server_answers_only_the_four_letter_words_the_project_uses(server):
    assert set(FOUR_LETTER_WORDS) == {"ruok", "srvr"}
    assert four_letter(server.host, server.port, "ruok") == "imok"
    assert "Mode: standalone" in four_letter(server.host, server.port, "srvr")
    # Not the ones that list clients' addresses, sessions or the tree's shape.
    for word in ("stat", "cons", "dump", "wchc", "wchp", "mntr", "envi", "conf", "crst", "srst"):
        answer = four_letter(server.host, server.port, word)
        assert answer == f"{word} is not executed because it is not in the whitelist.\n", (word, answer)


def _hold(host, port, source, n):
    """`n` TCP connections to the server from `source`, each either held open by the
    server (True) or closed by it at once (False)."""
    held = []
    for _ in range(n):
        s = socket.socket()
        s.bind((source, 0))
        s.connect((host, port))
        held.append(s)
        # ZooKeeper counts a connection once its selector has taken it up: a burst
        # overshoots the limit by a few (72 held for 64, measured), one at a time not.
        time.sleep(0.005)
    # A refused connection is closed by the server: it turns readable (its end); one
    # held stays quiet (a client that says nothing hears nothing).
    closed, deadline = set(), time.monotonic() + 0.5
    while time.monotonic() < deadline:
        readable, _, _ = select.select([s for s in held if s not in closed], [], [], deadline - time.monotonic())
        closed.update(readable)
    return held, [s not in closed for s in held]


def test_one_address_holds_at_most_the_connection_limit(server):
    assert f"maxClientCnxns={MAX_CLIENT_CONNECTIONS}" in open(server.config_path).read()
    held, states = _hold(server.host, server.port, "127.0.0.1", MAX_CLIENT_CONNECTIONS + 5)
    try:
        assert states.count(True) == MAX_CLIENT_CONNECTIONS and states[MAX_CLIENT_CONNECTIONS:] == [False] * 5
        # Another address (another unit) is not held up by it.
        other = socket.create_connection((server.host, server.port), timeout=2, source_address=("127.0.0.2", 0))
        with other:
            other.sendall(b"ruok")
            assert other.recv(4) == b"imok"
    finally:
        for s in held:
            s.close()
    # Once they are gone, the address connects again.
    deadline = time.monotonic() + 5
    while four_letter(server.host, server.port, "ruok") != "imok":
        assert time.monotonic() < deadline
        time.sleep(0.05)


@pytest_twisted.ensureDeferred
async def test_the_server_and_the_root_are_the_admins_once_an_environment_is_made(server):
    admin = auth.new_admin()
    client = await _connect(server, admin, create_root=True)
    stranger = await _connect(server, None, root="", join=False)
    try:
        await initialize(client, "closed")
        private = [(auth.ALL, "digest", admin.id)]
        outside = await client.outside()
        for path in ("/", "/zookeeper", "/zookeeper/quota", ROOT):
            assert (await outside.get_acl(path))[0] == private, path
        for attempt in (stranger.create("/evil", b""), stranger.set_acl("/", [(auth.ALL, "world", "anyone")]),
                        stranger.get_children("/"), stranger.create("/zookeeper/quota/evil", b""),
                        stranger.get_children("/zookeeper"), stranger.get(f"{ROOT}/environment")):
            with pytest.raises(NoAuth):
                await attempt
        # The admin may still make another environment of its own there.
        other = await _connect(server, admin, root="/second", create_root=True)
        await initialize(other, "second")
        await other.close()
    finally:
        await client.close()
        await stranger.close()


@pytest_twisted.ensureDeferred
async def test_a_shared_server_keeps_its_root_open_to_others(server):
    neighbour = await _connect(server, None, root="/neighbour", create_root=True)
    client = await _connect(server, auth.new_admin(), create_root=True)
    stranger = await _connect(server, None, root="", join=False)
    try:
        await initialize(client, "closed")
        # `/` holds another's tree: left open, so others can still make theirs...
        await neighbour.create("/still-here", b"")
        second = await _connect(server, auth.new_admin(), root="/second", create_root=True)
        await initialize(second, "second")
        await second.close()
        # ...while each environment's own nodes are its admin's alone.
        for path in (ROOT, f"{ROOT}/environment", "/second/environment"):
            with pytest.raises(NoAuth):
                await stranger.get(path)
    finally:
        for c in (client, neighbour, stranger):
            await c.close()
