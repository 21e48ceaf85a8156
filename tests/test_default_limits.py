"""Limits by default (issue 15 §3): what a unit gets when its service sets none, the
machine's parent cgroup over all its units, each unit's own filesystem, and the kernel's
per-user-namespace limits; floods inside one unit stop at its limits while a neighbour
unit and the host keep working. Real containers (user-namespaced, as units are) on a
bridge in a network namespace; fast tests of the rendering and parsing first."""

import ctypes
import dataclasses
import os
import types

import pytest
import pytest_twisted

from ensemble import hostfs, limits
from ensemble.errors import InvalidValue
from ensemble.machine.container import cgroups as machine_cgroups
from ensemble.machine.container import config as lxc_config
from ensemble.machine.container import disk as unit_disk
from ensemble.machine.container.config import HostCgroups, Hierarchy
from ensemble.machine.container.id_ranges import POOL
from ensemble.machine.deploy import UnitDeployer, unit_log_path
from ensemble.machine.reconcilers import limits as limits_reconciler

# A range the host grants (scripts/install grants the pool): the last, which units of
# an environment on this host, taking the lowest free, do not reach.
UNIT_RANGE = tuple(POOL.range(POOL.ranges - 1))
PYTHON = "/usr/bin/python3"


# -- fast: parsing, defaults, rendering ---------------------------------------------------

def test_defaults_fill_what_the_service_does_not_set():
    assert limits.effective(None) == limits.DEFAULTS
    assert limits.DEFAULTS[limits.MEMORY] == 1024**3 and limits.DEFAULTS[limits.PIDS] == 1024
    assert limits.DEFAULTS[limits.DISK] == 4 * 1024**3
    mine = limits.effective({"memory": 256 * 1024**2, "disk": "10G", "cpu-weight": 50})
    assert mine == {"memory": 256 * 1024**2, "pids": 1024, "disk": 10 * 1024**3, "cpu-weight": 50}
    assert limits.effective({"pids": 64}, defaults={})["pids"] == 64


def test_disk_sizes_parse_like_memory():
    assert limits.parse_disk("4G") == 4 * 1024**3
    assert limits.parse_disk("100.5M") == 101 * 1024**2  # whole MiB, rounded up
    for bad in ("lots", "-1G", "1M"):
        with pytest.raises(InvalidValue):
            limits.parse_disk(bad)


def test_deploy_takes_disk_alongside_memory_and_pids():
    from ensemble.cli.service_commands import _parse_limits

    args = types.SimpleNamespace(memory="512M", cpu_weight=None, pids="200", disk="2G")
    assert _parse_limits(args) == {"memory": 512 * 1024**2, "pids": 200, "disk": 2 * 1024**3}


def _v1(tmp_path, memsw=True):
    hierarchies = []
    for controller in ("memory", "pids", "cpuset", "cpu"):
        mount = tmp_path / controller
        mount.mkdir(parents=True)
        for key in ("cpuset.cpus", "cpuset.mems"):
            (mount / key).write_text("0-1\n")
        hierarchies.append(Hierarchy(str(mount), "/", [controller], 1, "/"))
    cgroups = HostCgroups(hierarchies)
    cgroups.memsw = memsw
    return cgroups


def test_render_nests_the_container_under_the_machine_and_limits_swap_and_namespaces(tmp_path):
    spec = types.SimpleNamespace(
        name="ens-t-web-0", hostname="web-0", address="10.0.0.2", prefixlen=24, gateway="10.0.0.1",
        bridge="br", mtu=None, idmap=UNIT_RANGE, mounts=(), memory=1024**3, cpu_weight=None, pids=1024,
        agent_forked=False,
    )
    for memsw, swap_line in ((True, "lxc.cgroup.memory.memsw.limit_in_bytes = 1073741824"),
                             (False, "lxc.cgroup.memory.swappiness = 0")):
        text = lxc_config.render(spec, str(tmp_path), "/t", "veth", cgroups=_v1(tmp_path / str(memsw), memsw),
                                 cgroup_parent="ensemble-m-1234")
        lines = text.splitlines()
        assert "lxc.cgroup.dir.container = ensemble-m-1234/lxc.payload.ens-t-web-0" in lines
        assert "lxc.cgroup.dir.monitor = ensemble-m-1234/lxc.monitor.ens-t-web-0" in lines
        assert "lxc.cgroup.dir.monitor.pivot = ensemble-m-1234/lxc.pivot.ens-t-web-0" in lines
        assert swap_line in lines
        hook = [line for line in lines if line.startswith("lxc.hook.start-host = ")]
        assert len(hook) == 1 and "--user=/proc/${LXC_PID}/ns/user" in hook[0]
        assert "echo 128 > /proc/sys/user/max_inotify_instances" in hook[0]
        assert "echo 0 > /proc/sys/user/max_user_namespaces" in hook[0]
    # The unit's root cannot raise them: no CAP_SYS_RESOURCE.
    assert "sys_resource" not in lxc_config.CAP_KEEP


