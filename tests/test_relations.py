"""Relations: metadata endpoints, add-relation/remove-relation matching, their ZooKeeper
tree (peers at deploy, destroy-service cleanup), status, and the ACLs with real
credentials on a real ZooKeeper."""

import pytest
import pytest_twisted
import yaml

from ensemble.charm import Charm, bundle_id
from ensemble.errors import InvalidCharm, InvalidRelation, RelationExists, RelationNotFound, ServiceNotFound
from ensemble.state import auth, nodes
from ensemble.state.client import NoAuth, NodeExists, ZKClient
from ensemble.state.environment import initialize
from ensemble.state.machine import MachineStateManager
from ensemble.state.nodes import service_path
from ensemble.state.relation import RELATIONS_INDEX, RelationStateManager, join_reader, relation_path
from ensemble.state.service import ServiceStateManager
from ensemble.status import collect

from conftest import SESSION_TIMEOUT, deploy_charm, make_charm

MYSQL = "provides:\n  db: mysql\n"
WORDPRESS = "requires:\n  db: {interface: mysql}\n  cache: {interface: memcache, optional: true}\npeers:\n  ring: wp-ring\n"
TWO_DBS = "provides:\n  db: mysql\n  db-admin: mysql\n"


def _charm(tmp_path, name, extra):
    return make_charm(tmp_path / name, name=name, metadata_extra=extra)


# -- metadata ------------------------------------------------------------------------


def test_short_and_long_forms_and_the_implicit_juju_info(tmp_path):
    charm = Charm.load(_charm(tmp_path, "wordpress", WORDPRESS + "ensemble: formula\n"))
    assert charm.endpoints["db"] == {"interface": "mysql", "role": "client", "scope": "global", "limit": 1,
                                     "optional": False}
    assert charm.endpoints["cache"]["optional"] is True
    assert charm.endpoints["ring"]["role"] == "peer"
    assert charm.endpoints["juju-info"] == {"interface": "juju-info", "role": "server", "scope": "global",
                                            "limit": None, "optional": False}
    long = Charm.load(_charm(tmp_path, "logger", "requires:\n  juju-info: {interface: juju-info, scope: container}\n"
                             "provides:\n  logs: {interface: syslog, limit: 3}\n"))
    assert long.endpoints["juju-info"]["role"] == "client" and long.endpoints["juju-info"]["scope"] == "container"
    assert long.endpoints["logs"]["limit"] == 3
    assert list(Charm.load(make_charm(tmp_path / "plain")).endpoints) == ["juju-info"]


@pytest.mark.parametrize("extra, expected", [
    ("provides:\n  db: {interface: mysql, colour: red}\n", "provides relation 'db': unknown key 'colour'"),
    ("provides:\n  db: {limit: 1}\n", "provides relation 'db': interface missing"),
    ("provides:\n  db: {interface: My_SQL}\n", "provides relation 'db': interface 'My_SQL' is not a name"),
    ("provides:\n  db: 42\n", "provides relation 'db': expected an interface name or a mapping with 'interface'"),
    ("requires:\n  db: {interface: mysql, scope: machine}\n", "requires relation 'db': scope must be global or container"),
    ("provides:\n  db: mysql\nrequires:\n  db: mysql\n", "requires relation 'db': the relation name is used twice"),
    ("peers:\n  db: x\nprovides:\n  db: mysql\n", "relation 'db': the relation name is used twice"),
    ("provides:\n  juju-db: mysql\n", "provides relation 'juju-db': relations and interfaces starting with 'juju-' may not be provided"),
    ("provides:\n  db: juju-info\n", "provides relation 'db': relations and interfaces starting with 'juju-' may not be provided"),
    ("provides:\n  Db: mysql\n", "provides relation 'Db': relation names must be"),
    ("provides:\n  db/x: mysql\n", "relation names must be"),
    ("provides: [db]\n", "'provides' must be a mapping"),
    ("requires:\n  db: {interface: mysql, optional: maybe}\n", "optional must be true or false"),
    ("requires:\n  db: {interface: mysql, limit: 0}\n", "limit must be a positive integer"),
])
def test_bad_relations_in_metadata_are_one_line_errors(tmp_path, extra, expected):
    with pytest.raises(InvalidCharm) as e:
        Charm.load(_charm(tmp_path, "broken", extra))
    message = str(e.value)
    assert message.startswith("charm broken: ") and expected in message and "\n" not in message


