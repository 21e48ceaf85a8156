"""Relations between real units (LXC containers, their agents with their own ZooKeeper
credentials) in a local environment of the test's own: the CLI relates them, each
unit's hooks see the other's settings through the hook tools, and removal runs
-departed then -broken. The rules themselves are tested on host-run agents
(test_unit_relations.py); this shows them in containers."""

import os

import pytest_twisted
from twisted.internet import threads

from ensemble.lab import Lab

from conftest import make_charm
from test_deploy import all_started, environment, sh, until  # noqa: F401 (a fixture)

CHARMS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "charms")
RECORD = 'echo "$(basename $0) $JUJU_RELATION_ID ${JUJU_REMOTE_UNIT:--}" >> "$HOME/hooks.log"'


def server_charm(tmp_path):
    return make_charm(tmp_path / "store", "store", metadata_extra="provides:\n  data: {interface: kv}\n", hooks={
        "data-relation-joined": f"{RECORD}\nrelation-set secret=$(hostname) port=9000",
        "data-relation-changed": RECORD,
        "data-relation-departed": RECORD,
        "data-relation-broken": RECORD,
    })


def client_charm(tmp_path):
    return make_charm(tmp_path / "reader", "reader", metadata_extra="requires:\n  data: kv\n", hooks={
        "data-relation-joined": RECORD,
        "data-relation-changed": f'{RECORD}\n[ -n "$(relation-get secret)" ] || exit 0\n'
                                 'relation-get --format json > "$HOME/remote.tmp" && mv "$HOME/remote.tmp" "$HOME/remote"',
        "data-relation-departed": RECORD,
        "data-relation-broken": RECORD,
    })


async def read(env, unit, path):
    code, out, _ = await sh(env.driver(), env.units()[unit]["container"], f"cat {path} 2>/dev/null")
    return out if code == 0 else ""


@pytest_twisted.ensureDeferred
async def test_related_units_in_containers_exchange_settings_and_part(environment, tmp_path):
    env = environment
    env.cli("deploy", server_charm(tmp_path), "--to", "0")
    env.cli("deploy", client_charm(tmp_path), "--to", "0")
    units = await all_started(env, ["store/0", "reader/0"])
    result = env.cli("add-relation", "reader", "store")
    assert result.stdout.strip() == "added relation data:0 between reader:data and store:data (interface kv)"

    async def remote():
        return await read(env, "reader/0", "/var/lib/ensemble/unit/remote")
    text = await until(remote, what="reader read store's settings")
    assert '"secret": "store-0"' in text and '"port": "9000"' in text
    assert f'"private-address": "{units["store/0"]["private-address"]}"' in text
    status = env.status()["services"]
    assert status["reader"]["relations"] == {"data": ["store"]} and status["store"]["relations"] == {"data": ["reader"]}

    env.cli("remove-relation", "reader", "store")

    async def broken(unit):
        return "data-relation-broken data:0 -" in await read(env, unit, "/var/lib/ensemble/unit/hooks.log")
    await until(lambda: broken("reader/0"), what="reader's -broken")
    await until(lambda: broken("store/0"), what="store's -broken")
    for unit, remote_unit in (("reader/0", "store/0"), ("store/0", "reader/0")):
        lines = (await read(env, unit, "/var/lib/ensemble/unit/hooks.log")).splitlines()
        assert lines[:2] == [f"data-relation-joined data:0 {remote_unit}", f"data-relation-changed data:0 {remote_unit}"]
        assert lines[-2:] == [f"data-relation-departed data:0 {remote_unit}", "data-relation-broken data:0 -"]


@pytest_twisted.ensureDeferred
async def test_relations_across_hosts_of_a_lab_work_as_on_one(tmp_path):
    lab = Lab(tmp_path / "lab", hosts=2)
    try:
        await threads.deferToThread(lab.start)
        await threads.deferToThread(lab.ensemble, "deploy", server_charm(tmp_path), "--to", "0")
        await threads.deferToThread(lab.ensemble, "deploy", client_charm(tmp_path), "--to", "1")
        units = await threads.deferToThread(lab.wait_started, ["store/0", "reader/0"], 240)
        await threads.deferToThread(lab.ensemble, "add-relation", "store", "reader")

        async def lab_read(unit, path):
            machine, container = units[unit]["machine"], units[unit]["container"]
            ran = await threads.deferToThread(lab.container_run, machine, container, ["/bin/sh", "-c",
                                                                                      f"cat {path} 2>/dev/null"])
            return ran.stdout

        async def remote():
            return await lab_read("reader/0", "/var/lib/ensemble/unit/remote")
        text = await until(remote, timeout=60, what="reader (host 1) read store's (host 0) settings")
        assert '"secret": "store-0"' in text
        assert f'"private-address": "{units["store/0"]["private-address"]}"' in text
        lines = (await lab_read("store/0", "/var/lib/ensemble/unit/hooks.log")).splitlines()
        assert lines[:2] == ["data-relation-joined data:0 reader/0", "data-relation-changed data:0 reader/0"]
    finally:
        await threads.deferToThread(lab.close)


@pytest_twisted.ensureDeferred
async def test_a_real_database_from_apt_and_its_client_related(environment):
    """PostgreSQL and its client, installed from Debian through the host's cache: the
    client connects with the credentials the relation gave it, writes a row and reads
    it back; the server opened no port (the relation lets the client in)."""
    env = environment
    env.cli("deploy", os.path.join(CHARMS, "postgresql"), "--to", "0")
    env.cli("deploy", os.path.join(CHARMS, "pgclient"), "--to", "0")
    env.cli("add-relation", "pgclient", "postgresql")
    units = await until(lambda: _started(env, ["postgresql/0", "pgclient/0"]), timeout=600,
                        what="postgresql and pgclient started")
    assert "open-ports" not in units["postgresql/0"]

    async def result():
        return await read(env, "pgclient/0", "/var/lib/pgclient/result")
    row = await until(result, timeout=120, what="pgclient's row read back")
    assert "pgclient/0 was here" in row
    # The server opened no port: the relation is what lets the client in.
    code, out, _ = await sh(env.driver(), units["pgclient/0"]["container"],
                            f"pg_isready -h {units['postgresql/0']['private-address']} -p 5432")
    assert code == 0, out
    env.cli("remove-relation", "pgclient", "postgresql")
    await until(lambda: _gone(env, "pgclient/0", "/var/lib/pgclient/db.json"), what="pgclient forgot the credentials")


def _started(env, names):
    units = env.units()
    failed = {n: units[n].get("error") for n in names if units.get(n, {}).get("agent-state") == "error"}
    assert not failed, failed
    return units if all(units.get(n, {}).get("agent-state") == "started" for n in names) else None


async def _gone(env, unit, path):
    code, _, _ = await sh(env.driver(), env.units()[unit]["container"], f"test -e {path}")
    return code != 0
