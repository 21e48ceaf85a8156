"""One deploy's timeline, for bench/deploy.py: when each step of a unit's deploy
happened, read from the timestamped lines the agents already write (the machine
agent's log, the unit agent's log and its hook log). Milliseconds after the add-unit
transaction began; a step whose line is missing is left out.
"""

import datetime
import os
import re

from ensemble import log_layout
from ensemble.names import unit_key

STAMP = r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})"

# (step, where, pattern with {unit}/{container}), in the order they happen.
STEPS = (
    ("assigned", "machine", r"assigned units: .*\(added: (?:[^;]*, )?{unit}[,;]"),
    ("address", "machine", r": {unit} has address "),
    ("created", "machine", r"created (?P<container>\S+) for {unit} at "),
    ("container_started", "machine", r"started {container}$"),
    ("agent_connected", "agent", r"zookeeper \S+: connected"),
    ("agent_present", "agent", r": present \(session"),
    ("install_begin", "hooks", r"^--- \S+ \S+ install hook$"),
    ("install_end", "hooks", r"^--- \S+ \S+ install hook exited"),
    ("start_begin", "hooks", r"^--- \S+ \S+ start hook$"),
    ("start_end", "hooks", r"^--- \S+ \S+ start hook exited"),
    ("started", "agent", r": {unit}: started$"),
)


def _when(line):
    match = re.search(STAMP, line)
    if match is None:
        return None
    return datetime.datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()


def _lines(path):
    try:
        with open(path, errors="replace") as f:
            return f.read().splitlines()
    except FileNotFoundError:
        return []


def timeline(home, machine_id, unit, since, machine_log=None):
    """{step: ms after `since` (epoch seconds)} for `unit`'s deploy on `machine_id`.
    `machine_log`: the machine agent's log, if not in `home`'s logs (a lab host's)."""
    key = unit_key(unit)
    unit_dir = os.path.join(home, "logs", log_layout.UNITS, key)
    sources = {
        "machine": _lines(machine_log or os.path.join(home, "logs", f"machine-{machine_id}.log")),
        "agent": _lines(os.path.join(unit_dir, log_layout.AGENT_LOG)),
        "hooks": _lines(os.path.join(unit_dir, log_layout.hook_log(key))),
    }
    fields = {"unit": re.escape(unit), "container": None}
    found = {}
    for step, where, pattern in STEPS:
        if "{container}" in pattern and fields["container"] is None:
            continue
        regex = re.compile(pattern.format(**fields))
        for line in sources[where]:
            match = regex.search(line)
            when = _when(line) if match else None
            if when is not None and when >= since - 0.002:  # log stamps are to the ms
                found[step] = round((when - since) * 1000, 1)
                if "container" in regex.groupindex:
                    fields["container"] = re.escape(match.group("container"))
                break
    return found


def durations(steps):
    """Each step's own time: from the step before it that was found. The caller may add
    two of its own: "added", when its add-unit call returned, and "seen", when it saw
    `started`."""
    result, last = {}, 0.0
    for step in ["added"] + [step for step, _, _ in STEPS] + ["seen"]:
        if step in steps:
            result[step] = round(steps[step] - last, 1)
            last = steps[step]
    return result


def slow_passes(home, machine_id, since):
    """{reconciler: [seconds, ...]} of the passes the machine agent logged as slow
    (0.25 s or more) after `since`."""
    regex = re.compile(r": (\S+) pass took ([\d.]+)s$")
    found = {}
    for line in _lines(os.path.join(home, "logs", f"machine-{machine_id}.log")):
        match = regex.search(line)
        when = _when(line) if match else None
        if when is not None and when >= since:
            found.setdefault(match.group(1), []).append(float(match.group(2)))
    return found
