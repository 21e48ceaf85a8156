"""Scale benchmark: one ZooKeeper holding an environment of --machines machines and
--units units, of which only machine 0 is real: a lab host (ensemble/lab.py, a network
namespace with no route off the machine) running its machine agent, with containers.
The other machines are simulated as their agents would leave them, without
containers: registered with an address of their own, their subnets leased, their
units added (services related in pairs), addressed from their machines' ranges and
`started`, every agent's presence node held. Nothing runs for them.

It measures, in the same run: add-unit to `started` on machine 0 in the empty
environment, each step's own time (the machine agent's log, and the unit's own logs
read through the agent's mount namespace); the ZooKeeper requests of each of machine
0's reconciler passes (from its agent's log at DEBUG) with its units in place; then
removes the units it added, fills the environment and measures both again (the
deploys onto the same units of machine 0 as before, then the passes). For each phase,
what the host spent meanwhile (bench/host_load.py: its busy share, the CPU seconds of
ZooKeeper, the machine agent and this benchmark, the JVM's collections; for the
populating too, what machine 0's agent spends on the machines joining). Then the
ZooKeeper server: its memory (the JVM's resident set), node count and requests per
second while only machine 0 and its units are active. Prints one JSON object.

    .venv/bin/python bench/scale.py [--machines 1000] [--units 10000] [--samples 15] [--zookeeper-heap-mb N]
                                    [--keep-empty-units]
"""

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import netaddr  # noqa: E402
import yaml  # noqa: E402
from twisted.internet import defer, task, threads  # noqa: E402

from ensemble import connection  # noqa: E402
from ensemble.charm import Charm, bundle_id  # noqa: E402
from ensemble.connection import AUTH_VARIABLE  # noqa: E402
from ensemble.lab import Lab  # noqa: E402
from ensemble.machine.container.names import container_name  # noqa: E402
from ensemble.network.ipam import Allocator  # noqa: E402
from ensemble.network.netns import netns_path  # noqa: E402
from ensemble.state.client import count_requests  # noqa: E402
from ensemble.state.machine import MachineStateManager  # noqa: E402
from ensemble.state.network import ZooKeeperAddressStore, lease_subnet  # noqa: E402
from ensemble.state.presence import agent_info  # noqa: E402
from ensemble.state.relation import RelationStateManager  # noqa: E402
from ensemble.state.service import ServiceStateManager  # noqa: E402
from ensemble.state.unit import STARTED, UnitStateManager, unit_path  # noqa: E402
from ensemble.zookeeper import four_letter  # noqa: E402

IDLE = os.path.join(HERE, "charms", "idle")
CHARMS = os.path.join(os.path.dirname(HERE), "examples", "charms")
NETWORK = "10.64.0.0/14"  # 1024 machine subnets of /24
SIMULATED_ADDRESSES = netaddr.IPNetwork("192.168.252.0/22")  # routed nowhere in the lab
PASS_RE = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) DEBUG \S+: machine-0: (\S+) pass: ([\d.]+)s, (\d+) ZooKeeper")
QUIET = 16  # seconds of passes read: three resync ticks


def outside(args):
    os.environ["ENSEMBLE_LOG_LEVEL"] = "DEBUG"  # machine 0's agent: every pass, with its requests
    with tempfile.TemporaryDirectory(prefix="ensemble-scale-", dir="/var/tmp") as tmp:
        with Lab(tmp, hosts=1, mode="vxlan", cidr=NETWORK, zookeeper_heap_mb=args.zookeeper_heap_mb) as lab:
            lab.ensemble("deploy", IDLE, "--to", "0")
            env = dict(os.environ, ENSEMBLE_ZOOKEEPER=lab.zookeeper_address)
            env[AUTH_VARIABLE] = lab.admin_auth
            inner = subprocess.run(
                ["nsenter", f"--net={netns_path(lab.network.lab)}", "--", sys.executable, os.path.abspath(__file__),
                 "--inside", "--agent-log", lab.agent_log(0), "--agent-pid", str(lab.agents[0].pid),
                 "--agent-home", lab.home(0), "--zookeeper-pid", str(lab.zookeeper.pid()),
                 "--machines", str(args.machines),
                 "--units", str(args.units), "--samples", str(args.samples),
                 *(["--keep-empty-units"] if args.keep_empty_units else [])],
                env=env, capture_output=True, text=True,
            )
            if inner.returncode != 0 or not inner.stdout.strip():
                raise SystemExit(f"the measuring side failed: {inner.stderr.strip()[-2000:]}")
            result = json.loads(inner.stdout)
            result["zookeeper_rss_mb"] = _rss_mb(lab.zookeeper.pid())
            result["zookeeper_heap_mb"] = lab.zookeeper.heap_mb
            print(json.dumps(result))


