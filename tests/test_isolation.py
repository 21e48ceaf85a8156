"""Isolation between two real containers on one bridge, in a network namespace the
test creates: processes, files, unix sockets, hostnames, TCP between their addresses,
a memory limit that kills inside one container only, and root inside that is not root
on the host. The containers are user-namespaced, as units are."""

import json
import os
import socket
import subprocess

import pytest
import pytest_twisted
from twisted.internet import threads

from ensemble.machine.container import config as lxc_config
from ensemble.machine.container.driver import OWN_RANGE
from ensemble.machine.content import ensemble_mounts
from ensemble.machine.container.template import shift_owners

from conftest import eventually
from test_containers import lab, sh, template, unprivileged_driver  # noqa: F401 (fixtures)

PYTHON = "/usr/bin/python3"  # the rootfs's own python3: no host code needed for these

UNIX_SERVER = r"""
import os, socket
listeners = []
for address in ("/tmp/a.sock", "\0ens-isolation-a"):
    s = socket.socket(socket.AF_UNIX)
    s.bind(address)
    s.listen()
    listeners.append(s)
import selectors
sel = selectors.DefaultSelector()
for s in listeners:
    sel.register(s, selectors.EVENT_READ)
while True:
    for key, _ in sel.select():
        conn, _ = key.fileobj.accept()
        conn.sendall(b"hello from a")
        conn.close()
"""

UNIX_CLIENT = r"""
import socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1].replace("@", "\0", 1))
    print(s.recv(100).decode())
except OSError as e:
    print("refused", type(e).__name__)
"""

TCP_SERVER = r"""
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 7777))
s.listen()
while True:
    conn, peer = s.accept()
    conn.sendall(f"{socket.gethostname()} sees {peer[0]}".encode())
    conn.close()
"""

TCP_CLIENT = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], 7777), timeout=5)
print(s.recv(100).decode())
"""

HOG = r"""
chunks = []
for i in range(512):
    chunks.append(bytearray(b"x") * (1 << 20))  # written, so really resident