def test_requiring_a_juju_interface_is_allowed(tmp_path):
    charm = Charm.load(_charm(tmp_path, "sub", "requires:\n  host: juju-info\n"))
    assert charm.endpoints["host"]["interface"] == "juju-info"


# -- add-relation / remove-relation --------------------------------------------------


async def _deploy(client, tmp_path, name, extra, n=1, to=0):
    return await deploy_charm(client, _charm(tmp_path, name, extra), n=n, to=to)


@pytest_twisted.ensureDeferred
async def test_add_relation_matches_by_interface_and_role(env_client, tmp_path):
    await _deploy(env_client, tmp_path, "mysql", MYSQL)
    await _deploy(env_client, tmp_path, "wordpress", WORDPRESS, n=2)
    # Endpoints are on the service node: add-relation reads no bundle.
    service = await ServiceStateManager(env_client).get_service("wordpress")
    assert service.data["endpoints"]["db"] == {"interface": "mysql", "role": "client", "scope": "global"}
    manager = RelationStateManager(env_client)
    relation, a, b = await manager.add_relation("wordpress", "mysql")
    assert (a[:2], b[:2]) == (("wordpress", "db"), ("mysql", "db"))
    assert relation.relation_id("wordpress") == "db:1"  # 0 is wordpress's peer relation
    data, _ = await nodes.read(env_client, relation_path(relation.key))
    assert data == {"id": 1, "interface": "mysql", "scope": "global", "endpoints": [
        {"service": "wordpress", "relation-name": "db", "role": "client"},
        {"service": "mysql", "relation-name": "db", "role": "server"}]}
    tree = relation_path(relation.key)
    assert sorted(await env_client.get_children(tree)) == ["client", "server", "settings"]
    assert sorted(await env_client.get_children(f"{tree}/settings")) == ["mysql-0", "wordpress-0", "wordpress-1"]
    # A unit added later gets its settings node too.
    await ServiceStateManager(env_client).add_units("mysql", 1, to=0)
    assert "mysql-1" in await env_client.get_children(f"{tree}/settings")
    # The same pair again: refused, by either order and spelling.
    with pytest.raises(RelationExists, match=r"mysql:db and wordpress:db are already related \(db:1\)"):
        await manager.add_relation("mysql:db", "wordpress")
    # Ids keep counting.
    await _deploy(env_client, tmp_path, "other-db", MYSQL)
    await _deploy(env_client, tmp_path, "blog", "requires:\n  database: mysql\n")
    second, _, _ = await manager.add_relation("other-db", "blog:database")
    assert second.relation_id("blog") == "database:2" and second.relation_id("other-db") == "db:2"


@pytest_twisted.ensureDeferred
async def test_add_relation_refusals(env_client, tmp_path):
    await _deploy(env_client, tmp_path, "mysql", TWO_DBS)
    await _deploy(env_client, tmp_path, "wordpress", WORDPRESS)
    await _deploy(env_client, tmp_path, "cache", "provides:\n  cache: memcache\n")
    manager = RelationStateManager(env_client)
    with pytest.raises(ServiceNotFound):
        await manager.add_relation("wordpress", "nosuch")
    with pytest.raises(InvalidRelation, match=r"service mysql has no relation 'nope' \(relations: db, db-admin, juju-info\)"):
        await manager.add_relation("wordpress", "mysql:nope")
    with pytest.raises(InvalidRelation) as e:
        await manager.add_relation("wordpress", "mysql")
    assert "ambiguous relation between wordpress and mysql" in str(e.value)
    assert "wordpress:db mysql:db" in str(e.value) and "wordpress:db mysql:db-admin" in str(e.value)
    assert "SERVICE:RELATION" in str(e.value)
    with pytest.raises(InvalidRelation, match="no relation between mysql and cache: mysql has db .provides mysql."):
        await manager.add_relation("mysql", "cache")
    with pytest.raises(InvalidRelation, match="cannot be related to itself"):
        await manager.add_relation("wordpress", "wordpress")
    with pytest.raises(InvalidRelation, match="invalid relation name"):
        await manager.add_relation("wordpress:DB", "mysql")
    # Naming one side resolves the ambiguity; nothing was created by the refusals.
    before = len(await manager.get_all_relations())
    relation, _, _ = await manager.add_relation("wordpress", "mysql:db-admin")
    assert relation.endpoint("mysql")["relation-name"] == "db-admin"
    assert len(await manager.get_all_relations()) == before + 1
    cache, _, _ = await manager.add_relation("cache", "wordpress")
    assert cache.interface == "memcache"


