"""A unit is a small real machine for the software inside it: apt-get install works
(through its host's package cache, the only way out), offline once cached, and units
find each other by name (the host's name server). Real LXC, ZooKeeper and a local
environment of the test's own."""

import os
import random
import shutil
import socket
import tempfile
import threading

import pytest_twisted
from twisted.internet import threads

from ensemble.home import EnsembleHome
from ensemble.lab import Lab
from ensemble.machine.package_cache import PackageCache
from ensemble.network.netns import ip_forwarding
from ensemble.state import nodes

from conftest import make_charm
from test_deploy import all_started, environment, sh, states, until  # noqa: F401 (a fixture)

# Install hooks as real charms write them: no apt-get update first.
INSTALL = 'apt-get install -y --no-install-recommends {package} && echo "{package} installed"'


def apt_charm(tmp_path, name, package):
    return make_charm(tmp_path / name, name, hooks={"install": INSTALL.format(package=package)})


def cache_dir(env):
    return os.path.join(EnsembleHome(str(env.home)).storage_dir, "packages", "machine-0", "cache")


def cached(env, package):
    found = []
    for directory, _, files in os.walk(cache_dir(env)):
        found += [os.path.join(directory, f) for f in files if f.startswith(f"{package}_") and f.endswith(".deb")]
    return found


class BlackHole:
    """A TCP port on loopback that accepts and never answers: an upstream that is gone."""

    def __init__(self):
        # apt-cacher-ng 3.7.4 cannot reach ports above 32767 (it keeps them signed),
        # and the kernel's ephemeral ports all are: pick one below.
        for _ in range(100):
            self.socket = socket.socket()
            try:
                self.socket.bind(("127.0.0.1", random.randint(20000, 32767)))
                break
            except OSError:
                self.socket.close()
        self.socket.listen(64)
        self.held = []
        self.thread = threading.Thread(target=self._hold, daemon=True)
        self.thread.start()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.socket.getsockname()[1]}"

    def _hold(self):
        try:
            while True:
                self.held.append(self.socket.accept()[0])
        except OSError:
            pass

    def close(self):
        self.socket.close()
        for connection in self.held:
            connection.close()


async def run_in(env, unit, script):
    container = env.units()[unit]["container"]
    return await sh(env.driver(), container, script)


@pytest_twisted.ensureDeferred
async def test_units_install_packages_through_their_hosts_cache_and_again_offline(environment, tmp_path):
    env = environment
    forwarding = ip_forwarding(None)
    env.cli("deploy", apt_charm(tmp_path, "greeter", "hello"), "--to", "0")
    await all_started(env, ["greeter/0"])
    code, out, _ = await run_in(env, "greeter/0", "hello")
    assert code == 0 and out.strip() == "Hello, world!"
    assert cached(env, "hello"), "the .deb went through the host's cache"
    machine = env.status()["machines"]["0"]
    gateway = machine["subnet"].rsplit(".", 1)[0] + ".1"
    assert machine["package-cache"] == {"address": f"{gateway}:3142", "state": "running"}
    # The unit's apt knows only the cache; the unit has no route past its host.
    code, out, _ = await run_in(env, "greeter/0", "apt-config dump Acquire::http::Proxy; ip route")
    assert f'Acquire::http::Proxy "http://{gateway}:3142";' in out
    assert out.count(" via ") == 1 and f"default via {gateway}" in out
    assert ip_forwarding(None) == forwarding

    # The upstream goes away (a black hole: connections accepted, never answered).
    # A package fetched once installs in a new unit all the same.
    black_hole = BlackHole()
    try:
        client = await env.client()
        try:
            await nodes.update(client, nodes.ENVIRONMENT, lambda d: {
                **d, "package-cache": {**(d.get("package-cache") or {}), "proxy": black_hole.url}})
        finally:
            await client.close()
        os.kill(env.agent_pid(), 15)  # its cache goes with it; the restart reads the new upstream
        await until(lambda: env.status()["machines"]["0"]["agent"] == "down", what="agent down")
        env.cli("bootstrap")
        env.cli("add-unit", "greeter")
        await all_started(env, ["greeter/0", "greeter/1"])
        code, out, _ = await run_in(env, "greeter/1", "hello")
        assert code == 0 and out.strip() == "Hello, world!"

        # Something never fetched cannot be had: the unit says so in one line, soon.
        env.cli("deploy", apt_charm(tmp_path, "trains", "sl"), "--to", "0")
        await until(lambda: states(env).get("trains/0") == "error", timeout=180, what="trains/0 in error")
        error = env.units()["trains/0"]["error"]
        assert error.startswith("install hook exited with status 100") and "\n" not in error
        assert "sl" in error
        assert black_hole.held, "the cache's upstream was the black hole"
    finally:
        black_hole.close()


