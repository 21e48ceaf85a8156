"""The charm author's loop on real LXC, in one local environment: a broken install
shown in status, fixed with upgrade-charm and `resolved --retry`; set/get reaching
config-changed in the container; upgrade-charm keeping the unit's data, address and
relations, and refusing a charm that drops a relation in use; a failed relation hook
moved past with `resolved UNIT RELATION`."""

import json
import shutil
import urllib.request

import pytest
import pytest_twisted

from conftest import make_charm
from test_deploy import DB, WEB, all_started, bootstrapped, sh, states, until

HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    with bootstrapped(tmp_path_factory.mktemp("loop") / "home") as env:
        yield env


def unit(env, name):
    return env.units()[name]


async def read(driver, container, path):
    code, out, _ = await sh(driver, container, f"cat {path}")
    return out.strip() if code == 0 else None


def write_hook(charm, hook, body):
    path = charm / "hooks" / hook
    path.write_text(f"#!/bin/sh\nset -e\n{body}\n")
    path.chmod(0o755)


@pytest_twisted.ensureDeferred
async def test_break_fix_upgrade_retry_set_get_in_a_container(env, tmp_path):
    try:
        await _break_fix_upgrade_retry_set_get(env, tmp_path)
    finally:
        # Gone whatever happened: the next test counts every unit of the environment.
        env.cli("destroy-service", "hello", check=False)
        await until(lambda: "hello/0" not in env.units(), what="hello/0 removed")


async def _break_fix_upgrade_retry_set_get(env, tmp_path):
    charm = tmp_path / "hello"
    make_charm(charm, name="hello", hooks={
        "install": 'echo "installing hello"; echo "E: Unable to locate package hello-server" >&2; exit 100',
        "config-changed": 'mkdir -p /var/lib/hello; g=$(config-get greeting); '
                          'if [ "$g" = fail ]; then echo "refusing $g" >&2; exit 4; fi; echo "$g" > /var/lib/hello/greeting',
    })
    (charm / "config.yaml").write_text("options:\n  greeting: {type: string, default: hi, description: what it says}\n")
    env.cli("deploy", str(charm), "--to", "0")
    await until(lambda: states(env).get("hello/0") == "error", what="hello/0 in error")
    shown = unit(env, "hello/0")
    assert shown["error"] == "install hook exited with status 100: installing hello | " \
                             "E: Unable to locate package hello-server"
    assert shown["workload"]["hook"] == "install" and shown["workload"]["result"] == "exit 100"

    # Fixed in the directory, shipped, and retried: the fixed install runs.
    write_hook(charm, "install", "echo fixed; mkdir -p /var/lib/hello; echo kept > /var/lib/hello/data")
    result = env.cli("upgrade-charm", "hello")
    assert result.stdout.startswith("hello: upgraded hello-") and result.stdout.rstrip().endswith(" for hello/0")
    assert states(env)["hello/0"] == "error"  # the failure stands until resolved
    assert env.cli("resolved", "--retry", "hello/0").stdout == (
        "hello/0: retrying install hook exited with status 100: installing hello | "
        "E: Unable to locate package hello-server\n")
    units = await all_started(env, ["hello/0"])
    container, address = units["hello/0"]["container"], units["hello/0"]["private-address"]
    driver = env.driver()
    try:
        assert await read(driver, container, "/var/lib/hello/greeting") == "hi"

        assert env.cli("set", "hello", "greeting=bonjour").stdout == "hello: set greeting=bonjour\n"
        await until(lambda: read(driver, container, "/var/lib/hello/greeting"), what="config-changed ran")
        await until(lambda: _equals(read(driver, container, "/var/lib/hello/greeting"), "bonjour"),
                    what="config-changed saw bonjour")
        got = json.loads(env.cli("get", "hello", "--format", "json").stdout)["settings"]["greeting"]
        assert got == {"value": "bonjour", "default": "hi", "type": "string", "set": True,
                       "description": "what it says"}
        result = env.cli("set", "hello", "greeting", check=False)
        assert (result.returncode, result.stderr) == (1, "error: invalid 'greeting': use KEY=VALUE "
                                                         "(KEY= to go back to the default)\n")

        # An upgrade runs upgrade-charm in the same container, its data and address kept.
        write_hook(charm, "upgrade-charm", "echo upgraded > /var/lib/hello/upgraded")
        env.cli("upgrade-charm", "hello")
        await until(lambda: read(driver, container, "/var/lib/hello/upgraded"), what="upgrade-charm ran")
        assert await read(driver, container, "/var/lib/hello/data") == "kept"
        after = unit(env, "hello/0")
        assert (after["container"], after["private-address"]) == (container, address)

        # A config-changed that fails is an error until resolved; skipping it goes on.
        env.cli("set", "hello", "greeting=fail")
        await until(lambda: states(env)["hello/0"] == "error", what="config-changed failed")
        assert unit(env, "hello/0")["error"] == "config-changed hook exited with status 4: refusing fail"
        env.cli("resolved", "hello/0")
        await all_started(env, ["hello/0"])
        assert await read(driver, container, "/var/lib/hello/greeting") == "bonjour"
        result = env.cli("resolved", "hello/0", check=False)
        assert (result.returncode, result.stderr) == (
            1, "error: unit hello/0 is started, not in error: nothing to resolve\n")
    finally:
        await driver.close()


