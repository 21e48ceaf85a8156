"""What the postgresql charm's hooks share: the hook tools they use, the cluster that
Debian's package creates, its pg_hba.conf entries for related units, and SQL run as
the postgres superuser. The hooks run `python3 -B`: importing this writes no
__pycache__ into the charm directory."""

import ipaddress
import json
import os
import re
import subprocess
import sys

# postgresql-common's tools honour this variable too (its tests point it elsewhere;
# so do this charm's).
CONF_ROOT = os.environ.get("PG_CLUSTER_CONF_ROOT") or "/etc/postgresql"
CLUSTER = "main"  # the cluster the postgresql package creates
# Ends each pg_hba.conf line this charm writes: which relation and unit it lets in.
MARK = "# ensemble"
# Names the server gives meaning to: a service so named must not get them as its own.
RESERVED = {"postgres", "public", "template0", "template1"}


def run(*argv, stdin=None):
    """A command's output; a failure fails the hook with the command's status (it said why)."""
    done = subprocess.run(argv, input=stdin, stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        sys.exit(done.returncode)
    return done.stdout


def call(*argv, stdin=None):
    """Run a command whose output belongs in the unit's log; a failure fails the hook."""
    status = subprocess.run(argv, input=stdin, text=True).returncode
    if status != 0:
        sys.exit(status)


# -- the hook tools --------------------------------------------------------------------


def private_address():
    return run("unit-get", "private-address").strip()


def relation_get(unit=None):
    """All settings of `unit` (the remote unit by default) in this hook's relation."""
    return json.loads(run("relation-get", "--format", "json", "-", *([unit] if unit else [])))


def relation_set(**settings):
    run("relation-set", *(f"{key}={value}" for key, value in settings.items()))


def log(message):
    run("juju-log", message)


# -- the cluster -----------------------------------------------------------------------


def version():
    """The newest PostgreSQL version that has a main cluster."""
    try:
        versions = [v for v in os.listdir(CONF_ROOT) if os.path.isfile(os.path.join(CONF_ROOT, v, CLUSTER, "postgresql.conf"))]
    except FileNotFoundError:
        versions = []
    if not versions:
        sys.exit(f"no PostgreSQL cluster in {CONF_ROOT}: is postgresql installed?")
    return max(versions, key=lambda v: [int(part) for part in re.findall(r"\d+", v)])


def conf_dir():
    return os.path.join(CONF_ROOT, version(), CLUSTER)


def port():
    """The cluster's port (the package gives the first cluster 5432)."""
    with open(os.path.join(conf_dir(), "postgresql.conf")) as f:
        for line in f:
            found = re.match(r"\s*port\s*=\s*(\d+)", line)
            if found:
                return int(found.group(1))
    return 5432


def ctl(action):
    call("pg_ctlcluster", version(), CLUSTER, action)


def running():
    # pg_ctlcluster status: 0 running, 3 stopped.
    return subprocess.run(["pg_ctlcluster", version(), CLUSTER, "status"], stdout=subprocess.DEVNULL).returncode == 0


def listen_on(address):
    """Listen on `address` as well as locally, from the next start on."""
    conf = os.path.join(conf_dir(), "conf.d", "ensemble.conf")
    os.makedirs(os.path.dirname(conf), exist_ok=True)
    write_like(conf, f"listen_addresses = 'localhost,{address}'\n")


# -- who may connect -------------------------------------------------------------------


def hba_line(relation_id, unit, database, user, address):
    """A pg_hba.conf line letting `unit` in from `address`, marked as this charm's.
    Names are quoted so that a service called `all` or `replication` is just a name."""
    host = ipaddress.ip_address(address)
    return f'host\t"{database}"\t"{user}"\t{host}/{host.max_prefixlen}\tscram-sha-256\t{MARK} {relation_id} {unit}'


def without(text, relation_id, unit=None):
    """pg_hba.conf text without this charm's lines for the relation (or one unit of it)."""
    def ours(line):
        _, mark, rest = line.partition(MARK + " ")
        return mark and (rest.split() == [relation_id, unit] if unit else rest.split()[:1] == [relation_id])

    return "".join(line for line in text.splitlines(keepends=True) if not ours(line))


def allowing(text, relation_id, unit, database, user, address):
    """pg_hba.conf text with `unit`'s line, at its place if it is there already."""
    line = hba_line(relation_id, unit, database, user, address)
    if line in text.splitlines():
        return text
    return without(text, relation_id, unit).rstrip("\n") + "\n" + line + "\n"


def allow(relation_id, unit, database, user, address):
    _edit_hba(lambda text: allowing(text, relation_id, unit, database, user, address))


def forget(relation_id, unit=None):
    _edit_hba(lambda text: without(text, relation_id, unit))


def _edit_hba(change):
    """Apply `change` to pg_hba.conf; a running server rereads it at once."""
    path = os.path.join(conf_dir(), "pg_hba.conf")
    with open(path) as f:
        text = f.read()
    if write_like(path, change(text)) and running():
        ctl("reload")


def write_like(path, text):
    """Replace `path` whole if its text differs, keeping its owner and mode (postgres
    must still read it); True if it changed."""
    try:
        with open(path) as f:
            if f.read() == text:
                return False
        info = os.stat(path)
    except FileNotFoundError:
        info = None
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    if info:
        os.chown(tmp, info.st_uid, info.st_gid)
        os.chmod(tmp, info.st_mode & 0o7777)
    else:
        os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return True


# -- databases and users ---------------------------------------------------------------

# psql fills in :'name' (a literal) and format's %I/%L quote; \gexec runs each
# statement built, only when its WHERE holds: so running this again changes nothing
# but the password.
GRANT = r"""
SELECT format('CREATE ROLE %I', :'user') WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'user') \gexec
SELECT format('ALTER ROLE %I LOGIN PASSWORD %L', :'user', :'password') \gexec
SELECT format('CREATE DATABASE %I OWNER %I', :'database', :'user') WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'database') \gexec
"""


def check_name(name):
    """A service name ([a-z][a-z0-9-]*) that may name a database and a user."""
    if not re.fullmatch(r"[a-z][a-z0-9-]{0,62}", name) or name in RESERVED:
        sys.exit(f"cannot give a database to a service named {name!r}: PostgreSQL reserves that name")


def grant(database, user, password):
    """Create the user and its database unless they exist; set the user's password."""
    for value in (database, user, password):
        if not re.fullmatch(r"[A-Za-z0-9_-]+", value):
            sys.exit(f"refusing to put {value!r} into SQL")
    # The password goes in on standard input: arguments are visible to every process.
    variables = "".join(f"\\set {name} '{value}'\n" for name, value in
                        (("database", database), ("user", user), ("password", password)))
    call("runuser", "-u", "postgres", "--", "psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", "postgres",
        stdin=variables + GRANT)
