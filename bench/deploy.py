"""Deploy benchmark: from add-unit to the unit agent's `started`, in a real local
environment (its own ENSEMBLE_HOME and network) with real containers. Prints one JSON
object. The template must be cached (the machine agent builds it once otherwise).

    .venv/bin/python bench/deploy.py [--sequential 30] [--concurrent 10] [--many 100] [--floor]

Each sequential deploy's timeline (deploy_timeline.py) is reported as the median of
each step. --floor interleaves each sequential deploy with one sample of the physical
floor (deploy_floor.py), so that the machine's drift hits both alike.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

import yaml
from twisted.internet import defer, task

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from stats import percentile  # noqa: E402

from deploy_floor import Floor  # noqa: E402
from deploy_timeline import durations, slow_passes, timeline  # noqa: E402

from ensemble import local  # noqa: E402
from ensemble.home import EnsembleHome  # noqa: E402
from ensemble.state.machine import MachineStateManager  # noqa: E402
from ensemble.state.service import ServiceStateManager  # noqa: E402
from ensemble.state.unit import UnitStateManager  # noqa: E402

CHARM = os.path.join(HERE, "charms", "idle")


def ensemble(env, *args):
    result = subprocess.run([sys.executable, "-m", "ensemble", *args], env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"ensemble {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout


async def started(reactor, client, names, timeout, since=None):
    """Seconds from `since` (default: now) until each unit in `names` was seen started
    (left out: those that never were)."""
    units = UnitStateManager(client)
    begin = reactor.seconds() if since is None else since
    pending = set(names)
    done = {}
    while pending and reactor.seconds() - begin < timeout:
        for name in list(pending):
            if (await units.get_unit(name)).state == "started":
                done[name] = reactor.seconds() - begin
                pending.discard(name)
        if pending:
            await task.deferLater(reactor, 0.01, lambda: None)
    return done


def cgroup_memory(container):
    for base in ("/sys/fs/cgroup/memory", "/sys/fs/cgroup"):
        for root, dirs, files in os.walk(base):
            if os.path.basename(root) == f"lxc.payload.{container}":
                for name in ("memory.usage_in_bytes", "memory.current"):
                    path = os.path.join(root, name)
                    if os.path.exists(path):
                        return int(open(path).read())
            if root.count(os.sep) > base.count(os.sep) + 3:
                dirs[:] = []
    return None


def monitor_rss(container):
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ")
            if cmdline.startswith(b"[lxc monitor]") and cmdline.rstrip().endswith(container.encode()):
                for line in open(f"/proc/{pid}/status"):
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            continue
    return 0


def _status_field(pid, field):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(field + ":"):
            return line.split()[1]
    return None


def agent_processes():
    """{"starter_rss": bytes of the agent starters' RSS (paid once per machine; the
    forked agents share most of it), "forked": unit agents forked in by a starter,
    "runsv": unit agents started by runsv}."""
    titles, found = {}, {"starter_rss": 0, "forked": 0, "runsv": 0}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            titles[pid] = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
    for pid, title in titles.items():
        try:
            if "agent_starter" in title:
                found["starter_rss"] += int(_status_field(pid, "VmRSS")) * 1024
            elif "unit-agent" in title.split():
                parent = titles.get(_status_field(pid, "PPid"), "")
                found["forked" if "agent_starter" in parent else "runsv"] += 1
        except (OSError, TypeError):
            continue
    return found


async def benchmark(reactor, args, env, config):
    client = await local.admin_client(EnsembleHome(env["ENSEMBLE_HOME"]))
    services = ServiceStateManager(client)
    floor = None
    try:
        if args.floor:
            machines = await MachineStateManager(client).get_all_machines()
            leased = [m.data["subnet"] for m in machines if m.data.get("subnet")]
            floor = Floor(reactor, client, config["network"], leased, config["zookeeper"])
            await floor.prepare()
        # The environment's own first unit (idle/0) started, and with it what the
        # machine agent starts once: no sample overlaps it.
        if "idle/0" not in await started(reactor, client, ["idle/0"], timeout=120):
            raise SystemExit("idle/0 did not start within 120s")
        # Sequential: one unit at a time (each followed by a floor sample).
        latencies, floors, timelines = [], [], []
        for i in range(args.sequential):
            begin = reactor.seconds()
            (name,) = await services.add_units("idle", n=1, to=0)
            added = (reactor.seconds() - begin) * 1000
            took = await started(reactor, client, [name], timeout=60, since=begin)
            if name not in took:
                raise SystemExit(f"{name} did not start within 60s")
            latencies.append(took[name] * 1000)
            timelines.append({"added": added, **timeline(env["ENSEMBLE_HOME"], 0, name, begin),
                              "seen": took[name] * 1000})
            if floor is not None:
                floors.append(await floor.sample(i))
        # Ten at once.
        begin = reactor.seconds()
        names = await services.add_units("idle", n=args.concurrent, to=0)
        took = await started(reactor, client, names, timeout=120, since=begin)
        concurrent_ms = max(took.values()) * 1000 if len(took) == len(names) else None
        # When the last of them reached each step.
        together = [timeline(env["ENSEMBLE_HOME"], 0, n, begin) for n in names]
        concurrent_steps = {step: max(t[step] for t in together if step in t)
                            for step in together[0] if all(step in t for t in together)}
        # Idle footprint: container memory cgroup + its LXC monitor on the host.
        await task.deferLater(reactor, 3, lambda: None)
        footprints = []
        for unit in await UnitStateManager(client).get_all_units():
            container = unit.data.get("container")
            memory = cgroup_memory(container) if container else None
            if memory is not None:
                footprints.append(memory + monitor_rss(container))
        agents = agent_processes()
        # Many: up to --many units on this one host.
        have = len(await UnitStateManager(client).get_all_units())
        more = await services.add_units("idle", n=max(0, args.many - have), to=0)
        every = [u.name for u in await UnitStateManager(client).get_all_units()]
        took = await started(reactor, client, every, timeout=900)
        # The machine agent's passes with every unit in place: it logs each that took
        # 0.25 s or more (ensemble/machine/reconciler.py); the tick makes one every 5 s.
        quiet_from = reactor.seconds()
        await task.deferLater(reactor, 16, lambda: None)
        slow = slow_passes(env["ENSEMBLE_HOME"], 0, quiet_from)
        result = {
            "deploy_p50_ms": round(statistics.median(latencies), 1),
            "deploy_p99_ms": round(percentile(latencies, 99), 1),
            "concurrent10_all_started_ms": round(concurrent_ms, 1) if concurrent_ms else None,
            "concurrent10_last_at_step_ms": concurrent_steps,
            "idle_unit_rss_mb": round(statistics.median(footprints) / 2**20, 1) if footprints else None,
            # The agent starter's memory, not in any unit's: once per machine.
            "agent_starter_rss_mb": round(agents["starter_rss"] / 2**20, 1),
            "agents_forked_in": agents["forked"],
            "agents_started_by_runsv": agents["runsv"],
            f"units_started_of_{len(every)}": len(took),
            "sequential": args.sequential,
            "added_for_many": len(more),
            "slow_passes_with_all_units": slow,
            "timeline_p50_ms": _median_steps(timelines),
            "steps_p50_ms": _median_steps([durations(t) for t in timelines]),
            # Where the tail goes: the slowest sequential deploy's own steps.
            "slowest_steps_ms": durations(max(timelines, key=lambda t: t["seen"])),
        }
        if floors:
            totals = [f["total"] for f in floors]
            result.update({
                "floor_p50_ms": round(statistics.median(totals), 1),
                "floor_p99_ms": round(percentile(totals, 99), 1),
                "floor_steps_p50_ms": _median_steps(floors),
                "ratio_p50": round(statistics.median(latencies) / statistics.median(totals), 2),
                "ratio_p99": round(percentile(latencies, 99) / percentile(totals, 99), 2),
            })
        print(json.dumps(result))
    finally:
        if floor is not None:
            await floor.close()
        await client.close()


def _median_steps(samples):
    steps = {}
    for sample in samples:
        for step, ms in sample.items():
            steps.setdefault(step, []).append(ms)
    return {step: round(statistics.median(values), 1) for step, values in steps.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequential", type=int, default=30)
    parser.add_argument("--concurrent", type=int, default=10)
    parser.add_argument("--many", type=int, default=100)
    parser.add_argument("--network", default="10.240.0.0/16")
    parser.add_argument("--floor", action="store_true", help="interleave samples of the physical floor")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ENSEMBLE_")}
        env["ENSEMBLE_HOME"] = os.path.join(tmp, "home")
        ensemble(env, "bootstrap", "--network", args.network)
        try:
            ensemble(env, "deploy", CHARM, "--to", "0", "-n", "1")
            with open(os.path.join(env["ENSEMBLE_HOME"], "environment.yaml")) as f:
                config = yaml.safe_load(f)
            task.react(lambda reactor: defer.ensureDeferred(benchmark(reactor, args, env, config)))
        except SystemExit as e:
            if e.code not in (0, None):
                raise
        finally:
            ensemble(env, "destroy-environment", "-y")


if __name__ == "__main__":
    main()
