"""Relation benchmark: from `add-relation` until both sides' `-relation-changed` hooks
have run, in real environments with real containers. Prints one JSON object on stdout
(progress on stderr); figures in seconds.

    .venv/bin/python bench/relations.py [--one-host 30] [--lab 20] [--fan-out 50]

With none of the three, all three run with their defaults; otherwise only those given.

- one-host: services `left` (bench/charms/relbench-provides: provides x, interface
  bench) and `right` (bench/charms/relbench-requires: requires x), one unit each, both
  on machine 0 of a local environment of its own (own ENSEMBLE_HOME in a temp dir,
  --network 10.211.0.0/16, --name benchrel). N add/remove cycles.
- lab: the same with left/0 on host 0 and right/0 on host 1 of a lab of simulated
  hosts (ensemble/lab.py, hosts=2: each host its own network namespace and machine
  agent, ZooKeeper on host 0). N cycles.
- fan-out: `right` grown to N units on machine 0 of the local environment (one
  `add-unit -n N-1`, all started before timing), related to left's one unit: until
  left/0 has run -changed for every right unit and every right unit its -changed.
  `--fan-out-cycles` cycles.

A cycle: `RelationStateManager(admin client).add_relation("left", "right")` in this
process (t0 is just before the call), then wait until each unit's hook log shows
`x-relation-changed` completed; a pause (`--settle`); `remove_relation`, then wait for
each unit's `x-relation-broken`. The relation hooks are `#!/bin/sh` + `true`: they run
and are logged, and cost only a process. Hook completion is seen in the unit's hook
log, which the host reads where the machine agent bind-mounts it into the container
(<ENSEMBLE_HOME>/logs/units/<unit>/<unit>.log; a lab host's home for the lab), polled
from the reactor (task.deferLater) every 2 ms (`--poll`; 10 ms for fan-out's 51 logs,
`--fan-out-poll`); an event's time is when the poll that first read its line returned.
Each scenario starts with one uncounted warm-up cycle; one-host then runs one more,
uncounted, through the `ensemble` CLI, to show the CLI's own overhead (its process's
start to exit, and `ensemble --version` for the interpreter and imports alone) next to
the in-process call. After each add in the pair scenarios, ZooKeeper's own times
(ctime/mtime, its server's clock, this machine's) of the relation node, each unit's
settings write and member node split the time before the first hook.

p50 is the median; p99 is the nearest-rank percentile (bench/stats.py). Goal: p50 of
add-relation to both -changed under 1 s. Everything the run creates is destroyed at the
end, also after a failure, Ctrl-C or SIGTERM. Needs root and the cached container
template.
"""

import argparse
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from twisted.internet import defer, task, threads

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from stats import percentile  # noqa: E402

from ensemble import connection, hostfs, local  # noqa: E402
from ensemble.errors import UnsafeFile  # noqa: E402
from ensemble.home import EnsembleHome  # noqa: E402
from ensemble.lab import Lab  # noqa: E402
from ensemble.names import unit_key  # noqa: E402
from ensemble.network.netns import inside  # noqa: E402
from ensemble.state import auth  # noqa: E402
from ensemble.state.relation import RelationStateManager, relation_path, role_path, settings_path  # noqa: E402
from ensemble.state.unit import UnitStateManager  # noqa: E402

PROVIDES = os.path.join(HERE, "charms", "relbench-provides")
REQUIRES = os.path.join(HERE, "charms", "relbench-requires")
RELATION = "x"
CHANGED, JOINED, BROKEN, DEPARTED = (f"{RELATION}-relation-{k}" for k in ("changed", "joined", "broken", "departed"))
GOAL_P50_S = 1.0
CLI = os.path.join(os.path.dirname(sys.executable), "ensemble")
# What run_hook (ensemble/unit/hooks.py) writes around each hook.
HOOK_START = re.compile(r"^--- \d{4}-\d\d-\d\d \d\d:\d\d:\d\d (\S+) hook$")
HOOK_EXIT = re.compile(r"^--- (\S+) hook exited with status (-?\d+)$")
# The unit agent's own log (INFO, with milliseconds).
AGENT_LINE = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) \S+ \S+: (\S+): (?:joined relation (\S+) |relation (\S+) removed)")

