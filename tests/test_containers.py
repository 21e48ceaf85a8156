"""LXC containers per unit: names, the template, the rendered config and the driver,
with real containers on a bridge in a network namespace each test creates.

The template is built once (first run: ~45 s) in the well-known cache
($ENSEMBLE_TEMPLATE_CACHE or /var/cache/ensemble) and reused by later runs. The
tests of failed, interrupted and concurrent builds use a cache of their own.
"""

import dataclasses
import json
import os
import re
import time
import uuid

import pytest
import pytest_twisted
from pyroute2 import IPRoute
from twisted.internet import defer, reactor, task

import ensemble
from ensemble.errors import InvalidName, InvalidValue
from ensemble.machine.container import config as lxc_config
from ensemble.machine.container import driver as driver_module
from ensemble.machine.container import id_ranges
from ensemble.machine.container.id_ranges import IdRangeError
from ensemble.machine.container.driver import (
    ContainerError,
    ContainerExists,
    ContainerNotFound,
    OWN_RANGE,
    ContainerSpec,
    LXCDriver,
)
from ensemble.machine.content import agent_python, ensemble_mounts
from ensemble.machine.container.names import container_name, hostname, validate_container_name, veth_name
from ensemble.machine.container.template import (
    LOCK_FD,
    MARKER,
    Template,
    TemplateError,
    apt_sources,
    host_mirror,
    mounts_under,
    remove_tree,
)
from ensemble.network.bridge import ensure_bridge

from conftest import eventually
from netns import temporary_netns

BRIDGE = "ens-t"
SUBNET = "10.231.0.0/24"


# -- fixtures (test_isolation.py imports them) ----------------------------------------

@pytest.fixture(scope="session")
def template():
    """The real template in the well-known cache: built by the first run, reused after."""
    t = Template()
    lines = []
    pytest_twisted.blockon(defer.ensureDeferred(t.ensure(progress=lines.append)))
    assert t.exists()
    return t


class Lab:
    """A network namespace with a bridge, and specs for containers on it."""

    def __init__(self, netns, gateway):
        self.netns = netns
        self.gateway = gateway
        self.names = []
        self._next = 10

    def spec(self, unit="web/0", env="test", **kw):
        name = container_name(env, unit)
        address = kw.pop("address", None) or f"10.231.0.{self._next}"
        self._next += 1
        self.names.append(name)
        kw.setdefault("mounts", ensemble_mounts())
        return ContainerSpec(name=name, hostname=hostname(unit), address=address, prefixlen=24,
                             gateway=self.gateway, bridge=BRIDGE, **kw)


@pytest.fixture
def lab():
    with temporary_netns() as ns:
        gateway = ensure_bridge(BRIDGE, SUBNET, ns)
        yield Lab(ns, gateway)


async def _destroy_all(d, lab):
    """Every container the test made or the driver holds, then the driver itself."""
    try:
        for name in set(lab.names) | set(await d.list()):
            await d.destroy(name, timeout=2)
    finally:
        await d.close()


@pytest_twisted.async_yield_fixture
async def driver(template, lab, tmp_path):
    d = LXCDriver(str(tmp_path / "lxc"), template, netns=lab.netns)
    try:
        yield d
    finally:
        await _destroy_all(d, lab)


@pytest_twisted.async_yield_fixture
async def unprivileged_driver(template, lab):
    """A driver for user-namespaced containers (units' kind). Its lxc path is where
    the containers' root, an unprivileged host id, can search it: not under tmp_path."""
    path = f"/var/lib/ensemble/test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    d = LXCDriver(path, template, netns=lab.netns)
    try:
        yield d
    finally:
        try:
            await _destroy_all(d, lab)
        finally:
            remove_tree(path)


async def sh(driver, name, script, **kw):
    """Run a shell script inside; its stdout as text (asserting it succeeded)."""
    code, out, err = await driver.exec(name, ["/bin/sh", "-c", script], **kw)
    assert code == 0, (script, code, out, err)
    return out.decode()


def leftovers(driver, lab, name):
    """What of container `name` is still on the host."""
    found = []
    if os.path.exists(os.path.join(driver.lxc_path, name)):
        found.append("dir")
    found += [d for d in driver.cgroup_dirs(name) if os.path.exists(d)]
    with IPRoute(netns=lab.netns, flags=0) as ipr:
        if ipr.link_lookup(ifname=veth_name(name)):
            found.append("veth")
    with open("/proc/self/mountinfo") as f:
        found += [line for line in f if name in line or driver.lxc_path in line]
    return found


# -- names ----------------------------------------------------------------------------

