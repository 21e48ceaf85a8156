"""The web charm's pieces that several of its hooks use."""

import json
import os

import hooklib

# {relation id: {db unit: {"host": …, "port": …}}}: the server reads it again whenever
# it is replaced, so the relation hooks never restart the server.
BACKENDS = os.path.join(hooklib.RUN_DIR, "backends.json")


def server(config, address):
    port = config["port"]
    args = ["--host", address, "--port", port, "--unit", os.environ["JUJU_UNIT_NAME"], "--backends", BACKENDS]
    return hooklib.Server(args, address, port)


def backends():
    try:
        with open(BACKENDS) as f:
            return json.load(f)
    except FileNotFoundError:
        return {}


def use(relation_id, unit, host, port):
    relations = backends()
    backend = {"host": host, "port": int(port)}
    if relations.get(relation_id, {}).get(unit) == backend:
        return
    relations.setdefault(relation_id, {})[unit] = backend
    _save(relations)
    hooklib.log(f"reading from {unit} at {host}:{port}")


def forget(relation_id, unit=None):
    """Stop using one db unit of the relation, or all of them."""
    relations = backends()
    units = relations.get(relation_id, {})
    gone = list(units) if unit is None else [unit] if unit in units else []
    if not gone:
        return
    for name in gone:
        del units[name]
    if not units:
        del relations[relation_id]
    _save(relations)
    hooklib.log(f"no longer reading from {', '.join(gone)}")


def _save(relations):
    os.makedirs(hooklib.RUN_DIR, exist_ok=True)
    hooklib.write_atomic(BACKENDS, json.dumps(relations, indent=1, sort_keys=True) + "\n")