# The most read of one log a unit writes (its agent's, or any kept with --keep-logs):
# a whole run's worth, yet bounded whatever the unit does to it.
AGENT_LOG_LIMIT = 64 << 20
CLEANUPS = []  # blocking undo steps still owed, run by main() if the reactor stops first


def say(message):
    print(f"{time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


class Once:
    """A blocking cleanup step, registered until it has run once."""

    def __init__(self, what, undo):
        self.what = what
        self.undo = undo
        self.done = False
        CLEANUPS.append(self)

    def __call__(self):
        if not self.done:
            self.done = True
            try:
                self.undo()
            finally:
                if self in CLEANUPS:
                    CLEANUPS.remove(self)


def summary(values, digits=4):
    """{p50, p99, min, max, n} of seconds."""
    if not values:
        return {"n": 0}
    return {
        "p50": round(statistics.median(values), digits),
        "p99": round(percentile(values, 99), digits),
        "min": round(min(values), digits),
        "max": round(max(values), digits),
        "n": len(values),
    }


# -- hook logs, as the host sees them ---------------------------------------------------

class HookLog:
    """A unit's hook log: the lines appended since the last read. The unit writes it:
    opened through ensemble.hostfs (no links, a regular file), read a bounded amount
    at a time."""

    def __init__(self, root, relative):
        self.root, self.relative = root, relative
        self.fd = None
        self.offset = 0
        self.partial = b""

    def read(self):
        if self.fd is None:
            try:
                self.fd = hostfs.open_regular(self.root, self.relative)
            except FileNotFoundError:
                return []
        chunks, size = [], 0
        while size < hostfs.TAIL_LIMIT:
            data = os.pread(self.fd, 1 << 16, self.offset)
            if not data:
                break
            self.offset += len(data)
            size += len(data)
            chunks.append(data)
        if not chunks:
            return []
        lines = (self.partial + b"".join(chunks)).split(b"\n")
        self.partial = lines.pop()[-hostfs.TAIL_LIMIT:]
        return [line.decode(errors="replace") for line in lines]

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class Events:
    """Hook starts and exits per unit, each with the monotonic time it was first seen."""

    def __init__(self, units):
        self.by_unit = {u: [] for u in units}  # unit -> [(t, "start"|"exit", hook, status)]

    def add(self, unit, t, line):
        m = HOOK_START.match(line)
        if m:
            self.by_unit[unit].append((t, "start", m.group(1), None))
            return
        m = HOOK_EXIT.match(line)
        if m:
            status = int(m.group(2))
            if status != 0:
                raise SystemExit(f"{unit}: {m.group(1)} hook exited with status {status}")
            self.by_unit[unit].append((t, "exit", m.group(1), status))

    def times(self, unit, kind, hook):
        return [t for t, k, h, _ in self.by_unit[unit] if k == kind and h == hook]

    def count(self, unit, hook):
        return len(self.times(unit, "exit", hook))

    def describe(self):
        return {u: [f"{k} {h}" for _, k, h, _ in e] for u, e in self.by_unit.items()}


async def follow(reactor, logs, done, timeout, poll, what):
    """Poll `logs` ({unit: HookLog}) until `done(events)`; returns the Events."""
    events = Events(logs)
    deadline = time.monotonic() + timeout
    while True:
        for unit, log in logs.items():
            lines = log.read()
            seen = time.monotonic()
            for line in lines:
                events.add(unit, seen, line)
        if done(events):
            return events
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout}s waiting for {what}; seen: {json.dumps(events.describe())}")
        await task.deferLater(reactor, poll, lambda: None)


def drain(logs):
    """Relation hooks logged since the last look (none are expected between phases)."""
    stray = []
    for unit, log in logs.items():
        for line in log.read():
            m = HOOK_START.match(line)
            if m:
                stray.append(f"{unit}: {m.group(1)}")
    return stray


# -- one cycle ---------------------------------------------------------------------------