def test_container_names_derive_from_environment_and_unit():
    assert container_name("prod", "web/0") == "ens-prod-web-0"
    assert container_name("test", "db-main/12") == "ens-test-db-main-12"
    assert hostname("web/3") == "web-3"
    long = container_name("a" * 16, "s" * 40 + "/123456789")
    assert len(long) <= 64 and re.fullmatch(r"[a-z0-9-]+", long)
    assert long != container_name("a" * 16, "s" * 39 + "t/123456789")
    assert long.endswith("-123456789")
    for env, unit in [("Prod", "web/0"), ("prod", "web"), ("prod", "web/x"), ("prod", "../x/0"),
                      ("p" * 17, "web/0"), ("prod", "Web/0"), ("prod", "web/01")]:
        with pytest.raises(InvalidName):
            container_name(env, unit)
    for bad in ["", "a/b", "..", "-x", "A", "x" * 65, "a b", "é"]:
        with pytest.raises(InvalidName):
            validate_container_name(bad)


def test_veth_names_fit_and_are_ours():
    name = veth_name("ens-prod-web-0")
    assert name.startswith("ve-") and len(name) == 15
    assert veth_name("ens-prod-web-0") == name != veth_name("ens-prod-web-1")


# -- template recipe and mirror -------------------------------------------------------

def test_template_version_follows_what_goes_in(tmp_path):
    a = Template(str(tmp_path), release="bookworm", mirror="http://deb.debian.org/debian")
    assert a.name == f"ensemble-template-{a.version}" and len(a.version) == 12
    assert Template(str(tmp_path), release="bookworm", mirror="http://deb.debian.org/debian/").version == a.version
    assert Template(str(tmp_path), release="trixie", mirror="http://deb.debian.org/debian").version != a.version
    assert Template(str(tmp_path), release="bookworm", mirror="http://mirror.example/debian").version != a.version
    assert a.path == str(tmp_path / "lxc" / a.name) and not a.exists()
    assert Template().cache_dir == os.environ.get("ENSEMBLE_TEMPLATE_CACHE", "/var/cache/ensemble")


def test_host_mirror_is_the_main_archive_for_the_release(tmp_path):
    apt = tmp_path / "apt"
    (apt / "sources.list.d").mkdir(parents=True)
    (apt / "sources.list").write_text(
        "# deb http://commented.example/debian bookworm main\n"
        "deb [arch=amd64] https://packages.example.com/apt cloud-sdk-bookworm main\n"
        "deb-src http://src.example/debian bookworm main\n"
    )
    (apt / "sources.list.d" / "nodesource.sources").write_text(
        "Types: deb\nURIs: https://deb.nodesource.com/node_20.x\nSuites: nodistro\nComponents: main\n"
    )
    (apt / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://security.example/debian-security\nSuites: bookworm-security\nComponents: main\n\n"
        "Types: deb\nURIs: http://mirror.example/debian/\nSuites: bookworm bookworm-updates\n"
        "Components: main contrib\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n"
        "Types: deb\nEnabled: no\nURIs: http://disabled.example/debian\nSuites: bookworm\nComponents: main\n"
    )
    (apt / "sources.list.d" / "thirdparty.list").write_text("deb http://third.example/debian bookworm main\n")
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "third.example_debian_dists_bookworm_InRelease").write_text("Origin: Third\nSuite: bookworm\n")
    (lists / "mirror.example_debian_dists_bookworm_InRelease").write_text("Origin: Debian\nSuite: bookworm\n")
    uris = [s.uri for s in apt_sources(str(apt))]
    assert "http://disabled.example/debian" not in uris and "http://src.example/debian" not in uris
    mirror, keyring = host_mirror("bookworm", str(apt), str(lists))
    assert mirror == "http://mirror.example/debian"
    assert keyring == "/usr/share/keyrings/debian-archive-keyring.gpg"
    with pytest.raises(TemplateError, match="no apt source"):
        host_mirror("trixie", str(apt), str(lists))
    # This host: its Debian mirror, not the disabled third-party repositories.
    assert host_mirror()[0] == "http://deb.debian.org/debian"


# -- config ---------------------------------------------------------------------------

class FakeCgroups:
    def __init__(self, version, controllers, memsw=False):
        self.version, self.controllers, self.memsw = version, set(controllers), memsw

    def has(self, controller):
        return controller in self.controllers


def _spec(**kw):
    return ContainerSpec("ens-test-web-0", "web-0", "10.231.0.5", 24, "10.231.0.1", BRIDGE, **kw)


