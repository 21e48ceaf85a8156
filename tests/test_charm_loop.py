"""The charm author's loop as unit agents live it, on this host with a real ZooKeeper
and the real CLI: `set`/`get` and config-changed (typed, coalesced), `upgrade-charm`
(upgrade-charm then config-changed, the unit's data kept), and a failed hook of each
kind shown in status and moved past with `resolved` (skipping it, or `--retry`).
Containers add nothing to these rules; test_charm_loop_lxc.py runs them on real LXC."""

import json
import os
import sys
import textwrap

import pytest
import pytest_twisted

from ensemble import status
from ensemble.state.relation import RelationStateManager
from ensemble.state.service import ServiceStateManager, charm_path

from conftest import eventually, make_charm
from test_unit_relations import Units, deploy_pair, relation_hooks, unit_data  # noqa: F401

CONFIG = textwrap.dedent("""\
    options:
      port: {type: int, default: 5432, description: where it listens}
      debug: {type: boolean, default: false}
      ratio: {type: float, default: 0.5}
      title: {type: string, description: shown on the page}
""")


def breakable(hook, line):
    """A hook that fails while $HOME/break-<hook> exists (noting it in failures), else
    appends `line` to hooks.log."""
    return (f'if [ -e "$HOME/break-{hook}" ]; then echo {hook} >> "$HOME/failures"; echo "{hook} broke" >&2; exit 3; fi\n'
            f'echo "{line}" >> "$HOME/hooks.log"')


def loop_charm(directory, version="1", extra_hooks=None, metadata_extra=""):
    hooks = {hook: breakable(hook, f"{hook} $(cat $CHARM_DIR/version)")
             for hook in ("install", "start", "upgrade-charm")}
    hooks["config-changed"] = (breakable("config-changed", "config-changed $(cat $CHARM_DIR/version)") +
                               '\nconfig-get --format json >> "$HOME/config.log"')
    hooks.update(extra_hooks or {})
    path = make_charm(directory, name="probe", hooks=hooks, metadata_extra=metadata_extra)
    (directory / "config.yaml").write_text(CONFIG)
    (directory / "version").write_text(version + "\n")
    return path


@pytest.fixture
def units(zk_server, zk_root, tmp_path):
    return Units(zk_server, zk_root, tmp_path)


@pytest_twisted.async_yield_fixture
async def probe(env_client, cli, units, tmp_path):
    """A started probe/0 deployed with the CLI from tmp/charm (so upgrade-charm finds it)."""
    charm = loop_charm(tmp_path / "charm")
    result = cli("deploy", charm, "--to", "0")
    assert result.returncode == 0, result.stderr
    yield units
    await units.close()


def hooks(units, unit="probe/0"):
    return units.hooks(unit)


def configs(units, unit="probe/0"):
    text = units.file(unit, "config.log") or ""
    return [json.loads(line) for line in text.splitlines()]


async def state(client, unit="probe/0"):
    return (await unit_data(client, unit)).get("state")


async def started(client, unit="probe/0"):
    async def check():
        return await state(client, unit) == "started"
    await eventually(check, timeout=20)