@pytest_twisted.ensureDeferred
async def test_remove_relation(env_client, tmp_path):
    await _deploy(env_client, tmp_path, "mysql", TWO_DBS)
    await _deploy(env_client, tmp_path, "wordpress", "requires:\n  db: mysql\n  backup: mysql\n")
    manager = RelationStateManager(env_client)
    with pytest.raises(RelationNotFound, match="no relation between wordpress and mysql"):
        await manager.remove_relation("wordpress", "mysql")
    one, _, _ = await manager.add_relation("wordpress:db", "mysql:db")
    two, _, _ = await manager.add_relation("wordpress:backup", "mysql:db-admin")
    # A member joined (as a unit agent will): the tree goes anyway.
    await env_client.create(f"{relation_path(one.key)}/client/wordpress-0", b"", ephemeral=True)
    with pytest.raises(InvalidRelation, match="related more than once"):
        await manager.remove_relation("wordpress", "mysql")
    removed = await manager.remove_relation("mysql:db", "wordpress")
    assert removed.key == one.key
    assert await env_client.exists(relation_path(one.key)) is None
    assert await env_client.exists(relation_path(two.key)) is not None
    with pytest.raises(RelationNotFound):
        await manager.remove_relation("wordpress:db", "mysql")
    # The pair can be related again, with a new id.
    again, _, _ = await manager.add_relation("wordpress:db", "mysql:db")
    assert again.id > two.id


@pytest_twisted.ensureDeferred
async def test_peers_are_made_at_deploy_and_relations_go_with_destroy_service(env_client, tmp_path):
    await _deploy(env_client, tmp_path, "mysql", MYSQL)
    _, units = await _deploy(env_client, tmp_path, "wordpress", WORDPRESS, n=2)
    manager = RelationStateManager(env_client)
    [peer] = await manager.relations_of("wordpress")
    assert peer.endpoints == [{"service": "wordpress", "relation-name": "ring", "role": "peer"}]
    assert peer.interface == "wp-ring" and peer.relation_id("wordpress") == "ring:0"
    assert sorted(await env_client.get_children(relation_path(peer.key))) == ["peer", "settings"]
    assert sorted(await env_client.get_children(f"{relation_path(peer.key)}/settings")) == ["wordpress-0", "wordpress-1"]
    db, _, _ = await manager.add_relation("wordpress", "mysql")
    # Status shows both, as pyjuju's did.
    status = await collect(env_client)
    assert status["services"]["wordpress"]["relations"] == {"db": ["mysql"], "ring": ["wordpress"]}
    assert status["services"]["mysql"]["relations"] == {"db": ["wordpress"]}
    units_left = await ServiceStateManager(env_client).destroy_service("wordpress")
    assert units_left == units
    assert await manager.get_all_relations() == []
    assert await env_client.exists(relation_path(db.key)) is None
    status = await collect(env_client)
    assert "relations" not in status["services"]["mysql"]


async def _index(client, service):
    data, _ = await nodes.read(client, service_path(service))
    return data.get(RELATIONS_INDEX)


@pytest_twisted.ensureDeferred
async def test_each_service_indexes_its_relations_so_add_unit_reads_only_those(env_client, tmp_path, monkeypatch):
    await _deploy(env_client, tmp_path, "mysql", MYSQL)
    await _deploy(env_client, tmp_path, "wordpress", WORDPRESS)
    manager = RelationStateManager(env_client)
    assert await _index(env_client, "wordpress") == ["relation-0000000000"]   # its peer relation, at deploy
    assert await _index(env_client, "mysql") == []
    db, _, _ = await manager.add_relation("wordpress", "mysql")
    for i in range(3):  # other services' relations, which wordpress's add-unit has no business reading
        await _deploy(env_client, tmp_path, f"db{i}", MYSQL)
        await _deploy(env_client, tmp_path, f"blog{i}", "requires:\n  db: mysql\n")
        await manager.add_relation(f"db{i}", f"blog{i}")
    assert await _index(env_client, "wordpress") == ["relation-0000000000", db.key]
    assert await _index(env_client, "mysql") == [db.key]
    read = []
    get, get_children = env_client.get, env_client.get_children
    monkeypatch.setattr(env_client, "get", lambda path, *a, **k: read.append(path) or get(path, *a, **k))
    monkeypatch.setattr(env_client, "get_children",
                        lambda path, *a, **k: read.append(f"children of {path}") or get_children(path, *a, **k))
    [unit] = await ServiceStateManager(env_client).add_units("wordpress", 1, to=0)
    monkeypatch.undo()
    assert sorted(p for p in read if p.startswith(f"{nodes.RELATIONS}/relation-") and p.count("/") == 2) == [
        relation_path("relation-0000000000"), relation_path(db.key)]
    assert f"children of {nodes.RELATIONS}" not in read
    assert "wordpress-1" in await env_client.get_children(f"{relation_path(db.key)}/settings")
    # remove-relation takes it out of both; destroy-service out of the other side's.
    await manager.remove_relation("wordpress", "mysql")
    assert await _index(env_client, "wordpress") == ["relation-0000000000"]
    assert await _index(env_client, "mysql") == []
    await ServiceStateManager(env_client).destroy_service("blog0")
    assert await _index(env_client, "db0") == []