def test_config_renders_network_limits_mounts_and_init():
    spec = _spec(memory="64M", cpu_weight=50, pids=128, mounts=[("/srv/my data", "/srv/data", True)])
    text = lxc_config.render(spec, "/l/ens-test-web-0", "/cache/rootfs", "ve-0123456789ab",
                             FakeCgroups(1, {"memory", "cpu", "pids"}, memsw=True))
    keys = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition(" = ")
            keys.setdefault(key, []).append(value)
    assert text.startswith(lxc_config.MARKER + "\n")
    assert keys["lxc.rootfs.path"] == ["overlay:/cache/rootfs:/l/ens-test-web-0/overlay/delta"]
    assert keys["lxc.uts.name"] == ["web-0"]
    assert keys["lxc.net.0.type"] == ["veth"] and keys["lxc.net.0.link"] == [BRIDGE]
    assert keys["lxc.net.0.veth.pair"] == ["ve-0123456789ab"]
    assert keys["lxc.net.0.ipv4.address"] == ["10.231.0.5/24 10.231.0.255"]
    assert keys["lxc.net.0.ipv4.gateway"] == ["10.231.0.1"]
    assert keys["lxc.cgroup.relative"] == ["1"]
    assert keys["lxc.cgroup.memory.limit_in_bytes"] == [str(64 << 20)]
    assert keys["lxc.cgroup.memory.memsw.limit_in_bytes"] == [str(64 << 20)]
    assert keys["lxc.cgroup.cpu.shares"] == ["512"]
    assert keys["lxc.cgroup.pids.max"] == ["128"]
    assert keys["lxc.init.cmd"] == [lxc_config.INIT_CMD]
    assert keys["lxc.log.file"] == ["/l/ens-test-web-0/lxc.log"]
    assert "/srv/my\\040data srv/data none bind,ro,create=dir 0 0" in keys["lxc.mount.entry"]
    assert "/l/ens-test-web-0/ensemble etc/ensemble none bind,create=dir 0 0" in keys["lxc.mount.entry"]
    assert not any(k.startswith("lxc.cgroup2.memory") for k in keys)

    # No pids controller: the limit is recorded as not enforced, nothing fails.
    text = lxc_config.render(_spec(pids=128), "/l/x", "/r", "ve-x", FakeCgroups(1, {"memory", "cpu"}))
    assert "lxc.cgroup.pids.max" not in text and "pids limit 128 not enforced" in text

    # cgroup v2 hosts get the cgroup2 keys.
    text = lxc_config.render(_spec(memory="1G", cpu_weight=200, pids=64), "/l/x", "/r", "ve-x",
                             FakeCgroups(2, {"memory", "cpu", "pids"}))
    assert "lxc.cgroup2.memory.max = 1073741824" in text
    assert "lxc.cgroup2.cpu.weight = 200" in text and "lxc.cgroup2.pids.max = 64" in text
    assert "lxc.cgroup.memory" not in text


def test_spec_validates_its_input():
    with pytest.raises(InvalidName):
        _spec().__class__("../../etc", "web-0", "10.231.0.5", 24, "10.231.0.1", BRIDGE)
    with pytest.raises(InvalidName):
        ContainerSpec("ens-test-web-0", "web_0", "10.231.0.5", 24, "10.231.0.1", BRIDGE)
    with pytest.raises(InvalidValue):
        ContainerSpec("ens-test-web-0", "web-0", "10.231.0.5", 24, "10.9.0.1", BRIDGE)
    with pytest.raises(InvalidValue):
        ContainerSpec("ens-test-web-0", "web-0", "not-an-ip", 24, "10.231.0.1", BRIDGE)
    with pytest.raises(InvalidValue):
        _spec(memory="1K")
    with pytest.raises(InvalidValue):
        _spec(cpu_weight=0)
    with pytest.raises(ValueError):
        _spec(mounts=[("relative/path", "/x", True)])
    with pytest.raises(InvalidValue):
        _spec(agent_command="python -m ensemble")
    # The agent starter runs `-m ensemble ARGS` itself: nothing else can be forked in.
    with pytest.raises(InvalidValue):
        _spec(agent_command=["/bin/sh", "-c", "x"], agent_forked=True)
    with pytest.raises(InvalidValue):
        _spec(agent_forked=True)


def test_a_forked_agent_gets_its_lock_mounted_read_only_and_its_command_in_a_file_of_its_own():
    spec = _spec(agent_command=["/venv/python", "-m", "ensemble", "unit-agent", "--unit", "web/0"],
                 agent_environment={"ENSEMBLE_AUTH": "secret"}, agent_forked=True)
    text = lxc_config.render(spec, "/l/ens-test-web-0", "/cache/rootfs", "ve-0123456789ab",
                             FakeCgroups(1, {"memory", "cpu", "pids"}, memsw=True))
    assert ("lxc.mount.entry = /l/ens-test-web-0/agent.lock etc/ensemble/agent.lock none bind,ro,create=file 0 0"
            in text.splitlines())
    files = lxc_config.service_files(spec)
    content, mode = files["service/agent/agent.json"]
    assert mode == 0o600 and files["service/agent/run"][1] == 0o700
    assert json.loads(content) == {
        "argv": ["/venv/python", "-m", "ensemble", "unit-agent", "--unit", "web/0"],
        "environment": {"ENSEMBLE_AUTH": "secret", "HOME": "/root", "LANG": "C.UTF-8",
                        "PATH": lxc_config.DEFAULT_PATH},
    }
    # runsv's script waits for the lock before it starts an agent of its own.
    run = files["service/agent/run"][0]
    assert run.index("flock 9") < run.index("exec /usr/bin/env -i")
    # Not forked: no lock, no file, the agent started at once.
    plain = lxc_config.service_files(dataclasses.replace(spec, agent_forked=False))
    assert list(plain) == ["service/agent/run"] and "flock" not in plain["service/agent/run"][0]
    assert "agent.lock" not in lxc_config.render(dataclasses.replace(spec, agent_forked=False), "/l/ens-test-web-0",
                                                 "/cache/rootfs", "ve-0123456789ab", FakeCgroups(1, set()))


