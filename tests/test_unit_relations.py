"""Relations as unit agents live them, on this host with a real ZooKeeper: joining with
private-address, the hook order, settings committed only by a hook that exits 0, a
failing relation hook as that relation's error, removal (-departed then -broken), and
an agent restart in the middle of it all. Containers add nothing to these rules; the
LXC tests relate real units (test_unit_machine.py)."""

import os
import subprocess
import sys

import pytest_twisted

from ensemble import status
from ensemble.state import nodes
from ensemble.state.relation import RelationStateManager, relation_key, relation_path, settings_path
from ensemble.state.unit import UnitStateManager
from ensemble.state.client import ZKClient
from ensemble.unit.agent import UnitAgent

from conftest import SESSION_TIMEOUT, deploy_charm, ensemble_env, eventually, make_charm

# Every relation hook appends one line: hook, relation id, remote unit, relation-list.
RECORD = ('echo "$(basename $0) $JUJU_RELATION_ID ${JUJU_REMOTE_UNIT:--} '
          '$(relation-list | tr "\\n" " " | sed "s/ $//;s/ /,/g")" >> "$HOME/hooks.log"')
KINDS = ("joined", "changed", "departed", "broken")


def relation_hooks(name, extra=None):
    hooks = {f"{name}-relation-{kind}": RECORD for kind in KINDS}
    for kind, body in (extra or {}).items():
        hooks[f"{name}-relation-{kind}"] = f"{RECORD}\n{body}"
    return hooks


class Units:
    """Unit agents of this test, each in its own directories under tmp."""

    def __init__(self, zk_server, zk_root, tmp_path):
        self.zk_server, self.zk_root, self.tmp_path = zk_server, zk_root, tmp_path
        self.agents = {}

    def dir(self, unit):
        return self.tmp_path / unit.replace("/", "-")

    async def start(self, unit, address=None):
        client = await ZKClient(self.zk_server.address, self.zk_root, session_timeout=SESSION_TIMEOUT).connect()
        if address:
            await (await UnitStateManager(client).get_unit(unit)).update(**{"private-address": address})
        base = self.dir(unit)
        agent = UnitAgent(client, unit, unit_dir=str(base / "unit"), charm_dir=str(base / "charm"),
                          log_dir=str(base / "log"))
        await agent.start()
        self.agents[unit] = agent
        return agent

    async def stop(self, unit):
        await self.agents.pop(unit).stop()

    def hooks(self, unit):
        try:
            return (self.dir(unit) / "unit" / "hooks.log").read_text().splitlines()
        except FileNotFoundError:
            return []

    def file(self, unit, name):
        try:
            return (self.dir(unit) / "unit" / name).read_text()
        except FileNotFoundError:
            return None

    async def close(self):
        for unit in list(self.agents):
            await self.stop(unit)


@pytest_twisted.async_yield_fixture
async def units(zk_server, zk_root, tmp_path):
    units = Units(zk_server, zk_root, tmp_path)
    yield units
    await units.close()


async def unit_data(client, name):
    return (await UnitStateManager(client).get_unit(name)).data


async def deploy_pair(env_client, tmp_path, db_hooks=None, web_hooks=None, db_units=1):
    await deploy_charm(env_client, make_charm(
        tmp_path / "db-charm", name="db", metadata_extra="provides:\n  db: kv\n",
        hooks={**relation_hooks("db"), **(db_hooks or {})}), n=db_units)
    await deploy_charm(env_client, make_charm(
        tmp_path / "web-charm", name="web", metadata_extra="requires:\n  db:\n    interface: kv\n",
        hooks={**relation_hooks("db"), **(web_hooks or {})}))


def has(units, unit, *lines):
    async def check():
        return all(line in units.hooks(unit) for line in lines)
    return check


async def nothing_owed(units, unit):
    return not os.listdir(units.dir(unit) / "unit" / "relations")


def ran(units, unit, *hooks):
    """Whether each (hook kind, remote unit) has run, whatever relation-list said then
    (remote units join in no set order)."""
    async def check():
        done = {tuple(line.split()[0::2][:2]) for line in units.hooks(unit)}
        return all((f"db-relation-{kind}", remote) in done for kind, remote in hooks)
    return check


