"""Who may do what in ZooKeeper: digest credentials and the ACLs built from them.

The environment has one admin credential (random, kept by whoever created it; the CLI
uses it). Every other credential is derived from it: machine N's from the admin's, each
unit's from its machine's; the shared readers (the machines', the units', each
relation's) likewise, handed to their holders by a node or by the machine agent. A
machine agent can thus hand its units their credentials, and the admin can name any
agent in an ACL before the agent exists.

Nothing is granted to a session without a credential: each principal reads what it
needs and no more (docs/zookeeper-layout.md, "Who may do what", has the table; the
server's own nodes are closed by ensemble/state/repair.py, quotas in quota.py).

Grants are (permissions, scheme, id) triples; client.py turns them into kazoo's ACLs.
"""

import base64
import dataclasses
import hashlib
import hmac
import re
import secrets

from ensemble.errors import InvalidValue
from ensemble.names import machine_key, unit_key

READ, WRITE, CREATE, DELETE, ADMIN = 1, 2, 4, 8, 16
ALL = READ | WRITE | CREATE | DELETE | ADMIN
# What an agent gets on the nodes it creates: everything but changing who else may.
OWN = READ | WRITE | CREATE | DELETE
# A unit on its own node: no DELETE. ZooKeeper checks a delete against the parent's
# ACL, so DELETE here would let the unit delete its guard; nothing of the unit's needs
# it (its presence node is ephemeral and goes with its session).
UNIT_OWN = READ | WRITE | CREATE
# A unit on its settings in a relation: it rewrites them, and makes nothing below.
SETTINGS_OWN = READ | WRITE

ADMIN_USER = "admin"
# Every machine agent is also this reader: one grant lets all machines read what each
# needs of the whole environment (every unit for names and the firewall, services,
# relations, leases, other machines' addresses), and a machine added later reads it
# too without a grant on every node. Its secret is derived from the admin's and waits
# for each machine in that machine's reader node (`reader_path`).
MACHINES_USER = "machines"
READER = "reader"
# Every unit agent is also this reader, for what all units read (`/environment`,
# `/relations`): one grant there, not one per unit, which made each add-unit rewrite two
# ACLs as long as the environment. Derived from the machines' reader, so each machine
# agent hands it to its units; machines read all it may anyway.
UNITS_USER = "units"
# What `/environment` says of its ACLs (`acl-version`): older ones are repaired by the
# admin's next connection (ensemble/state/repair.py).
ACL_VERSION = 4
_USER_RE = re.compile(r"^[a-z][a-z0-9-]{0,80}$")
_SECRET_RE = re.compile(r"^[A-Za-z0-9_-]{16,128}$")


@dataclasses.dataclass(frozen=True)
class Credential:
    user: str
    secret: str

    def __post_init__(self):
        if not _USER_RE.match(self.user) or not _SECRET_RE.match(self.secret):
            raise InvalidValue("invalid ZooKeeper credential: expected USER:SECRET")

    def __str__(self):
        return f"{self.user}:{self.secret}"

    def __repr__(self):
        return f"Credential({self.user!r}, <secret>)"  # never the secret, even in logs

    @classmethod
    def parse(cls, text):
        user, colon, secret = (text or "").strip().partition(":")
        if not colon:
            raise InvalidValue("invalid ZooKeeper credential: expected USER:SECRET")
        return cls(user, secret)

    @property
    def id(self):
        """The digest id ZooKeeper compares ACLs with: user:base64(sha1(user:secret))."""
        digest = hashlib.sha1(str(self).encode()).digest()
        return f"{self.user}:{base64.b64encode(digest).decode()}"

    def derive(self, user):
        """The credential `user` gets from this one (HMAC: it reveals nothing of ours)."""
        mac = hmac.new(self.secret.encode(), user.encode(), hashlib.sha256).digest()
        return Credential(user, base64.urlsafe_b64encode(mac).decode().rstrip("=")[:32])


def new_admin():
    return Credential(ADMIN_USER, secrets.token_urlsafe(24))


def admin_of(config):
    """The admin credential kept in a local environment's config, or None."""
    secret = config.get("admin-secret")
    return Credential(ADMIN_USER, secret) if secret else None


def machine_credential(admin, machine_id):
    return admin.derive(f"machine-{int(machine_id)}")


def unit_credential(machine, unit_name):
    return machine.derive(f"unit-{unit_key(unit_name)}")


def machines_reader(admin):
    return admin.derive(MACHINES_USER)


def units_reader(machines):
    """The units' reader, from the machines' reader credential."""
    return machines.derive(UNITS_USER)