print("allocated", len(chunks), "MiB")
"""


@pytest.fixture
def shared(tmp_path):
    """Storage the host shares with container a (as it shares a unit's log directory):
    under tmp_path, whose 0700 parents the containers' root cannot search."""
    path = tmp_path / "shared"
    path.mkdir()
    return path


@pytest_twisted.async_yield_fixture
async def pair(unprivileged_driver, lab, shared):
    driver = unprivileged_driver
    # Each with a supervised "agent" whose run file holds a credential, as units' do.
    agent = {"agent_command": ["/bin/sleep", "infinity"]}
    a = lab.spec("web/0", idmap=OWN_RANGE, mounts=[*ensemble_mounts(), (str(shared), "/shared", False)],
                 agent_environment={"ENSEMBLE_AUTH": "credential-of-a"}, **agent)
    b = lab.spec("db/0", memory="64M", idmap=OWN_RANGE, agent_environment={"ENSEMBLE_AUTH": "credential-of-b"},
                 **agent)
    for spec in (a, b):
        await driver.create(spec)
    # As the deployer gives a unit its log directory.
    shift_owners(str(shared), *await driver.id_range(a.name))
    for spec in (a, b):
        await driver.start(spec.name)
    yield driver, a, b


async def daemon(driver, name, script, *args):
    """Start a python script inside as a detached daemon."""
    quoted = " ".join(["'" + a + "'" for a in args])
    path = f"/tmp/daemon-{abs(hash(script))}.py"
    await driver.exec(name, ["/bin/sh", "-c", f"cat > {path}"], input=script.encode())
    await sh(driver, name, f"setsid -f {PYTHON} {path} {quoted} </dev/null >/dev/null 2>&1")


async def process_list(driver, name):
    return [line.strip() for line in (await sh(driver, name, "ps -eo pid=,args=")).splitlines()]


@pytest_twisted.ensureDeferred
async def test_each_container_sees_only_its_own_processes(pair):
    driver, a, b = pair
    await sh(driver, a.name, "setsid -f sleep 1111 </dev/null >/dev/null 2>&1")
    await sh(driver, b.name, "setsid -f sleep 2222 </dev/null >/dev/null 2>&1")
    in_a = await eventually(lambda: _with(driver, a.name, "sleep 1111"))
    in_b = await eventually(lambda: _with(driver, b.name, "sleep 2222"))
    assert not any("sleep 2222" in p for p in in_a)
    assert not any("sleep 1111" in p for p in in_b)
    for listing in (in_a, in_b):
        assert listing[0].startswith("1 /usr/bin/tini")
        assert not any("pytest" in p or "lxc monitor" in p for p in listing)
        assert len(listing) < 10, listing
    # /proc holds only the container's own pids.
    pids_a = {int(p) for p in (await sh(driver, a.name, "ls /proc")).split() if p.isdigit()}
    host_init_b = await driver.init_pid(b.name)
    assert host_init_b not in pids_a and os.getpid() not in pids_a and max(pids_a) < 100


async def _with(driver, name, word):
    listing = await process_list(driver, name)
    return listing if any(word in p for p in listing) else None


@pytest_twisted.ensureDeferred
async def test_files_and_unix_sockets_are_private(pair, template):
    driver, a, b = pair
    await sh(driver, a.name, "echo secret > /tmp/secret-a")
    await daemon(driver, a.name, UNIX_SERVER)
    await eventually(lambda: _exists(driver, a.name, "/tmp/a.sock"))
    client = "/tmp/client.py"
    for spec in (a, b):
        await driver.exec(spec.name, ["/bin/sh", "-c", f"cat > {client}"], input=UNIX_CLIENT.encode())

    # a reaches its own sockets (path and abstract) ...
    for address in ("/tmp/a.sock", "@ens-isolation-a"):
        assert (await sh(driver, a.name, f"{PYTHON} {client} {address}")).strip() == "hello from a"
    # ... b sees neither the file nor the sockets.
    code, _, _ = await driver.exec(b.name, ["test", "-e", "/tmp/secret-a"])
    assert code == 1
    code, _, _ = await driver.exec(b.name, ["test", "-e", "/tmp/a.sock"])
    assert code == 1
    for address in ("/tmp/a.sock", "@ens-isolation-a"):
        assert (await sh(driver, b.name, f"{PYTHON} {client} {address}")).startswith("refused")

    # The host sees them only inside a's storage (its overlay upper directory).
    assert not os.path.exists("/tmp/secret-a") and not os.path.exists("/tmp/a.sock")
    assert not os.path.exists(os.path.join(template.rootfs, "tmp/secret-a"))
    with open(os.path.join(driver.rootfs_delta(a.name), "tmp/secret-a")) as f:
        assert f.read() == "secret\n"
    assert not os.path.exists(os.path.join(driver.rootfs_delta(b.name), "tmp/secret-a"))
    host = socket.socket(socket.AF_UNIX)
    with pytest.raises(OSError):
        host.connect("\0ens-isolation-a")  # abstract sockets live in a's network namespace
    host.close()


async def _exists(driver, name, path):
    code, _, _ = await driver.exec(name, ["test", "-e", path])
    return code == 0


@pytest_twisted.ensureDeferred
async def test_hostnames_differ_and_tcp_works_between_their_addresses(pair):
    driver, a, b = pair
    assert (await sh(driver, a.name, "hostname")).strip() == "web-0"
    assert (await sh(driver, b.name, "hostname")).strip() == "db-0"
    await daemon(driver, a.name, TCP_SERVER)
    await eventually(lambda: _listening(driver, a.name, ":7777"))
    await driver.exec(b.name, ["/bin/sh", "-c", "cat > /tmp/tcp.py"], input=TCP_CLIENT.encode())
    reply = (await sh(driver, b.name, f"{PYTHON} /tmp/tcp.py {a.address}")).strip()
    assert reply == f"web-0 sees {b.address}"


async def _listening(driver, name, port):
    code, out, _ = await driver.exec(name, ["ss", "-ltn"])
    return code == 0 and port in out.decode()


def _oom_kills(cgroup_dir):
    with open(os.path.join(cgroup_dir, "memory.oom_control")) as f:
        for line in f:
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
    return 0


@pytest_twisted.ensureDeferred
async def test_memory_limit_kills_inside_that_container_only(pair):
    driver, a, b = pair
    cgroups = lxc_config.host_cgroups()
    if cgroups.version != 1 or not cgroups.has("memory"):
        pytest.skip("checks cgroup v1 memory accounting")
    host_cgroup = cgroups.hierarchy("memory").base
    before = {"host": _oom_kills(host_cgroup),
              "a": _oom_kills(driver.payload_cgroup(a.name, "memory")),
              "b": _oom_kills(driver.payload_cgroup(b.name, "memory"))}
    await sh(driver, a.name, "setsid -f sleep 3333 </dev/null >/dev/null 2>&1")
    await sh(driver, b.name, "setsid -f sleep 4444 </dev/null >/dev/null 2>&1")
    for spec in (a, b):
        await driver.exec(spec.name, ["/bin/sh", "-c", "cat > /tmp/hog.py"], input=HOG.encode())

    # 512 MiB in b (limit 64M): the hog is killed ...
    code, out, _ = await driver.exec(b.name, [PYTHON, "/tmp/hog.py"], timeout=60)
    assert code == 128 + 9 and b"allocated" not in out
    assert _oom_kills(driver.payload_cgroup(b.name, "memory")) > before["b"]
    # ... b itself goes on (PID 1 and its other processes) ...
    assert await driver.state(b.name) == "RUNNING"
    assert await _with(driver, b.name, "sleep 4444")
    # ... a is untouched, and has no such limit: the same program runs to the end there.
    assert await _with(driver, a.name, "sleep 3333")
    code, out, _ = await driver.exec(a.name, [PYTHON, "/tmp/hog.py"], timeout=60)
    assert code == 0 and b"allocated 512 MiB" in out
    assert _oom_kills(driver.payload_cgroup(a.name, "memory")) == before["a"]
    # ... and so is the host: no OOM kill in the cgroup that holds this test.
    assert _oom_kills(host_cgroup) == before["host"]


@pytest_twisted.ensureDeferred
async def test_root_inside_is_an_unprivileged_id_on_the_host(pair, shared):
    driver, a, _ = pair
    first, count = await driver.id_range(a.name)
    assert (await sh(driver, a.name, "id -u")).strip() == "0"
    assert (await sh(driver, a.name, "cat /proc/self/uid_map")).split() == ["0", str(first), str(count)]
    assert (await sh(driver, a.name, "cat /proc/self/gid_map")).split() == ["0", str(first), str(count)]
    # Its processes belong to that id on the host ...
    assert os.stat(f"/proc/{await driver.init_pid(a.name)}").st_uid == first
    # ... and so do the files it makes on storage shared with the host.
    await sh(driver, a.name, "echo from-a > /shared/made-inside && mkdir /shared/d")
    for made in ("made-inside", "d"):
        st = os.stat(shared / made)
        assert (st.st_uid, st.st_gid) == (first, first), made
    # Host root's own file there is not root's inside: owner and mode hold.
    secret = shared / "host-secret"
    secret.write_text("host only\n")
    os.chmod(secret, 0o600)
    code, _, err = await driver.exec(a.name, ["cat", "/shared/host-secret"])
    assert code != 0 and b"Permission denied" in err
    code, _, err = await driver.exec(a.name, ["/bin/sh", "-c", "echo x >> /shared/host-secret"])
    assert code != 0 and secret.read_text() == "host only\n"


MODULE_LOAD = r"""
import ctypes, errno, os
libc = ctypes.CDLL(None, use_errno=True)
fd = os.open("/dev/null", os.O_RDONLY)
libc.syscall(313, fd, b"", 0)  # finit_module(2) on x86_64
print(errno.errorcode[ctypes.get_errno()])
"""


@pytest_twisted.ensureDeferred
async def test_root_inside_cannot_reach_the_host_kernel(pair):
    driver, a, _ = pair
    # Loading a module needs CAP_SYS_MODULE in the host's user namespace, which no
    # process in the container's has; a kernel built without modules says ENOSYS to all.
    await driver.exec(a.name, ["/bin/sh", "-c", "cat > /tmp/module.py"], input=MODULE_LOAD.encode())
    answer = (await sh(driver, a.name, f"{PYTHON} /tmp/module.py")).strip()
    assert answer in ("EPERM", "ENOSYS")
    init = await driver.init_pid(a.name)
    assert os.readlink(f"/proc/{init}/ns/user") != os.readlink("/proc/self/ns/user")
    # No device node can be made (the host's root disk, say), nor the host's disk mounted.
    root_dev = os.stat("/").st_dev
    code, _, err = await driver.exec(
        a.name, ["mknod", "/tmp/disk", "b", str(os.major(root_dev)), str(os.minor(root_dev))])
    assert code != 0 and b"Operation not permitted" in err
    code, _, err = await driver.exec(a.name, ["/bin/sh", "-c", "mkdir -p /mnt/h && mount --bind / /mnt/h"])
    assert code != 0 and b"permission denied" in err.lower()
    # /dev holds only the harmless nodes.
    assert set((await sh(driver, a.name, "ls /dev")).split()) <= {
        "console", "fd", "full", "null", "ptmx", "pts", "random", "shm", "stderr", "stdin", "stdout",
        "tty", "urandom", "zero", "mqueue", "hugepages"}
    status = await sh(driver, a.name, "grep CapBnd /proc/1/status")
    bounding = int(status.split()[1], 16)
    assert not bounding & (1 << 21)  # CAP_SYS_ADMIN
    assert not bounding & (1 << 16)  # CAP_SYS_MODULE
    code, _, _ = await driver.exec(a.name, ["/bin/sh", "-c", "mkdir -p /mnt/p && mount -t proc proc /mnt/p"])
    assert code != 0
    with open("/proc/sys/kernel/core_pattern") as f:
        core_pattern = f.read()
    code, _, _ = await driver.exec(a.name, ["/bin/sh", "-c", "echo '|/tmp/x' > /proc/sys/kernel/core_pattern"])
    assert code != 0
    with open("/proc/sys/kernel/core_pattern") as f:
        assert f.read() == core_pattern


# Kernel interfaces a unit is kept from (x86_64 numbers): {what: "ok" or errno name}.
KERNEL_SURFACE = r"""
import ctypes, errno, json
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
def answer(result):
    return "ok" if result >= 0 else errno.errorcode[ctypes.get_errno()]
buffer = ctypes.create_string_buffer(256)
found = {
    "keyctl": answer(libc.syscall(250, 0, -3, 0)),           # the session keyring's id
    "io_uring_setup": answer(libc.syscall(425, 4, buffer)),
    "perf_event_open": answer(libc.syscall(298, buffer, 0, -1, -1, 0)),
    "bpf": answer(libc.syscall(321, 0, buffer, 0)),
    "userfaultfd": answer(libc.syscall(323, 0)),
    "user namespace": answer(libc.unshare(0x10000000)),    # last: it may succeed
}
print(json.dumps(found))
"""


@pytest_twisted.ensureDeferred
async def test_a_unit_is_kept_from_kernel_interfaces_no_charm_needs(pair):
    driver, a, _ = pair
    await driver.exec(a.name, ["/bin/sh", "-c", "cat > /tmp/surface.py"], input=KERNEL_SURFACE.encode())
    inside = json.loads(await sh(driver, a.name, f"{PYTHON} /tmp/surface.py"))
    # Keyrings and io_uring as on a kernel without them; perf, bpf and userfaultfd
    # refused; no user namespace nested (the unit's cap for them is 0).
    assert inside == {"keyctl": "ENOSYS", "io_uring_setup": "ENOSYS", "perf_event_open": "EPERM",
                      "bpf": "EPERM", "userfaultfd": "EPERM", "user namespace": "ENOSPC"}, inside
    # The same calls on the host answer otherwise: it is the unit's policy that refuses.
    host = json.loads(subprocess.run([PYTHON, "-c", KERNEL_SURFACE], capture_output=True, check=True).stdout)
    assert host["keyctl"] == "ok" and host["user namespace"] == "ok" and host["io_uring_setup"] != "ENOSYS"


# What a host process can do to one unit: run as another unit's root id (as one that
# escaped its container would be), it prints {what: "ok" or the error's name}.
DRILL = r"""
import errno, json, os, signal, sys
container, pid = sys.argv[1], int(sys.argv[2])
delta = os.path.join(container, "overlay", "delta")
results = {}
def attempt(what, action):
    try:
        action()
        results[what] = "ok"
    except OSError as e:
        results[what] = errno.errorcode[e.errno]
def write(path):
    with open(path, "w") as f:
        f.write("planted")
attempt("read its secret", lambda: open(os.path.join(delta, "root/secret")).read())
attempt("read its world-readable file", lambda: open(os.path.join(delta, "srv/data")).read())
attempt("read its credential", lambda: open(os.path.join(container, "ensemble/service/agent/run")).read())
attempt("write into its root", lambda: write(os.path.join(delta, "planted")))
attempt("read through /proc", lambda: open(f"/proc/{pid}/root/srv/data").read())
attempt("read its environment", lambda: open(f"/proc/{pid}/environ").read())
attempt("signal it", lambda: os.kill(pid, 0))
print(json.dumps(results))
"""


def agent_pid(first):
    """The host pid of the supervised "agent" (sleep) of the unit whose root is `first`:
    a process of the unit's own, as a charm's daemon is (LXC's init is not dumpable)."""
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/status") as f:
                status = dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
        except (OSError, ValueError):
            continue
        if status.get("Name") == "sleep" and status["Uid"].split()[0] == str(first):
            return int(entry)
    raise AssertionError(f"no agent of host id {first} running")


async def drill(driver, as_ids, target):
    """DRILL against container `target`, run on the host as `as_ids`' root id."""
    pid = agent_pid((await driver.id_range(target)).first)
    argv = ["setpriv", f"--reuid={as_ids.first}", f"--regid={as_ids.first}", "--clear-groups",
            "/usr/bin/python3", "-c", DRILL, driver.container_dir(target), str(pid)]
    done = await threads.deferToThread(subprocess.run, argv, capture_output=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest_twisted.ensureDeferred
async def test_each_unit_has_ids_of_its_own_and_they_reach_nothing_of_another_unit(pair):
    driver, a, b = pair
    ids = {spec.name: await driver.id_range(spec.name) for spec in (a, b)}
    first_a, first_b = ids[a.name].first, ids[b.name].first
    # Two disjoint ranges, each root's inside its own container.
    assert abs(first_a - first_b) >= ids[a.name].count
    for spec in (a, b):
        first = ids[spec.name].first
        assert (await sh(driver, spec.name, "cat /proc/self/uid_map")).split() == ["0", str(first), "65536"]
        assert os.stat(f"/proc/{await driver.init_pid(spec.name)}").st_uid == first
        await sh(driver, spec.name, "umask 077 && echo secret > /root/secret && mkdir -p /srv && "
                                    "umask 022 && echo data > /srv/data")
    everything = {"read its secret", "read its world-readable file", "read its credential",
                  "write into its root", "read through /proc", "read its environment", "signal it"}
    # Unit a's root id on the host reaches a's files and processes ... (but not
    # through /proc: a's processes hold capabilities in a's namespace, which the bare
    # id on the host lacks, so the kernel refuses it that access even to a's own.)
    through_proc = {"read through /proc", "read its environment"}
    own = await drill(driver, ids[a.name], a.name)
    assert own == {what: "EACCES" if what in through_proc else "ok" for what in everything}, own
    # ... and nothing of b's: not its files, its credential, its processes.
    other = await drill(driver, ids[a.name], b.name)
    assert set(other) == everything and "ok" not in other.values(), other
    # The same the other way round.
    assert "ok" not in (await drill(driver, ids[b.name], a.name)).values()
    assert await drill(driver, ids[b.name], b.name) == own