@pytest_twisted.ensureDeferred
async def test_join_publishes_the_address_first_then_joined_changed_on_both_sides(env_client, tmp_path, units):
    await deploy_pair(env_client, tmp_path, db_hooks={
        "db-relation-joined": f"{RECORD}\nrelation-set port=7070 host=$(unit-get private-address)",
    }, web_hooks={
        "db-relation-joined": f'{RECORD}\nrelation-get private-address > "$HOME/db-address-at-join"',
        "db-relation-changed": f'{RECORD}\nrelation-get --format json - > "$HOME/db-settings"',
    })
    await units.start("db/0", "10.9.0.2")
    await units.start("web/0", "10.9.0.3")
    relation, _, _ = await RelationStateManager(env_client).add_relation("web", "db")
    await eventually(has(units, "web/0", "db-relation-changed db:0 db/0 db/0"))
    await eventually(has(units, "db/0", "db-relation-changed db:0 web/0 web/0"))
    # The remote's address is there at its first hook; -changed follows -joined.
    assert units.file("web/0", "db-address-at-join") == "10.9.0.2\n"
    for unit, remote in (("web/0", "db/0"), ("db/0", "web/0")):
        assert units.hooks(unit)[:2] == [f"db-relation-joined db:0 {remote} {remote}",
                                         f"db-relation-changed db:0 {remote} {remote}"]

    # db's -joined set port and host (committed at its exit 0): web's -changed runs
    # again and reads them.
    async def settings():
        text = units.file("web/0", "db-settings") or ""
        return "7070" in text and text
    text = await eventually(settings)
    assert '"host": "10.9.0.2"' in text and '"private-address": "10.9.0.2"' in text
    assert relation.relation_id("web") == "db:0"


@pytest_twisted.ensureDeferred
async def test_settings_of_a_failing_hook_are_dropped_and_its_relation_is_in_error(env_client, tmp_path, units):
    await deploy_pair(env_client, tmp_path, db_hooks={
        "db-relation-joined": f"{RECORD}\nrelation-set ok=yes",
        "db-relation-changed": f"{RECORD}\nrelation-set broken=yes\necho 'cannot configure' >&2\nexit 4",
    })
    await units.start("db/0", "10.9.0.2")
    await units.start("web/0", "10.9.0.3")
    await RelationStateManager(env_client).add_relation("web", "db")

    async def errored():
        return ((await unit_data(env_client, "db/0")).get("relation-errors") or {}).get("db:0")
    error = await eventually(errored)
    assert error == "db-relation-changed hook exited with status 4: cannot configure"
    data = await unit_data(env_client, "db/0")
    assert data["state"] == "started"  # the unit goes on
    shown = (await status.collect(env_client))["services"]["db"]["units"]["db/0"]
    assert shown["agent-state"] == "started" and shown["relation-errors"] == {"db:0": error}
    settings = await env_client.get(settings_path(relation_key(0), "db/0"))
    assert b"ok: 'yes'" in settings[0] and b"broken" not in settings[0]


@pytest_twisted.ensureDeferred
async def test_remove_relation_runs_departed_for_each_remote_unit_then_broken(env_client, tmp_path, units):
    await deploy_pair(env_client, tmp_path, db_units=2)
    for unit, address in (("db/0", "10.9.0.2"), ("db/1", "10.9.0.4"), ("web/0", "10.9.0.3")):
        await units.start(unit, address)
    manager = RelationStateManager(env_client)
    await manager.add_relation("web", "db")
    await eventually(ran(units, "web/0", ("changed", "db/0"), ("changed", "db/1")), timeout=20)
    await manager.remove_relation("web", "db")
    await eventually(has(units, "web/0", "db-relation-broken db:0 - "))
    lines = units.hooks("web/0")
    # Each remote unit departs in name order, the other still listed, then -broken.
    tail = lines[lines.index("db-relation-departed db:0 db/0 db/1"):]
    assert tail == ["db-relation-departed db:0 db/0 db/1", "db-relation-departed db:0 db/1 ",
                    "db-relation-broken db:0 - "]
    await eventually(has(units, "db/0", "db-relation-departed db:0 web/0 ", "db-relation-broken db:0 - "))
    # Nothing more is owed: the schedule goes once -broken has completed (just after
    # the hook's last line).
    await eventually(lambda: nothing_owed(units, "web/0"))


@pytest_twisted.ensureDeferred
async def test_changes_while_the_agent_is_down_give_the_right_hooks_after_none_twice(env_client, tmp_path, units):
    await deploy_pair(env_client, tmp_path, db_units=2)
    for unit, address in (("db/0", "10.9.0.2"), ("db/1", "10.9.0.4"), ("web/0", "10.9.0.3")):
        await units.start(unit, address)
    await RelationStateManager(env_client).add_relation("web", "db")
    await eventually(ran(units, "web/0", ("changed", "db/0"), ("changed", "db/1")), timeout=20)
    before = list(units.hooks("web/0"))
    await units.stop("web/0")
    # Meanwhile: db/1's agent goes away (its member node with it) and db/0's settings change.
    await units.stop("db/1")
    await nodes.update(env_client, settings_path(relation_key(0), "db/0"), nodes.merge({"extra": "1"}))

    await units.start("web/0")

    async def two_more():
        return len(units.hooks("web/0")) >= len(before) + 2
    await eventually(two_more, timeout=20)
    after = units.hooks("web/0")[len(before):]
    # Each change once, and nothing that had run before the stop.
    assert sorted(after) == ["db-relation-changed db:0 db/0 db/0", "db-relation-departed db:0 db/1 db/0"]