def test_ensemble_mounts_cover_the_venv_and_the_package():
    mounts = ensemble_mounts()
    paths = [container for _, container, _ in mounts]
    assert all(read_only for _, _, read_only in mounts)
    package = os.path.dirname(ensemble.__file__)
    assert any(package == p or package.startswith(p + "/") for p in paths)
    import sys
    assert sys.prefix in paths and agent_python() == os.path.join(sys.prefix, "bin", "python")


# -- the driver, with real containers -------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_lifecycle_and_destroy_leaves_nothing(driver, lab):
    spec = lab.spec("web/0")
    name = spec.name
    assert await driver.state(name) is None
    await driver.create(spec)
    assert await driver.state(name) == "STOPPED"
    assert await driver.list() == [name]
    with pytest.raises(ContainerExists):
        await driver.create(spec)

    await driver.start(name)
    assert await driver.state(name) == "RUNNING"
    pid = await driver.init_pid(name)
    assert pid and os.path.exists(f"/proc/{pid}")
    assert os.readlink(f"/proc/{pid}/exe") == "/usr/bin/tini"
    await driver.start(name)  # already running: fine

    code, out, err = await driver.exec(name, ["/bin/sh", "-c", "cat; echo $FOO; echo oops >&2; exit 3"],
                                       env={"FOO": "bar"}, input=b"hello\n")
    assert (code, out, err) == (3, b"hello\nbar\n", b"oops\n")
    with pytest.raises(ContainerError, match="timed out"):
        await driver.exec(name, ["sleep", "30"], timeout=1)
    # Our veth is on the bridge, with the name LXC was told.
    with IPRoute(netns=lab.netns, flags=0) as ipr:
        veth = ipr.link_lookup(ifname=veth_name(name))
        bridge = ipr.link_lookup(ifname=BRIDGE)[0]
        assert veth and ipr.get_links(veth[0])[0].get_attr("IFLA_MASTER") == bridge

    await driver.stop(name)
    assert await driver.state(name) == "STOPPED"
    await driver.stop(name)  # stopping a stopped container is fine
    with pytest.raises(ContainerError, match="not running"):
        await driver.exec(name, ["true"])

    await driver.start(name)
    await driver.destroy(name)  # running: stopped first
    assert await driver.state(name) is None
    assert await driver.list() == []
    assert leftovers(driver, lab, name) == []
    await driver.destroy(name)  # idempotent
    assert leftovers(driver, lab, name) == []
    for operation in (driver.start, driver.stop, driver.init_pid):
        with pytest.raises(ContainerNotFound):
            await operation(name)


@pytest_twisted.ensureDeferred
async def test_a_create_cut_short_is_made_again_from_scratch(unprivileged_driver, lab):
    # What a SIGKILL of the machine agent leaves: the directory and what create() had
    # made by then (its disk mounted, its ids claimed), without the config that is
    # written last. The agent's next create() must not take that for a container.
    driver = unprivileged_driver
    cut_early = lab.spec("web/0", idmap=OWN_RANGE)
    os.makedirs(os.path.join(driver.lxc_path, cut_early.name, lxc_config.SERVICE_DIR))
    cut_late = lab.spec("web/1", idmap=OWN_RANGE, disk="64M")
    await driver.create(cut_late)
    first_ids = await driver.id_range(cut_late.name)
    os.unlink(driver.config_path(cut_late.name))
    assert await driver.list() == sorted([cut_early.name, cut_late.name])
    for spec in (cut_early, cut_late):
        assert await driver.state(spec.name) is None
        await driver.create(spec)
        await driver.start(spec.name)
        assert await driver.state(spec.name) == "RUNNING"
    # Made anew: its disk not mounted twice, the range of the cut one given back and taken again.
    with open("/proc/self/mountinfo") as f:
        assert sum(cut_late.name in line for line in f) <= 1
    assert await driver.id_range(cut_late.name) == first_ids
    with pytest.raises(ContainerExists):  # what has its config is a container
        await driver.create(cut_late)
    for spec in (cut_early, cut_late):
        await driver.destroy(spec.name)
    for spec in (cut_early, cut_late):  # (leftovers() sees any mount under the lxc path)
        assert leftovers(driver, lab, spec.name) == []


@pytest_twisted.ensureDeferred
async def test_stop_is_forced_after_the_timeout(driver, lab):
    # An agent that ignores SIGTERM: the graceful stop gives up after the timeout.
    spec = lab.spec("stubborn/0", agent_command=["/bin/sh", "-c", "trap '' TERM; while :; do sleep 1; done"])
    await driver.create(spec)
    await driver.start(spec.name)
    await eventually(lambda: _running(driver, spec.name, "while"))
    started = time.monotonic()
    await driver.stop(spec.name, timeout=1)
    elapsed = time.monotonic() - started
    assert await driver.state(spec.name) == "STOPPED"
    assert 0.9 <= elapsed < 8, elapsed


