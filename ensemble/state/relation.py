"""Relations between services, in ZooKeeper.

    /relations                               {next-id}: the relation counter
    /relations/relation-NNNNNNNNNN           {id, interface, scope, endpoints: [{service, relation-name, role}]}
    /relations/relation-N/reader             {credential}: the reader of its settings, for its units
    /relations/relation-N/settings           (empty)
    /relations/relation-N/settings/<unit>    the unit's relation settings (a YAML mapping)
    /relations/relation-N/<role>             (empty): server and client, or peer
    /relations/relation-N/<role>/<unit>      ephemeral: the unit has joined (its agent creates it)

A hook sees a relation as `<its relation name>:<id>` (e.g. `db:0`); ids come from the
counter and are never reused. Relation nodes are made by the admin (add-relation, and
deploy for a charm's peers) in one transaction with the counter bump, each unit's settings
node included: a unit may write only its own settings node, and read the settings of the
units it is related to (as the relation's reader, which its agent becomes when it joins);
it may create (not delete) members in its own role's container.
"""

import io
import zipfile

import yaml
from twisted.internet import defer

from ensemble.errors import (
    InvalidCharm,
    InvalidRelation,
    MalformedState,
    RelationExists,
    RelationNotFound,
    ServiceNotFound,
)
from ensemble.names import unit_key
from ensemble.relations import IMPLICIT, match, parse_descriptor, parse_endpoints, stored
from ensemble.state import auth, nodes, quota
from ensemble.state.client import BadVersion, NodeExists, NoNode, NotEmpty
from ensemble.state.nodes import service_path
from ensemble.state.unit import DYING, UnitStateManager, unit_path

SETTINGS = "settings"
# In a service node's data: the keys of the relations the service is in, so that
# add-unit and remove-relation read those, not every relation in the environment.
RELATIONS_INDEX = "relations"
ROLES = ("server", "client", "peer")


def relation_key(number):
    return f"relation-{int(number):010d}"


def relation_path(key):
    return f"{nodes.RELATIONS}/{key}"


def settings_path(key, unit_name):
    return f"{relation_path(key)}/{SETTINGS}/{unit_key(unit_name)}"


def role_path(key, role):
    return f"{relation_path(key)}/{role}"


class RelationState:
    def __init__(self, key, data):
        self.key = key
        self.data = data

    def __repr__(self):
        return f"<Relation {self.key} {self.describe()}>"

    @property
    def id(self):
        return self.data.get("id")

    @property
    def interface(self):
        return self.data.get("interface")

    @property
    def scope(self):
        return self.data.get("scope", "global")

    @property
    def endpoints(self):
        """[{service, relation-name, role}]: one entry for a peer relation, two otherwise."""
        return list(self.data.get("endpoints") or [])

    @property
    def services(self):
        return sorted({e["service"] for e in self.endpoints})

    def endpoint(self, service):
        for e in self.endpoints:
            if e["service"] == service:
                return e
        return None

    def relation_id(self, service):
        """What hooks of `service`'s units see as JUJU_RELATION_ID, e.g. 'db:0'."""
        return f"{self.endpoint(service)['relation-name']}:{self.id}"

    def remote_services(self, service):
        others = [e["service"] for e in self.endpoints if e["service"] != service]
        return others or [service]  # a peer relation's other side is the service itself

    def describe(self):
        return " ".join(f"{e['service']}:{e['relation-name']}" for e in self.endpoints)


def endpoints_from_bundle(charm_name, bundle):
    """A service's endpoints read from its charm bundle's metadata.yaml."""
    try:
        with zipfile.ZipFile(io.BytesIO(bundle)) as archive:
            metadata = yaml.safe_load(archive.read("metadata.yaml")) or {}
    except (zipfile.BadZipFile, KeyError, yaml.YAMLError):
        metadata = {}
    if not isinstance(metadata, dict):
        raise InvalidCharm(f"charm {charm_name}: metadata.yaml must be a YAML mapping")
    return parse_endpoints(charm_name, metadata)


def reader_path(key):
    """Where relation `key`'s units find the reader of its settings."""
    return f"{relation_path(key)}/{auth.READER}"


def _unit_id(admin, machine_id, unit_name):
    return auth.unit_credential(auth.machine_credential(admin, machine_id), unit_name)


