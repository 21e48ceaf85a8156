"""The LXC config of a unit's container, rendered in full (nothing is taken from
/etc/lxc/default.conf, which names an lxcbr0 that hosts without lxc-net do not have),
and the runit service directory that PID 1 (tini, then runsv) supervises.

Layout of one container under its lxc path:

    <lxc_path>/<name>/config              this file
    <lxc_path>/<name>/overlay/delta       the overlayfs upper dir (the template is below)
    <lxc_path>/<name>/ensemble/service/agent/   runsv's service directory (the unit agent),
                                          seen inside as /etc/ensemble/service/agent
    <lxc_path>/<name>/lxc.log             LXC's log for this container
    <lxc_path>/<name>/stage.json          what a user-namespaced start binds (below)
"""

import json
import logging
import os
import shlex

import netaddr

from ensemble import log_layout
from ensemble.searchable import unsearchable

log = logging.getLogger("ensemble.container")

# The first line of every config we write: what `list()` and `destroy()` recognise.
MARKER = "# ensemble container"
SERVICE_DIR = "ensemble"             # in the container's lxc dir
SERVICE_MOUNT = "etc/ensemble"       # where it is seen inside (relative to the rootfs)
AGENT_LOG = f"{log_layout.INSIDE}/{log_layout.AGENT_LOG}"
# A forked agent (agent_starter.py): the lock it holds while it runs, the host's file in
# the container's directory seen read-only inside; the command and environment it runs
# with (the unit root's, 0600: its credential); its pid, for runsv's script.
AGENT_LOCK = "agent.lock"
AGENT_LOCK_INSIDE = f"/{SERVICE_MOUNT}/{AGENT_LOCK}"
AGENT_SPEC = f"/{SERVICE_MOUNT}/service/agent/agent.json"
FORKED_AGENT_PID = f"/{SERVICE_MOUNT}/service/agent/forked.pid"
# A forked agent's command is `PYTHON -m ensemble ARGS...`: the starter runs ARGS.
ENSEMBLE_ARGS = 3
INIT_CMD = "/usr/bin/tini -- /usr/bin/runsv /etc/ensemble/service/agent"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Under a user namespace LXC mounts the rootfs and the bind mounts as the container's
# root: an unprivileged host id, which cannot search 0700 directories such as /root or
# pytest's tmp. So the start binds each such path onto a fixed mountpoint here, in a
# mount namespace of its own (nothing shows on the host), and the config names those.
# Every container uses the same mountpoints; each sees only its own binds.
STAGE_DIR = "/run/ensemble/stage"
# A container with a user namespace runs on an overlay its start mounts there (stage.py):
# the template seen through an idmapped mount below, its own writable layer above.
STAGE_ROOTFS = f"{STAGE_DIR}/rootfs"
STAGE_LOWER = f"{STAGE_DIR}/lower"

# What a container may touch in /dev (LXC's own common.conf list): null, zero, full,
# random, urandom, tty, console, ptmx, pts, fuse; mknod of anything, use of nothing else.
DEVICES = [
    "c *:* m", "b *:* m", "c 1:3 rwm", "c 1:5 rwm", "c 1:7 rwm", "c 5:0 rwm", "c 5:1 rwm",
    "c 5:2 rwm", "c 1:8 rwm", "c 1:9 rwm", "c 136:* rwm", "c 10:229 rwm",
]
# Root in a container keeps only these capabilities (Docker's default set): enough to
# install packages, bind low ports and run daemons; not CAP_SYS_ADMIN, with which root
# in a privileged container could mount /proc or a cgroup anew and reach the host
# (core_pattern, release_agent) on hosts without AppArmor.
CAP_KEEP = ("audit_write chown dac_override fowner fsetid kill mknod net_bind_service net_raw "
            "setfcap setgid setpcap setuid sys_chroot")
# LXC's seccomp policy (its common.seccomp: module loading, kexec, open_by_handle_at,
# forced unmounts) and more: kernel interfaces no charm needs whose bugs have been the
# way out of containers. Keyrings and io_uring answer ENOSYS, as on a kernel built
# without them, so that software falls back (pam_keyinit, liburing users); perf
# events, bpf and userfaultfd EPERM, as where their sysctls forbid the unprivileged.
SECCOMP_FILE = "seccomp"  # in the container's directory
SECCOMP_PROFILE = """2
denylist
reject_force_umount
[all]
kexec_load errno 1
open_by_handle_at errno 1
init_module errno 1
finit_module errno 1
delete_module errno 1
keyctl errno 38
add_key errno 38
request_key errno 38
io_uring_setup errno 38
io_uring_enter errno 38
io_uring_register errno 38
perf_event_open errno 1
bpf errno 1
userfaultfd errno 1
"""