def _rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    return None


async def inside(reactor, args):
    from deploy import _median_steps, started
    from deploy_timeline import durations, timeline
    import host_load

    # The unit agents' logs are bound over their directories in the machine agent's
    # mount namespace (each unit's disk, container/disk.py): read them through it.
    agent_home = f"/proc/{args.agent_pid}/root{args.agent_home}"
    watched = {"zookeeper": args.zookeeper_pid, "machine_agent": args.agent_pid, "benchmark": os.getpid()}

    async def measured(phase, work):
        """`work`'s result; records in result["load"][phase] what the host spent meanwhile."""
        before = await threads.deferToThread(host_load.sample, watched, args.zookeeper_pid)
        value = await work
        after = await threads.deferToThread(host_load.sample, watched, args.zookeeper_pid)
        result.setdefault("load", {})[phase] = host_load.spent(before, after)
        return value

    client = await connection.connect()
    server = client.servers.split(",")[0]
    result = {"machines": args.machines, "units": args.units, "samples": args.samples}
    try:
        async def deploys():
            """add-unit to `started` (ms) of each sample, and each step's own time (p50)."""
            latencies, steps, requests = [], [], []
            for _ in range(args.samples):
                begin = reactor.seconds()
                (name,) = await defer.ensureDeferred(add_unit(client, requests))
                added_units.append(name)
                added = (reactor.seconds() - begin) * 1000
                took = await started(reactor, client, [name], timeout=120, since=begin)
                if name not in took:
                    raise SystemExit(f"{name} did not start within 120 s")
                latencies.append(took[name] * 1000)
                steps.append(durations({"added": added, **timeline(agent_home, 0, name, begin,
                                                                     machine_log=args.agent_log),
                                        "seen": latencies[-1]}))
            return latencies, _median_steps(steps), statistics.median(requests)

        added_units = []
        empty, result["empty_steps_p50_ms"], result["empty_add_unit_requests"] = await measured(
            "empty_deploys", deploys())
        result["empty_passes"] = await measured("empty_passes", passes(reactor, args.agent_log))
        # Machine 0 as it was before the empty environment's deploys, so that both
        # phases deploy onto the same units of its own and differ in the environment
        # alone (each deploy costs a little more with every unit on its host).
        if not args.keep_empty_units:
            await remove_units(reactor, client, added_units)
        del added_units[:]
        began = time.monotonic()
        await measured("populate", populate(client, args.machines, args.units))
        result["populate_s"] = round(time.monotonic() - began, 1)
        full, result["full_steps_p50_ms"], result["full_add_unit_requests"] = await measured(
            "full_deploys", deploys())
        result["full_passes"] = await measured("full_passes", passes(reactor, args.agent_log))
        result["empty_add_unit_p50_ms"] = round(statistics.median(empty), 1)
        result["full_add_unit_p50_ms"] = round(statistics.median(full), 1)
        result["full_to_empty_p50"] = round(statistics.median(full) / statistics.median(empty), 2)
        result["units_in_environment"] = len(await client.get_children("/units"))
        result["machines_in_environment"] = len(await MachineStateManager(client).machine_ids())
        result["zookeeper"] = await server_load(reactor, server)
    finally:
        await client.close()
    print(json.dumps(result))


async def add_unit(client, requests):
    """One unit of the idle service on machine 0; appends to `requests` how many
    ZooKeeper requests the add-unit made (counted in its own coroutine)."""
    counted = count_requests()
    try:
        return await ServiceStateManager(client).add_units("idle", n=1, to=0)
    finally:
        requests.append(counted[0])


async def remove_units(reactor, client, names, timeout=300):
    """Remove the units `names` and wait until their machine has torn them down."""
    units = UnitStateManager(client)
    for name in names:
        await units.remove_unit(name)
    deadline = reactor.seconds() + timeout
    for name in names:
        while await client.exists(unit_path(name)) is not None:
            if reactor.seconds() > deadline:
                raise SystemExit(f"{name} was not torn down within {timeout} s")
            await task.deferLater(reactor, 0.2, lambda: None)


async def passes(reactor, agent_log):
    """{reconciler: {"requests": median per pass, "seconds": median}} of machine 0's
    passes in the next QUIET seconds."""
    since = time.time()
    await task.deferLater(reactor, QUIET, lambda: None)
    found = {}
    with open(agent_log, errors="replace") as f:
        for line in f:
            match = PASS_RE.search(line)
            if not match:
                continue
            when = time.mktime(time.strptime(match.group(1).split(",")[0], "%Y-%m-%d %H:%M:%S"))
            if when >= int(since):
                found.setdefault(match.group(2), []).append((float(match.group(3)), int(match.group(4))))
    return {name: {"requests": statistics.median(r for _, r in seen),
                   "seconds": round(statistics.median(s for s, _ in seen), 3), "passes": len(seen)}
            for name, seen in sorted(found.items())}