@pytest_twisted.ensureDeferred
async def test_set_and_get_are_typed_and_every_change_runs_config_changed(env_client, cli, probe):
    await probe.start("probe/0", "10.9.0.2")
    await started(env_client)
    assert configs(probe)[-1] == {"port": 5432, "debug": False, "ratio": 0.5}

    result = cli("set", "probe", "port=7070", "debug=true", "title=My site")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "probe: set debug=true, port=7070, title=My site\n"
    await eventually(lambda: _async(configs(probe)[-1].get("port") == 7070), timeout=20)
    assert configs(probe)[-1] == {"port": 7070, "debug": True, "ratio": 0.5, "title": "My site"}

    shown = json.loads(cli("get", "probe", "--format", "json").stdout)
    assert shown["service"] == "probe" and shown["charm"].startswith("probe-")
    assert shown["settings"]["port"] == {"value": 7070, "default": 5432, "type": "int", "set": True,
                                         "description": "where it listens"}
    assert shown["settings"]["ratio"] == {"value": 0.5, "default": 0.5, "type": "float", "set": False}
    assert shown["settings"]["title"]["value"] == "My site" and "default" not in shown["settings"]["title"]
    assert "port:\n    value: 7070" in cli("get", "probe").stdout

    # KEY= goes back to the default; a set that changes nothing runs nothing.
    runs = len(configs(probe))
    assert cli("set", "probe", "port=").stdout == "probe: set port back to its default (5432)\n"
    await eventually(lambda: _async(len(configs(probe)) == runs + 1), timeout=20)
    assert configs(probe)[-1]["port"] == 5432
    assert cli("set", "probe", "debug=true").stdout == "probe: no change\n"

    for args, message in [
        (("port=abc",), "error: option 'port' must be an integer, not 'abc'\n"),
        (("debug=maybe",), "error: option 'debug' must be true or false, not 'maybe'\n"),
        (("ratio=x",), "error: option 'ratio' must be a number, not 'x'\n"),
        (("colour=red",), "error: charm probe has no option 'colour' (options: debug, port, ratio, title)\n"),
        (("port",), "error: invalid 'port': use KEY=VALUE (KEY= to go back to the default)\n"),
    ]:
        result = cli("set", "probe", *args)
        assert (result.returncode, result.stderr) == (1, message)
    assert cli("set", "nosuch", "a=b").stderr == "error: service 'nosuch' not found\n"
    await probe.close()
    assert len(configs(probe)) == runs + 1  # none of the refused sets ran anything


def _async(value):
    async def check():
        return value
    return check()


async def counting_probe(env_client, units, tmp_path, pause=""):
    """A started probe/0 whose config-changed notes each run and the port it saw;
    returns how many runs there were so far."""
    from conftest import deploy_charm

    charm = loop_charm(tmp_path / "charm", extra_hooks={
        "config-changed": f'echo run >> "$HOME/runs"; {pause} config-get port >> "$HOME/ports"'})
    await deploy_charm(env_client, charm)
    await units.start("probe/0", "10.9.0.2")
    await started(env_client)
    return len(units.file("probe/0", "runs").splitlines())


async def runs_once_the_last_is_seen(units, before, done=None):
    """The config-changed runs since `before`, once one saw port 7010 (and `done()`)."""
    async def seen():
        return (done is None or done()) and (units.file("probe/0", "ports") or "").splitlines()[-1:] == ["7010"]
    await eventually(seen, timeout=60)
    await units.close()
    return len(units.file("probe/0", "runs").splitlines()) - before


@pytest_twisted.ensureDeferred
async def test_ten_quick_sets_run_config_changed_at_most_twice(env_client, units, tmp_path):
    before = await counting_probe(env_client, units, tmp_path, pause="sleep 0.2;")
    manager = ServiceStateManager(env_client)
    for port in range(7001, 7011):
        await manager.update_config("probe", {"port": port})
    assert 1 <= await runs_once_the_last_is_seen(units, before) <= 2


