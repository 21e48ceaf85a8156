"""Services: /services/<name> holds the charm id, limits, life, the unit counter and
`exposed: true` while it is exposed; its child `config` the config, which only the
service's machines and units may read. Adding units creates the unit nodes and their
machine assignments in the same transaction as the counter bump, so a unit is never
half-made or half-assigned."""

from twisted.internet import defer

from ensemble.errors import (
    MachineNotFound,
    MalformedState,
    NoMachines,
    ServiceDying,
    ServiceExists,
    ServiceNotFound,
)
from ensemble.names import machine_key, unit_name
from ensemble.relations import stored
from ensemble.state import auth, nodes, quota, relation
from ensemble.state.nodes import service_path
from ensemble.state.client import BadVersion, NodeExists, NoNode, NotEmpty
from ensemble.state.machine import MachineStateManager
from ensemble.state.unit import ALIVE, DYING, PENDING, UnitStateManager, assignment_path, unit_path


# The service node's field naming the charm directory it was deployed from (on the host
# that deployed it): where `upgrade-charm` without --path reads the charm again.
CHARM_DIR = "charm-dir"


def config_path(name):
    return f"{service_path(name)}/config"


def charm_path(charm_id):
    return f"{nodes.CHARMS}/{charm_id}"


class ServiceState:
    def __init__(self, client, name, data):
        self.client = client
        self.name = name
        self.data = data

    def __repr__(self):
        return f"<Service {self.name}>"

    @property
    def path(self):
        return service_path(self.name)

    @property
    def charm_id(self):
        return self.data.get("charm")

    async def get_config(self):
        try:
            data, _ = await nodes.read(self.client, config_path(self.name))
        except NoNode:
            return self.data.get("config") or {}  # stored before config had its own node
        return data.get("config") or {}

    @property
    def limits(self):
        return self.data.get("limits") or {}

    @property
    def life(self):
        return self.data.get("life", ALIVE)

    @property
    def exposed(self):
        """Whether the ports its units opened are reachable from anywhere."""
        return self.data.get("exposed") is True

    async def unit_names(self):
        return [n for n in await UnitStateManager(self.client).unit_names() if n.rpartition("/")[0] == self.name]

    async def charm_bundle(self):
        data, _ = await self.client.get(charm_path(self.charm_id))
        return data


def place(counts, n, to=None):
    """Machines for `n` new units: all on `to`, or each on the machine with fewest units."""
    if to is not None:
        if to not in counts:
            raise MachineNotFound(to)
        return [to] * n
    if not counts:
        raise NoMachines()
    counts = dict(counts)
    chosen = []
    for _ in range(n):
        machine = min(counts, key=lambda m: (counts[m], m))
        counts[machine] += 1
        chosen.append(machine)
    return chosen


def _unit_data(service, machine_id):
    return {"service": service, "machine": machine_id, "life": ALIVE, "state": PENDING}


def _placements(service, first_number, machines):
    """{unit name: machine id} of the units about to be added."""
    return {unit_name(service, first_number + i): m for i, m in enumerate(machines)}


async def prepare_units(client, policy, placements):
    """What units {name: machine id} need before the transaction that makes them (so
    that they never exist without it): the list of relations, and their nodes' quotas.
    A transaction that then fails leaves quotas that later rounds drop, or the same
    units' retry reuses. (Every unit reads `/environment` and `/relations` as the units'
    reader: nothing to grant there per unit.)"""
    await relation.ensure_root(client)
    await quota.ensure_all(client, [quota.unit_limits(unit_path(u)) for u in placements], acl=policy.private())


# Gone units' quotas are pruned once they outnumber the units by this much: until then
# an add-unit costs two reads, not a listing of every unit and every quota.
PRUNE_AFTER = 64


async def prune_unit_quotas(client, units=None):
    """Forget the quotas of units that are gone (their machines removed them), once
    there are PRUNE_AFTER more quotas than units. `units`: /units' Stat, if read."""
    from ensemble.state.repair import QUOTA_GRACE

    units = units or await client.exists(nodes.UNITS)
    quotas = await (await client.outside()).exists(quota.quota_path(client, nodes.UNITS))
    if units is None or quotas is None or quotas.num_children < units.num_children + PRUNE_AFTER:
        return []
    return await quota.prune(client, nodes.UNITS, await client.get_children(nodes.UNITS), QUOTA_GRACE)