def relation_reader(admin, relation_key):
    """The reader of a relation's settings (its units are; not its machines): one grant
    on each settings node, not one per unit of the relation, which made each add-unit
    rewrite every settings node's ACL and the ACLs quadratic in the relation's units.
    Its units find it in the relation's reader node."""
    return admin.derive(relation_key)


def units_reader_of(client):
    """The units' reader a machine agent's session can hand its units, or None (it has
    not joined the machines' reader)."""
    machines = next((c for c in client.readers if c.user == MACHINES_USER), None)
    return units_reader(machines) if machines else None


def machine_id_of(credential):
    """N for machine N's credential, else None."""
    prefix, _, number = credential.user.partition("-")
    return int(number) if prefix == "machine" and number.isdigit() else None


def reader_path(machine_id):
    """Where machine N finds the machines' reader credential (only it and the admin may read)."""
    return f"/machines/{machine_key(machine_id)}/{READER}"


def digest(perms, identity):
    """A grant to a credential, or to a digest id (user:hash) such as the admin's."""
    return (perms, "digest", identity.id if isinstance(identity, Credential) else identity)


WORLD_READ = (READ, "world", "anyone")


def merged(grants):
    """`grants` with one entry per identity, its permissions the union of its entries
    (ZooKeeper would take either; one entry each keeps ACLs short and comparable)."""
    perms = {}
    for p, scheme, identity in grants:
        perms[(scheme, identity)] = perms.get((scheme, identity), 0) | p
    return [(p, scheme, identity) for (scheme, identity), p in perms.items()]


def default_acl(credential, admin_id, machines_id=None):
    """What a node created with `credential` gets unless its creator says otherwise: the
    admin everything, the machines READ (`machines_id`: their reader's digest id; the
    admin derives it), its creator all but ADMIN. Nobody else anything."""
    if machines_id is None and credential.id == admin_id:
        machines_id = machines_reader(credential).id
    grants = [digest(ALL, admin_id)]
    if machines_id:
        grants.append(digest(READ, machines_id))
    if credential.id != admin_id:
        grants.append(digest(OWN, credential))
    return grants


def environment_acl(admin_id, machines_id=None):
    """The admin's nodes every machine may read (the tree's parents, machines, assignments)."""
    return [digest(ALL, admin_id), *([digest(READ, machines_id)] if machines_id else [])]


def private_acl(admin_id, *readers):
    """Nodes with secrets in them (a service's config): the admin and `readers`."""
    return [digest(ALL, admin_id), *(digest(READ, r) for r in readers)]


class AdminPolicy:
    """The ACLs the admin gives the nodes it creates (None where the environment is
    open: see `admin_policy`). docs/zookeeper-layout.md has them as a table."""

    def __init__(self, admin):
        self.admin = admin
        self.admin_id = admin.id
        self.machines_id = machines_reader(admin).id
        self.units_id = units_reader(machines_reader(admin)).id

    def machine(self, machine_id):
        return machine_credential(self.admin, machine_id)

    def unit(self, machine_id, unit_name):
        return unit_credential(self.machine(machine_id), unit_name)

    def units(self, placements):
        """The credentials of units {name: machine id}, in name order."""
        return [self.unit(m, u) for u, m in sorted(placements.items())]

    def private(self):
        """The admin alone: `/`, `/zookeeper`, the root, quotas."""
        return [digest(ALL, self.admin_id)]

    def public(self):
        return environment_acl(self.admin_id, self.machines_id)

    def for_units(self):
        """`/environment` and `/relations`: every unit reads the first (the environment's
        public settings, the admin's id) and lists the second (its relations)."""
        return [*self.public(), digest(READ, self.units_id)]

    def machine_node(self, machine_id):
        """A machine's node and its address tree: that machine's agent writes them."""
        return [*self.public(), digest(OWN, self.machine(machine_id))]

    def machine_reader(self, machine_id):
        """Machine N's reader node: the machines' reader secret, for machine N alone."""
        return [*self.private(), digest(READ, self.machine(machine_id))]

    def unit_node(self, machine_id, unit_name):
        """The machine agent sets a unit's address and state; the unit agent its own
        state and ports, and makes its presence below."""
        return [*self.public(), digest(OWN, self.machine(machine_id)), digest(UNIT_OWN, self.unit(machine_id, unit_name))]

    def service_node(self, placements):
        """Also a charm's. Its units read it (their charm, their service). DELETE: the
        agent that removes a dying service's last unit removes the service (its config
        first) and perhaps its charm (its guard first)."""
        return [
            *self.public(),
            *(digest(DELETE, self.machine(m)) for m in sorted(set(placements.values()))),
            *(digest(READ, u) for u in self.units(placements)),
        ]

    def service_config(self, placements):
        """Readable by the machines and units of the service only: config holds secrets."""
        readers = [self.machine(m) for m in sorted(set(placements.values()))]
        readers += self.units(placements)
        return private_acl(self.admin_id, *readers)