def test_host_floors_leave_room_for_every_unit_and_host_root():
    floors = limits.host_user_limits(units=10, unit_limits={"max_inotify_instances": 128})
    assert floors == {"max_inotify_instances": 128 + 10 * 129}
    full = limits.host_user_limits()
    for key, value in limits.UNIT_USER_LIMITS.items():
        assert full[key] > limits.MAX_UNITS_PER_MACHINE * value


def test_user_limits_are_raised_never_lowered(tmp_path):
    (tmp_path / "max_inotify_instances").write_text("128\n")
    (tmp_path / "max_user_namespaces").write_text("96363\n")
    floors = {"max_inotify_instances": 5000, "max_user_namespaces": 2000, "max_absent": 1}
    assert limits_reconciler.ensure_user_limits(floors, str(tmp_path)) is None
    assert (tmp_path / "max_inotify_instances").read_text().strip() == "5000"
    assert (tmp_path / "max_user_namespaces").read_text().strip() == "96363"


def test_machine_cgroup_is_made_capped_and_checked(tmp_path):
    cgroups = _v1(tmp_path)
    parent = machine_cgroups.MachineCgroup("ensemble-m-1", cgroups)
    assert parent.problem(memory=2**30, pids=100).endswith("is missing")
    memory_dir = tmp_path / "memory" / "ensemble-m-1"
    memory_dir.mkdir()  # a fake v1 cgroup starts with unlimited files
    for key in ("memory.limit_in_bytes", "memory.memsw.limit_in_bytes"):
        (memory_dir / key).write_text("9223372036854771712\n")
    parent.ensure(memory=2**30, pids=100)
    assert (memory_dir / "memory.limit_in_bytes").read_text() == str(2**30)
    assert (memory_dir / "memory.memsw.limit_in_bytes").read_text() == str(2**30)
    assert (tmp_path / "pids" / "ensemble-m-1" / "pids.max").read_text() == "100"
    assert (tmp_path / "cpuset" / "ensemble-m-1" / "cpuset.cpus").read_text() == "0-1"
    assert parent.problem(memory=2**30, pids=100) is None
    (tmp_path / "pids" / "ensemble-m-1" / "pids.max").write_text("max")
    assert "pids.max is max" in parent.problem(memory=2**30, pids=100)


def test_machine_caps_default_to_a_share_of_the_host():
    caps = limits.machine_caps()
    assert 0 < caps["memory"] < limits.host_memory() and 0 < caps["pids"] < limits.host_pids()
    assert limits.machine_caps("2G", 500) == {"memory": 2 * 1024**3, "pids": 500}


def test_parent_names_are_per_lxc_path():
    a, b = machine_cgroups.parent_name("/x/lxc/machine-1"), machine_cgroups.parent_name("/y/lxc/machine-1")
    assert a != b and a.startswith("ensemble-machine-1-")


# -- real containers ---------------------------------------------------------------------

from test_containers import lab, template, unprivileged_driver  # noqa: E402,F401 (fixtures)


@pytest.fixture
def host_user_limits():
    """The host's /proc/sys/user limits raised as the limits reconciler raises them,
    and put back as they were after the test."""
    before = {}
    for key in limits.UNIT_USER_LIMITS:
        path = os.path.join("/proc/sys/user", key)
        if os.path.exists(path):
            with open(path) as f:
                before[key] = f.read().strip()
    assert limits_reconciler.ensure_user_limits(limits.host_user_limits()) is None
    yield
    for key, value in before.items():
        if value != _read(os.path.join("/proc/sys/user", key)):
            with open(limits_reconciler.ALIASES.get(key, os.path.join("/proc/sys/user", key)), "w") as f:
                f.write(value)