async def _running(driver, name, word):
    code, out, _ = await driver.exec(name, ["ps", "-eo", "args="])
    return code == 0 and any(word in line for line in out.decode().splitlines() if "ps -eo" not in line)


@pytest_twisted.ensureDeferred
async def test_list_shows_only_our_containers(driver, lab, tmp_path):
    names = []
    for unit in ("web/0", "web/1", "db/0"):
        spec = lab.spec(unit)
        await driver.create(spec)
        names.append(spec.name)
    os.makedirs(os.path.join(driver.lxc_path, "someone-elses"))
    with open(os.path.join(driver.lxc_path, "someone-elses", "config"), "w") as f:
        f.write("lxc.uts.name = x\n")
    os.makedirs(os.path.join(driver.lxc_path, "Not_A_Name", "ensemble"))
    assert await driver.list() == sorted(names)
    other = LXCDriver(str(tmp_path / "other-host"), driver.template, netns=lab.netns)
    assert await other.list() == []
    await driver.destroy(names[1])
    assert await driver.list() == sorted([names[0], names[2]])
    assert os.path.isdir(os.path.join(driver.lxc_path, "someone-elses"))


@pytest_twisted.ensureDeferred
async def test_limits_reach_the_container_cgroup(driver, lab):
    spec = lab.spec("web/0", memory="96M", cpu_weight=50, pids=100)
    await driver.create(spec)
    await driver.start(spec.name)
    cgroups = lxc_config.host_cgroups()
    if cgroups.version == 1:
        files = {"memory": ("memory", "memory.limit_in_bytes", str(96 << 20)),
                 "cpu": ("cpu", "cpu.shares", "512"),
                 "pids": ("pids", "pids.max", "100")}
    else:
        files = {"memory": ("", "memory.max", str(96 << 20)),
                 "cpu": ("", "cpu.weight", "50"),
                 "pids": ("", "pids.max", "100")}
    if not cgroups.has("pids"):
        del files["pids"]
    for controller, (inside_dir, filename, expected) in files.items():
        # On the host, in the container's own cgroup ...
        with open(os.path.join(driver.payload_cgroup(spec.name, controller), filename)) as f:
            assert f.read().strip() == expected, filename
        # ... and as the container sees it.
        inside = await sh(driver, spec.name, f"cat /sys/fs/cgroup/{inside_dir}/{filename}".replace("//", "/"))
        assert inside.strip() == expected, filename
    pid = await driver.init_pid(spec.name)
    with open(os.path.join(driver.payload_cgroup(spec.name, "memory"), "cgroup.procs")) as f:
        assert str(pid) in f.read().split()
    if "pids" in files:
        # The pids limit holds: 150 more processes cannot all start.
        await driver.exec(spec.name, ["/bin/sh", "-c", "for i in $(seq 150); do sleep 3 >/dev/null 2>&1 & done "
                                                     "2>/dev/null; true"], timeout=20)
        # Read from the host: inside, a further process may not start until the sleeps end.
        with open(os.path.join(driver.payload_cgroup(spec.name, "pids"), "pids.events")) as f:
            events = f.read()
        assert int(events.split()[1]) > 0, events


@pytest_twisted.ensureDeferred
async def test_hostname_network_and_the_ensemble_package_inside(driver, lab):
    spec = lab.spec("web/7")
    await driver.create(spec)
    await driver.start(spec.name)
    assert (await sh(driver, spec.name, "hostname")).strip() == "web-7"
    assert (await sh(driver, spec.name, "cat /etc/hostname")).strip() == "web-7"
    addresses = await sh(driver, spec.name, "ip -4 -o addr show eth0")
    assert f"inet {spec.address}/24 brd 10.231.0.255" in addresses
    assert f"default via {lab.gateway} dev eth0" in await sh(driver, spec.name, "ip route")
    # The host's own ensemble, at the same paths, read-only.
    code, out, err = await driver.exec(spec.name, [agent_python(), "-m", "ensemble", "--version"])
    assert code == 0, err
    assert out.decode().split()[-1] == ensemble.__version__
    where = await sh(driver, spec.name, f"{agent_python()} -c 'import ensemble; print(ensemble.__file__)'")
    assert where.strip() == ensemble.__file__
    package = os.path.dirname(ensemble.__file__)
    code, _, err = await driver.exec(spec.name, ["touch", os.path.join(package, "written-from-a-container")])
    assert code != 0 and b"Read-only" in err
    # The host side answers: the gateway is reachable from inside.
    code, _, _ = await driver.exec(
        spec.name, ["/usr/bin/python3", "-c",
                    f"import socket; s = socket.socket(); s.settimeout(2); "
                    f"s.connect_ex(('{lab.gateway}', 9)); print('ok')"])
    assert code == 0


