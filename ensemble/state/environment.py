"""The environment node: its name and network settings, and the tree under it."""

from ensemble.errors import EnvironmentExists, EnvironmentNotInitialized
from ensemble.state import nodes
from ensemble.state.client import NodeExists, NoNode

DEFAULT_NETWORK = {"cidr": "10.77.0.0/16", "host-prefix": 24, "mode": "host-gw"}


async def initialize(client, name, network=None, units_zookeeper=None):
    """Create the environment node and the empty tree in one transaction.
    `units_zookeeper`: HOST:PORT list units use, when it is not the agents'."""
    settings = {"name": name, "network": dict(DEFAULT_NETWORK, **(network or {}))}
    if units_zookeeper:
        settings["units-zookeeper"] = units_zookeeper
    if client.credential is not None:
        # Agents name the admin in the ACLs of the nodes they create.
        settings["admin-id"] = client.credential.id
    tx = client.transaction()
    tx.create(nodes.ENVIRONMENT, nodes.dump(settings))
    for path in nodes.TREE:
        tx.create(path, nodes.dump({"next-id": 0}) if path == nodes.MACHINES else b"")
    try:
        await tx.commit()
    except NodeExists:
        raise EnvironmentExists(f"an environment already exists at {client.servers}{client.root}")
    return settings


async def get_environment(client):
    try:
        settings, _ = await nodes.read(client, nodes.ENVIRONMENT)
    except NoNode:
        raise EnvironmentNotInitialized(client.servers, client.root)
    return settings