@pytest_twisted.ensureDeferred
async def test_a_service_deployed_before_the_index_still_finds_its_relations(env_client, tmp_path):
    await _deploy(env_client, tmp_path, "mysql", MYSQL)
    await _deploy(env_client, tmp_path, "wordpress", WORDPRESS)
    await _deploy(env_client, tmp_path, "cache", "provides:\n  cache: memcache\n")
    manager = RelationStateManager(env_client)
    db, _, _ = await manager.add_relation("wordpress", "mysql")
    for service in ("wordpress", "mysql"):  # as an environment made before the index left them
        data, version = await nodes.read(env_client, service_path(service))
        del data[RELATIONS_INDEX]
        await env_client.set(service_path(service), nodes.dump(data), version)
    assert [r.key for r in await manager.relations_of("mysql")] == [db.key]
    await ServiceStateManager(env_client).add_units("mysql", 1, to=0)
    assert "mysql-1" in await env_client.get_children(f"{relation_path(db.key)}/settings")
    # Its next relation writes the whole index, the older relations in it.
    cache, _, _ = await manager.add_relation("wordpress", "cache")
    assert await _index(env_client, "wordpress") == sorted(["relation-0000000000", db.key, cache.key])
    assert await _index(env_client, "mysql") is None


# -- the CLI -------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_cli_add_and_remove_relation(env_client, cli, tmp_path):
    for charm, extra in (("mysql", MYSQL), ("wordpress", "requires:\n  db: mysql\n")):
        result = cli("deploy", _charm(tmp_path, charm, extra), "--to", "0")
        assert result.returncode == 0, result.stderr
    result = cli("add-relation", "wordpress", "mysql")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "added relation db:0 between wordpress:db and mysql:db (interface mysql)\n"
    status = yaml.safe_load(cli("status").stdout)
    assert status["services"]["wordpress"]["relations"] == {"db": ["mysql"]}
    again = cli("add-relation", "mysql", "wordpress")
    assert again.returncode == 1 and again.stderr.startswith("error: ") and "already related" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1
    result = cli("remove-relation", "mysql", "wordpress:db")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "removed relation db:0 between wordpress:db and mysql:db\n"
    gone = cli("remove-relation", "mysql", "wordpress")
    assert gone.returncode == 1 and gone.stderr == "error: no relation between mysql and wordpress\n"
    bad = cli("add-relation", "wordpress", "nosuch")
    assert bad.returncode == 1 and bad.stderr == "error: service 'nosuch' not found\n"


# -- ACLs with real credentials ------------------------------------------------------


async def _connect(zk_server, zk_root, credential, admin_id=None, create_root=False, readers=()):
    client = ZKClient(zk_server.address, zk_root, session_timeout=SESSION_TIMEOUT, credential=credential,
                      readers=readers)
    client.default_acl = auth.default_acl(credential, admin_id or credential.id)
    return await client.connect(create_root=create_root)


