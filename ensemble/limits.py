"""Per-service resource limits as users write them (`--memory 512M`, `--cpu-weight 200`)."""

import re

from ensemble.errors import InvalidValue

_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B?)?\Z", re.IGNORECASE)
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
MIN_MEMORY = 8 * 1024**2
CPU_WEIGHT_RANGE = (1, 10000)
PIDS_RANGE = (16, 4194304)


def parse_memory(text):
    """'512M', '1.5G', '1073741824' -> bytes."""
    match = _SIZE_RE.match(str(text).strip())
    if not match:
        raise InvalidValue(f"invalid memory size {text!r}: use a number with K, M, G or T, e.g. 512M")
    value = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    if value < MIN_MEMORY:
        raise InvalidValue(f"memory size {text!r} is below the minimum of {format_memory(MIN_MEMORY)}")
    return value


def format_memory(value):
    for suffix in ("T", "G", "M", "K"):
        unit = _UNITS[suffix]
        if value >= unit and value % unit == 0:
            return f"{value // unit}{suffix}"
    return str(value)


def _parse_int(name, text, low, high):
    try:
        value = int(str(text))
    except ValueError:
        raise InvalidValue(f"invalid {name} {text!r}: use a whole number from {low} to {high}")
    if not low <= value <= high:
        raise InvalidValue(f"invalid {name} {value}: use a whole number from {low} to {high}")
    return value


def parse_cpu_weight(text):
    return _parse_int("cpu weight", text, *CPU_WEIGHT_RANGE)


def parse_pids(text):
    return _parse_int("pids limit", text, *PIDS_RANGE)


# -- disk ---------------------------------------------------------------------------

MIN_DISK = 32 * 1024**2