class Cycler:
    """add/remove cycles of the relation left-right, timed from the hook logs."""

    def __init__(self, reactor, client, logs, expected, args, agent_logs=None, poll=None):
        self.reactor = reactor
        self.poll = poll or args.poll
        self.client = client
        self.relations = RelationStateManager(client)
        self.logs = logs  # {unit: HookLog}
        self.expected = expected  # {unit: -changed hooks owed per add}
        self.args = args
        self.agent_logs = agent_logs or {}  # {unit: (directory, path below it) of its agent log}
        self.stray = []
        self.starts = {}  # relation id number -> wall time of the add (for the agent logs)
        self.removes = {}

    def added(self, events):
        return all(events.count(u, CHANGED) >= n for u, n in self.expected.items())

    def broken(self, events):
        return all(events.count(u, BROKEN) >= 1 for u in self.expected)

    async def cycle(self, timeout, cli_env=None, counted=True):
        """One add/remove cycle; returns its figures (None for the in-process call's
        duration when the CLI was used). `counted`: its agent log lines count too."""
        self.stray += drain(self.logs)
        cpu0 = cpu_times()
        wall0, t0 = time.time(), time.monotonic()
        if cli_env is None:
            relation, _, _ = await self.relations.add_relation("left", "right")
            call = time.monotonic() - t0
            cli = None
        else:
            running = threads.deferToThread(run_timed, [CLI, "add-relation", "left", "right"], cli_env)
        added = await follow(self.reactor, self.logs, self.added, timeout, self.poll, "-changed on both sides")
        cpu1 = cpu_times()
        if cli_env is not None:
            cli, _ = await running
            call = None
            relation = (await self.relations.relations_of("left"))[0]
        if counted:
            self.starts[relation.id] = wall0
        stamps = await self.stamps(relation) if self.args.stamps and len(self.expected) == 2 else None
        await task.deferLater(self.reactor, self.args.settle, lambda: None)
        self.stray += drain(self.logs)
        wall1, t1 = time.time(), time.monotonic()
        if cli_env is None:
            await self.relations.remove_relation("left", "right")
            remove_call = time.monotonic() - t1
            remove_cli = None
        else:
            running = threads.deferToThread(run_timed, [CLI, "remove-relation", "left", "right"], cli_env)
        removed = await follow(self.reactor, self.logs, self.broken, timeout, self.poll, "-broken on both sides")
        if cli_env is not None:
            remove_cli, _ = await running
            remove_call = None
        if counted:
            self.removes[relation.id] = wall1
        await task.deferLater(self.reactor, self.args.settle, lambda: None)
        return {
            "relation_id": relation.id,
            "t0": t0,
            "t1": t1,
            "added": added,
            "removed": removed,
            "add_call": call,
            "remove_call": remove_call,
            "cli_add": cli,
            "cli_remove": remove_cli,
            "wall0": wall0,
            "cpu_busy": (cpu1[0] - cpu0[0]) / max(1, cpu1[1] - cpu0[1]),
            "stamps": stamps,
        }

    async def stamps(self, relation):
        """ZooKeeper's own times (its server's clock, this machine's): the relation's
        commit, and each unit's write of its settings (private-address) and creation
        of its member node."""
        found = {"commit": (await self.client.exists(relation_path(relation.key))).ctime}
        for unit in self.expected:
            service = unit.partition("/")[0]
            role = relation.endpoint(service)["role"]
            settings = await self.client.exists(settings_path(relation.key, unit))
            member = await self.client.exists(f"{role_path(relation.key, role)}/{unit_key(unit)}")
            found[unit] = {"settings_written": settings.mtime, "member_created": member.ctime}
        return found

    def changed_done(self, result, unit):
        """Seconds from the add to `unit`'s last owed -changed."""
        return result["added"].times(unit, "exit", CHANGED)[self.expected[unit] - 1] - result["t0"]

    def broken_done(self, result, unit):
        return result["removed"].times(unit, "exit", BROKEN)[0] - result["t1"]

    def agent_times(self):
        """{unit: {"joined": [s], "removed": [s]}}: from the add (remove) to the unit
        agent's `joined relation x:N` (`relation x:N removed`) log line."""
        found = {}
        for unit, (root, relative) in self.agent_logs.items():
            joined, removed = [], []
            try:
                data, _ = hostfs.read_tail(root, relative, AGENT_LOG_LIMIT)
            except (OSError, UnsafeFile):
                continue
            lines = data.decode(errors="replace").splitlines()
            for line in lines:
                m = AGENT_LINE.match(line)
                if not m or m.group(3) != unit:
                    continue
                stamp = time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")) + int(m.group(2)) / 1000
                if m.group(4):
                    number = int(m.group(4).rpartition(":")[2])
                    if number in self.starts:
                        joined.append(stamp - self.starts[number])
                else:
                    number = int(m.group(5).rpartition(":")[2])
                    if number in self.removes:
                        removed.append(stamp - self.removes[number])
            found[unit] = {"add_to_agent_joined_log": summary(joined, 3),
                           "remove_to_agent_removed_log": summary(removed, 3)}
        return found