async def server_load(reactor, server):
    """The server's node count and requests per second over 10 s (srvr's counters)."""
    host, port = server.rsplit(":", 1)

    def srvr():
        answer = four_letter(host, int(port), "srvr", timeout=2) or ""
        return dict(line.split(": ", 1) for line in answer.splitlines() if ": " in line)

    first = await defer.maybeDeferred(srvr)
    await task.deferLater(reactor, 10, lambda: None)
    second = await defer.maybeDeferred(srvr)
    return {"nodes": int(second.get("Node count", 0)),
            "requests_per_s": round((int(second["Received"]) - int(first["Received"])) / 10, 1),
            "latency_min_avg_max_ms": second.get("Latency min/avg/max")}


async def populate(client, machines, units):
    """Machines 1..machines-1 and `units` units on them, as their agents would leave them."""
    services = ServiceStateManager(client)
    per_service = 100
    pairs = max(1, units // (2 * per_service))
    with tempfile.TemporaryDirectory() as charms:
        for i in range(pairs):
            for kind in ("db", "web"):
                # A charm of its own per service, as in an environment of many charms: a
                # charm's node grants every unit of every service using it (one shared
                # by fifty services here made each add-unit rewrite an ACL of
                # thousands of grants: see docs/benchmarks.md).
                charm = Charm.load(_charm_copy(os.path.join(CHARMS, kind), os.path.join(charms, f"{kind}-{i}")))
                bundle = charm.bundle()
                await services.deploy(f"{kind}-{i}", bundle_id(charm.name, bundle), bundle, charm.config({}), {}, n=0)
            await RelationStateManager(client).add_relation(f"web-{i}:db", f"db-{i}:db")
    manager = MachineStateManager(client)
    addresses = iter(SIMULATED_ADDRESSES.iter_hosts())
    ids = []
    for _ in range(machines - 1):
        ids.append((await manager.add_machine(address=str(next(addresses)))).id)
    # Each service's units on per_service / per_machine machines of their own.
    per_machine = max(1, units // max(1, len(ids)))
    names = [f"{kind}-{i}" for i in range(pairs) for kind in ("db", "web")]
    plan = {}  # service -> [machine, ...]
    for n, machine in enumerate(ids):
        plan.setdefault(names[(n // max(1, per_service // per_machine)) % len(names)], []).append(machine)
    limit = defer.DeferredSemaphore(32)
    await defer.gatherResults(
        [limit.run(lambda s=s, m=m: defer.ensureDeferred(simulate_service(client, s, m, per_machine)))
         for s, m in plan.items()],
        consumeErrors=True,
    )


def _charm_copy(source, target):
    """`source`'s charm under the name of `target`'s last component."""
    shutil.copytree(source, target)
    path = os.path.join(target, "metadata.yaml")
    with open(path) as f:
        metadata = yaml.safe_load(f)
    metadata["name"] = os.path.basename(target)
    with open(path, "w") as f:
        yaml.safe_dump(metadata, f)
    return target


async def simulate_service(client, service, machines, per_machine):
    for machine_id in machines:
        machine = await MachineStateManager(client).get_machine(machine_id)
        subnet = await lease_subnet(client, machine_id)
        store = ZooKeeperAddressStore(client, machine_id)
        await store.ensure(subnet)
        allocator = Allocator(store, subnet)
        await machine.register_agent(agent_info())
        for name in await ServiceStateManager(client).add_units(service, n=per_machine, to=machine_id):
            address = await allocator.allocate(name)
            unit = await UnitStateManager(client).get_unit(name)
            await unit.update(state=STARTED, container=container_name("sim", name), **{"private-address": address})
            await unit.register_agent(agent_info())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--machines", type=int, default=1000)
    parser.add_argument("--units", type=int, default=10000)
    parser.add_argument("--samples", type=int, default=15)
    parser.add_argument("--zookeeper-heap-mb", type=int, default=None,
                        help="the lab's ZooKeeper heap (default: ensemble/zookeeper.py's)")
    parser.add_argument("--keep-empty-units", action="store_true",
                        help="deploy the full environment's samples on top of the empty one's, as runs "
                             "before 2026-12-03 evening did (machine 0 then has more units of its own)")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--agent-log", help=argparse.SUPPRESS)
    parser.add_argument("--agent-pid", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--agent-home", help=argparse.SUPPRESS)
    parser.add_argument("--zookeeper-pid", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inside:
        sys.path.insert(0, HERE)
        task.react(lambda reactor: defer.ensureDeferred(inside(reactor, args)))
    else:
        outside(args)


if __name__ == "__main__":
    main()
