"""The postgresql and pgclient example charms, as far as this host can run them without
PostgreSQL: their hooks for real with the real hook tools (charm_units.py), but with
fakes of the PostgreSQL commands that record how they were called, and a cluster
configuration directory of the test's own (PG_CLUSTER_CONF_ROOT, which
postgresql-common's tools honour too). That PostgreSQL runs these hooks' SQL and
pg_hba.conf lines was checked in a unit container (see the report of that change)."""

import importlib.util
import json
import os
import re
import stat
import sys

import pytest
import pytest_twisted

from charm_units import CHARMS, charm_environment

# Debian's default pg_hba.conf rules (bookworm, PostgreSQL 15), which must outlive
# every change the charm makes.
DEBIAN_HBA = """\
# Database administrative login by Unix domain socket
local   all             postgres                                peer

# TYPE  DATABASE        USER            ADDRESS                 METHOD
local   all             all                                     peer
host    all             all             127.0.0.1/32            scram-sha-256
host    all             all             ::1/128                 scram-sha-256
local   replication     all                                     peer
host    replication     all             127.0.0.1/32            scram-sha-256
host    replication     all             ::1/128                 scram-sha-256
"""

# Records each call (its name, arguments, standard input and PG* variables) in
# $FAKE_LOG, prints $FAKE_OUTPUT and succeeds.
FAKE = """\
#!{python}
import json, os, sys
call = {{"argv": [os.path.basename(sys.argv[0]), *sys.argv[1:]], "stdin": sys.stdin.read(),
         "env": {{k: v for k, v in os.environ.items() if k.startswith("PG")}}}}
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps(call) + "\\n")
sys.stdout.write(os.environ.get("FAKE_OUTPUT", ""))
"""


