"""Size quotas on what units may write, as ZooKeeper enforces them.

The server runs with `zookeeper.enforceQuota=true` (ensemble/zookeeper.py): a write
that would take a subtree with a quota past its hard limits fails (QuotaExceeded), the
admin's and agents' writes as much as the unit's. A quota is two nodes under
`/zookeeper/quota/<the subtree's full path>/`: `zookeeper_limits`, which the admin
writes, and `zookeeper_stats`, which the server keeps. Only the deepest quota above a
node counts for it, so the units' quotas sit below anything else's.

What a unit may write, and so what has a quota (made before the node exists, so the
node never exists without one):
- its unit node and what it makes below it (its presence): UNIT_BYTES of data in at
  most UNIT_NODES nodes (the node, its guard, its presence);
- its settings in each relation: SETTINGS_BYTES, no node below;
- the role containers of its relations, where it creates its member node: no data at
  all, and one node per unit that may join there.

ZooKeeper counts data, not names: a node's name can be as long as a request
(jute.maxbuffer, 1 MiB), so what a unit can store in names is bounded by the node
counts above, not by bytes.
"""

import time

from twisted.internet import defer

from ensemble.state.client import BadVersion, NodeExists, NoNode

QUOTA_ROOT = "/zookeeper/quota"
LIMITS, STATS = "zookeeper_limits", "zookeeper_stats"
# A unit node holds a few short fields (state, addresses, opened ports, the tail of a
# failed hook's output); its presence node about 100 bytes.
UNIT_BYTES = 64 * 1024
UNIT_NODES = 3
# Relation settings: what charms pass each other (addresses, passwords, a certificate).
SETTINGS_BYTES = 64 * 1024
# Members of a role container are empty: only their number needs a limit.
MEMBER_BYTES = 0


def quota_path(client, path):
    """Where the quota of `path` (relative to `client`'s root) lives on the server."""
    return f"{QUOTA_ROOT}{client.root}{path}"


def limits_text(byte_limit=-1, count_limit=-1):
    """A `zookeeper_limits` value with hard limits only (-1: none). Count and bytes come
    first, and the spurious '=' after them, for the parsers of ZooKeeper before 3.7."""
    return f"count=-1,bytes=-1=;byteHardLimit={byte_limit};countHardLimit={count_limit}".encode()


def parse_limits(data):
    """{name: value} of a limits or stats node's text."""
    fields = {}
    for pair in data.decode(errors="replace").replace(";", ",").split(","):
        key, _, value = pair.partition("=")
        value = value.rstrip("=")
        if key and value.lstrip("-").isdigit():
            fields[key] = int(value)
    return fields


async def ensure(client, path, byte_limit=-1, count_limit=-1, at_least=False, acl=None):
    """Give `path` (relative to the admin `client`'s root; it need not exist yet) hard
    limits. `at_least`: never lower a count limit that is already higher (two admins
    sizing one role container each for its own units). Safe to repeat."""
    outside = await client.outside()
    base = quota_path(client, path)
    wanted = limits_text(byte_limit, count_limit)
    # A new quota (the usual case) in one write: its node, limits and stats. The server
    # counts what is there when the stats node is made, and keeps the count after.
    tx = outside.transaction()
    tx.create(base, b"", acl=acl)
    tx.create(f"{base}/{LIMITS}", wanted, acl=acl)
    tx.create(f"{base}/{STATS}", b"count=0,bytes=0", acl=acl)
    try:
        await tx.commit()
        return
    except NoNode:
        await make_path(outside, base.rpartition("/")[0], acl)
        return await ensure(client, path, byte_limit, count_limit, at_least, acl)
    except NodeExists:
        pass
    while True:
        try:
            data, stat = await outside.get(f"{base}/{LIMITS}")
        except NoNode:
            try:
                await outside.create(f"{base}/{LIMITS}", wanted, acl=acl)
            except NodeExists:
                continue
            break
        if at_least and parse_limits(data).get("countHardLimit", -1) >= count_limit >= 0:
            wanted = limits_text(byte_limit, parse_limits(data)["countHardLimit"])
        if data == wanted:
            break
        try:
            await outside.set(f"{base}/{LIMITS}", wanted, stat.version)
            break
        except BadVersion:
            continue
    try:
        await outside.create(f"{base}/{STATS}", b"count=0,bytes=0", acl=acl)
    except NodeExists:
        pass


async def make_path(outside, path, acl):
    """`path` and its missing parents, each with `acl` (one request when the parent is there)."""
    try:
        await outside.create(path, b"", acl=acl)
    except NodeExists:
        pass
    except NoNode:
        await make_path(outside, path.rpartition("/")[0], acl)
        await make_path(outside, path, acl)


async def ensure_all(client, limits, acl=None):
    """`ensure` for each (path, byte limit, count limit, at_least), in parallel; the
    first failure is raised as itself."""
    try:
        await defer.gatherResults(
            [defer.ensureDeferred(ensure(client, p, b, c, a, acl)) for p, b, c, a in limits], consumeErrors=True,
        )
    except defer.FirstError as e:
        e.subFailure.raiseException()


def unit_limits(unit_path):
    return (unit_path, UNIT_BYTES, UNIT_NODES, False)


def settings_limits(settings_path):
    return (settings_path, SETTINGS_BYTES, 1, False)


def role_limits(role_path, members):
    """The container and one member per unit that may join it."""
    return (role_path, MEMBER_BYTES, 1 + members, True)


async def _quota_node(client, path, name):
    outside = await client.outside()
    try:
        data, _ = await outside.get(f"{quota_path(client, path)}/{name}")
    except NoNode:
        return None
    return parse_limits(data)


async def limits_of(client, path):
    """{byteHardLimit, countHardLimit, ...} of `path`'s quota, or None."""
    return await _quota_node(client, path, LIMITS)


async def usage(client, path):
    """{count, bytes} the server counts for `path`'s quota, or None."""
    return await _quota_node(client, path, STATS)


async def forget(client, path):
    """Drop the quotas of `path` and everything below it (the nodes are gone)."""
    outside = await client.outside()
    await outside.delete_tree(quota_path(client, path))


async def prune(client, parent, existing, older_than):
    """Drop the quotas of `parent`'s children not in `existing` (names of the nodes
    there now) whose limits nobody set for `older_than` seconds (one set that recently
    may be for a node an admin is about to make)."""
    outside = await client.outside()
    base = quota_path(client, parent)
    try:
        names = await outside.get_children(base)
    except NoNode:
        return []
    now = time.time()  # the server's clock stamps mtime: hosts' clocks agree to well within this
    dropped = []
    for name in sorted(set(names) - set(existing)):
        stats = [await outside.exists(f"{base}/{name}"), await outside.exists(f"{base}/{name}/{LIMITS}")]
        if any(s is not None and now - max(s.ctime, s.mtime) < older_than for s in stats):
            continue
        await outside.delete_tree(f"{base}/{name}")
        dropped.append(name)
    return dropped
