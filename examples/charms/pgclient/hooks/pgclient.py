"""What the pgclient charm's hooks share: the hook tools, the credentials kept, and
the round trip through the database. The hooks run `python3 -B`: importing this
writes no __pycache__ into the charm directory."""

import functools
import json
import os
import subprocess
import sys

KEYS = ("host", "port", "database", "user", "password")

# One table for every unit of the service; the lock lets two units create it at the
# same time. The last line printed is the unit's row as read back; the server's notices
# ("already exists, skipping") are not worth a line in the unit's log.
ROUND_TRIP = r"""
SET client_min_messages = warning;
BEGIN;
SELECT pg_advisory_xact_lock(hashtext('pgclient visitors'));
CREATE TABLE IF NOT EXISTS visitors (unit text PRIMARY KEY, seen timestamptz NOT NULL DEFAULT now());
INSERT INTO visitors (unit) VALUES (:'unit') ON CONFLICT (unit) DO UPDATE SET seen = now();
COMMIT;
SELECT unit || ' was here at ' || seen FROM visitors WHERE unit = :'unit';
"""


def run(*argv, env=None, stdin=None):
    """A command's output; a failure fails the hook with its status (it said why)."""
    done = subprocess.run(argv, env=env, input=stdin, stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        sys.exit(done.returncode)
    return done.stdout


def log(message):
    run("juju-log", message)


@functools.lru_cache(maxsize=None)
def data_dir():
    return json.loads(run("config-get", "--format", "json", "data-dir"))


def remote_settings():
    return json.loads(run("relation-get", "--format", "json", "-"))


def remember(credentials):
    """Keep the credentials, readable by root only."""
    os.makedirs(data_dir(), exist_ok=True)
    path = os.path.join(data_dir(), "db.json")
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        json.dump(credentials, f, sort_keys=True)
    os.replace(tmp, path)


def record(row):
    with open(os.path.join(data_dir(), "result"), "w") as f:
        f.write(row + "\n")


def forget(**match):
    """Drop the credentials kept, if they came from where `match` says."""
    path = os.path.join(data_dir(), "db.json")
    try:
        with open(path) as f:
            kept = json.load(f)
    except FileNotFoundError:
        return
    if all(kept.get(key) == value for key, value in match.items()):
        os.unlink(path)
        log(f"forgot the credentials for database {kept.get('database')} on {kept.get('host')}")


def round_trip(credentials, unit):
    """Write a row naming `unit` and read it back; the row as text."""
    # libpq takes the password from the environment: arguments are visible to all.
    env = {**os.environ, "PGHOST": credentials["host"], "PGPORT": str(credentials["port"]),
           "PGDATABASE": credentials["database"], "PGUSER": credentials["user"],
           "PGPASSWORD": credentials["password"], "PGCONNECT_TIMEOUT": "10"}
    out = run("psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-v", f"unit={unit}", env=env, stdin=ROUND_TRIP)
    return out.strip().splitlines()[-1]