async def join_reader(client, key):
    """Make a unit's session the reader of relation `key`'s settings. Nothing to do
    without a credential, or for a relation without a reader node (one made before
    there were readers: its units have grants of their own)."""
    if client.credential is None:
        return
    try:
        data, _ = await nodes.read(client, reader_path(key))
    except NoNode:
        return
    reader = auth.Credential.parse(str(data.get("credential", "")))
    if reader not in client.readers:
        await client.add_credential(reader)


class RelationAcls:
    """ACLs of relation `key`'s nodes, for the units {unit name: machine id} of its
    services."""

    def __init__(self, admin, units_by_service, key):
        self.admin = admin
        self.policy = auth.AdminPolicy(admin)
        self.units_by_service = units_by_service  # {service: {unit: machine}}
        self.reader = auth.relation_reader(admin, key)

    def _units(self, services):
        return [(u, m) for s in sorted(set(services)) for u, m in sorted(self.units_by_service.get(s, {}).items())]

    def _all(self):
        return self._units(self.units_by_service)

    def public(self):
        return self.policy.public()

    def relation(self):
        """The relation node: its units read it (which services, which roles)."""
        return [*self.public(), *(auth.digest(auth.READ, _unit_id(self.admin, m, u)) for u, m in self._all())]

    def role(self, services):
        """A role container: the relation's units list its members; units of the
        services in that role may create members."""
        creators = {u for u, _ in self._units(services)}
        return [*self.public(), *(
            auth.digest(auth.READ | auth.CREATE if u in creators else auth.READ, _unit_id(self.admin, m, u))
            for u, m in self._all()
        )]

    def reader_node(self):
        """The relation's reader node: its units read it; the machines do not (it reads
        settings, which carry passwords, like config)."""
        return [auth.digest(auth.ALL, self.admin.id), *(auth.digest(auth.READ, _unit_id(self.admin, m, u))
                                                        for u, m in self._all())]

    def settings(self, unit, machine, services, own_grants=False):
        """A unit's settings: its own to rewrite; readable by the relation's reader.
        `own_grants`: also by each other unit of the relation's services as itself (an
        environment repaired from before readers: its agents may not have one)."""
        own = _unit_id(self.admin, machine, unit)
        readers = [_unit_id(self.admin, m, u) for u, m in self._units(services) if u != unit] if own_grants else []
        return [auth.digest(auth.ALL, self.admin.id), auth.digest(auth.SETTINGS_OWN, own),
                auth.digest(auth.READ, self.reader), *(auth.digest(auth.READ, r) for r in readers)]


def _roles(data):
    """{role: [services in it]} of relation `data`."""
    roles = {}
    for e in data["endpoints"]:
        roles.setdefault(e["role"], []).append(e["service"])
    return roles


def _relation_ops(tx, key, data, units_by_service, policy):
    """Create a relation's node tree in `tx`; `policy`: the admin's AdminPolicy or None."""
    acls = RelationAcls(policy.admin, units_by_service, key) if policy is not None else None
    services = [e["service"] for e in data["endpoints"]]
    tx.create(relation_path(key), nodes.dump(data), acl=acls and acls.relation())
    if acls is not None:
        tx.create(reader_path(key), nodes.dump({"credential": str(acls.reader)}), acl=acls.reader_node())
    tx.create(f"{relation_path(key)}/{SETTINGS}", b"", acl=acls and acls.public())
    for service in sorted(set(services)):
        for unit, machine in sorted(units_by_service.get(service, {}).items()):
            tx.create(settings_path(key, unit), b"", acl=acls and acls.settings(unit, machine, services))
    for role, in_role in sorted(_roles(data).items()):
        tx.create(role_path(key, role), b"", acl=acls and acls.role(in_role))


def _relation_quotas(key, data, units_by_service):
    """The quotas of what the relation's units write: their settings, and the role
    containers they join in (see ensemble/state/quota.py)."""
    limits = [quota.settings_limits(settings_path(key, u))
              for s in sorted({e["service"] for e in data["endpoints"]}) for u in units_by_service.get(s, {})]
    for role, in_role in _roles(data).items():
        members = sum(len(units_by_service.get(s, {})) for s in set(in_role))
        limits.append(quota.role_limits(role_path(key, role), members))
    return limits


