"""The admin closes the server and puts every node's ACL and quota where the policy
(ensemble/state/auth.py) says: once when it creates an environment (`close_server`),
and in an environment made by an older version on its next connection (`upgrade`)."""

import logging

from ensemble.errors import MalformedState
from ensemble.names import machine_key, unit_name_from_key
from ensemble.state import auth, nodes, quota
from ensemble.state.client import BadVersion, NoAuth, NodeExists, NoNode

log = logging.getLogger("ensemble.zookeeper")

ZOOKEEPER = "/zookeeper"
# A quota set this recently may be for a node an admin is about to make.
QUOTA_GRACE = 600.0


async def close_server(client, policy):
    """The environment's root and what is above it, and the server's own `/zookeeper`,
    for the admin alone (nobody else needs them). A parent that also holds others' nodes
    (a ZooKeeper shared with other environments or users) is left as it is: closing it
    would lock them out; whoever runs that ZooKeeper closes it. Safe to repeat."""
    outside = await client.outside()
    private = policy.private()
    # The quotas of this environment's units and relations, below which each gets its own.
    for path in (nodes.UNITS, nodes.RELATIONS):
        await quota.make_path(outside, quota.quota_path(client, path), private)
    root = client.root or "/"
    await _close(outside, root, private)
    parts = client.root.strip("/").split("/") if client.root else []
    for depth in range(len(parts)):
        ancestor = "/" + "/".join(parts[:depth])
        ours = {parts[depth]} | ({ZOOKEEPER.strip("/")} if ancestor == "/" else set())
        try:
            children = set(await outside.get_children(ancestor))
        except NoAuth:
            continue  # another admin's already
        if children <= ours:
            await _close(outside, ancestor, private)
        else:
            log.warning("%s on %s holds other nodes than this environment's (%s): left open to others",
                        ancestor, client.servers, ", ".join(sorted(children - ours)[:5]))
    if parts == [] or await _acl(outside, "/") == sorted(private):
        # The server is this environment's: its quotas are the admin's alone too.
        for path in (ZOOKEEPER, quota.QUOTA_ROOT):
            await _close(outside, path, private)


async def _acl(client, path):
    try:
        return sorted((await client.get_acl(path))[0])
    except NoAuth:
        return None


async def _close(client, path, acl):
    try:
        grants, _ = await client.get_acl(path)
        if sorted(grants) != sorted(acl):
            await client.set_acl(path, acl)
    except NoAuth:
        log.warning("%s on %s belongs to another admin: left as it is", path, client.servers)


async def upgrade(client):
    """Repair an environment whose ACLs are older than this version's (`acl-version`),
    as its admin; True if it did. Agents started before it keep their sessions: a
    machine agent joins the machines' reader as soon as its reader node appears."""
    policy = auth.admin_policy(client)
    if policy is None:
        return False
    try:
        settings, _ = await nodes.read(client, nodes.ENVIRONMENT)
    except (NoNode, NoAuth, MalformedState):
        return False  # no environment (the command says so), or not this admin's
    if settings.get("admin-id") != policy.admin_id or settings.get("acl-version", 1) >= auth.ACL_VERSION:
        return False
    log.info("environment at %s%s: putting ACLs and quotas right", client.servers, client.root)
    # Agents read `machines-id` when they start: first, so nothing made meanwhile misses it.
    await nodes.update(client, nodes.ENVIRONMENT, nodes.merge({"machines-id": policy.machines_id}))
    await repair(client, policy)
    await nodes.update(client, nodes.ENVIRONMENT, nodes.merge({"acl-version": auth.ACL_VERSION}))
    return True