def cpu_times():
    """(busy, total) jiffies of all CPUs, from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:9]]
    return sum(values) - values[3] - values[4], sum(values)


def run_timed(argv, env):
    """(wall seconds from spawn to exit, stdout); the command must succeed."""
    start = time.monotonic()
    result = subprocess.run(argv, env=env, capture_output=True, text=True)
    took = time.monotonic() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(argv[1:])}: {result.stderr.strip() or result.stdout.strip()}")
    return took, result.stdout


def pair_figures(cycler, results):
    """Figures of one-unit-each cycles."""
    both, broken, calls, remove_calls = [], [], [], []
    sides = {u: {"changed": [], "broken": []} for u in cycler.expected}
    zk = {u: {"add_to_commit": [], "commit_to_own_settings_written": [], "own_settings_to_own_member": [],
              "remote_member_to_joined_start": []} for u in cycler.expected}
    phases = {u: {"to_joined_start": [], "call_returned_to_joined_start": [], "joined_hook": [],
                  "joined_exit_to_changed_start": [], "changed_hook": []}
              for u in cycler.expected}
    for r in results:
        per_unit = {u: cycler.changed_done(r, u) for u in cycler.expected}
        both.append(max(per_unit.values()))
        broken.append(max(cycler.broken_done(r, u) for u in cycler.expected))
        for u in cycler.expected:
            sides[u]["changed"].append(per_unit[u])
            sides[u]["broken"].append(cycler.broken_done(r, u))
            ev = r["added"]
            js, je = ev.times(u, "start", JOINED)[0], ev.times(u, "exit", JOINED)[0]
            cs, ce = ev.times(u, "start", CHANGED)[0], ev.times(u, "exit", CHANGED)[0]
            phases[u]["to_joined_start"].append(js - r["t0"])
            phases[u]["call_returned_to_joined_start"].append(js - r["t0"] - r["add_call"])
            phases[u]["joined_hook"].append(je - js)
            phases[u]["joined_exit_to_changed_start"].append(cs - je)
            phases[u]["changed_hook"].append(ce - cs)
        calls.append(r["add_call"])
        remove_calls.append(r["remove_call"])
        st = r["stamps"]
        if st:
            for u in cycler.expected:
                (remote,) = [v for v in cycler.expected if v != u]
                js_wall = r["wall0"] + r["added"].times(u, "start", JOINED)[0] - r["t0"]
                zk[u]["add_to_commit"].append(st["commit"] - r["wall0"])
                zk[u]["commit_to_own_settings_written"].append(st[u]["settings_written"] - st["commit"])
                zk[u]["own_settings_to_own_member"].append(st[u]["member_created"] - st[u]["settings_written"])
                zk[u]["remote_member_to_joined_start"].append(js_wall - st[remote]["member_created"])
    return {
        "add_to_both_changed": summary(both),
        "remove_to_both_broken": summary(broken),
        "add_relation_call": summary(calls),
        "remove_relation_call": summary(remove_calls),
        "per_unit": {u: {"add_to_changed": summary(s["changed"]), "remove_to_broken": summary(s["broken"])}
                     for u, s in sides.items()},
        # As the host's polls saw them (each within one poll interval of the event).
        "phases_p50": {u: {k: round(statistics.median(v), 4) for k, v in p.items()} for u, p in phases.items()},
        # ZooKeeper's ctime/mtime (ms) against this process's clock, same machine.
        "zookeeper_stamps_p50": {u: {k: round(statistics.median(v), 4) for k, v in p.items()}
                                 for u, p in zk.items() if p["add_to_commit"]},
        "samples_add_to_both_changed": [round(x, 3) for x in both],
        "samples_add_relation_call": [round(x, 3) for x in calls],
    }


def warmup_figures(cycler, r):
    out = {
        "add_to_both_changed": round(max(cycler.changed_done(r, u) for u in cycler.expected), 4),
        "remove_to_both_broken": round(max(cycler.broken_done(r, u) for u in cycler.expected), 4),
    }
    if r["cli_add"] is not None:
        out["cli_add_relation_process"] = round(r["cli_add"], 4)
        out["cli_remove_relation_process"] = round(r["cli_remove"], 4)
    return out


# -- waiting for units -------------------------------------------------------------------

async def wait_started(reactor, client, names, timeout):
    units = UnitStateManager(client)
    deadline = time.monotonic() + timeout
    pending = set(names)
    while pending:
        for name in sorted(pending):
            try:
                state = (await units.get_unit(name)).state
            except Exception:
                continue
            if state == "started":
                pending.discard(name)
            elif state == "error":
                raise SystemExit(f"{name} is in error")
        if not pending:
            break
        if time.monotonic() > deadline:
            raise SystemExit(f"not started within {timeout}s: {', '.join(sorted(pending))}")
        await task.deferLater(reactor, 0.2, lambda: None)


def unit_logs(home, units):
    """{unit: HookLog} and {unit: (directory, path below it) of its agent log}, where the
    machine agent of `home` bind-mounts each unit's /var/log/ensemble
    (ensemble/machine/deploy.py)."""
    base = os.path.join(EnsembleHome(home).logs_dir, "units")
    hooks = {u: HookLog(base, os.path.join(unit_key(u), f"{unit_key(u)}.log")) for u in units}
    agents = {u: (base, os.path.join(unit_key(u), "agent.log")) for u in units}
    return hooks, agents


# -- scenarios ---------------------------------------------------------------------------

def keep_logs(args, logs_dir, name):
    """Copy the environment's logs to --keep-logs. Units write theirs: each file is read
    through ensemble.hostfs (a link, a FIFO or a device is skipped; a bounded tail)."""
    if not (args.keep_logs and os.path.isdir(logs_dir)):
        return
    for directory, _, files in os.walk(logs_dir):
        for file in files:
            relative = os.path.relpath(os.path.join(directory, file), logs_dir)
            try:
                data, _ = hostfs.read_tail(logs_dir, relative, AGENT_LOG_LIMIT)
            except (OSError, UnsafeFile):
                continue
            target = os.path.join(args.keep_logs, name, relative)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target, "wb") as f:
                f.write(data)


def cli(env, *args, timeout=300):
    result = subprocess.run([sys.executable, "-m", "ensemble", *args], env=env, capture_output=True, text=True,
                            timeout=timeout)
    if result.returncode != 0:
        raise SystemExit(f"ensemble {' '.join(args)}: {result.stderr.strip() or result.stdout.strip()}")
    return result.stdout


async def local_scenarios(reactor, args, work, result):
    home = os.path.join(work, "home")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENSEMBLE_")}
    env["ENSEMBLE_HOME"] = home
    destroy = Once("destroy-environment", lambda: subprocess.run(
        [CLI, "destroy-environment", "-y"], env=env, capture_output=True, text=True, timeout=600))
    client = None
    logs = {}
    try:
        say(f"bootstrap {args.name} on {args.network} ...")
        await threads.deferToThread(cli, env, "bootstrap", "--network", args.network, "--name", args.name)
        await threads.deferToThread(cli, env, "deploy", PROVIDES, "left", "--to", "0")
        await threads.deferToThread(cli, env, "deploy", REQUIRES, "right", "--to", "0")
        client = await local.admin_client(EnsembleHome(home))
        await wait_started(reactor, client, ["left/0", "right/0"], 180)
        logs, agents = unit_logs(home, ["left/0", "right/0"])
        for log in logs.values():
            log.read()  # what the units logged before: not ours
        if args.one_host:
            say(f"one-host: 1 warm-up cycle, 1 through the CLI, then {args.one_host} cycles ...")
            cycler = Cycler(reactor, client, logs, {"left/0": 1, "right/0": 1}, args, agents)
            warm = await cycler.cycle(60, counted=False)
            versions = [(await threads.deferToThread(run_timed, [CLI, "--version"], env))[0] for _ in range(3)]
            via_cli = await cycler.cycle(60, cli_env=env, counted=False)
            results = [await cycler.cycle(60) for _ in range(args.one_host)]
            figures = pair_figures(cycler, results)
            figures["warmup"] = warmup_figures(cycler, warm)
            figures["via_cli"] = warmup_figures(cycler, via_cli)
            figures["via_cli"]["cli_version_process_min"] = round(min(versions), 4)
            figures["agent_log"] = cycler.agent_times()
            figures["stray_hooks"] = cycler.stray
            result["one_host"] = figures
        if args.fan_out:
            n = args.fan_out
            say(f"fan-out: add-unit right -n {n - 1}, wait for started ...")
            begin = time.monotonic()
            await threads.deferToThread(cli, env, "add-unit", "right", "--to", "0", "-n", str(n - 1))
            rights = [f"right/{i}" for i in range(n)]
            await wait_started(reactor, client, rights, 900)
            started_in = time.monotonic() - begin
            more, _ = unit_logs(home, rights[1:])
            for log in more.values():
                log.read()
            logs.update(more)
            _, agents = unit_logs(home, ["left/0", *rights])
            expected = {"left/0": n, **{u: 1 for u in rights}}
            cycler = Cycler(reactor, client, logs, expected, args, agents, poll=args.fan_out_poll)
            say(f"fan-out: 1 warm-up cycle, then {args.fan_out_cycles} cycles ...")
            warm = await cycler.cycle(600, counted=False)
            results = [await cycler.cycle(600) for _ in range(args.fan_out_cycles)]
            result["fan_out"] = fan_out_figures(cycler, results, rights, warm)
            result["fan_out"]["units_added_and_started_s"] = round(started_in, 1)
    finally:
        for log in logs.values():
            log.close()
        if client is not None:
            await client.close()
        keep_logs(args, EnsembleHome(home).logs_dir, "local")
        say("destroy-environment ...")
        await threads.deferToThread(destroy)


def fan_out_figures(cycler, results, rights, warm):
    right_changed, left_changed, first, last, all_broken, left_joined = [], [], [], [], [], []
    for r in results:
        ev = r["added"]
        left_joined.append(ev.times("left/0", "start", JOINED)[0] - r["t0"])
        mine = [cycler.changed_done(r, u) for u in rights]
        lefts = [t - r["t0"] for t in ev.times("left/0", "exit", CHANGED)[:len(rights)]]
        right_changed += mine
        left_changed += lefts
        first.append(min(mine + lefts))
        last.append(max(mine + lefts))
        all_broken.append(max(cycler.broken_done(r, u) for u in cycler.expected))
    calls = [r["add_call"] for r in results]
    return {
        "right_units": len(rights),
        "add_to_all_changed": summary(last),
        "add_to_first_changed": summary(first),
        "right_units_add_to_changed": summary(right_changed),
        "left_add_to_kth_changed": summary(left_changed),
        "remove_to_all_broken": summary(all_broken),
        "add_relation_call": summary(calls),
        "left_add_to_first_joined_start": summary(left_joined),
        # Both cores, from the add until the last -changed (from /proc/stat).
        "cpu_busy_fraction_during_add": [round(r["cpu_busy"], 2) for r in results],
        "warmup": {"add_to_all_changed": round(max(cycler.changed_done(warm, u) for u in cycler.expected), 3)},
        "agent_log_left": cycler.agent_times().get("left/0"),
        "stray_hooks": cycler.stray,
    }


async def lab_scenario(reactor, args, work, result):
    lab = Lab(os.path.join(work, "lab"), hosts=2)
    close = Once("lab.close", lab.close)
    client = None
    logs = {}
    try:
        say("lab: 2 hosts ...")
        await threads.deferToThread(lab.start)
        await threads.deferToThread(lab.ensemble, "deploy", PROVIDES, "left", "--to", "0")
        await threads.deferToThread(lab.ensemble, "deploy", REQUIRES, "right", "--to", "1")
        credential = auth.Credential.parse(lab.admin_auth)
        # kazoo's threads must be born in the lab, where ZooKeeper is reachable.
        with inside(lab.network.lab):
            connecting = defer.ensureDeferred(connection.connect(lab.zookeeper_address, credential=credential))
        client = await connecting
        await wait_started(reactor, client, ["left/0", "right/0"], 240)
        left, left_agent = unit_logs(lab.home(0), ["left/0"])
        right, right_agent = unit_logs(lab.home(1), ["right/0"])
        logs = {**left, **right}
        for log in logs.values():
            log.read()
        say(f"lab: 1 warm-up cycle, then {args.lab} cycles ...")
        cycler = Cycler(reactor, client, logs, {"left/0": 1, "right/0": 1}, args, {**left_agent, **right_agent})
        warm = await cycler.cycle(60, counted=False)
        results = [await cycler.cycle(60) for _ in range(args.lab)]
        figures = pair_figures(cycler, results)
        figures["warmup"] = warmup_figures(cycler, warm)
        figures["agent_log"] = cycler.agent_times()
        figures["stray_hooks"] = cycler.stray
        figures["mode"] = lab.mode
        result["lab"] = figures
    finally:
        for log in logs.values():
            log.close()
        if client is not None:
            await client.close()
        for i in range(len(lab.network.hosts)):
            keep_logs(args, EnsembleHome(lab.home(i)).logs_dir, f"lab-host{i}")
        say("lab.close ...")
        await threads.deferToThread(close)


async def benchmark(reactor, args, work, result):
    signal.signal(signal.SIGHUP, lambda *_: reactor.callFromThread(reactor.stop))
    if args.one_host or args.fan_out:
        await local_scenarios(reactor, args, work, result)
    if args.lab:
        await lab_scenario(reactor, args, work, result)


def facts():
    def out(*argv):
        try:
            return subprocess.run(argv, capture_output=True, text=True).stdout.strip()
        except OSError:
            return None

    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "lxc": out("lxc-info", "--version"),
        "zookeeper": out("dpkg-query", "-W", "-f", "${Version}", "zookeeper"),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--one-host", type=int, metavar="N", help="cycles on one host (default 30)")
    parser.add_argument("--lab", type=int, metavar="N", help="cycles across two lab hosts (default 20)")
    parser.add_argument("--fan-out", type=int, metavar="N", help="right units related to one left (default 50)")
    parser.add_argument("--fan-out-cycles", type=int, default=3)
    parser.add_argument("--poll", type=float, default=0.002, help="seconds between reads of the hook logs")
    parser.add_argument("--fan-out-poll", type=float, default=0.01,
                        help="the same for fan-out (51 logs a read: polling them must not take the cores)")
    parser.add_argument("--settle", type=float, default=0.5, help="pause after each wait, before the next step")
    parser.add_argument("--no-stamps", dest="stamps", action="store_false",
                        help="do not read ZooKeeper's node times after each add (pair scenarios)")
    parser.add_argument("--keep-logs", metavar="DIR", help="copy the environments' logs here before destroying them")
    parser.add_argument("--network", default="10.211.0.0/16")
    parser.add_argument("--name", default="benchrel")
    args = parser.parse_args()
    if args.one_host is None and args.lab is None and args.fan_out is None:
        args.one_host, args.lab, args.fan_out = 30, 20, 50
    args.one_host, args.lab, args.fan_out = args.one_host or 0, args.lab or 0, args.fan_out or 0
    if args.fan_out == 1 or args.fan_out < 0 or args.one_host < 0 or args.lab < 0 or args.fan_out_cycles < 1:
        parser.error("counts must be positive (--fan-out at least 2)")
    result = {**facts(), "goal": {"add_to_both_changed_p50_under_s": GOAL_P50_S}}
    done, failed = [], []
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="ensemble-bench-relations-") as work:

        async def run(reactor):
            try:
                await benchmark(reactor, args, work, result)
                done.append(True)
            except BaseException as e:
                failed.append(e)
                raise

        try:
            task.react(lambda reactor: defer.ensureDeferred(run(reactor)))
        except SystemExit as e:
            if failed:
                raise failed[0]
            if e.code not in (0, None):
                raise
        finally:
            for step in reversed(list(CLEANUPS)):  # the reactor stopped before they ran
                say(f"{step.what} ...")
                step()
    if not done:
        raise SystemExit("interrupted: no figures")
    # The goal is the pair's (one-host, lab); fan-out is reported beside it.
    met = [result[k]["add_to_both_changed"]["p50"] < GOAL_P50_S for k in ("one_host", "lab") if k in result]
    result["goal"]["met"] = all(met) if met else None
    result["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    result["run_s"] = round(time.monotonic() - began, 1)
    print(json.dumps(result, indent=2), flush=True)


if __name__ == "__main__":
    main()
