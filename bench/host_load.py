"""What the host and its processes spent while a benchmark's phase ran, for
bench/scale.py: read before and after the phase, so that a phase that got slower can
be told apart as the host's load (another process's CPU, the ZooKeeper JVM's garbage
collection) or the code's own work.
"""

import os
import subprocess

TICK = os.sysconf("SC_CLK_TCK")
# jstat -gc's columns this reports: collections and their seconds (young, full,
# concurrent), and the old generation's use and capacity (KB).
GC_COUNTS = ("YGC", "YGCT", "FGC", "FGCT", "CGC", "CGCT", "GCT")


def _host_ticks():
    """(busy, total, stolen) clock ticks of every CPU since boot: stolen is the time the
    hypervisor ran something else while this VM had work (counted in busy too)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal guest guest_nice; the guests are
    # counted in user and nice already.
    fields = fields[:8]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields), fields[7]


def _process_seconds(pid):
    """CPU seconds (user + system) `pid` has used, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime (fields 14, 15)


def _gc(java_pid):
    """{column: value} of `jstat -gc` for a JVM, or {} if jstat cannot read it."""
    try:
        out = subprocess.run(["jstat", "-gc", str(java_pid)], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    lines = out.split("\n")
    if len(lines) < 2 or not lines[1].strip():
        return {}
    values = {}
    for name, value in zip(lines[0].split(), lines[1].split()):
        try:
            values[name] = float(value)
        except ValueError:
            continue
    return values


def sample(processes, java_pid=None):
    """A reading now: `processes` is {label: pid}; `java_pid` a JVM to read jstat of."""
    return {"host": _host_ticks(), "processes": {k: _process_seconds(p) for k, p in processes.items()},
            "gc": _gc(java_pid) if java_pid is not None else {}, "wall": os.times().elapsed}


def spent(before, after):
    """What was spent between two samples: the host's busy share of all its CPUs and the
    share the hypervisor took from them, each process's CPU seconds, the JVM's
    collections and the old generation's fill."""
    busy, total, stolen = (a - b for a, b in zip(after["host"], before["host"]))
    result = {"seconds": round(after["wall"] - before["wall"], 1),
              "host_busy": round(busy / total, 3) if total else None,
              "host_stolen": round(stolen / total, 3) if total else None,
              "cpu_s": {k: round(after["processes"][k] - before["processes"][k], 2)
                        for k in after["processes"]
                        if after["processes"][k] is not None and before["processes"].get(k) is not None}}
    gc_before, gc_after = before["gc"], after["gc"]
    if gc_before and gc_after:
        result["gc"] = {k: round(gc_after[k] - gc_before[k], 3) for k in GC_COUNTS if k in gc_after and k in gc_before}
        if "OU" in gc_after and "OC" in gc_after:
            result["gc"]["old_used_mb"] = round(gc_after["OU"] / 1024, 1)
            result["gc"]["old_capacity_mb"] = round(gc_after["OC"] / 1024, 1)
    return result


def spent_over(spans):
    """spent() summed over (before, after) pairs of readings: what was spent within
    those spans alone (their processes' CPU, the host's ticks), not between them."""
    host, processes, wall = [0, 0, 0], {}, 0.0
    for before, after in spans:
        host = [t + a - b for t, a, b in zip(host, after["host"], before["host"])]
        wall += after["wall"] - before["wall"]
        for k, seconds in after["processes"].items():
            if seconds is not None and before["processes"].get(k) is not None:
                processes[k] = processes.get(k, 0.0) + seconds - before["processes"][k]
    zero = {"host": (0, 0, 0), "processes": dict.fromkeys(processes, 0.0), "gc": {}, "wall": 0.0}
    return spent(zero, {"host": host, "processes": processes, "gc": {}, "wall": wall})