AGENT = """
import os, time
with open('/run/agent.pid', 'w') as f:
    f.write(str(os.getpid()))
with open('/run/agent.env', 'w') as f:
    f.write(repr(sorted(os.environ.items())))
time.sleep(100000)
"""


@pytest_twisted.ensureDeferred
async def test_agent_is_supervised_and_charm_daemons_survive_its_restart(driver, lab):
    spec = lab.spec("web/0", agent_command=[agent_python(), "-c", AGENT],
                    agent_environment={"ENSEMBLE_UNIT": "web/0"})
    await driver.create(spec)
    await driver.start(spec.name)

    async def agent_pid():
        code, out, _ = await driver.exec(spec.name, ["cat", "/run/agent.pid"])
        return int(out) if code == 0 and out.strip() else None

    first = await eventually(agent_pid)
    env = dict(eval(await sh(driver, spec.name, "cat /run/agent.env")))
    assert env["ENSEMBLE_UNIT"] == "web/0" and "PATH" in env
    # A charm's daemon detaches (new session, parent gone: PID 1 adopts it).
    # (The second one's child outlives it: an orphan for PID 1 to reap when it exits.)
    await sh(driver, spec.name, "setsid -f sleep 4242; setsid -f sh -c 'sleep 0.2 & exit 0'")
    daemon = int(await eventually(lambda: _pgrep(driver, spec.name, "sleep 4242")))
    # Kill the agent: runsv starts it again; the daemon keeps running.
    await sh(driver, spec.name, f"rm /run/agent.pid; kill -9 {first}")
    second = await eventually(agent_pid)
    assert second != first
    assert int(await _pgrep(driver, spec.name, "sleep 4242")) == daemon
    # Orphans that exit are reaped (tini is PID 1): no zombies pile up.
    await task.deferLater(reactor, 0.5, lambda: None)
    states = (await sh(driver, spec.name, "ps -eo stat=,args=")).splitlines()
    assert not [s for s in states if s.startswith("Z")], states
    assert (await sh(driver, spec.name, "ps -o args= -p 1")).startswith("/usr/bin/tini")
    # The agent's output goes to its log, which the host can read in the overlay.
    log_path = os.path.join(driver.rootfs_delta(spec.name), lxc_config.AGENT_LOG.lstrip("/"))
    assert os.path.exists(log_path)


async def _pgrep(driver, name, pattern):
    code, out, _ = await driver.exec(name, ["pgrep", "-f", f"^{pattern}$"])
    return out.decode().split()[0] if code == 0 else None


@pytest_twisted.ensureDeferred
async def test_bad_names_are_rejected_before_any_file_is_made(driver, lab, tmp_path):
    for bad in ["../../etc", "a/b", "", "UPPER", "x" * 65, "-rf", "a b"]:
        for call in (driver.state, driver.start, driver.stop, driver.destroy, driver.init_pid):
            with pytest.raises(InvalidName):
                await call(bad)
        with pytest.raises(InvalidName):
            await driver.exec(bad, ["true"])
    assert not os.path.exists(driver.lxc_path)
    with pytest.raises(InvalidName):
        LXCDriver(str(tmp_path / "x"), driver.template, netns="../../x")


@pytest_twisted.ensureDeferred
async def test_start_failure_is_one_line_and_create_needs_the_template(driver, lab, tmp_path):
    spec = lab.spec("web/0")
    spec.bridge = "no-such-br"
    await driver.create(spec)
    with pytest.raises(ContainerError) as caught:
        await driver.start(spec.name)
    message = str(caught.value)
    assert "\n" not in message and spec.name in message and "lxc.log" in message
    assert 'bridge "no-such-br"' in message and "doesn't exist" in message, message
    await driver.destroy(spec.name)
    assert leftovers(driver, lab, spec.name) == []

    missing = Template(str(tmp_path / "empty-cache"), release="bookworm", mirror="http://deb.debian.org/debian")
    other = LXCDriver(str(tmp_path / "lxc2"), missing, netns=lab.netns)
    with pytest.raises(ContainerError, match="ensure"):
        await other.create(lab.spec("web/1"))
    assert await other.list() == []


@pytest_twisted.ensureDeferred
async def test_many_containers_at_once(driver, lab):
    specs = [lab.spec(f"web/{i}") for i in range(6)]
    await defer.gatherResults([defer.ensureDeferred(driver.create(s)) for s in specs], consumeErrors=True)
    await defer.gatherResults([defer.ensureDeferred(driver.start(s.name)) for s in specs], consumeErrors=True)
    states = await defer.gatherResults([defer.ensureDeferred(driver.state(s.name)) for s in specs])
    assert states == ["RUNNING"] * len(specs)
    await defer.gatherResults([defer.ensureDeferred(driver.destroy(s.name)) for s in specs], consumeErrors=True)
    for s in specs:
        assert leftovers(driver, lab, s.name) == []