@pytest_twisted.ensureDeferred
async def test_upgrade_charm_runs_upgrade_then_config_changed_and_keeps_the_units_data(
        env_client, cli, probe, tmp_path):
    await probe.start("probe/0", "10.9.0.2")
    await started(env_client)
    (probe.dir("probe/0") / "unit" / "data").write_text("kept\n")
    old = (await ServiceStateManager(env_client).get_service("probe")).charm_id
    assert cli("upgrade-charm", "probe").stdout == f"probe: already at {old} (nothing in {tmp_path / 'charm'} changed)\n"

    (tmp_path / "charm" / "version").write_text("2\n")
    result = cli("upgrade-charm", "probe")
    assert result.returncode == 0, result.stderr
    new = (await ServiceStateManager(env_client).get_service("probe")).charm_id
    assert new != old and result.stdout == f"probe: upgraded {old} -> {new} for probe/0\n"
    await eventually(lambda: _async("config-changed 2" in hooks(probe)), timeout=20)
    assert hooks(probe)[-2:] == ["upgrade-charm 2", "config-changed 2"]
    assert hooks(probe).count("install 1") == 1 and "install 2" not in hooks(probe)
    assert probe.file("probe/0", "data") == "kept\n"
    assert await env_client.exists(charm_path(old)) is None  # no service uses it any more

    async def reported():
        data = await unit_data(env_client, "probe/0")
        return data["workload"]["hook"] == "config-changed" and data
    data = await eventually(reported)
    assert data["state"] == "started" and data["workload"]["status"] == 0

    # Another directory (--path) is remembered for the next upgrade.
    other = loop_charm(tmp_path / "elsewhere", version="3")
    assert cli("upgrade-charm", "probe", "--path", other).returncode == 0
    await eventually(lambda: _async("config-changed 3" in hooks(probe)), timeout=20)
    (tmp_path / "elsewhere" / "version").write_text("4\n")
    assert cli("upgrade-charm", "probe").returncode == 0
    await eventually(lambda: _async("config-changed 4" in hooks(probe)), timeout=20)


@pytest_twisted.ensureDeferred
async def test_upgrade_charm_refuses_what_the_service_cannot_follow(env_client, cli, tmp_path):
    for name, extra in (("db", "provides:\n  db: kv\n"), ("web", "requires:\n  db: kv\n")):
        result = cli("deploy", make_charm(tmp_path / name, name=name, metadata_extra=extra), "--to", "0")
        assert result.returncode == 0, result.stderr
    await RelationStateManager(env_client).add_relation("web", "db")
    before = (await ServiceStateManager(env_client).get_service("web")).charm_id

    make_charm(tmp_path / "web-no-db", name="web")
    result = cli("upgrade-charm", "web", "--path", tmp_path / "web-no-db")
    assert (result.returncode, result.stderr) == (1, "error: the new charm drops relation 'db' (kv), which service "
                                                     "web is in (web:db db:db): remove that relation first\n")
    make_charm(tmp_path / "web-other", name="web", metadata_extra="requires:\n  db: sql\n")
    result = cli("upgrade-charm", "web", "--path", tmp_path / "web-other")
    assert result.returncode == 1 and "changes relation 'db' (kv)" in result.stderr
    result = cli("upgrade-charm", "web", "--path", tmp_path / "db")
    assert (result.returncode, result.stderr) == (1, f"error: {tmp_path / 'db'} holds charm db, not web "
                                                     "(service web's)\n")
    result = cli("upgrade-charm", "web", "--path", tmp_path / "nowhere")
    assert result.returncode == 1 and "does not exist" in result.stderr
    assert (await ServiceStateManager(env_client).get_service("web")).charm_id == before

    # A set option whose type the new charm changes must be reset first.
    (tmp_path / "web" / "config.yaml").write_text("options:\n  port: {type: string, default: '80'}\n")
    assert cli("upgrade-charm", "web").returncode == 0
    assert cli("set", "web", "port=8080").returncode == 0
    (tmp_path / "web" / "config.yaml").write_text("options:\n  port: {type: int, default: 80}\n")
    result = cli("upgrade-charm", "web")
    assert (result.returncode, result.stderr) == (
        1, "error: option 'port' of web is set to a value that is not a int in the new charm: "
           "reset it first (ensemble set web port=)\n")


FAILURES = {
    # the hook that fails: (how the test makes it run after the unit started, or None
    # if it runs while the unit starts; the hooks.log lines once skipped past)
    "install": (None, ["config-changed 1", "start 1"]),
    "config-changed": (None, ["install 1", "start 1"]),
    "start": (None, ["install 1", "config-changed 1"]),
    "config-changed-later": ("set", ["install 1", "config-changed 1", "start 1"]),
    "upgrade-charm": ("upgrade", ["install 1", "config-changed 1", "start 1", "config-changed 2"]),
}