def deployer_spec(lab, unit, service_limits, log_dir):
    """The spec the machine agent's deployer makes for `unit` of a service with
    `service_limits`, on the lab's bridge, without an agent inside."""
    host = types.SimpleNamespace(
        client=types.SimpleNamespace(credential=None, readers=[]), reactor=None, environment={"name": "test"},
        subnet="10.231.0.0/24", gateway=lab.gateway, bridge="ens-t", mtu=None, unit_zookeeper="127.0.0.1:1",
        allocator=types.SimpleNamespace(mac=lambda unit, address: None),  # the lab's bridge binds no MACs
    )
    deployer = UnitDeployer(host, driver=None, unit_log_dir=str(log_dir))
    spec = deployer.spec(types.SimpleNamespace(name=unit), lab.spec(unit).address, service_limits)
    lab.names.append(spec.name)
    return dataclasses.replace(spec, idmap=UNIT_RANGE, agent_command=None, agent_environment=None, agent_forked=False)


@pytest.fixture
def log_root():
    path = f"/var/lib/ensemble/test-logs-{os.getpid()}"
    os.makedirs(path, exist_ok=True)
    yield path
    from ensemble.machine.container.template import remove_tree
    remove_tree(path)


SMALL = {"memory": 64 * 1024**2, "pids": 64, "disk": 64 * 1024**2}


@pytest_twisted.async_yield_fixture
async def units(unprivileged_driver, lab, log_root, host_user_limits):
    """web/0 with small limits of its service's, db/0 with none (the defaults)."""
    driver = unprivileged_driver
    driver.cgroup_caps = {"memory": 8 * 1024**3, "pids": 4096}
    specs = [deployer_spec(lab, "web/0", SMALL, log_root), deployer_spec(lab, "db/0", None, log_root)]
    for spec in specs:
        await create(driver, spec, log_root)
        await driver.start(spec.name)
    yield driver, specs[0], specs[1], log_root


async def create(driver, spec, log_root):
    """As the deployer does: the container, then its log directory given to its root."""
    await driver.create(spec)
    hostfs.own_directory(log_root, os.path.basename(spec.disk_binds[0]), UNIT_RANGE[0], UNIT_RANGE[0], 0o700)


async def run(driver, name, script, timeout=120):
    code, out, err = await driver.exec(name, [PYTHON, "-c", script], timeout=timeout)
    return code, out.decode(), err.decode()


def _read(path):
    with open(path) as f:
        return f.read().strip()


@pytest_twisted.ensureDeferred
async def test_a_unit_whose_service_sets_no_limits_gets_the_defaults(units):
    driver, web, db, log_root = units
    memory = driver.payload_cgroup(db.name, "memory")
    # Below the machine's parent cgroup, which has the machine's cap.
    assert os.path.dirname(memory) == driver.cgroup.path("memory")
    assert driver.cgroup.problem(**driver.cgroup_caps) is None
    assert int(_read(os.path.join(memory, "memory.limit_in_bytes"))) == limits.DEFAULTS["memory"]
    if lxc_config.host_cgroups().memsw:
        assert int(_read(os.path.join(memory, "memory.memsw.limit_in_bytes"))) == limits.DEFAULTS["memory"]
    assert int(_read(os.path.join(driver.payload_cgroup(db.name, "pids"), "pids.max"))) == limits.DEFAULTS["pids"]
    # Its own filesystem of the default size, holding its writable layer and its log.
    container = driver.container_dir(db.name)
    used, total = unit_disk.usage(container)
    assert 0.9 * limits.DEFAULTS["disk"] < total <= limits.DEFAULTS["disk"]
    inside = await run(driver, db.name, "import os; s = os.statvfs('/var/log/ensemble'); print(s.f_blocks * s.f_frsize)")
    assert inside[0] == 0 and int(inside[1]) == total
    # The kernel's per-user-namespace limits, set inside, and not for its root to raise.
    code, out, _ = await run(driver, db.name, "print(open('/proc/sys/user/max_inotify_instances').read())")
    assert int(out) == limits.UNIT_USER_LIMITS["max_inotify_instances"]
    code, _, err = await run(driver, db.name, "open('/proc/sys/user/max_inotify_instances', 'w').write('100000')")
    assert code != 0 and ("Permission denied" in err or "Read-only" in err)
    # The service's own limits win where it sets them.
    assert int(_read(os.path.join(driver.payload_cgroup(web.name, "pids"), "pids.max"))) == SMALL["pids"]