# -- template builds: failed, interrupted, concurrent (a cache of their own) ----------

def _build_processes(path):
    """Pids of processes whose command line mentions `path` (a build in progress)."""
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if path.encode() in f.read():
                        found.append(int(pid))
            except OSError:
                pass
    return found


def _nothing_usable(t):
    assert not t.exists()
    assert not os.path.exists(t.path)
    assert os.listdir(t.build_root) == [] if os.path.isdir(t.build_root) else True
    assert mounts_under(t.cache_dir) == []
    assert _build_processes(t.cache_dir) == []


@pytest.fixture
def scratch_cache(tmp_path):
    """A template cache of the test's own, removed afterwards even if the test fails."""
    cache = str(tmp_path / "cache")
    yield cache
    if os.path.exists(cache):
        remove_tree(cache)


@pytest_twisted.ensureDeferred
async def test_failed_build_leaves_nothing(scratch_cache):
    t = Template(scratch_cache, mirror="http://127.0.0.1:9/debian")
    lines = []
    with pytest.raises(TemplateError) as caught:
        await t.ensure(progress=lines.append)
    assert "\n" not in str(caught.value) and "debootstrap" in str(caught.value)
    assert any("debootstrap" in line for line in lines)
    _nothing_usable(t)


@pytest_twisted.ensureDeferred
async def test_interrupted_build_leaves_nothing_then_concurrent_builds_build_once(scratch_cache):
    cache = scratch_cache
    t = Template(cache)
    lines = []
    building = defer.ensureDeferred(t.ensure(progress=lines.append))
    try:
        # Let debootstrap get well into it (dpkg unpacking in the new rootfs), then interrupt.
        await eventually(lambda: defer.succeed(any(l.startswith("I: Unpacking") for l in lines)), timeout=120)
        builders = _build_processes(cache)
        assert builders
        # debootstrap holds the lock itself: were this process killed, nobody could
        # clean up under it until it has exited.
        holders = [pid for pid in builders
                   if os.path.realpath(f"/proc/{pid}/fd/{LOCK_FD}") == os.path.join(cache, "template.lock")]
        assert holders, builders
    finally:
        building.cancel()
    with pytest.raises(defer.CancelledError):
        await building
    _nothing_usable(t)

    # A killed build (this process gone, not cancelled) leaves its directory in build/:
    # never used, and removed by the next build, which takes the lock.
    stale = os.path.join(t.build_root, f"{t.name}.99999", "rootfs", "etc")
    os.makedirs(stale)

    # Two agents at once: one builds, the other waits and finds it built.
    first, second = Template(cache), Template(cache)
    first_lines, second_lines = [], []
    await defer.gatherResults([
        defer.ensureDeferred(first.ensure(progress=first_lines.append)),
        defer.ensureDeferred(second.ensure(progress=second_lines.append)),
    ], consumeErrors=True)
    assert first.builds + second.builds == 1
    waited = second_lines if first.builds else first_lines
    assert any("waiting for another template build" in l for l in waited)
    assert first.exists() and second.exists()
    assert not os.path.exists(os.path.dirname(stale))
    info = first.info()
    assert info["version"] == first.version and info["release"] == first.release
    assert os.path.exists(os.path.join(first.path, MARKER))
    assert os.listdir(first.lxc_path) == [first.name]
    with open(os.path.join(first.rootfs, "etc/ssl/certs/ca-certificates.crt"), "rb") as a, \
            open("/etc/ssl/certs/ca-certificates.crt", "rb") as b:
        assert a.read() == b.read()

    await first.remove()
    assert not first.exists() and os.listdir(first.lxc_path) == []


# -- unprivileged containers: what they need of the host --------------------------------


@pytest_twisted.ensureDeferred
async def test_unprivileged_container_refuses_an_lxc_path_its_root_cannot_search(driver, lab):
    # driver's lxc path is under tmp_path, whose parents are 0700.
    spec = lab.spec("web/0", idmap=OWN_RANGE)
    with pytest.raises(ContainerError, match=r"cannot be searched by host id \d+, the root of unprivileged"):
        await driver.create(spec)
    assert await driver.list() == [] and not os.path.exists(driver.container_dir(spec.name))
    # Nor does it keep the range it claimed.
    assert await driver.id_range(spec.name) is None


def test_unprivileged_ids_must_be_granted_to_root(tmp_path, monkeypatch):
    subuid, subgid = tmp_path / "subuid", tmp_path / "subgid"
    subuid.write_text("alice:100000:65536\nroot:200000:65536\n")
    subgid.write_text("root:100000:65536\n")
    with pytest.raises(IdRangeError, match=r"subuid does not grant root host ids 100000-165535.*root:100000:65536"):
        id_ranges.require_granted(100000, 65536, (str(subuid), str(subgid)))
    subuid.write_text("root:100000:131072\n")
    id_ranges.require_granted(100000, 65536, (str(subuid), str(subgid)))
    with pytest.raises(IdRangeError, match="subgid"):
        id_ranges.require_granted(165536, 65536, (str(subuid), str(subgid)))
    # And the tools that apply the grant must be there.
    monkeypatch.setattr(id_ranges, "PATH", str(tmp_path))
    with pytest.raises(IdRangeError, match="newuidmap is missing: install the 'uidmap' package"):
        id_ranges.require_granted(100000, 65536, (str(subuid), str(subgid)))