@pytest_twisted.ensureDeferred
async def test_hook_tools_in_relation_and_other_hooks(env_client, tmp_path, units):
    await deploy_pair(env_client, tmp_path, db_hooks={
        "db-relation-joined": f"{RECORD}\nrelation-set user=wp 'password=s3cret pass'",
    }, web_hooks={
        "db-relation-changed": f'''{RECORD}
[ -n "$(relation-get user)" ] || exit 0
{{
  echo "ids: $(relation-ids db)"
  echo "get user: $(relation-get user)"
  echo "get missing: [$(relation-get missing)]"
  echo "get -r: $(relation-get -r db:0 user db/0)"
  relation-get --format shell
  relation-set -r db:0 seen=1 note=
  echo "own: $(relation-get - web/0 | tr -d '\\n')"
  relation-list --format json; echo
}} > "$HOME/tools.tmp" 2>&1
mv "$HOME/tools.tmp" "$HOME/tools"
''',
        "config-changed": '''
relation-list > "$HOME/outside" 2>&1; echo "status $?" >> "$HOME/outside"
''',
    })
    await units.start("db/0", "10.9.0.2")
    await units.start("web/0", "10.9.0.3")
    await RelationStateManager(env_client).add_relation("web", "db")

    async def tools():
        return units.file("web/0", "tools")
    text = await eventually(tools)
    lines = text.splitlines()
    assert "ids: db:0" in lines
    assert "get user: wp" in lines
    assert "get missing: []" in lines
    assert "get -r: wp" in lines
    assert "VAR_PASSWORD='s3cret pass'" in lines and "VAR_PRIVATE_ADDRESS=10.9.0.2" in lines
    assert "own: {'private-address': '10.9.0.3', 'seen': '1'}" in lines
    assert '["db/0"]' in lines
    # relation-list in a hook of no relation, without -r: one line, non-zero.
    outside = units.file("web/0", "outside").splitlines()
    assert len(outside) == 2 and "-r" in outside[0] and outside[1] != "status 0"


@pytest_twisted.ensureDeferred
async def test_a_relation_removed_while_the_agent_is_down_is_broken_after(env_client, tmp_path, units):
    await deploy_pair(env_client, tmp_path)
    await units.start("db/0", "10.9.0.2")
    await units.start("web/0", "10.9.0.3")
    manager = RelationStateManager(env_client)
    await manager.add_relation("web", "db")
    await eventually(has(units, "web/0", "db-relation-changed db:0 db/0 db/0"))
    await units.stop("web/0")
    await manager.remove_relation("web", "db")
    await units.start("web/0")
    await eventually(has(units, "web/0", "db-relation-broken db:0 - "))
    assert units.hooks("web/0")[-2:] == ["db-relation-departed db:0 db/0 ", "db-relation-broken db:0 - "]
    await eventually(lambda: nothing_owed(units, "web/0"))


@pytest_twisted.ensureDeferred
async def test_a_crashed_agents_member_node_stands_until_its_session_expires(env_client, zk_spec, tmp_path, units):
    await deploy_pair(env_client, tmp_path)
    await units.start("db/0", "10.9.0.2")
    await (await UnitStateManager(env_client).get_unit("web/0")).update(**{"private-address": "10.9.0.3"})
    base = units.dir("web/0")
    process = subprocess.Popen(
        [sys.executable, "-m", "ensemble", "unit-agent", "--unit", "web/0"],
        env=ensemble_env(tmp_path / "home", zk_spec, ENSEMBLE_SESSION_TIMEOUT="4", ENSEMBLE_UNIT_DIR=str(base / "unit"),
                         ENSEMBLE_CHARM_DIR=str(base / "charm"), ENSEMBLE_LOG_DIR=str(base / "log")),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    member = f"{relation_path(relation_key(0))}/client/web-0"
    try:
        await RelationStateManager(env_client).add_relation("web", "db")
        await eventually(has(units, "db/0", "db-relation-changed db:0 web/0 web/0"))
        old_owner = (await env_client.exists(member)).ephemeral_owner
    finally:
        process.kill()  # a crash: its session is left to expire, not closed
        process.wait()
    await units.start("web/0")
    new_session = units.agents["web/0"].client.session_id
    assert old_owner != new_session

    async def taken_over():
        stat = await env_client.exists(member)
        return stat is not None and stat.ephemeral_owner == new_session
    await eventually(taken_over, timeout=20)
    # db saw web/0 leave for a blink at most: a -departed (when the old session
    # expired) is followed by -joined and -changed again (when the new member came).
    lines = units.hooks("db/0")
    if "db-relation-departed db:0 web/0 " in lines:
        async def back():
            return units.hooks("db/0")[lines.index("db-relation-departed db:0 web/0 ") + 1:][:2] == [
                "db-relation-joined db:0 web/0 web/0", "db-relation-changed db:0 web/0 web/0"]
        await eventually(back)