# -- the host's cgroups ---------------------------------------------------------------

class Hierarchy:
    """One mounted cgroup hierarchy and where this process sits in it."""

    def __init__(self, mountpoint, root, controllers, version, path):
        self.mountpoint = mountpoint
        self.root = root
        self.controllers = frozenset(controllers)
        self.version = version
        self.path = path  # this process's cgroup in the hierarchy ('/...')

    @property
    def base(self):
        """The directory of this process's cgroup: where LXC puts our containers'
        cgroups (lxc.cgroup.relative = 1)."""
        relative = self.path
        if self.root != "/" and (relative == self.root or relative.startswith(self.root + "/")):
            relative = relative[len(self.root):]
        return os.path.normpath(self.mountpoint + "/" + relative.lstrip("/"))

    def __repr__(self):
        return f"Hierarchy({self.mountpoint!r}, v{self.version}, {sorted(self.controllers)})"


class HostCgroups:
    """Which cgroup version the container limits use and which controllers exist."""

    def __init__(self, hierarchies):
        self.hierarchies = hierarchies
        v1 = set()
        for h in hierarchies:
            if h.version == 1:
                v1 |= h.controllers
        self.v1_controllers = frozenset(c for c in v1 if not c.startswith("name="))
        unified = [h for h in hierarchies if h.version == 2]
        self.v2_controllers = frozenset()
        if unified:
            try:
                with open(os.path.join(unified[0].mountpoint, "cgroup.controllers")) as f:
                    self.v2_controllers = frozenset(f.read().split())
            except OSError:
                pass
        # Legacy or hybrid (controllers on v1 mounts): LXC's lxc.cgroup.* keys.
        self.version = 1 if "memory" in self.v1_controllers or not unified else 2
        memory = self.hierarchy("memory")
        self.memsw = bool(
            self.version == 1 and memory and os.path.exists(os.path.join(memory.base, "memory.memsw.limit_in_bytes"))
        )

    def has(self, controller):
        controllers = self.v1_controllers if self.version == 1 else self.v2_controllers
        return controller in controllers

    def hierarchy(self, controller):
        for h in self.hierarchies:
            if h.version == self.version and (h.version == 2 or controller in h.controllers):
                return h
        return None


def read_host_cgroups(mountinfo="/proc/self/mountinfo", cgroup="/proc/self/cgroup", subsystems="/proc/cgroups"):
    memberships = {}
    with open(cgroup) as f:
        for line in f:
            hid, controllers, path = line.rstrip("\n").split(":", 2)
            memberships[frozenset(c for c in controllers.split(",") if c)] = (2 if hid == "0" else 1, path)
    try:
        with open(subsystems) as f:
            known = {line.split()[0] for line in f if line.strip() and not line.startswith("#")}
    except OSError:
        known = {"cpu", "cpuacct", "cpuset", "memory", "devices", "freezer", "blkio", "pids",
                 "net_cls", "net_prio", "perf_event", "hugetlb", "rdma", "misc"}
    hierarchies = []
    seen = set()
    with open(mountinfo) as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            fstype, options = fields[sep + 1], fields[sep + 3]
            if fstype == "cgroup2":
                controllers, version = frozenset(), 2
            elif fstype == "cgroup":
                controllers = frozenset(o for o in options.split(",") if o in known or o.startswith("name="))
                version = 1
            else:
                continue
            member = memberships.get(controllers)
            if (version, controllers) in seen or member is None or member[0] != version:
                continue  # a second mount of one hierarchy, or one we are not in
            seen.add((version, controllers))
            hierarchies.append(Hierarchy(_unescape(fields[4]), _unescape(fields[3]), controllers, version, member[1]))
    return HostCgroups(hierarchies)


def _unescape(path):
    return path.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


_host_cgroups = None


def host_cgroups():
    """The host's cgroup layout, read once per process."""
    global _host_cgroups
    if _host_cgroups is None:
        _host_cgroups = read_host_cgroups()
    return _host_cgroups


# -- rendering ------------------------------------------------------------------------

def cpu_shares(weight):
    """cgroup v1 cpu.shares for a CPU weight (100 is the default share, 1024)."""
    return max(2, round(weight * 1024 / 100))