@pytest_twisted.ensureDeferred
async def test_unprivileged_start_binds_what_its_root_cannot_reach_for_itself_only(unprivileged_driver, lab,
                                                                                   tmp_path):
    driver = unprivileged_driver
    hidden = tmp_path / "hidden"  # under pytest's 0700 tmp: the container's root cannot reach it
    hidden.mkdir()
    (hidden / "note").write_text("from the host\n")
    spec = lab.spec("web/0", idmap=OWN_RANGE, mounts=[*ensemble_mounts(), (str(hidden), "/hidden", True)])
    await driver.create(spec)
    await driver.start(spec.name)
    first, count = await driver.id_range(spec.name)
    config = open(driver.config_path(spec.name)).read()
    assert f"lxc.idmap = u 0 {first} {count}" in config and f"lxc.idmap = g 0 {first} {count}" in config
    # The unreachable mount goes through a stage mountpoint; what its root can reach
    # (the container directory, the venv) is named directly; the root filesystem is
    # the overlay the start mounts.
    staged = [line for line in config.splitlines() if line.startswith("lxc.mount.entry") and "hidden" in line]
    assert len(staged) == 1 and re.fullmatch(
        rf"lxc.mount.entry = {lxc_config.STAGE_DIR}/dir-\d+ hidden none bind,ro,create=dir 0 0", staged[0]), staged
    assert f"lxc.rootfs.path = dir:{lxc_config.STAGE_ROOTFS}" in config
    for host_path, container_path, _ in ensemble_mounts():
        assert f"lxc.mount.entry = {host_path} {container_path.lstrip('/')} " in config
    # It runs, sees the file, and the bind exists in its own mount namespace only.
    assert await driver.state(spec.name) == "RUNNING"
    assert (await sh(driver, spec.name, "cat /hidden/note")) == "from the host\n"
    with open("/proc/self/mountinfo") as f:
        assert lxc_config.STAGE_DIR not in f.read()


def test_debootstraps_progress_reads_as_stage_and_packages_out_of_total():
    from ensemble.machine.container.template import _Build

    lines = []
    build = _Build(lines.append)
    coded = (
        "P: 0 100 DOWNREL\nPF: Downloading Release file\n"
        "P: 125 125 SIZEDEBS\nPF: Finding package sizes\n"
        "P: 0 45600000 DOWNDEBS\nPF: Downloading packages\n"
        "I: RETRIEVING\nIA: adduser\nIA: 3.134\nIF: Retrieving %s %s\n"
        "P: 38 37 CONFBASE\nPF: Configuring base system\n"
        "E: COULDNT_DL\nEA: apt\nEF: Couldn't download package %s\n"
    ).encode()
    for chunk in (coded[:50], coded[50:51], coded[51:]):  # lines split across reads
        build.childDataReceived(3, chunk)
    build.childDataReceived(1, b"the full log goes to the tail only\n")
    assert lines == [
        "stage 1 of 10: checking the release",
        "stage 3 of 10: resolving packages: 125 of 125 packages",
        "stage 4 of 10: downloading packages: 0 of 125 packages (45.6 MB)",
        "I: Retrieving adduser 3.134",
        "stage 4 of 10: downloading packages: 1 of 125 packages (45.6 MB)",
        "stage 10 of 10: configuring the base system: 37 of 37 packages",
        "E: Couldn't download package apt",
    ]
    assert build.errors == ["Couldn't download package apt"]
    assert build.tail == ["the full log goes to the tail only"]


def stage_servers():
    """Pids of this process's children that are stage servers."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except (OSError, ValueError):
            continue
        if parent == os.getpid() and b"--serve" in argv and any(a.endswith(b"stage.py") for a in argv):
            found.append(int(entry))
    return found


@pytest_twisted.ensureDeferred
async def test_unprivileged_starts_share_one_stage_server_which_ends_with_the_driver(unprivileged_driver, lab):
    driver = unprivileged_driver
    specs = [lab.spec(f"web/{i}", idmap=OWN_RANGE) for i in range(3)]
    for spec in specs:
        await driver.create(spec)
    # Started side by side: one server forks each.
    await defer.gatherResults([defer.ensureDeferred(driver.start(s.name)) for s in specs])
    assert [await driver.state(s.name) for s in specs] == ["RUNNING"] * 3
    servers = stage_servers()
    assert len(servers) == 1
    # Another start later is the same server's.
    await driver.stop(specs[0].name)
    await driver.start(specs[0].name)
    assert stage_servers() == servers
    await driver.close()
    await eventually(lambda: defer.succeed(stage_servers() == []))