def load_pglib():
    path = os.path.join(CHARMS, "postgresql", "hooks", "pglib.py")
    spec = importlib.util.spec_from_file_location("pglib", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def pglib(conf_root, monkeypatch):
    module = load_pglib()
    monkeypatch.setattr(module, "CONF_ROOT", str(conf_root))
    return module


@pytest.fixture
def conf_root(tmp_path):
    """/etc/postgresql as the package leaves it, plus an old cluster's leftovers."""
    root = tmp_path / "etc-postgresql"
    for version, port in (("9.6", 5432), ("15", 5433)):
        main = root / version / "main"
        main.mkdir(parents=True)
        (main / "postgresql.conf").write_text(
            f"data_directory = '/var/lib/postgresql/{version}/main'\n#port = 1\nport = {port}\t\t\t\t# (change requires restart)\n"
        )
        (main / "pg_hba.conf").write_text(DEBIAN_HBA)
        (main / "pg_hba.conf").chmod(0o640)
    (root / "16").mkdir()  # no cluster in it
    return root


class Fakes:
    def __init__(self, directory, commands):
        self.directory = str(directory)
        self.log = os.path.join(self.directory, "calls.jsonl")
        directory.mkdir()
        for name in commands:
            (directory / name).write_text(FAKE.format(python=sys.executable))
            (directory / name).chmod(0o755)

    def calls(self, name=None):
        try:
            with open(self.log) as f:
                calls = [json.loads(line) for line in f]
        except FileNotFoundError:
            return []
        return [call for call in calls if name is None or call["argv"][0] == name]


@pytest_twisted.async_yield_fixture
async def env(tmp_path):
    async with charm_environment(tmp_path) as env:
        yield env


@pytest.fixture
def fakes(tmp_path):
    return Fakes(tmp_path / "fakes", ["runuser", "pg_ctlcluster", "psql"])


def postgresql_unit(env, fakes, conf_root):
    return env.unit("postgresql", path_first=[fakes.directory],
                    extra_env={"PG_CLUSTER_CONF_ROOT": str(conf_root), "FAKE_LOG": fakes.log})


def pgclient_unit(env, fakes, data_dir, number=0):
    row = f"pgclient/{number} was here at 2026-12-02 08:35:49.896253+00"
    return env.unit("pgclient", number, config={"data-dir": str(data_dir)}, path_first=[fakes.directory],
                    extra_env={"FAKE_LOG": fakes.log, "FAKE_OUTPUT": f"\n{row}\n"})


def hba(conf_root):
    return (conf_root / "15" / "main" / "pg_hba.conf").read_text()


def ours(conf_root):
    return [line for line in hba(conf_root).splitlines() if "# ensemble" in line]


# -- pglib, directly -------------------------------------------------------------------


def test_the_cluster_is_the_newest_with_a_configuration(pglib, conf_root):
    assert pglib.version() == "15"  # not "9.6", which sorts after it as text
    assert pglib.conf_dir() == str(conf_root / "15" / "main")
    assert pglib.port() == 5433


def test_no_cluster_fails_clearly(pglib, tmp_path, monkeypatch):
    monkeypatch.setattr(pglib, "CONF_ROOT", str(tmp_path / "nothing"))
    with pytest.raises(SystemExit, match="no PostgreSQL cluster in .*: is postgresql installed"):
        pglib.version()


def test_hba_lines(pglib):
    assert pglib.hba_line("db:0", "blog/0", "all", "all", "10.0.3.5") == (
        'host\t"all"\t"all"\t10.0.3.5/32\tscram-sha-256\t# ensemble db:0 blog/0'
    )
    assert "\tfd00::5/128\t" in pglib.hba_line("db:0", "blog/0", "blog", "blog", "fd00::5")
    with pytest.raises(ValueError):
        pglib.hba_line("db:0", "blog/0", "blog", "blog", "10.0.3.5/0 trust")


def test_hba_edits_touch_only_their_own_lines(pglib):
    text = DEBIAN_HBA
    text = pglib.allowing(text, "db:0", "blog/0", "blog", "blog", "10.0.3.5")
    text = pglib.allowing(text, "db:0", "blog/1", "blog", "blog", "10.0.3.6")
    text = pglib.allowing(text, "db:1", "wiki/0", "wiki", "wiki", "10.0.3.7")
    assert pglib.allowing(text, "db:0", "blog/0", "blog", "blog", "10.0.3.5") == text  # already there
    moved = pglib.allowing(text, "db:0", "blog/0", "blog", "blog", "10.0.3.9")  # a new address replaces the old
    assert moved.count("blog/0") == 1 and "10.0.3.9/32" in moved

    assert pglib.without(text, "db:0", "blog/0") == DEBIAN_HBA + "\n".join(text.splitlines()[-2:]) + "\n"
    assert pglib.without(text, "db:0") == DEBIAN_HBA + text.splitlines()[-1] + "\n"
    assert pglib.without(pglib.without(text, "db:0"), "db:1") == DEBIAN_HBA
    assert pglib.without(DEBIAN_HBA + "# ensemble rules below\n", "db:0") == DEBIAN_HBA + "# ensemble rules below\n"


@pytest.mark.parametrize("name", ["postgres", "template1", "public", "Blog", "blog;drop"])
def test_names_postgresql_reserves_or_that_are_no_service_names(pglib, name):
    with pytest.raises(SystemExit, match="cannot give a database to a service named"):
        pglib.check_name(name)


def test_write_like_keeps_owner_and_mode(pglib, tmp_path):
    path = tmp_path / "pg_hba.conf"
    path.write_text("a\n")
    path.chmod(0o640)
    assert pglib.write_like(str(path), "a\n") is False
    assert pglib.write_like(str(path), "b\n") is True
    assert path.read_text() == "b\n" and stat.S_IMODE(path.stat().st_mode) == 0o640


# -- the postgresql charm's hooks --------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_postgresql_gives_each_service_a_database(env, fakes, conf_root, tmp_path):
    pg = postgresql_unit(env, fakes, conf_root)
    clients = [pgclient_unit(env, fakes, tmp_path / f"c{n}", n) for n in range(2)]
    env.relate("db:0", pg, *clients)
    env.settings["db:0", "pgclient/1"]["private-address"] = "10.0.3.7"

    await pg.hook("db-relation-joined", "db:0", "pgclient/0")
    settings = pg.settings("db:0")
    password = settings.pop("password")
    assert settings == {"private-address": "127.0.0.1", "host": "127.0.0.1", "port": "5433",
                        "database": "pgclient", "user": "pgclient"}
    assert re.fullmatch(r"[A-Za-z0-9_-]{32}", password)
    (grant,) = fakes.calls("runuser")
    assert grant["argv"][:5] == ["runuser", "-u", "postgres", "--", "psql"]
    assert password not in " ".join(grant["argv"])  # other processes see arguments
    assert f"\\set password '{password}'\n" in grant["stdin"] and "CREATE DATABASE" in grant["stdin"]
    assert ours(conf_root) == ['host\t"pgclient"\t"pgclient"\t127.0.0.1/32\tscram-sha-256\t# ensemble db:0 pgclient/0']
    assert [call["argv"][1:] for call in fakes.calls("pg_ctlcluster")] == [["15", "main", "status"], ["15", "main", "reload"]]
    assert pg.messages.lines == ["postgresql/0 db-relation-joined: pgclient/0 may use database pgclient as user "
                                 "pgclient from 127.0.0.1"]

    # Another unit of the service: the same credentials, its own address let in.
    await pg.hook("db-relation-joined", "db:0", "pgclient/1")
    assert pg.settings("db:0")["password"] == password
    assert [line.split("\t")[3] for line in ours(conf_root)] == ["127.0.0.1/32", "10.0.3.7/32"]

    # Again (a retried hook): no second line, no reload.
    calls = len(fakes.calls("pg_ctlcluster"))
    await pg.hook("db-relation-joined", "db:0", "pgclient/0")
    assert len(ours(conf_root)) == 2 and len(fakes.calls("pg_ctlcluster")) == calls

    await env.depart("db:0", pg, clients[0])
    assert [line.split("\t")[3] for line in ours(conf_root)] == ["10.0.3.7/32"]
    await env.break_("db:0", pg)
    assert hba(conf_root) == DEBIAN_HBA
    assert stat.S_IMODE((conf_root / "15" / "main" / "pg_hba.conf").stat().st_mode) == 0o640


@pytest_twisted.ensureDeferred
async def test_postgresql_waits_for_the_remote_address(env, fakes, conf_root, tmp_path):
    pg = postgresql_unit(env, fakes, conf_root)
    client = pgclient_unit(env, fakes, tmp_path / "c")
    env.relate("db:0", pg, client)
    del env.settings["db:0", "pgclient/0"]["private-address"]
    result = await pg.hook("db-relation-joined", "db:0", "pgclient/0")
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert pg.settings("db:0") == {"private-address": "127.0.0.1"}
    assert fakes.calls() == [] and ours(conf_root) == []


@pytest_twisted.ensureDeferred
async def test_postgresql_refuses_a_service_named_postgres(env, fakes, conf_root):
    pg = postgresql_unit(env, fakes, conf_root)
    env.relate("db:0", pg)
    env.settings["db:0", "postgres/0"] = {"private-address": "10.0.3.9"}
    result = await pg.hook("db-relation-joined", "db:0", "postgres/0", check=False)
    assert result.returncode == 1
    assert "cannot give a database to a service named 'postgres'" in result.stderr
    assert fakes.calls() == [] and pg.settings("db:0") == {"private-address": "127.0.0.1"}


@pytest_twisted.ensureDeferred
async def test_postgresql_start_and_stop_use_pg_ctlcluster(env, fakes, conf_root):
    pg = postgresql_unit(env, fakes, conf_root)
    await pg.hook("start")
    await pg.hook("stop")
    # The fake's `status` succeeds: the cluster counts as running.
    assert [call["argv"][1:] for call in fakes.calls("pg_ctlcluster")] == [
        ["15", "main", "status"], ["15", "main", "status"], ["15", "main", "stop"]
    ]
    assert pg.messages.lines == ["postgresql/0 start: PostgreSQL 15/main is running on port 5433"]


# -- the pgclient charm's hooks --------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_pgclient_uses_what_postgresql_publishes(env, fakes, conf_root, tmp_path):
    pg = postgresql_unit(env, fakes, conf_root)
    client = pgclient_unit(env, fakes, tmp_path / "client")
    env.relate("db:0", pg, client)

    # postgresql/0 has not run its -joined yet: nothing to use, nothing said.
    await client.hook("db-relation-joined", "db:0", "postgresql/0")
    result = await client.hook("db-relation-changed", "db:0", "postgresql/0")
    assert (result.stdout, result.stderr) == ("", "")
    assert fakes.calls("psql") == [] and not (tmp_path / "client").exists()

    await env.join("db:0", pg, client)
    await client.hook("db-relation-changed", "db:0", "postgresql/0")
    published = pg.settings("db:0")
    (call,) = fakes.calls("psql")
    assert call["env"] == {"PGHOST": "127.0.0.1", "PGPORT": "5433", "PGDATABASE": "pgclient", "PGUSER": "pgclient",
                           "PGPASSWORD": published["password"], "PGCONNECT_TIMEOUT": "10"}
    assert published["password"] not in " ".join(call["argv"])
    assert ["-v", "unit=pgclient/0"] == call["argv"][call["argv"].index("unit=pgclient/0") - 1:][:2]
    assert "INSERT INTO visitors" in call["stdin"] and "SELECT unit" in call["stdin"]

    row = "pgclient/0 was here at 2026-12-02 08:35:49.896253+00"
    assert (tmp_path / "client" / "result").read_text() == row + "\n"
    assert client.messages.lines == [f"pgclient/0 db-relation-changed: database pgclient on 127.0.0.1:5433: {row}"]
    credentials = tmp_path / "client" / "db.json"
    assert stat.S_IMODE(credentials.stat().st_mode) == 0o600
    assert json.loads(credentials.read_text()) == {
        "host": "127.0.0.1", "port": "5433", "database": "pgclient", "user": "pgclient",
        "password": published["password"], "relation": "db:0", "unit": "postgresql/0",
    }


@pytest_twisted.ensureDeferred
async def test_pgclient_forgets_the_credentials(env, fakes, tmp_path):
    client = pgclient_unit(env, fakes, tmp_path / "client")
    server = env.unit("postgresql")
    env.relate("db:0", server, client)
    env.settings["db:0", "postgresql/0"].update(host="10.0.3.5", port="5432", database="pgclient", user="pgclient",
                                                password="s3cret")
    credentials = tmp_path / "client" / "db.json"

    await client.hook("db-relation-changed", "db:0", "postgresql/0")
    assert credentials.exists()
    await client.hook("db-relation-departed", "db:0", "postgresql/1")  # another unit's: kept
    assert credentials.exists()
    await env.depart("db:0", client, server)
    assert not credentials.exists()
    assert client.messages.lines[-1] == "pgclient/0 db-relation-departed: forgot the credentials for database pgclient on 10.0.3.5"

    await client.hook("db-relation-changed", "db:0", "postgresql/0")
    await env.break_("db:0", client)
    assert not credentials.exists()
    assert (tmp_path / "client" / "result").exists()  # what it read stays
