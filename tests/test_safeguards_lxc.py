"""Fail closed, for real: a local environment whose machine agent cannot import the
nftables binding (a module of that name ahead of it on PYTHONPATH raises ImportError,
as a missing one does) starts no unit and says why on the machine; once the module is
gone, the same agent loads the firewall and starts the unit. Fast cases, on fakes:
test_safeguards.py."""

import uuid

import pytest_twisted
from twisted.internet import reactor, task

from ensemble.machine.container.names import container_name
from ensemble.network.firewall import Firewall

from conftest import run_ensemble
from test_deploy import DB, Environment, all_started, until

SHADOW = 'raise ImportError("No module named \'nftables\' (shadowed by test_safeguards_lxc)")\n'


@pytest_twisted.ensureDeferred
async def test_a_unit_waits_with_the_reason_on_its_machine_until_the_firewall_loads(tmp_path):
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "nftables.py").write_text(SHADOW)
    env = Environment(tmp_path / "home")
    # Not the range of test_deploy's first environment, which another run may hold.
    env.network = f"10.{uuid.uuid4().int % 20 + 225}.0.0/16"
    driver = env.driver()
    try:
        # Only the bootstrap (and so machine 0's agent, which it spawns) gets the shadow.
        result = run_ensemble("bootstrap", "--network", env.network, env={**env.env, "PYTHONPATH": str(shadow)},
                              timeout=300)
        assert result.returncode == 0, result.stderr
        pid = env.agent_pid()
        name = env.config["name"]
        env.cli("deploy", DB, "--to", "0")

        def security_error():
            return env.status()["machines"]["0"].get("security-error")

        shown = await until(security_error, timeout=60, what="the machine's security-error")
        # The firewall's tables cannot be loaded: a machine-wide layer, which holds the
        # unit before its container is made (its port's entry, what a start needs
        # besides, is not asked for then).
        assert sorted(shown) == ["firewall"]
        assert shown["firewall"].startswith("the nftables Python binding is missing: install the 'python3-nftables'")
        # Several passes later the unit still waits, without a container.
        await task.deferLater(reactor, 12, lambda: None)
        unit = env.units()["db/0"]
        assert unit["agent-state"] == "pending" and unit["private-address"] and not unit.get("container")
        assert await driver.list() == [] and Firewall(name, "unused", None).present() == []

        (shadow / "nftables.py").unlink()  # the binding is back
        await all_started(env, ["db/0"])
        assert security_error() is None
        assert await driver.list() == [container_name(name, "db/0")]
        assert Firewall(name, "unused", None).present() == ["bridge", "inet"]
        assert env.agent_pid() == pid  # no restart
    finally:
        await driver.close()
        result = env.cli("destroy-environment", "-y", check=False)
        assert result.returncode == 0, result.stderr