async def repair(client, policy):
    """Every node's ACL and every unit-writable subtree's quota as a new environment's
    would be. Readers' grants come before world READ goes, so nothing that may read
    loses it on the way."""
    from ensemble.state.relation import RelationStateManager, ensure_root, _relation_quotas, _roles
    from ensemble.state.service import ServiceStateManager, config_path, charm_path
    from ensemble.state.unit import UnitStateManager, unit_path

    await close_server(client, policy)
    await ensure_root(client)
    machines = sorted(await _children(client, nodes.MACHINES))
    machine_ids = {}
    for key in machines:
        try:
            machine_ids[key] = int(key.rpartition("-")[2])
        except ValueError:
            continue
    # Each machine's reader first: its running agent joins the machines' reader at once.
    from ensemble.state.machine import reader_data

    for machine_id in machine_ids.values():
        if await client.exists(auth.reader_path(machine_id)) is None:
            try:
                await client.create(auth.reader_path(machine_id), reader_data(policy),
                                    acl=policy.machine_reader(machine_id))
            except NoNode:
                continue  # removed meanwhile
        else:
            await _set(client, auth.reader_path(machine_id), policy.machine_reader(machine_id))
    placements = {u.name: u.machine_id for u in await UnitStateManager(client).get_all_units()
                  if isinstance(u.machine_id, int)}
    by_service = {}
    for unit, machine_id in placements.items():
        by_service.setdefault(unit.rpartition("/")[0], {})[unit] = machine_id

    # The environment's shared nodes. Each unit there now gets a grant of its own too:
    # its agent may have started before there was a units' reader to hand it (and keeps
    # its run file until its container is made again).
    for path in (nodes.ENVIRONMENT, nodes.RELATIONS):
        await _set(client, path, [*policy.for_units(), *(auth.digest(auth.READ, u) for u in policy.units(placements))])
    for path in (nodes.MACHINES, nodes.NETWORK, nodes.ADDRESSES):
        await _set(client, path, policy.public())
    for path, perms in auth.MACHINE_PARENT_GRANTS.items():
        await _set(client, path, [*policy.public(), *(auth.digest(perms, policy.machine(m))
                                                      for m in sorted(machine_ids.values()))])

    # Machines, their assignments, presence and address reservations.
    for key, machine_id in sorted(machine_ids.items()):
        path = f"{nodes.MACHINES}/{key}"
        own = policy.machine_node(machine_id)
        await _set(client, path, own)
        await _set(client, f"{path}/agent", own)
        await _set(client, f"{path}/units", policy.public())
        for assignment in await _children(client, f"{path}/units"):
            await _set(client, f"{path}/units/{assignment}", policy.public())
        await _set_tree(client, f"{nodes.ADDRESSES}/{machine_key(machine_id)}", own)
    for lease in await _children(client, nodes.SUBNETS):
        path = f"{nodes.SUBNETS}/{lease}"
        try:
            owner = (await nodes.read(client, path))[0].get("machine")
        except (NoNode, MalformedState):
            owner = None
        await _set(client, path, policy.machine_node(owner) if isinstance(owner, int) else policy.public())

    # Services, their config and charms.
    charms = {}
    for service in await ServiceStateManager(client).get_all_services():
        mine = by_service.get(service.name, {})
        await _set(client, service.path, policy.service_node(mine))
        await _set(client, config_path(service.name), policy.service_config(mine))
        if service.charm_id:
            charms.setdefault(service.charm_id, {}).update(mine)
    for charm in await _children(client, nodes.CHARMS):
        await _set(client, charm_path(charm), policy.service_node(charms.get(charm, {})))
        await _set(client, f"{charm_path(charm)}/{auth.GUARD}", policy.public())

    # Units, their guards and presence.
    for unit, machine_id in sorted(placements.items()):
        path = unit_path(unit)
        await _set(client, path, policy.unit_node(machine_id, unit))
        await _set(client, f"{path}/{auth.GUARD}", policy.public())
        agent = [*policy.public(), auth.digest(auth.OWN, policy.unit(machine_id, unit))]
        for child in await _children(client, path):
            if child != auth.GUARD:
                await _set(client, f"{path}/{child}", agent)
    limits = [quota.unit_limits(unit_path(u)) for u in placements]
    # Nodes whose data cannot be read as a unit's (so no unit to grant): closed to units.
    known = {unit_path(u).rpartition("/")[2] for u in placements}
    for key in await _children(client, nodes.UNITS):
        if key not in known:
            await _set_tree(client, f"{nodes.UNITS}/{key}", policy.public())

    # Relations: each one's units, settings, roles and members.
    relations = await RelationStateManager(client).get_all_relations()
    readable = set()
    for relation in relations:
        try:
            services = [e["service"] for e in relation.endpoints]
            roles = _roles(relation.data)
        except (KeyError, TypeError, AttributeError):
            continue  # malformed endpoints: closed to units below
        readable.add(relation.key)
        units = {s: by_service.get(s, {}) for s in set(services)}
        await _repair_relation(client, policy, relation.key, services, roles, units)
        limits += _relation_quotas(relation.key, relation.data, units)
    for key in await _children(client, nodes.RELATIONS):
        if key not in readable:
            await _set_tree(client, f"{nodes.RELATIONS}/{key}", policy.public())
    await quota.ensure_all(client, limits, acl=policy.private())
    await quota.prune(client, nodes.UNITS, await client.get_children(nodes.UNITS), QUOTA_GRACE)
    await quota.prune(client, nodes.RELATIONS, [r.key for r in relations], QUOTA_GRACE)


async def _repair_relation(client, policy, key, services, roles, units):
    from ensemble.state.relation import RelationAcls, reader_path

    acls = RelationAcls(policy.admin, units, key)
    base = f"{nodes.RELATIONS}/{key}"
    await _set(client, base, acls.relation())
    try:
        await client.create(reader_path(key), nodes.dump({"credential": str(acls.reader)}), acl=acls.reader_node())
    except NodeExists:
        await _set(client, reader_path(key), acls.reader_node())
    except NoNode:
        return  # removed meanwhile
    await _set(client, f"{base}/settings", acls.public())
    everyone = {u: m for s in units.values() for u, m in s.items()}
    for child in await _children(client, f"{base}/settings"):
        unit = _unit(child)
        # Grants of their own too: the units' agents may have started before readers.
        acl = acls.settings(unit, everyone[unit], services, own_grants=True) if unit in everyone else policy.private()
        await _set(client, f"{base}/settings/{child}", acl)
    for role, in_role in roles.items():
        await _set(client, f"{base}/{role}", acls.role(in_role))
        for child in await _children(client, f"{base}/{role}"):
            unit = _unit(child)
            member = [*policy.public()]
            if unit in everyone:
                member.append(auth.digest(auth.OWN, policy.unit(everyone[unit], unit)))
            await _set(client, f"{base}/{role}/{child}", member)


def _unit(key):
    try:
        return unit_name_from_key(key)
    except Exception:
        return None


async def _children(client, path):
    try:
        return await client.get_children(path)
    except NoNode:
        return []


async def _set(client, path, acl):
    """`path`'s ACL made `acl` (a node gone meanwhile is no error)."""
    wanted = auth.merged(acl)
    while True:
        try:
            grants, version = await client.get_acl(path)
            if sorted(grants) != sorted(wanted):
                await client.set_acl(path, wanted, version)
            return
        except NoNode:
            return
        except BadVersion:
            continue  # changed meanwhile (an add-unit's grant, say): what we set says it all


async def _set_tree(client, path, acl):
    await _set(client, path, acl)
    for child in await _children(client, path):
        await _set_tree(client, f"{path}/{child}", acl)