async def _grant_service(client, policy, name, charm_id, placements, drop=True, gone=True):
    """Let the new units and their machines read the config, the units their service and
    charm, and the machines remove the service and its charm when done: before the units
    exist, and again after without `drop` (a read, unless another admin's drop ran
    between). `drop` with `gone`: the grants of units gone meanwhile go."""
    if drop:
        await prepare_units(client, policy, placements)
    # Missing: a new charm (created with these grants), or config in the service node.
    await auth.change_acls(client, {service_path(name): policy.service_node(placements),
                                    charm_path(charm_id): policy.service_node(placements),
                                    config_path(name): policy.service_config(placements)},
                           drop_gone_units=drop and gone, skip_missing=True)


# On a service node: /units' [cversion, children] read before its ACLs last lost the
# grants of gone units. While no unit was removed anywhere since, none of its grants
# can be of a gone unit, and an add-unit need not list every unit of the environment
# to find them (7-9 ms at 10,000 units; docs/benchmarks.md).
UNITS_SEEN = "units-seen"


def units_seen(units):
    """The service node's UNITS_SEEN field for /units' Stat `units` ({} if unread)."""
    return {UNITS_SEEN: [units.cversion, units.num_children]} if units is not None else {}


def units_removed_since(seen, units):
    """Whether a unit may have left /units between `seen` (UNITS_SEEN) and its Stat
    `units`: each child created moves cversion and the count up by one, each removed
    moves cversion up and the count down, so any removal parts the two."""
    if units is None or not (isinstance(seen, list) and len(seen) == 2 and all(type(v) is int for v in seen)):
        return True
    return units.cversion - seen[0] != units.num_children - seen[1]


async def _store_charm(client, tx, charm_id, bundle, policy, placements):
    """Add to `tx` the charm's node, readable by the units {name: machine id} and their
    machines; one stored already (the same bytes) gets their grants now instead."""
    if await client.exists(charm_path(charm_id)) is None:
        tx.create(charm_path(charm_id), bundle, acl=policy and policy.service_node(placements))
        if policy is not None:
            tx.create(f"{charm_path(charm_id)}/{auth.GUARD}", b"", acl=policy.public())
    elif policy is not None:
        await auth.change_grants(client, charm_path(charm_id), add=policy.service_node(placements))


def _add_unit_ops(tx, service, first_number, machines, policy=None):
    names = []
    for offset, machine_id in enumerate(machines):
        name = unit_name(service, first_number + offset)
        tx.create(unit_path(name), nodes.dump(_unit_data(service, machine_id)),
                  acl=policy and policy.unit_node(machine_id, name))
        if policy is not None:
            tx.create(f"{unit_path(name)}/{auth.GUARD}", b"", acl=policy.public())
        tx.create(assignment_path(machine_id, name), b"")
        names.append(name)
    return names


