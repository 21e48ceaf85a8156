"""The db charm's pieces that several of its hooks use."""

import json
import os

import hooklib


def prepare(config):
    """Create the data directory and seed it, keeping any data already there."""
    directory = config["data-dir"]
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "data.json")
    if os.path.exists(path):
        return
    unit = os.environ["JUJU_UNIT_NAME"]
    seed = {"greeting": f"hello from {unit}", "service": unit.partition("/")[0], "unit": unit}
    hooklib.write_atomic(path, json.dumps(seed, sort_keys=True))
    hooklib.log(f"seeded {path}")


def server(config, address):
    port = config["port"]
    # Its pid file and log are kept with its data.
    args = ["--data", config["data-dir"], "--host", address, "--port", port]
    return hooklib.Server(args, address, port, config["data-dir"])


def publish(config, address, relation_id=None):
    """What a kv client needs: where to connect."""
    hooklib.relation_set(relation_id, host=address, port=config["port"])