async def _equals(reading, value):
    return await reading == value


@pytest_twisted.ensureDeferred
async def test_upgrade_keeps_relations_refuses_dropping_one_and_a_relation_hook_is_resolved(env, tmp_path):
    web = tmp_path / "web"
    shutil.copytree(WEB, web)
    env.cli("deploy", DB, "--to", "0")
    env.cli("deploy", str(web), "--to", "0")
    env.cli("add-relation", "web", "db")
    env.cli("expose", "web")
    units = await all_started(env, ["db/0", "web/0"])
    address = units["web/0"]["private-address"]

    async def page():
        try:
            with HTTP.open(f"http://{address}/", timeout=10) as response:
                return response.read().decode()
        except OSError:
            return None
    assert "hello from db/0" in await until(page, what="web serving db's data")

    # A new revision whose db-relation-changed fails: the next db unit puts web's
    # relation in error; the unit and its page go on.
    hook = web / "hooks" / "db-relation-changed"
    original = hook.read_text()
    hook.write_text("#!/bin/sh\necho 'cannot parse the db answer' >&2\nexit 3\n")
    env.cli("upgrade-charm", "web")
    await until(lambda: "upgrading-from" not in unit(env, "web/0") and
                unit(env, "web/0").get("workload", {}).get("hook") == "config-changed", what="web upgraded")
    env.cli("add-unit", "db", "--to", "0")
    await until(lambda: unit(env, "web/0").get("relation-errors"), what="web's relation in error")
    assert unit(env, "web/0")["relation-errors"] == {
        "db:0": "db-relation-changed hook exited with status 3: cannot parse the db answer"}
    assert states(env)["web/0"] == "started"
    assert "hello from db/0" in await page()

    hook.write_text(original)
    env.cli("upgrade-charm", "web")
    result = env.cli("resolved", "--retry", "web/0", "db")
    assert result.stdout.startswith("web/0: retrying relation db:0: db-relation-changed hook exited with status 3")
    await until(lambda: not unit(env, "web/0").get("relation-errors"), what="web's relation resolved")
    assert unit(env, "web/0")["private-address"] == address

    # A revision without the db relation is refused while web is in it.
    metadata = web / "metadata.yaml"
    metadata.write_text(metadata.read_text().split("requires:")[0])
    result = env.cli("upgrade-charm", "web", check=False)
    assert result.returncode == 1
    assert result.stderr.startswith("error: the new charm drops relation 'db' (")
    assert "remove that relation first" in result.stderr
