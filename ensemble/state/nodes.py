"""How state is laid out in ZooKeeper and how node data is (de)serialised.

Every node holds a YAML mapping. Updates are read-modify-write with the version
checked, retried on a concurrent change, so two writers never lose each other's fields.
"""

import yaml

from ensemble.errors import MalformedState
from ensemble.state.client import BadVersion

ENVIRONMENT = "/environment"
MACHINES = "/machines"
SERVICES = "/services"
UNITS = "/units"
CHARMS = "/charms"
NETWORK = "/network"
SUBNETS = "/network/subnets"
ADDRESSES = "/network/addresses"
RELATIONS = "/relations"  # {next-id}; children relation-NNNNNNNNNN (ensemble/state/relation.py)

TREE = [MACHINES, SERVICES, UNITS, CHARMS, NETWORK, SUBNETS, ADDRESSES, RELATIONS]


def service_path(name):
    return f"{SERVICES}/{name}"


def dump(mapping):
    return yaml.safe_dump(mapping, default_flow_style=False, sort_keys=True).encode()


def load(data, path):
    """Parse a node's YAML mapping; anything else is MalformedState naming the node."""
    if not data:
        return {}
    try:
        value = yaml.safe_load(data)
    except yaml.YAMLError as e:
        raise MalformedState(path, f"not valid YAML ({str(e).splitlines()[0]})")
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise MalformedState(path, f"expected a mapping, found {type(value).__name__}")
    return value


async def read(client, path):
    """(mapping, version) of a node."""
    data, stat = await client.get(path)
    return load(data, path), stat.version


async def update(client, path, change):
    """Apply `change(mapping) -> mapping` atomically; returns the new mapping."""
    while True:
        current, version = await read(client, path)
        new = change(dict(current))
        if new == current:
            return current
        try:
            await client.set(path, dump(new), version)
            return new
        except BadVersion:
            continue


def merge(fields):
    """A change for `update` that sets `fields`; a None value removes that field."""

    def change(current):
        new = dict(current)
        for key, value in fields.items():
            if value is None:
                new.pop(key, None)
            else:
                new[key] = value
        return new

    return change