@pytest_twisted.ensureDeferred
async def test_units_find_each_other_by_name(environment, tmp_path):
    env = environment
    probe = make_charm(tmp_path / "probe", "probe", hooks={"install": "true", "start": "true", "stop": "true"})
    env.cli("deploy", probe, "db", "--to", "0", "-n", "2")
    env.cli("deploy", probe, "web", "--to", "0")
    units = await all_started(env, ["db/0", "db/1", "web/0"])
    address = {name: unit["private-address"] for name, unit in units.items()}

    async def lookup(name, unit="web/0"):
        code, out, _ = await run_in(env, unit, f"getent ahostsv4 {name} | awk '{{print $1}}' | sort -u")
        assert code == 0
        return sorted(out.split()) or None  # nothing: it did not resolve

    assert await lookup("web-0") == [address["web/0"]]          # its own name
    assert await lookup("db-0") == [address["db/0"]]
    assert await lookup("db") == sorted([address["db/0"], address["db/1"]])
    domain = env.status()["machines"]["0"]["name-server"]["domain"]
    assert await lookup(f"db-1.{domain}") == [address["db/1"]]
    assert await lookup("db-0", unit="db/1") == [address["db/0"]]
    # Not a unit's: answered at once, not forwarded anywhere.
    code, _, _ = await run_in(env, "web/0", "getent hosts nosuch-7 || exit 9; getent hosts deb.debian.org || exit 9")
    assert code == 9

    # On its host a unit reaches the name server and the cache, and nothing else new.
    gateway = env.status()["machines"]["0"]["subnet"].rsplit(".", 1)[0] + ".1"
    other = socket.socket()
    other.bind((gateway, 0))
    other.listen(1)
    port = other.getsockname()[1]
    try:
        code, out, _ = await run_in(env, "web/0", (
            "python3 -c 'import socket, sys\n"
            "for port in sys.argv[1:]:\n"
            "    try: socket.create_connection((\"%s\", int(port)), timeout=2).close(); print(port, \"open\")\n"
            "    except OSError: print(port, \"closed\")' 3142 53 %d" % (gateway, port)
        ))
    finally:
        other.close()
    assert out.split("\n")[:3] == ["3142 open", "53 open", f"{port} closed"], out

    env.cli("remove-unit", "db/1")
    await until(lambda: "db/1" not in env.units(), what="db/1 removed")

    async def gone():
        return await lookup("db-1") is None and await lookup("db") == [address["db/0"]]

    await until(gone, timeout=20, what="db-1 no longer resolving")


@pytest_twisted.ensureDeferred
async def test_across_hosts_each_hosts_units_use_its_own_cache_and_find_all_units_by_name(tmp_path):
    """Two hosts of a lab (no route off the machine): the only way to packages is a
    site proxy of the test's (an apt-cacher-ng here), reached by each host's own cache."""
    site = PackageCache(str(site_directory()), "127.0.0.1", random.randint(20000, 32767))
    await site.start()
    lab = Lab(tmp_path / "lab", hosts=2, package_upstream=f"{site.address}:{site.port}")
    try:
        await threads.deferToThread(lab.start)
        charm = apt_charm(tmp_path, "greeter", "hello")
        await threads.deferToThread(lab.ensemble, "deploy", charm, "--to", "0")
        await threads.deferToThread(lab.ensemble, "add-unit", "greeter", "--to", "1")
        units = await threads.deferToThread(lab.wait_started, ["greeter/0", "greeter/1"], 240)
        for i, name in enumerate(["greeter/0", "greeter/1"]):
            assert units[name]["machine"] == i
            ran = await threads.deferToThread(lab.container_run, i, units[name]["container"], ["hello"])
            assert ran.stdout.strip() == "Hello, world!"
            # Through its own host's cache: the .deb is in each host's cache directory.
            cache = os.path.join(EnsembleHome(lab.home(i)).storage_dir, "packages", f"machine-{i}", "cache")
            assert any(f.startswith("hello_") for _, _, files in os.walk(cache) for f in files), cache

        async def resolve(i, unit, name):
            script = f"getent ahostsv4 {name} | awk '{{print $1}}' | sort -u"
            ran = await threads.deferToThread(lab.container_run, i, unit, ["/bin/sh", "-c", script])
            return sorted(ran.stdout.split()) or None

        on = {name: (units[name]["machine"], units[name]["container"]) for name in units}
        address = {name: units[name]["private-address"] for name in units}
        assert await resolve(*on["greeter/1"], "greeter-0") == [address["greeter/0"]]
        assert await resolve(*on["greeter/0"], "greeter-1") == [address["greeter/1"]]
        assert await resolve(*on["greeter/0"], "greeter") == sorted(address.values())

        await threads.deferToThread(lab.ensemble, "remove-unit", "greeter/0")

        async def gone():
            return await resolve(*on["greeter/1"], "greeter-0") is None

        await until(gone, timeout=60, what="greeter-0 no longer resolving on host 1")
    finally:
        await threads.deferToThread(lab.close)
        await site.stop()
        shutil.rmtree(site.directory, ignore_errors=True)


def site_directory():
    # The cache runs as the apt-cacher-ng user, which cannot enter pytest's 0700 tmp.
    return tempfile.mkdtemp(prefix="ensemble-site-cache-", dir="/var/tmp")