FORK_FLOOD = r"""
import os, signal, time
children = []
try:
    while len(children) < 100000:
        pid = os.fork()
        if pid == 0:
            time.sleep(600)
            os._exit(0)
        children.append(pid)
except OSError as e:
    print(len(children), e.errno)
for pid in children:
    os.kill(pid, signal.SIGKILL)
for pid in children:
    os.waitpid(pid, 0)
"""

CAN_FORK = r"""
import os
pids = [os.fork() or os._exit(0) for _ in range(%d)]
for pid in pids:
    os.waitpid(pid, 0)
print("forked", len(pids))
"""

HOG = r"""
chunks = []
for i in range(%d):
    chunks.append(bytearray(b"x") * (1 << 20))
print("allocated", len(chunks), "MiB")
"""

DISK_FLOOD = r"""
import errno, os, sys
written = 0
block = b"x" * (1 << 20)
try:
    with open(sys.argv[1] if len(sys.argv) > 1 else "%s", "wb") as f:
        while written < (64 << 30):
            written += f.write(block)
            f.flush()
            os.fsync(f.fileno())
except OSError as e:
    print(written, errno.errorcode[e.errno])
"""


def _oom_kills(cgroup_dir):
    for line in _read(os.path.join(cgroup_dir, "memory.oom_control")).splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill":
            return int(value)
    return 0


@pytest_twisted.ensureDeferred
async def test_a_fork_flood_stops_at_the_units_limit(units):
    driver, web, db, _ = units
    code, out, err = await run(driver, web.name, FORK_FLOOD)
    assert code == 0, err
    forked, error = (int(v) for v in out.split())
    assert error == 11 and forked < SMALL["pids"]  # EAGAIN, at its pids limit
    # The neighbour and the host fork as before.
    code, out, _ = await run(driver, db.name, CAN_FORK % 200)
    assert code == 0 and out.strip() == "forked 200"
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    assert os.waitpid(pid, 0)[1] == 0


@pytest_twisted.ensureDeferred
async def test_a_memory_flood_is_killed_at_the_units_limit(units):
    driver, web, db, _ = units
    if lxc_config.host_cgroups().version != 1:
        pytest.skip("counts OOM kills in cgroup v1")
    before = _oom_kills(driver.payload_cgroup(web.name, "memory"))
    code, out, _ = await run(driver, web.name, HOG % 512)
    assert code == 128 + 9 and "allocated" not in out
    assert _oom_kills(driver.payload_cgroup(web.name, "memory")) > before
    assert await driver.state(web.name) == "RUNNING"
    # The neighbour (default: 1G) allocates 256 MiB.
    code, out, _ = await run(driver, db.name, HOG % 256)
    assert code == 0 and "allocated 256 MiB" in out


@pytest_twisted.ensureDeferred
async def test_a_disk_flood_fills_the_units_own_filesystem_only(units):
    driver, web, db, log_root = units
    host_before = os.statvfs(driver.lxc_path)
    for path in ("/fill", "/var/log/ensemble/fill"):  # its writable layer, its log directory
        code, out, err = await driver.exec(web.name, [PYTHON, "-c", DISK_FLOOD, path], timeout=120)
        assert code == 0, err
        written, error = out.decode().split()
        assert error in ("ENOSPC", "EDQUOT") and int(written) <= SMALL["disk"]
        await driver.exec(web.name, ["rm", "-f", path])
    # What the unit wrote is on its image, not in the host directories it sees.
    host_log = unit_log_path(log_root, "web/0")
    assert os.path.ismount(host_log)
    code, out, err = await driver.exec(web.name, [PYTHON, "-c", DISK_FLOOD, "/fill"], timeout=120)
    free_after = os.statvfs(driver.lxc_path)
    # The host's filesystem lost at most what the image holds (the unit's 64M).
    lost = (host_before.f_bavail - free_after.f_bavail) * free_after.f_frsize
    assert lost <= SMALL["disk"] + 16 * 1024**2
    # The neighbour and the host write as before.
    code, out, _ = await run(driver, db.name, "open('/data', 'wb').write(b'y' * (32 << 20)); print('ok')")
    assert code == 0 and out.strip() == "ok"
    with open(os.path.join(driver.lxc_path, "host-file"), "wb") as f:
        f.write(b"z" * (1 << 20))
    os.unlink(os.path.join(driver.lxc_path, "host-file"))