@pytest_twisted.ensureDeferred
async def test_units_may_join_and_write_only_their_own_relation_nodes(zk_server, zk_root, tmp_path):
    admin = auth.new_admin()
    clients = []
    try:
        admin_client = await _connect(zk_server, zk_root, admin, create_root=True)
        clients.append(admin_client)
        await initialize(admin_client, "secured")
        await MachineStateManager(admin_client).add_machine(address="10.0.0.1")
        await MachineStateManager(admin_client).add_machine(address="10.0.0.2")
        await _deploy(admin_client, tmp_path, "mysql", MYSQL, to=0)
        await _deploy(admin_client, tmp_path, "wordpress", WORDPRESS, to=1)
        await _deploy(admin_client, tmp_path, "other", "requires:\n  db: mysql\n", to=0)
        relation, _, _ = await RelationStateManager(admin_client).add_relation("wordpress", "mysql")
        [peer] = [r for r in await RelationStateManager(admin_client).relations_of("wordpress") if r.key != relation.key]

        async def as_unit(machine, unit):
            c = await _connect(zk_server, zk_root, auth.unit_credential(auth.machine_credential(admin, machine), unit),
                               admin.id, readers=[auth.units_reader(auth.machines_reader(admin))])
            clients.append(c)
            return c

        tree = relation_path(relation.key)
        wp, db, other = await as_unit(1, "wordpress/0"), await as_unit(0, "mysql/0"), await as_unit(0, "other/0")
        # Each unit becomes the relation's reader (as its agent does when it joins)...
        for unit in (wp, db):
            await join_reader(unit, relation.key)
        # ...writes its own settings and joins in its own role.
        await wp.set(f"{tree}/settings/wordpress-0", nodes.dump({"private-address": "10.77.1.2"}))
        await db.set(f"{tree}/settings/mysql-0", nodes.dump({"private-address": "10.77.0.2", "password": "s3"}))
        await wp.create(f"{tree}/client/wordpress-0", b"", ephemeral=True)
        await db.create(f"{tree}/server/mysql-0", b"", ephemeral=True)
        # ...and reads the other side's settings (which may hold passwords).
        assert nodes.load((await wp.get(f"{tree}/settings/mysql-0"))[0], "x")["password"] == "s3"
        # Not the other unit's settings, not the other role, nothing new in settings/.
        with pytest.raises(NoAuth):
            await wp.set(f"{tree}/settings/mysql-0", nodes.dump({"private-address": "6.6.6.6"}))
        with pytest.raises(NoAuth):
            await wp.create(f"{tree}/server/wordpress-0", b"", ephemeral=True)
        with pytest.raises(NoAuth):
            await wp.create(f"{tree}/settings/wordpress-9", b"")
        with pytest.raises(NoAuth):
            await wp.delete(f"{tree}/server/mysql-0")
        with pytest.raises(NoAuth):
            await wp.set(tree, b"")
        # A unit of an unrelated service: no reader, no join, no write, no read of settings.
        with pytest.raises(NoAuth):
            await join_reader(other, relation.key)
        with pytest.raises(NoAuth):
            await other.create(f"{tree}/client/other-0", b"", ephemeral=True)
        with pytest.raises(NoAuth):
            await other.create(f"{tree}/server/other-0", b"", ephemeral=True)
        with pytest.raises(NoAuth):
            await other.set(f"{tree}/settings/mysql-0", b"")
        with pytest.raises(NoAuth):
            await other.get(f"{tree}/settings/mysql-0")
        with pytest.raises(NoAuth):
            await other.create(f"{relation_path(peer.key)}/peer/other-0", b"", ephemeral=True)
        # A unit added later may join and read at once; the peer relation is its too.
        # Nobody's settings node changes for it: they grant the relation's reader.
        acl = (await admin_client.get_acl(f"{tree}/settings/mysql-0"))[0]
        assert len(acl) == 3
        await ServiceStateManager(admin_client).add_units("wordpress", 1, to=0)
        assert (await admin_client.get_acl(f"{tree}/settings/mysql-0"))[0] == acl
        wp1 = await as_unit(0, "wordpress/1")
        await join_reader(wp1, relation.key)
        await wp1.set(f"{tree}/settings/wordpress-1", nodes.dump({"private-address": "10.77.0.3"}))
        await wp1.create(f"{tree}/client/wordpress-1", b"", ephemeral=True)
        assert b"s3" in (await wp1.get(f"{tree}/settings/mysql-0"))[0]
        await wp1.create(f"{relation_path(peer.key)}/peer/wordpress-1", b"", ephemeral=True)
        assert b"10.77.0.3" in (await db.get(f"{tree}/settings/wordpress-1"))[0]
        with pytest.raises(NoAuth):
            await wp1.set(f"{tree}/settings/wordpress-0", b"")
        # The admin removes the tree, members and all.
        await RelationStateManager(admin_client).remove_relation("wordpress", "mysql")
        assert await admin_client.exists(tree) is None
        with pytest.raises(NodeExists):
            await admin_client.create("/relations", b"")
    finally:
        for c in clients:
            await c.close()