@pytest.mark.parametrize("case", sorted(FAILURES))
@pytest_twisted.ensureDeferred
async def test_a_failed_hook_shows_in_status_and_resolved_skips_it_or_retries_it(
        env_client, cli, probe, tmp_path, case):
    hook = case.replace("-later", "")
    trigger, after_skip = FAILURES[case]
    home = probe.dir("probe/0") / "unit"
    home.mkdir(parents=True)
    if trigger is None:
        (home / f"break-{hook}").write_text("")
    await probe.start("probe/0", "10.9.0.2")
    if trigger is not None:
        await started(env_client)
        (home / f"break-{hook}").write_text("")
        if trigger == "set":
            assert cli("set", "probe", "port=7070").returncode == 0
        else:
            (tmp_path / "charm" / "version").write_text("2\n")
            assert cli("upgrade-charm", "probe").returncode == 0

    async def in_error():
        return await state(env_client) == "error"
    await eventually(in_error, timeout=20)
    unit = (await status.collect(env_client))["services"]["probe"]["units"]["probe/0"]
    assert unit["error"] == f"{hook} hook exited with status 3: {hook} broke"
    assert unit["workload"]["hook"] == hook and unit["workload"]["result"] == "exit 3"
    assert cli("resolved", "probe/0", "db").stderr == \
        "error: relation db of probe/0 is not in error (relations in error: none)\n"

    # Retried while still broken: it fails again, and nothing after it runs.
    ran = list(hooks(probe))
    result = cli("resolved", "--retry", "probe/0")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"probe/0: retrying {hook} hook exited with status 3: {hook} broke\n"

    async def cleared_and_failed_again():
        data = await unit_data(env_client, "probe/0")
        failures = (probe.file("probe/0", "failures") or "").split()
        return "resolved" not in data and data["state"] == "error" and failures == [hook, hook]
    await eventually(cleared_and_failed_again, timeout=20)
    assert hooks(probe) == ran

    if case in ("install", "upgrade-charm"):
        # Fixed and retried: the hook runs, then what it held back.
        (home / f"break-{hook}").unlink()
        assert cli("resolved", "--retry", "probe/0").returncode == 0
        await started(env_client)
        version = "2" if hook == "upgrade-charm" else "1"
        await eventually(lambda: _async(hooks(probe)[-1:] == [f"{'start' if hook == 'install' else 'config-changed'} "
                                                               f"{version}"]), timeout=20)
        assert f"{hook} {version}" in hooks(probe)
    else:
        # Skipped: it never ran, and what came after it did.
        assert cli("resolved", "probe/0").returncode == 0
        await started(env_client)
        await eventually(lambda: _async(hooks(probe) == after_skip), timeout=20)
    data = await unit_data(env_client, "probe/0")
    assert "error" not in data and data["state"] == "started"
    result = cli("resolved", "probe/0")
    assert (result.returncode, result.stderr) == (1, "error: unit probe/0 is started, not in error: nothing to resolve\n")


@pytest_twisted.ensureDeferred
async def test_a_failed_relation_hook_is_resolved_by_relation_name(env_client, cli, units, tmp_path):
    flag = units.dir("db/0") / "unit" / "break"
    await deploy_pair(env_client, tmp_path, db_hooks=relation_hooks("db", {
        "changed": f'if [ -e "{flag}" ]; then echo "changed broke" >&2; exit 5; fi'}))
    flag.parent.mkdir(parents=True)
    flag.write_text("")
    await units.start("db/0", "10.9.0.2")
    await units.start("web/0", "10.9.0.3")
    await RelationStateManager(env_client).add_relation("web", "db")

    async def relation_error():
        return ((await unit_data(env_client, "db/0")).get("relation-errors") or {}).get("db:0")
    assert await eventually(relation_error) == "db-relation-changed hook exited with status 5: changed broke"
    assert await state(env_client, "db/0") == "started"  # the unit goes on

    flag.unlink()
    result = cli("resolved", "db/0", "db", "--retry")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "db/0: retrying relation db:0: db-relation-changed hook exited with status 5: " \
                            "changed broke\n"

    async def fixed():
        data = await unit_data(env_client, "db/0")
        return not data.get("relation-errors") and "relation-resolved" not in data
    await eventually(fixed)
    await eventually(lambda: _async(units.hooks("db/0").count("db-relation-changed db:0 web/0 web/0") == 2))
    await units.close()
    result = cli("resolved", "db/0", "db:0")
    assert result.returncode == 1 and "relation db:0 of db/0 is not in error" in result.stderr