def _fstab_path(path):
    for char, code in (("\\", "\\134"), (" ", "\\040"), ("\t", "\\011")):
        path = path.replace(char, code)
    return path


def _check_path(path, what):
    if not isinstance(path, str) or not path.startswith("/") or "\n" in path or "\0" in path:
        raise ValueError(f"{what} must be an absolute path on one line, not {path!r}")
    return os.path.normpath(path)


def mount_entry(host_path, container_path, read_only, source=None):
    """The entry that binds `host_path`, which LXC reaches as `source` (default: the
    same path; a stage mountpoint under a user namespace)."""
    host_path = _check_path(host_path, "a mount's host path")
    container_path = _check_path(container_path, "a mount's container path")
    if container_path == "/":
        raise ValueError("cannot mount over the container's root")
    create = "create=file" if os.path.isfile(host_path) else "create=dir"
    host_path = source or host_path
    options = ",".join(["bind", "ro"] if read_only else ["bind"]) + "," + create
    return f"lxc.mount.entry = {_fstab_path(host_path)} {_fstab_path(container_path.lstrip('/'))} none {options} 0 0"


def limit_lines(memory=None, cpu_weight=None, pids=None, cgroups=None):
    """The cgroup keys for the limits, and warnings for limits this host cannot enforce."""
    cgroups = cgroups or host_cgroups()
    lines, warnings = [], []
    v1 = cgroups.version == 1
    if memory is not None:
        if cgroups.has("memory"):
            if v1:
                lines.append(f"lxc.cgroup.memory.limit_in_bytes = {memory}")
                # Memory and swap together: a unit does not swap beyond its limit.
                if cgroups.memsw:
                    lines.append(f"lxc.cgroup.memory.memsw.limit_in_bytes = {memory}")
                else:
                    # No swap accounting on this host (swapaccount=0): no swapping at all.
                    lines.append("lxc.cgroup.memory.swappiness = 0")
            else:
                lines.append(f"lxc.cgroup2.memory.max = {memory}")
                lines.append("lxc.cgroup2.memory.swap.max = 0")
        else:
            warnings.append(f"memory limit {memory} not enforced: no memory cgroup controller on this host")
    if cpu_weight is not None:
        if cgroups.has("cpu"):
            lines.append(f"lxc.cgroup.cpu.shares = {cpu_shares(cpu_weight)}" if v1 else f"lxc.cgroup2.cpu.weight = {cpu_weight}")
        else:
            warnings.append(f"cpu weight {cpu_weight} not enforced: no cpu cgroup controller on this host")
    if pids is not None:
        if cgroups.has("pids"):
            lines.append(f"lxc.cgroup.pids.max = {pids}" if v1 else f"lxc.cgroup2.pids.max = {pids}")
        else:
            warnings.append(f"pids limit {pids} not enforced: no pids cgroup controller on this host")
    return lines, warnings


def runtime_lines(init_cmd):
    """What every container of ours runs with: its init, mounts and capabilities."""
    return [
        f"lxc.init.cmd = {init_cmd}",
        "lxc.signal.halt = SIGTERM",
        "lxc.mount.auto = proc:mixed sys:mixed cgroup:mixed:force",
        "lxc.autodev = 1",
        "lxc.tty.max = 0",
        "lxc.pty.max = 64",
        "lxc.console.path = none",
        f"lxc.cap.keep = {CAP_KEEP}",
    ]


def _by_depth(mounts):
    return sorted(mounts, key=lambda m: os.path.normpath(m[1]).count("/"))


def stage_binds(spec, container_dir):
    """[(host path, stage mountpoint)] a start binds first: each path LXC resolves as the
    container's root that this root could not reach (none without a user namespace;
    see STAGE_DIR). Each bind costs a few ms of every start, so only those."""
    if not spec.idmap:
        return []
    candidates = [(container_dir, "container")]
    for i, (host_path, _, _) in enumerate(_by_depth(spec.mounts)):
        host_path = _check_path(host_path, "a mount's host path")
        candidates.append((host_path, f"{'file' if os.path.isfile(host_path) else 'dir'}-{i}"))
    first = spec.idmap[0]
    return [(path, f"{STAGE_DIR}/{name}") for path, name in candidates if unsearchable(path, first, first)]


