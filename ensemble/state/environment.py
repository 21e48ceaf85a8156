"""The environment node: its name and network settings, and the tree under it."""

from ensemble.errors import EnvironmentExists, EnvironmentNotInitialized
from ensemble.state import auth, nodes
from ensemble.state.client import NodeExists, NoNode

DEFAULT_NETWORK = {"cidr": "10.77.0.0/16", "host-prefix": 24, "mode": "host-gw"}
# Each machine's package cache for its units: on, fetching as the host's own apt does,
# unless an operator names another mirror or proxy, or turns it off.
DEFAULT_PACKAGE_CACHE = {"enabled": True, "mirror": None, "proxy": None}


async def initialize(client, name, network=None, units_zookeeper=None, package_cache=None):
    """Create the environment node and the empty tree in one transaction.
    `units_zookeeper`: HOST:PORT list units use, when it is not the agents'.
    `package_cache`: changes to DEFAULT_PACKAGE_CACHE."""
    settings = {
        "name": name, "network": dict(DEFAULT_NETWORK, **(network or {})),
        "package-cache": dict(DEFAULT_PACKAGE_CACHE, **(package_cache or {})),
    }
    if units_zookeeper:
        settings["units-zookeeper"] = units_zookeeper
    policy = auth.admin_policy(client)
    if client.credential is not None:
        # Agents name the admin in the ACLs of the nodes they create.
        settings["admin-id"] = client.credential.id
    if policy is not None:
        # ...and the machines, whose reader may read what every machine needs.
        settings["machines-id"] = policy.machines_id
        settings["acl-version"] = auth.ACL_VERSION
    tx = client.transaction()
    tx.create(nodes.ENVIRONMENT, nodes.dump(settings), acl=policy and policy.for_units())
    for path in nodes.TREE:
        acl = policy and (policy.for_units() if path == nodes.RELATIONS else policy.public())
        tx.create(path, nodes.dump({"next-id": 0}) if path == nodes.MACHINES else b"", acl=acl)
    try:
        await tx.commit()
    except NodeExists:
        raise EnvironmentExists(f"an environment already exists at {client.servers}{client.root}")
    if policy is not None:
        from ensemble.state.repair import close_server

        await close_server(client, policy)
    return settings


def package_cache_settings(environment):
    """The environment's package cache settings (an older environment has none: on)."""
    return dict(DEFAULT_PACKAGE_CACHE, **(environment.get("package-cache") or {}))


async def get_environment(client):
    try:
        settings, _ = await nodes.read(client, nodes.ENVIRONMENT)
    except NoNode:
        raise EnvironmentNotInitialized(client.servers, client.root)
    return settings