@pytest_twisted.ensureDeferred
async def test_one_set_reaches_the_units_on_every_machine(env_client, cli, units, tmp_path):
    from ensemble.state.machine import MachineStateManager

    await MachineStateManager(env_client).add_machine(address="192.0.2.11")  # inert: never contacted
    charm = loop_charm(tmp_path / "charm")
    assert cli("deploy", charm, "--to", "0").returncode == 0
    assert cli("add-unit", "probe", "--to", "1").returncode == 0
    for name, address in (("probe/0", "10.9.0.2"), ("probe/1", "10.9.1.2")):
        await units.start(name, address)
    for name in ("probe/0", "probe/1"):
        await started(env_client, name)
    assert cli("set", "probe", "title=everywhere").returncode == 0

    async def both():
        return all(configs(units, name)[-1:] and configs(units, name)[-1].get("title") == "everywhere"
                   for name in ("probe/0", "probe/1"))
    await eventually(both, timeout=20)
    await units.close()


@pytest_twisted.ensureDeferred
async def test_ten_sets_from_a_shell_loop_run_config_changed_at_most_twice(env_client, units, tmp_path, zk_spec):
    import subprocess

    from conftest import ensemble_env

    before = await counting_probe(env_client, units, tmp_path)
    # As a user's script would: one `ensemble set` after the other, each its own process.
    loop = subprocess.Popen(
        ["sh", "-c", 'for p in $(seq 7001 7010); do ensemble set probe port=$p || exit 1; done'],
        env={**ensemble_env(tmp_path / "home", zk_spec), "PATH": f"{os.path.dirname(sys.executable)}:/usr/bin:/bin"},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    runs = await runs_once_the_last_is_seen(units, before, done=lambda: loop.poll() is not None)
    assert loop.returncode == 0, loop.stderr.read()
    assert 1 <= runs <= 2


@pytest_twisted.ensureDeferred
async def test_an_upgrade_waits_for_a_running_relation_hook_to_finish_with_its_charm(env_client, units, tmp_path):
    """A hook sees one charm from start to end: the directory is not replaced under it."""
    db = tmp_path / "db-charm"
    await deploy_pair(env_client, tmp_path, db_hooks=relation_hooks("db", {
        "joined": 'cat "$CHARM_DIR/version" > "$HOME/first"; touch "$HOME/running"; sleep 1.5; '
                  'cat "$CHARM_DIR/version" > "$HOME/last"'}))
    (db / "version").write_text("1\n")
    from ensemble.charm import Charm, bundle_id
    await units.start("db/0", "10.9.0.2")
    await units.start("web/0", "10.9.0.3")
    await started(env_client, "db/0")
    # The service's first revision had no version file: ship one, then relate.
    manager = ServiceStateManager(env_client)
    charm = Charm.load(str(db))
    await manager.upgrade_charm("db", bundle_id(charm.name, charm.bundle()), charm.bundle(), charm.endpoints)
    await eventually(lambda: _async(units.file("db/0", "version") is None and
                                    (units.dir("db/0") / "charm" / "version").exists()), timeout=20)
    await RelationStateManager(env_client).add_relation("web", "db")
    await eventually(lambda: _async(units.file("db/0", "running") is not None), timeout=20)
    (db / "version").write_text("2\n")
    charm = Charm.load(str(db))
    await manager.upgrade_charm("db", bundle_id(charm.name, charm.bundle()), charm.bundle(), charm.endpoints)
    await eventually(lambda: _async(units.file("db/0", "last") is not None), timeout=20)
    assert units.file("db/0", "first") == units.file("db/0", "last") == "1\n"
    await eventually(lambda: _async((units.dir("db/0") / "charm" / "version").read_text() == "2\n"), timeout=20)
    await units.close()
