"""The web charm's pieces that several of its hooks use."""

import json
import os

import hooklib


def backends_file(config):
    """{relation id: {db unit: {"host": …, "port": …}}}: the server reads it again
    whenever it is replaced, so the relation hooks never restart the server."""
    return os.path.join(config["state-dir"], "backends.json")


def server(config, address):
    port = config["port"]
    args = ["--host", address, "--port", port, "--unit", os.environ["JUJU_UNIT_NAME"],
            "--backends", backends_file(config)]
    return hooklib.Server(args, address, port, config["state-dir"])


def backends(config):
    return _read(backends_file(config))


def use(config, relation_id, unit, host, port):
    relations = backends(config)
    backend = {"host": host, "port": int(port)}
    if relations.get(relation_id, {}).get(unit) == backend:
        return
    relations.setdefault(relation_id, {})[unit] = backend
    _save(config, relations)
    hooklib.log(f"reading from {unit} at {host}:{port}")


def forget(config, relation_id, unit=None):
    """Stop using one db unit of the relation, or all of them."""
    relations = backends(config)
    units = relations.get(relation_id, {})
    gone = list(units) if unit is None else [unit] if unit in units else []
    if not gone:
        return
    for name in gone:
        del units[name]
    if not units:
        del relations[relation_id]
    _save(config, relations)
    hooklib.log(f"no longer reading from {', '.join(gone)}")


def copy_backends(config, old_file):
    """`state-dir` changed under the running server: the db units its relation hooks
    wrote to `old_file` go to the new state directory. Whether they had to."""
    if old_file == backends_file(config):
        return False
    _save(config, _read(old_file))
    hooklib.log(f"moved the backends file to {backends_file(config)}")
    return True


def _read(path):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return {}


def _save(config, relations):
    os.makedirs(config["state-dir"], exist_ok=True)
    hooklib.write_atomic(backends_file(config), json.dumps(relations, indent=1, sort_keys=True) + "\n")