async def _prepare(client, policy, key, data, units_by_service):
    """Before the transaction that makes relation `key`: its quotas."""
    if policy is not None:
        await quota.ensure_all(client, _relation_quotas(key, data, units_by_service), acl=policy.private())


def relation_data(number, a, b=None):
    """Node data of relation `number` between endpoints (service, name, endpoint)."""
    ends = [a] if b is None else [a, b]
    scope = "container" if any(e["scope"] == "container" for _, _, e in ends) else "global"
    return {
        "id": number,
        "interface": a[2]["interface"],
        "scope": scope,
        "endpoints": [{"service": s, "relation-name": n, "role": e["role"]} for s, n, e in ends],
    }


async def ensure_root(client):
    """/relations, for an environment bootstrapped before relations existed."""
    if await client.exists(nodes.RELATIONS) is None:
        try:
            await client.create(nodes.RELATIONS, b"")
        except NodeExists:
            pass


async def counter(client):
    """(next relation id, version of /relations)."""
    await ensure_root(client)
    data, version = await nodes.read(client, nodes.RELATIONS)
    return int(data.get("next-id", 0)), version


def indexed(data, relations, add=None):
    """A service node's `data` with its index of relations: the keys of `relations`
    (those found in it now), and `add`."""
    keys = {r.key for r in relations} | ({add} if add else set())
    return {**data, RELATIONS_INDEX: sorted(keys)}


async def peer_ops(client, tx, service, endpoints, placements, first_id, policy):
    """Deploy's part: a peer relation per `peers:` endpoint (their quotas made now);
    returns how many ids it used."""
    number = first_id
    for name, endpoint in sorted(endpoints.items()):
        if endpoint["role"] != "peer":
            continue
        data = relation_data(number, (service, name, endpoint))
        await _prepare(client, policy, relation_key(number), data, {service: dict(placements)})
        _relation_ops(tx, relation_key(number), data, {service: dict(placements)}, policy)
        number += 1
    return number - first_id


async def _delete_tree_ops(client, tx, path):
    for child in sorted(await client.get_children(path)):
        await _delete_tree_ops(client, tx, f"{path}/{child}")
    tx.delete(path)