def parse_disk(text):
    """'4G', '512M' -> bytes: the size of a unit's own filesystem (its writable layer
    and its log directory; see ensemble/machine/container/disk.py)."""
    match = _SIZE_RE.match(str(text).strip())
    if not match:
        raise InvalidValue(f"invalid disk size {text!r}: use a number with K, M, G or T, e.g. 4G")
    value = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    if value < MIN_DISK:
        raise InvalidValue(f"disk size {text!r} is below the minimum of {format_memory(MIN_DISK)}")
    # Whole MiB: the unit's filesystem image is made in 1 MiB blocks.
    return -(-value // 1024**2) * 1024**2


# -- what a unit gets when its service sets none --------------------------------------

# Keys as the service node stores them (`ensemble deploy --memory/--cpu-weight/--pids/
# --disk`), one vocabulary from the command line to the container's config.
MEMORY, CPU_WEIGHT, PIDS, DISK = "memory", "cpu-weight", "pids", "disk"
PARSERS = {MEMORY: parse_memory, CPU_WEIGHT: parse_cpu_weight, PIDS: parse_pids, DISK: parse_disk}

# Every unit gets these unless its service sets its own (docs/cli.md). Memory is the
# limit of memory and swap together: a unit does not swap beyond it. No CPU weight by
# default: an idle host shares CPU by the kernel's default weight (100).
DEFAULTS = {
    MEMORY: 1024**3,        # 1G
    PIDS: 1024,             # processes and threads
    DISK: 4 * 1024**3,      # 4G: its writable layer and its log directory
}


def effective(service_limits, defaults=None):
    """The limits a unit of a service with `service_limits` runs with: the service's
    own, and the defaults for what it does not set. Values already parsed (bytes,
    numbers); what a hand-edited node holds is parsed again here."""
    result = dict(DEFAULTS if defaults is None else defaults)
    for key, value in (service_limits or {}).items():
        if key in PARSERS and value is not None:
            result[key] = PARSERS[key](value)
    return result


# -- kernel limits per user namespace ---------------------------------------------------

# /proc/sys/user/<key> in each unit's user namespace (lxc.sysctl): what each user id of
# the unit may hold. The kernel charges these up the chain of user namespaces: what a
# unit holds counts also against host root's own limit (the creator of the units'
# namespaces), which the machine agent raises to HOST_USER_LIMITS below so that units at
# their caps cannot exhaust it. The unit's root cannot raise them: it has no
# CAP_SYS_RESOURCE (config.CAP_KEEP), and namespaces it nests count against them too.
# No user namespace may be nested in a unit: one would give the unit's root the
# capabilities it was denied (CAP_NET_ADMIN, CAP_SYS_ADMIN) over fresh namespaces, the
# door to most of the kernel's netfilter and filesystem code that exploits from
# containers go through. (Without CAP_SYS_ADMIN of its own, a unit makes no other
# namespace either; their caps bound what a change to that would allow.)
UNIT_USER_LIMITS = {
    "max_inotify_instances": 128,
    "max_inotify_watches": 65536,
    "max_user_namespaces": 0,
    "max_mnt_namespaces": 64,
    "max_net_namespaces": 64,
    "max_pid_namespaces": 64,
    "max_ipc_namespaces": 64,
    "max_uts_namespaces": 64,
    "max_cgroup_namespaces": 64,
    "max_time_namespaces": 64,
}
# fanotify's (max_fanotify_groups, max_fanotify_marks) are not among them: this kernel
# refuses writes to those in /proc/sys/user (EPERM, even for host root; fs.fanotify.*
# sets the host's), so a unit's fanotify groups are bounded only by host root's
# fs.fanotify.max_user_groups (docs/security.md says so).
# Units a machine is sized for (the id-range pool grants at least 250 per machine).
MAX_UNITS_PER_MACHINE = 256
# What host root keeps for itself on top of its units' share (the kernel's defaults for
# inotify, or more where a default is higher).
HOST_RESERVE = {
    "max_inotify_instances": 128,
    "max_inotify_watches": 8192,
    "max_user_namespaces": 1024,
    "max_mnt_namespaces": 1024,
    "max_net_namespaces": 1024,
    "max_pid_namespaces": 1024,
    "max_ipc_namespaces": 1024,
    "max_uts_namespaces": 1024,
    "max_cgroup_namespaces": 1024,
    "max_time_namespaces": 1024,
}


def host_user_limits(units=MAX_UNITS_PER_MACHINE, unit_limits=None):
    """{key: at least this value} for /proc/sys/user/<key> on the host: room for
    `units` units at their caps, and host root's own reserve besides. A host whose
    value is higher keeps it."""
    unit_limits = UNIT_USER_LIMITS if unit_limits is None else unit_limits
    # Each of a unit's namespaces is made by LXC as host root: one of each per unit.
    return {key: HOST_RESERVE.get(key, 0) + units * (value + 1) for key, value in unit_limits.items()}


# -- all units of a machine together -------------------------------------------------

# The machine's parent cgroup holds every unit; by default it may use this share of
# the host's memory and of its process ids, and the rest stays the host's own (its
# agents, ZooKeeper, sshd). `ensemble machine-agent --units-memory/--units-pids`.
MACHINE_MEMORY_SHARE = 0.8
MACHINE_PIDS_SHARE = 0.8


def host_memory(meminfo="/proc/meminfo"):
    with open(meminfo) as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    raise OSError("no MemTotal in /proc/meminfo")


def host_pids(pid_max="/proc/sys/kernel/pid_max", threads_max="/proc/sys/kernel/threads-max"):
    values = []
    for path in (pid_max, threads_max):
        with open(path) as f:
            values.append(int(f.read().split()[0]))
    return min(values)


def machine_caps(memory=None, pids=None):
    """{memory: bytes, pids: n} for the parent cgroup of a machine's units: what is
    given, else the default share of the host's."""
    return {
        MEMORY: parse_memory(memory) if memory is not None else int(host_memory() * MACHINE_MEMORY_SHARE),
        PIDS: parse_pids(pids) if pids is not None else max(PIDS_RANGE[0], int(host_pids() * MACHINE_PIDS_SHARE)),
    }