class ServiceStateManager:
    def __init__(self, client):
        self.client = client

    async def _placements(self, n, to):
        if to is not None:
            # One read, not one per machine: placing on a named machine is how an
            # operator adds units to a big environment.
            if await self.client.exists(f"{nodes.MACHINES}/{machine_key(to)}/units") is None:
                raise MachineNotFound(to)
            return [to] * n
        return place(await MachineStateManager(self.client).unit_counts(), n)

    async def deploy(self, name, charm_bundle_id, bundle, config, limits, n=1, to=None, _retry=0, endpoints=None,
                     charm_dir=None):
        """Create the service (storing its charm if new) with `n` units, and a peer
        relation per `peers:` entry of its charm, atomically. `endpoints`: the charm's
        (Charm.endpoints); read from the bundle's metadata.yaml if not given.
        `charm_dir`: the directory it came from, which upgrade-charm reads again."""
        if endpoints is None:
            endpoints = relation.endpoints_from_bundle(charm_bundle_id.rpartition("-")[0], bundle)
        machines = await self._placements(n, to)
        if await self.client.exists(service_path(name)) is not None:
            service = await self.get_service(name)
            raise ServiceDying(name) if service.life == DYING else ServiceExists(name)
        if await ServiceState(self.client, name, {}).unit_names():
            # Units of an earlier service of this name are still being removed.
            raise ServiceDying(name)
        data = {
            "charm": charm_bundle_id,
            "limits": limits,
            "life": ALIVE,
            "unit-sequence": n,
            "endpoints": stored(endpoints),
        }
        if charm_dir:
            data[CHARM_DIR] = charm_dir
        policy = auth.admin_policy(self.client)
        placements = _placements(name, 0, machines)
        if policy is not None:
            await prune_unit_quotas(self.client)
            await prepare_units(self.client, policy, placements)
            # No `units-seen` yet: a charm stored already may hold the grants of another
            # service's gone units, which the first add-unit's listing drops.
        tx = self.client.transaction()
        data[relation.RELATIONS_INDEX] = []
        if any(e["role"] == "peer" for e in endpoints.values()):
            first_id, relations_version = await relation.counter(self.client)
            used = await relation.peer_ops(self.client, tx, name, endpoints, placements, first_id, policy)
            tx.set(nodes.RELATIONS, nodes.dump({"next-id": first_id + used}), relations_version)
            data[relation.RELATIONS_INDEX] = [relation.relation_key(first_id + i) for i in range(used)]
        await _store_charm(self.client, tx, charm_bundle_id, bundle, policy, placements)
        tx.create(service_path(name), nodes.dump(data), acl=policy and policy.service_node(placements))
        tx.create(config_path(name), nodes.dump({"config": config}), acl=policy and policy.service_config(placements))
        names = _add_unit_ops(tx, name, 0, machines, policy)
        try:
            await tx.commit()
        except NodeExists:
            if await self.client.exists(service_path(name)) is not None:
                service = await self.get_service(name)
                raise ServiceDying(name) if service.life == DYING else ServiceExists(name)
            for unit in names:
                if await self.client.exists(unit_path(unit)) is not None:
                    # Units of an earlier service of this name are still being removed.
                    raise ServiceDying(name)
            if _retry >= 3:
                raise
            # Another deploy stored the same charm first; ours is identical.
            return await self.deploy(name, charm_bundle_id, bundle, config, limits, n, to, _retry + 1, endpoints,
                                     charm_dir)
        except BadVersion:
            # Another relation took the id we meant for a peer relation.
            return await self.deploy(name, charm_bundle_id, bundle, config, limits, n, to, _retry, endpoints,
                                     charm_dir)
        except NoNode:
            raise MachineNotFound(to if to is not None else machines[0])
        return ServiceState(self.client, name, data), names

    async def add_units(self, name, n=1, to=None):
        """Add `n` units of a service; returns their names."""
        machines = await self._placements(n, to)
        units = None
        if auth.admin_policy(self.client) is not None:
            # Read before any listing of the units below, so that a removal after it is
            # seen by the next add-unit, never lost.
            units = await self.client.exists(nodes.UNITS)
            await prune_unit_quotas(self.client, units)
        while True:
            data, version = await self._read_alive(name)
            first = int(data.get("unit-sequence", 0))
            policy = auth.admin_policy(self.client)
            if policy is not None:
                await _grant_service(self.client, policy, name, data.get("charm"), _placements(name, first, machines),
                                     gone=units_removed_since(data.get(UNITS_SEEN), units))
                # The grant moved the ACL version, not the data version: `version` holds.
            tx = self.client.transaction()
            tx.set(service_path(name), nodes.dump({**data, "unit-sequence": first + n, **units_seen(units)}), version)
            names = _add_unit_ops(tx, name, first, machines, policy)
            # Their settings nodes in the service's relations; a relation added meanwhile
            # moves /relations' version, so this round is retried and sees it.
            _, relations_version = await relation.counter(self.client)
            tx.check(nodes.RELATIONS, relations_version)
            await relation.RelationStateManager(self.client).units_added_ops(
                tx, name, _placements(name, first, machines), data)
            try:
                await tx.commit()
            except BadVersion:
                continue
            except NoNode:
                if any([await self.client.exists(f"{nodes.MACHINES}/{machine_key(m)}") is None for m in set(machines)]):
                    raise MachineNotFound(to if to is not None else machines[0])
                continue  # a relation went meanwhile
            except NodeExists:
                raise ServiceDying(name)
            if policy is not None:
                await _grant_service(self.client, policy, name, data.get("charm"),
                                     _placements(name, first, machines), drop=False)
            return names

    async def update_config(self, name, values, reset=()):
        """Set options `values` ({key: typed value}) and drop `reset` (back to their
        defaults) in the service's config, in one write; returns the config before and
        after. Every unit runs config-changed for a write that changed something."""
        await self._read_alive(name)
        path = config_path(name)
        while True:
            try:
                data, version = await nodes.read(self.client, path)
            except NoNode:
                raise ServiceNotFound(name)
            before = dict(data.get("config") or {})
            after = {k: v for k, v in {**before, **values}.items() if k not in reset}
            if after == before:
                return before, after
            try:
                await self.client.set(path, nodes.dump({**data, "config": after}), version)
                return before, after
            except BadVersion:
                continue
            except NoNode:
                raise ServiceNotFound(name)

    async def upgrade_charm(self, name, charm_bundle_id, bundle, endpoints, charm_dir=None):
        """Move the service to another charm (its units run upgrade-charm, then
        config-changed); returns the id of the charm it had. The caller checked that the
        charm keeps every relation the service is in."""
        policy = auth.admin_policy(self.client)
        while True:
            data, version = await self._read_alive(name)
            old = data.get("charm")
            if old == charm_bundle_id:
                return old
            placements = {}
            if policy is not None:
                for unit in await ServiceState(self.client, name, data).unit_names():
                    try:
                        unit_data, _ = await nodes.read(self.client, unit_path(unit))
                    except NoNode:
                        continue
                    if unit_data.get("machine") is not None:
                        placements[unit] = unit_data["machine"]
            tx = self.client.transaction()
            await _store_charm(self.client, tx, charm_bundle_id, bundle, policy, placements)
            changed = {**data, "charm": charm_bundle_id, "endpoints": stored(endpoints)}
            if charm_dir:
                changed[CHARM_DIR] = charm_dir
            tx.set(service_path(name), nodes.dump(changed), version)
            try:
                await tx.commit()
            except (BadVersion, NodeExists):
                continue  # the service changed (a unit added: it needs the grant too), or the charm was stored
            except NoNode:
                raise ServiceNotFound(name)
            await self._remove_charm_if_unused(old)
            return old

    async def set_exposed(self, name, exposed):
        """Expose the service (or stop); returns whether it was exposed before."""
        while True:
            data, version = await self._read_alive(name)
            before = data.get("exposed") is True
            if before == bool(exposed):
                return before
            changed = {k: v for k, v in data.items() if k != "exposed"}
            if exposed:
                changed["exposed"] = True
            try:
                await self.client.set(service_path(name), nodes.dump(changed), version)
                return before
            except BadVersion:
                continue
            except NoNode:
                raise ServiceNotFound(name)

    async def _read_alive(self, name):
        """(data, version) of a service that exists and is not being destroyed."""
        try:
            data, version = await nodes.read(self.client, service_path(name))
        except NoNode:
            raise ServiceNotFound(name)
        if data.get("life") == DYING:
            raise ServiceDying(name)
        return data, version

    async def get_service(self, name):
        try:
            data, _ = await nodes.read(self.client, service_path(name))
        except NoNode:
            raise ServiceNotFound(name)
        return ServiceState(self.client, name, data)

    async def get_all_services(self):
        names = sorted(await self.client.get_children(nodes.SERVICES))
        results = await defer.DeferredList(
            [defer.ensureDeferred(self.get_service(n)) for n in names], consumeErrors=True
        )
        services = []
        for name, (ok, value) in zip(names, results):
            if ok:
                services.append(value)
            elif value.check(MalformedState):
                services.append(ServiceState(self.client, name, {"malformed": str(value.value)}))
        return services

    async def destroy_service(self, name):
        """Mark the service and its units dying and unassign every unit, atomically.

        Machine agents tear the units down; the last unit's removal removes the
        service. A service without units goes at once."""
        while True:
            try:
                data, version = await nodes.read(self.client, service_path(name))
            except NoNode:
                raise ServiceNotFound(name)
            service = ServiceState(self.client, name, data)
            tx = self.client.transaction()
            units = []
            for unit in await service.unit_names():
                try:
                    unit_data, unit_version = await nodes.read(self.client, unit_path(unit))
                except NoNode:
                    continue
                except MalformedState:
                    # Unreadable, so it cannot be marked; it still keeps the service alive.
                    units.append(unit)
                    continue
                units.append(unit)
                if unit_data.get("life") != DYING:
                    tx.set(unit_path(unit), nodes.dump({**unit_data, "life": DYING}), unit_version)
                if unit_data.get("machine") is not None:
                    assignment = assignment_path(unit_data["machine"], unit)
                    if await self.client.exists(assignment) is not None:
                        tx.delete(assignment)
            # Its relations go now, in the same transaction (the units' agents see them go).
            relations = relation.RelationStateManager(self.client)
            gone = await relations.delete_ops(tx, name, data)
            if units:
                tx.set(service_path(name), nodes.dump({**data, "life": DYING, relation.RELATIONS_INDEX: []}), version)
            else:
                if await self.client.exists(config_path(name)) is not None:
                    tx.delete(config_path(name))
                tx.delete(service_path(name), version)
            try:
                await tx.commit()
            except (BadVersion, NoNode, NotEmpty):
                continue
            await relations.forget_quotas([r.key for r in gone])
            await relations.unindex(gone, skip=name)
            if not units:
                await self._remove_charm_if_unused(service.charm_id)
            return units

    async def remove_service_if_done(self, name):
        """Remove a dying service's node once no unit of it is left; True if removed."""
        try:
            service = await self.get_service(name)
        except ServiceNotFound:
            return True
        if service.life != DYING or await service.unit_names():
            return False
        await self.client.delete_tree(service.path)  # with its config
        await self._remove_charm_if_unused(service.charm_id)
        return True

    async def _remove_charm_if_unused(self, charm_id):
        if not charm_id:
            return
        for other in await self.get_all_services():
            if other.charm_id == charm_id:
                return
        await self.client.delete_tree(charm_path(charm_id))  # with its guard