def user_limit_lines(idmap, unit_limits=None):
    """The kernel's per-user-namespace limits (/proc/sys/user) of a container with a user
    namespace (see ensemble.limits.UNIT_USER_LIMITS). Not lxc.sysctl: LXC writes those
    inside, after proc:mixed made /proc/sys/user read-only. A start-host hook, run by
    LXC as host root once the namespaces exist and before the container's init runs,
    joins the container's user namespace as its root (nsenter sets ids 0 there, so the
    shell it runs keeps the full capabilities of that namespace, CAP_SYS_RESOURCE with
    them) and writes them; the unit's root, whose init runs without that capability
    (lxc.cap.keep), cannot raise them again. Only the user namespace is joined: the
    shell and /proc are the host's. The hook is on this line, not in a file the unit
    can write."""
    if not idmap:
        return []
    from ensemble.limits import UNIT_USER_LIMITS

    values = UNIT_USER_LIMITS if unit_limits is None else unit_limits
    writes = "; ".join(f"echo {int(v)} > /proc/sys/user/{k}" for k, v in sorted(values.items())
                       if os.path.exists(f"/proc/sys/user/{k}"))
    if not writes:
        return []
    script = f"set -e; {writes}"
    return [
        "lxc.hook.version = 1",
        f"lxc.hook.start-host = /usr/bin/nsenter --user=/proc/${{LXC_PID}}/ns/user -- /bin/sh -c {shlex.quote(script)}",
    ]


def cgroup_dir_lines(name, parent=None):
    """Where LXC puts the container's cgroups (relative to the caller's): below the
    machine's parent cgroup (cgroups.py) when there is one."""
    prefix = f"{parent}/" if parent else ""
    return [
        "lxc.cgroup.relative = 1",
        f"lxc.cgroup.dir.container = {prefix}lxc.payload.{name}",
        f"lxc.cgroup.dir.monitor = {prefix}lxc.monitor.{name}",
        f"lxc.cgroup.dir.monitor.pivot = {prefix}lxc.pivot.{name}",
    ]


def render(spec, container_dir, template_rootfs, veth, cgroups=None, cgroup_parent=None):
    """The LXC config for `spec` (see driver.ContainerSpec) as text; its cgroups below
    `cgroup_parent` (the machine's, cgroups.py) if given."""
    cgroups = cgroups or host_cgroups()
    binds = stage_binds(spec, container_dir)
    seen = dict(binds)  # host path -> where LXC reaches it
    staged_dir = seen.get(container_dir, container_dir)
    name = spec.name
    network = netaddr.IPNetwork(f"{spec.address}/{spec.prefixlen}")
    limits, warnings = limit_lines(spec.memory, spec.cpu_weight, spec.pids, cgroups)
    for warning in warnings:
        log.warning("container %s: %s", name, warning)
    key = "lxc.cgroup2" if cgroups.version == 2 else "lxc.cgroup"
    delta = os.path.join(staged_dir, "overlay", "delta")
    # With a user namespace the start mounts the overlay (stage.py); LXC takes it as is.
    rootfs = f"dir:{STAGE_ROOTFS}" if spec.idmap else f"overlay:{template_rootfs}:{delta}"
    lines = [
        MARKER,
        f"# {name}: rendered by ensemble; edits are lost when the unit is redeployed.",
        f"lxc.rootfs.path = {rootfs}",
        f"lxc.uts.name = {spec.hostname}",
        "",
        "# network: one veth on the host bridge, a static address from ipam",
        "lxc.net.0.type = veth",
        f"lxc.net.0.link = {spec.bridge}",
        f"lxc.net.0.veth.pair = {veth}",
        "lxc.net.0.name = eth0",
        "lxc.net.0.flags = up",
        *([f"lxc.net.0.hwaddr = {spec.mac}"] if getattr(spec, "mac", None) else []),
        f"lxc.net.0.ipv4.address = {spec.address}/{spec.prefixlen} {network.broadcast or network.network}",
        f"lxc.net.0.ipv4.gateway = {spec.gateway}",
        *([f"lxc.net.0.mtu = {spec.mtu}"] if spec.mtu else []),
        *([
            "",
            "# user namespace: root inside is an unprivileged id range on the host",
            f"lxc.idmap = u 0 {spec.idmap[0]} {spec.idmap[1]}",
            f"lxc.idmap = g 0 {spec.idmap[0]} {spec.idmap[1]}",
        ] if spec.idmap else []),
        "",
        "# cgroups: under the agent's own cgroup, one directory per container",
        *cgroup_dir_lines(name, cgroup_parent),
        *limits,
        *user_limit_lines(spec.idmap),
        *(f"# {w}" for w in warnings),
        f"{key}.devices.deny = a",
        *(f"{key}.devices.allow = {d}" for d in DEVICES),
        "",
        "# init: tini reaps orphans; runsv supervises the unit agent",
        *runtime_lines(INIT_CMD),
    ]
    lines.append(f"lxc.seccomp.profile = {os.path.join(container_dir, SECCOMP_FILE)}")
    if binds:
        lines += [
            "",
            f"# {STAGE_DIR}/*: what stage.json names, bound by ensemble when it starts this",
            "# container, seen by LXC only (not on the host): start it with ensemble, not lxc-start.",
        ]
    lines += [
        "",
        "# mounts",
        f"lxc.mount.entry = {_fstab_path(os.path.join(staged_dir, SERVICE_DIR))} {SERVICE_MOUNT} none bind,create=dir 0 0",
    ]
    if spec.agent_forked:
        lines.append(f"lxc.mount.entry = {_fstab_path(os.path.join(staged_dir, AGENT_LOCK))} "
                     f"{AGENT_LOCK_INSIDE.lstrip('/')} none bind,ro,create=file 0 0")
    for host_path, container_path, read_only in _by_depth(spec.mounts):
        source = seen.get(_check_path(host_path, "a mount's host path"))
        lines.append(mount_entry(host_path, container_path, read_only, source))
    lines += [
        "",
        f"lxc.log.file = {os.path.join(container_dir, 'lxc.log')}",
        "lxc.log.level = WARN",
        "",
    ]
    return "\n".join(lines)


