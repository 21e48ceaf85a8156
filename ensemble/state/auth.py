"""Who may do what in ZooKeeper: digest credentials and the ACLs built from them.

The environment has one admin credential (random, kept by whoever created it; the CLI
uses it). Every other credential is derived from it, so nothing else need be stored:
machine N's is derived from the admin's, and each unit's from its machine's. A machine
agent can thus hand its units their credentials, and the admin can name any agent in
an ACL before the agent exists.

Grants are (permissions, scheme, id) triples; client.py turns them into kazoo's ACLs.
"""

import base64
import dataclasses
import hashlib
import hmac
import re
import secrets

from ensemble.errors import InvalidValue
from ensemble.names import unit_key

READ, WRITE, CREATE, DELETE, ADMIN = 1, 2, 4, 8, 16
ALL = READ | WRITE | CREATE | DELETE | ADMIN
# What an agent gets on its own nodes: everything but changing who else may.
OWN = READ | WRITE | CREATE | DELETE

ADMIN_USER = "admin"
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


def digest(perms, identity):
    """A grant to a credential, or to a digest id (user:hash) such as the admin's."""
    return (perms, "digest", identity.id if isinstance(identity, Credential) else identity)


WORLD_READ = (READ, "world", "anyone")


def default_acl(credential, admin_id):
    """What a node created with `credential` gets unless its creator says otherwise:
    the admin everything, its creator all but ADMIN, everyone else READ."""
    grants = [digest(ALL, admin_id), WORLD_READ]
    if credential.id != admin_id:
        grants.append(digest(OWN, credential))
    return grants


def environment_acl(admin_id):
    """The admin's nodes everyone may read (the tree's parents, machines, assignments)."""
    return [digest(ALL, admin_id), WORLD_READ]


def private_acl(admin_id, *readers):
    """Nodes with secrets in them (a service's config): the admin and `readers`."""
    return [digest(ALL, admin_id), *(digest(READ, r) for r in readers)]


class AdminPolicy:
    """The ACLs the admin gives the nodes it creates (None where the environment is
    open: see `admin_policy`)."""

    def __init__(self, admin):
        self.admin = admin
        self.admin_id = admin.id

    def machine(self, machine_id):
        return machine_credential(self.admin, machine_id)

    def unit(self, machine_id, unit_name):
        return unit_credential(self.machine(machine_id), unit_name)

    def public(self):
        return environment_acl(self.admin_id)

    def machine_node(self, machine_id):
        """A machine's node and its address tree: that machine's agent writes them."""
        return [*self.public(), digest(OWN, self.machine(machine_id))]

    def unit_node(self, machine_id, unit_name):
        """The machine agent sets a unit's address and state; the unit agent its own
        state and ports, and its presence below."""
        return [*self.public(), digest(OWN, self.machine(machine_id)), digest(OWN, self.unit(machine_id, unit_name))]

    def service_node(self, placements):
        """Also a charm's. DELETE: the agent that removes a dying service's last unit
        removes the service (its config first) and perhaps its charm (its guard first)."""
        return [*self.public(), *(digest(DELETE, self.machine(m)) for m in sorted(set(placements.values())))]

    def service_config(self, placements):
        """Readable by the machines and units of the service only: config holds secrets."""
        readers = [self.machine(m) for m in sorted(set(placements.values()))]
        readers += [self.unit(m, u) for u, m in sorted(placements.items())]
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
# the node itself, which only the machines that run (or ran) it have. Services already
# have one (`config`).
GUARD = "guard"


async def change_grants(client, path, add=(), remove_ids=()):
    """Add grants to, or drop every grant of the ids in `remove_ids` from, `path`'s
    ACL; version-checked, so concurrent changes are not lost."""
    from ensemble.state.client import BadVersion

    while True:
        grants, version = await client.get_acl(path)
        kept = [g for g in grants if g[2] not in remove_ids]
        wanted = kept + [g for g in add if g not in kept]
        if wanted == grants:
            return
        try:
            await client.set_acl(path, wanted, version)
            return
        except BadVersion:
            continue