class RelationStateManager:
    def __init__(self, client):
        self.client = client

    async def get_all_relations(self):
        try:
            keys = sorted(await self.client.get_children(nodes.RELATIONS))
        except NoNode:
            return []
        return await self._read_relations(keys)

    async def _read_relations(self, keys):
        """The relations of `keys` that exist, read in parallel."""
        results = await defer.DeferredList(
            [defer.ensureDeferred(nodes.read(self.client, relation_path(k))) for k in keys],
            consumeErrors=True,
        )
        relations = []
        for key, (ok, value) in zip(keys, results):
            if ok:
                relations.append(RelationState(key, value[0]))
            elif not value.check(NoNode, MalformedState):
                value.raiseException()
        return relations

    async def relations_of(self, service, data=None):
        """The relations `service` is in: those its node's index lists (`data`: the
        node's data, if read already). A service without an index (deployed before
        there was one, and related to nothing since) has every relation read to find
        its own; a key left by a relation another service's destroy removed is
        skipped."""
        if data is None:
            try:
                data, _ = await nodes.read(self.client, service_path(service))
            except NoNode:
                data = {}
        keys = data.get(RELATIONS_INDEX)
        found = await self._read_relations(sorted(keys)) if keys is not None else await self.get_all_relations()
        return [r for r in found if service in r.services]

    async def _service(self, name):
        """(service data, version, endpoints, {unit: machine})."""
        try:
            data, version = await nodes.read(self.client, service_path(name))
        except NoNode:
            raise ServiceNotFound(name)
        endpoints = data.get("endpoints")
        if endpoints is None:
            # Deployed before services kept their endpoints: only the implicit one is known.
            endpoints = stored(IMPLICIT)
        return data, version, endpoints, (await self._units([name]))[name]

    async def _units(self, services):
        """{service: {unit: machine}} for each of `services`: its units that have a
        machine. One listing of the units, and their nodes read at once."""
        services = set(services)
        names = sorted(n for n in await UnitStateManager(self.client).unit_names()
                       if n.rpartition("/")[0] in services)
        results = await defer.DeferredList(
            [defer.ensureDeferred(nodes.read(self.client, unit_path(n))) for n in names], consumeErrors=True)
        units = {s: {} for s in services}
        for name, (ok, value) in zip(names, results):
            if not ok:
                if value.check(NoNode, MalformedState):
                    continue
                value.raiseException()
            machine = value[0].get("machine")
            if machine is not None:
                units[name.rpartition("/")[0]][name] = machine
        return units

    async def add_relation(self, a, b):
        """Relate descriptors `a` and `b` ('service' or 'service:relation'); returns
        (RelationState, (endpoint of a), (endpoint of b)) with endpoints as
        (service, relation name, {interface, role, scope})."""
        da, db = parse_descriptor(a), parse_descriptor(b)
        while True:
            sa, va, ea, ua = await self._service(da[0])
            sb, vb, eb, ub = await self._service(db[0])
            for name, data in ((da[0], sa), (db[0], sb)):
                if data.get("life") == DYING:
                    raise InvalidRelation(f"service {name!r} is being destroyed")
            end_a, end_b = match(da, ea, db, eb)
            wanted = {(s, n) for s, n, _ in (end_a, end_b)}
            of_a, of_b = await self.relations_of(da[0], sa), await self.relations_of(db[0], sb)
            for existing in of_a:
                if {(e["service"], e["relation-name"]) for e in existing.endpoints} == wanted:
                    raise RelationExists(
                        f"{end_a[0]}:{end_a[1]} and {end_b[0]}:{end_b[1]} are already related "
                        f"({existing.relation_id(end_a[0])})"
                    )
            number, version = await counter(self.client)
            data = relation_data(number, end_a, end_b)
            tx = self.client.transaction()
            tx.set(nodes.RELATIONS, nodes.dump({"next-id": number + 1}), version)
            # Each service's index gets the new relation (and loses keys of relations
            # gone meanwhile), at the version read: units added meanwhile bump it, and
            # would miss their settings.
            key = relation_key(number)
            tx.set(service_path(da[0]), nodes.dump(indexed(sa, of_a, add=key)), va)
            tx.set(service_path(db[0]), nodes.dump(indexed(sb, of_b, add=key)), vb)
            policy = auth.admin_policy(self.client)
            await _prepare(self.client, policy, relation_key(number), data, {da[0]: ua, db[0]: ub})
            _relation_ops(tx, relation_key(number), data, {da[0]: ua, db[0]: ub}, policy)
            try:
                await tx.commit()
            except (BadVersion, NodeExists):
                continue
            except NoNode:
                continue  # a service went meanwhile: the next round says so
            return RelationState(relation_key(number), data), end_a, end_b

    async def find(self, a, b):
        """The one relation between descriptors `a` and `b`; RelationNotFound or
        InvalidRelation (ambiguous) otherwise."""
        (sa, ra), (sb, rb) = parse_descriptor(a), parse_descriptor(b)
        if sa == sb:
            raise InvalidRelation(f"a service is not related to itself ({sa}); its peer relations go with the service")
        data_a = (await self._service(sa))[0]
        await self._service(sb)  # ServiceNotFound
        found = []
        for relation in await self.relations_of(sa, data_a):
            ea, eb = relation.endpoint(sa), relation.endpoint(sb)
            if ea is None or eb is None:
                continue
            if (ra is None or ea["relation-name"] == ra) and (rb is None or eb["relation-name"] == rb):
                found.append(relation)
        label_a, label_b = (f"{sa}:{ra}" if ra else sa), (f"{sb}:{rb}" if rb else sb)
        if not found:
            raise RelationNotFound(f"no relation between {label_a} and {label_b}")
        if len(found) > 1:
            options = ", ".join(r.describe() for r in found)
            raise InvalidRelation(
                f"ambiguous: {label_a} and {label_b} are related more than once ({options}); "
                f"name one as SERVICE:RELATION"
            )
        return found[0]

    async def remove_relation(self, a, b):
        """Remove the relation between `a` and `b` and its whole node tree, atomically.

        What the units' agents will see (the next slice wires this): the relation node
        and their membership and settings nodes vanish together (a data watch on the
        relation node fires NodeDeleted; children watches on the role containers fire
        too). Each unit then runs `<rel>-relation-departed` for every remote unit it had
        joined, then `<rel>-relation-broken`, from its own persisted membership, since
        the remote settings are gone. A unit whose ephemeral member node is recreated in
        the meantime gets NoNode: the relation is gone."""
        relation = await self.find(a, b)
        await self.delete(relation.key)
        await self.unindex([relation])
        return relation

    async def unindex(self, relations, skip=None):
        """Take `relations` (removed) out of their services' indexes, but `skip`'s."""
        for relation in relations:
            for service in sorted(set(relation.services) - {skip}):
                await self._unindex(service, relation.key)

    async def _unindex(self, service, key):
        # A service gone, or without an index, has nothing to take out.
        while True:
            try:
                data, version = await nodes.read(self.client, service_path(service))
            except NoNode:
                return
            if key not in (data.get(RELATIONS_INDEX) or ()):
                return
            try:
                await self.client.set(service_path(service), nodes.dump(
                    {**data, RELATIONS_INDEX: sorted(set(data[RELATIONS_INDEX]) - {key})}), version)
                return
            except BadVersion:
                continue
            except NoNode:
                return

    async def delete(self, key):
        while True:
            tx = self.client.transaction()
            try:
                await _delete_tree_ops(self.client, tx, relation_path(key))
            except NoNode:
                break  # gone already
            try:
                await tx.commit()
                break
            except (NotEmpty, NoNode):
                continue  # a unit joined or a node went meanwhile: read the tree again
        await self.forget_quotas([key])

    async def forget_quotas(self, keys):
        """Drop the quotas of relations that are gone (numbers are never reused)."""
        if auth.admin_policy(self.client) is not None:
            for key in keys:
                await quota.forget(self.client, relation_path(key))

    async def delete_ops(self, tx, service, data=None):
        """destroy-service's part: delete in `tx` every relation `service` (`data`: its
        node's) is in; returns them (for `forget_quotas` and `unindex` once `tx` is
        committed)."""
        gone = []
        for relation in await self.relations_of(service, data):
            try:
                await _delete_tree_ops(self.client, tx, relation_path(relation.key))
            except NoNode:
                continue
            gone.append(relation)
        return gone

    async def units_added_ops(self, tx, service, placements, data=None):
        """add-unit's part: grant the new units {unit: machine} their place in each
        relation of `service` (`data`: its node's, read already) and size its quotas
        for them (before `tx`), and create their settings nodes in `tx`. The caller
        checks the service's version and /relations' in `tx` too (see `counter`)."""
        policy = auth.admin_policy(self.client)
        relations = await self.relations_of(service, data)
        # Every related service's units at once: a listing of the environment's units
        # and a read per unit cost as much for one service as for all.
        known = await self._units({e["service"] for r in relations for e in r.endpoints}) if relations else {}
        for relation in relations:
            services = [e["service"] for e in relation.endpoints]
            units = {s: known[s] for s in set(services)}
            units[service] = {**units.get(service, {}), **placements}
            acls = RelationAcls(policy.admin, units, relation.key) if policy is not None else None
            if acls is not None:
                await self._grant_new_units(relation, service, placements, policy)
                await quota.ensure_all(
                    self.client, [q for q in _relation_quotas(relation.key, relation.data, units)
                                  if not q[0].startswith(f"{relation_path(relation.key)}/{SETTINGS}/")
                                  or q[0] in {settings_path(relation.key, u) for u in placements}],
                    acl=policy.private())
            for unit, machine in sorted(placements.items()):
                tx.create(settings_path(relation.key, unit), b"",
                          acl=acls and acls.settings(unit, machine, services))

    async def _grant_new_units(self, relation, service, placements, policy):
        """New units of `service` read `relation`'s node, its role containers and its
        reader (so the settings there), and create members in their own role's
        container."""
        ids = [_unit_id(policy.admin, m, u) for u, m in sorted(placements.items())]
        readers = [auth.digest(auth.READ, i) for i in ids]
        mine = relation.endpoint(service)["role"]
        changes = {relation_path(relation.key): readers, reader_path(relation.key): readers}
        for role in sorted({e["role"] for e in relation.endpoints}):
            perms = auth.READ | auth.CREATE if role == mine else auth.READ
            changes[role_path(relation.key, role)] = [auth.digest(perms, i) for i in ids]
        # (A relation removed meanwhile: the caller's check of /relations' version sees it.)
        await auth.change_acls(self.client, changes, skip_missing=True)