def agent_environment(environment=None):
    """The unit agent's whole environment: a clean one, with `environment` added."""
    env = {"PATH": DEFAULT_PATH, "HOME": "/root", "LANG": "C.UTF-8"}
    env.update(environment or {})
    for k in env:
        if not k or "=" in k or "\0" in k or "\0" in str(env[k]):
            raise ValueError(f"invalid environment variable {k!r}")
    return {k: str(v) for k, v in env.items()}


def agent_run_script(argv, environment=None, forked=False):
    """runsv's ./run for the unit agent: a clean environment, output to the agent log.
    `forked`: the container's first agent is forked in by the machine agent's starter
    (agent_starter.py) and holds AGENT_LOCK while it runs; until it ends this script
    stands in for it with runsv (passes runsv's TERM on, as at a container's stop) and
    starts an agent itself only once that one has ended on its own."""
    env = agent_environment(environment)
    assignments = " ".join(shlex.quote(f"{k}={v}") for k, v in sorted(env.items()))
    command = " ".join(shlex.quote(str(a)) for a in argv)
    log_dir = os.path.dirname(AGENT_LOG)
    wait = (
        f"exec 9<{AGENT_LOCK_INSIDE}\n"
        f"trap 'stopping=1; kill -TERM \"$(cat {FORKED_AGENT_PID} 2>/dev/null)\" 2>/dev/null' TERM\n"
        "flock 9 &\n"
        "waiter=$!\n"
        'while kill -0 "$waiter" 2>/dev/null; do wait "$waiter"; done\n'
        '[ -z "$stopping" ] || exit 0\n'
    ) if forked else ""
    return (
        "#!/bin/sh\n"
        "# The unit agent, supervised by runsv: restarted when it exits (at most once a second).\n"
        f"mkdir -p {log_dir}\n"
        f"exec </dev/null >>{AGENT_LOG} 2>&1\n"
        "cd /\n"
        f"{wait}"
        f"exec /usr/bin/env -i {assignments} {command}\n"
    )


def service_files(spec):
    """{relative path under <container>/ensemble: (content, mode)} for the spec."""
    if spec.agent_command:
        # 0700 and 0600: they hold the unit's ZooKeeper credential.
        files = {"service/agent/run": (
            agent_run_script(spec.agent_command, spec.agent_environment, spec.agent_forked), 0o700)}
        if spec.agent_forked:
            agent = {"argv": list(spec.agent_command), "environment": agent_environment(spec.agent_environment)}
            files["service/agent/agent.json"] = (json.dumps(agent), 0o600)
        return files
    # Nothing to supervise: runsv keeps the container up with the service down.
    return {
        "service/agent/run": ("#!/bin/sh\nexec sleep infinity\n", 0o755),
        "service/agent/down": ("", 0o644),
    }