INOTIFY_FLOOD = r"""
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
fds = []
while len(fds) < 100000:
    fd = libc.inotify_init1(0)
    if fd < 0:
        print(len(fds), ctypes.get_errno())
        break
    fds.append(fd)
"""


def _host_inotify_works():
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.inotify_init1(0)
    if fd < 0:
        return ctypes.get_errno()
    os.close(fd)
    return 0


@pytest_twisted.ensureDeferred
async def test_an_inotify_flood_leaves_the_host_and_the_neighbour_theirs(units):
    driver, web, db, _ = units
    # Holds them while host root and the neighbour try theirs.
    flood = INOTIFY_FLOOD + "\nimport time; open('/tmp/flooded', 'w').write('%d' % len(fds)); time.sleep(600)\n"
    await driver.exec(web.name, ["/bin/sh", "-c", "cat > /tmp/flood.py"], input=flood.encode())
    code, out, err = await driver.exec(
        web.name, ["/bin/sh", "-c", f"setsid -f {PYTHON} /tmp/flood.py </dev/null >/tmp/flood.out 2>&1"])
    assert code == 0, err
    from conftest import eventually
    held = await eventually(lambda: _flooded(driver, web.name), timeout=60)
    assert int(held) == limits.UNIT_USER_LIMITS["max_inotify_instances"]
    assert _host_inotify_works() == 0
    code, out, _ = await run(driver, db.name, INOTIFY_FLOOD.replace("100000", "10"))
    assert code == 0 and out.strip() == "", out  # 10 made, no failure


async def _flooded(driver, name):
    code, out, _ = await driver.exec(name, ["cat", "/tmp/flooded"])
    return out.decode().strip() if code == 0 and out.strip() else None


@pytest_twisted.ensureDeferred
async def test_the_machines_cap_holds_all_its_units_together(units):
    driver, web, db, _ = units
    if lxc_config.host_cgroups().version != 1:
        pytest.skip("counts OOM kills in cgroup v1")
    # The parent's cap below the unit's own default (1G): the parent's holds.
    driver.cgroup_caps = {"memory": 192 * 1024**2, "pids": 4096}
    driver.cgroup.ensure(**driver.cgroup_caps)
    try:
        code, out, _ = await run(driver, db.name, HOG % 512)
        assert code == 128 + 9 and "allocated" not in out
    finally:
        driver.cgroup_caps = {"memory": 8 * 1024**3, "pids": 4096}
        driver.cgroup.ensure(**driver.cgroup_caps)
    code, out, _ = await run(driver, db.name, HOG % 256)
    assert code == 0 and "allocated 256 MiB" in out


@pytest_twisted.ensureDeferred
async def test_destroy_leaves_no_image_mount_or_cgroup_and_keeps_the_log(unprivileged_driver, lab, log_root):
    driver = unprivileged_driver
    spec = deployer_spec(lab, "web/0", SMALL, log_root)
    await create(driver, spec, log_root)
    await driver.start(spec.name)
    code, _, err = await driver.exec(spec.name, ["/bin/sh", "-c", "echo hello > /var/log/ensemble/agent.log"])
    assert code == 0, err
    image = os.path.join(driver.container_dir(spec.name), unit_disk.IMAGE)
    device = unit_disk.loop_device(image)
    assert device is not None
    await driver.destroy(spec.name)
    host_log = unit_log_path(log_root, "web/0")
    assert not os.path.ismount(host_log)
    assert _read(os.path.join(host_log, "agent.log")) == "hello"
    from test_containers import leftovers
    assert leftovers(driver, lab, spec.name) == []
    with open("/proc/self/mountinfo") as f:
        assert host_log not in f.read()
    assert not os.path.exists(f"/sys/block/{os.path.basename(device)}/loop/backing_file") or \
        image not in _read(f"/sys/block/{os.path.basename(device)}/loop/backing_file")
    await driver.close()
    assert not any(os.path.exists(p) for p in driver.cgroup.paths())