def admin_policy(client):
    """An AdminPolicy if `client` is the admin of an environment with credentials."""
    credential = client.credential
    if credential is None or credential.user != ADMIN_USER:
        return None
    return AdminPolicy(credential)


# What a machine may do on the tree's shared parents: remove the units, services and
# charms it finishes (ZooKeeper checks a delete against the parent), lease a subnet.
MACHINE_PARENT_GRANTS = {"/units": DELETE, "/services": DELETE, "/charms": DELETE, "/network/subnets": CREATE}
# That parent grant would let any machine delete any childless unit or charm. So each
# gets a child only the admin may make: deleting it, and so the node, takes DELETE on
# the node itself, which only the machines that run (or ran) it have (and not the
# unit: see UNIT_OWN). Services already have one (`config`).
GUARD = "guard"


async def join(client):
    """Make an agent's session what its credential entitles it to: a machine also
    authenticates as the machines' reader (from its reader node; in an environment made
    before there was one, as soon as the admin makes it), and every session names the
    admin and the machines in the ACLs of the nodes it creates. Nothing to do for an
    anonymous session, or in an environment without credentials (its nodes stay open)."""
    from ensemble.state import nodes
    from ensemble.state.client import NoNode

    credential = client.credential
    if credential is None:
        return
    machine_id = machine_id_of(credential)
    if machine_id is not None:
        await _join_machines(client, reader_path(machine_id))
    try:
        settings, _ = await nodes.read(client, nodes.ENVIRONMENT)
    except NoNode:
        return
    if settings.get("admin-id"):
        client.default_acl = default_acl(credential, settings["admin-id"], settings.get("machines-id"))


async def _join_machines(client, path):
    from ensemble.state import nodes
    from ensemble.state.watch import DataWatch

    joined = []

    async def found(value):
        if value is None or joined:
            return
        reader = Credential.parse(str(nodes.load(value[0], path).get("credential", "")))
        await client.add_credential(reader)
        joined.append(reader)
        if watch is not None:
            watch.stop()

    watch = None
    watch = await DataWatch(client, path, found).start()
    if joined:
        watch.stop()


async def change_grants(client, path, add=(), remove_ids=()):
    """Add grants to (an identity already there gets the union), or drop every grant
    of the ids in `remove_ids` from, `path`'s ACL: `change_acls` for one node."""
    await change_acls(client, {path: add}, remove_ids)


async def change_acls(client, changes, remove_ids=(), drop_gone_units=False, skip_missing=False):
    """For each node of `changes` ({path: grants}) add the grants (an identity already
    there gets the union) and drop every grant of the ids in `remove_ids`; each set at
    the ACL version read, so concurrent changes are not lost. `drop_gone_units`: also
    drop the grants of units that no longer exist (their machines removed them), so that
    a service's ACLs stay as long as its units are many, not as every unit it ever had.
    The units are listed once, after every ACL is read: a unit added meanwhile (whose
    admin grants it again once it exists) makes that node's round start over and keeps
    it. `skip_missing`: leave out nodes that do not exist, rather than raise NoNode."""
    from ensemble.state import nodes
    from ensemble.state.client import BadVersion, NoNode

    pending = dict(changes)
    while pending:
        read = {}
        for path in list(pending):
            try:
                read[path] = await client.get_acl(path)
            except NoNode:
                if not skip_missing:
                    raise
                del pending[path]
        live = {f"unit-{key}" for key in await client.get_children(nodes.UNITS)} if drop_gone_units and read else None
        for path, (grants, version) in read.items():
            add = pending[path]
            kept = [g for g in grants if g[2] not in remove_ids]
            if live is not None:
                added = {g[2] for g in add}
                kept = [g for g in kept if not (g[1] == "digest" and g[2].startswith("unit-") and g[2] not in added
                                                and g[2].partition(":")[0] not in live)]
            wanted = merged(kept + list(add))
            try:
                if sorted(wanted) != sorted(grants):
                    # (Each set is a write to ZooKeeper's log: 25 ms for an ACL of 1000 grants.)
                    await client.set_acl(path, wanted, version)
                del pending[path]
            except BadVersion:
                continue
            except NoNode:
                if not skip_missing:
                    raise
                del pending[path]
