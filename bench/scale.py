"""Scale benchmark: an environment of --machines machines and --units units in one
ZooKeeper, of which only machine 0 is real: a lab host (ensemble/lab.py, a network
namespace with no route off the machine) running its machine agent, with containers.
The other machines are simulated as their agents would leave them, without
containers: registered with an address of their own, their subnets leased, their
units added (services related in pairs), addressed from their machines' ranges and
`started`, every agent's presence node held. Nothing runs for them.

Beside it, in the same run, a second lab whose environment stays empty: its own
ZooKeeper and machine 0. Once the full one is populated, add-unit to `started` on
machine 0 is measured in both, one deploy in each in turn (which goes first
alternating), so that whatever slows the host meanwhile (another tenant of the
hypervisor, say) hits both alike; each deploy's steps are timed from the machine
agent's log and the unit's own logs (read through the agent's mount namespace), and
the host's ticks are read around it. Then the ZooKeeper requests of each of machine
0's reconciler passes in both (from its agent's log at DEBUG). What the host spent
meanwhile (bench/host_load.py: its busy share and the hypervisor's, the CPU seconds
of both ZooKeepers, both machine agents and the measuring processes, the full
ZooKeeper's collections) is recorded for the populating, for each lab's deploys and
for the passes. Then the full ZooKeeper: its memory (the JVM's resident set), node
count and requests per second while only machine 0 and its units are active. Prints
one JSON object.

    .venv/bin/python bench/scale.py [--machines 1000] [--units 10000] [--samples 15] [--zookeeper-heap-mb N]
"""

import argparse
import contextlib
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
from ensemble.state.unit import STARTED, UnitStateManager  # noqa: E402
from ensemble.zookeeper import four_letter  # noqa: E402

IDLE = os.path.join(HERE, "charms", "idle")
CHARMS = os.path.join(os.path.dirname(HERE), "examples", "charms")
NETWORK = "10.64.0.0/14"  # 1024 machine subnets of /24
SIMULATED_ADDRESSES = netaddr.IPNetwork("192.168.252.0/22")  # routed nowhere in the lab
PASS_RE = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) DEBUG \S+: machine-0: (\S+) pass: ([\d.]+)s, (\d+) ZooKeeper")
QUIET = 16  # seconds of passes read: three resync ticks


LABS = ("empty", "full")


class Worker:
    """The measuring side in one lab's namespace (`--inside`): one JSON request a line
    on its stdin, one JSON answer a line on its stdout."""

    def __init__(self, lab):
        env = dict(os.environ, ENSEMBLE_ZOOKEEPER=lab.zookeeper_address)
        env[AUTH_VARIABLE] = lab.admin_auth
        # A file, not a pipe: nobody reads it until the end, and a full pipe would stop it.
        self.errors = open(os.path.join(lab.directory, "measuring.err"), "w+")
        self.process = subprocess.Popen(
            ["nsenter", f"--net={netns_path(lab.network.lab)}", "--", sys.executable, os.path.abspath(__file__),
             "--inside", "--agent-log", lab.agent_log(0), "--agent-pid", str(lab.agents[0].pid),
             "--agent-home", lab.home(0)],
            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.errors, text=True,
        )

    def request(self, op, **arguments):
        self.process.stdin.write(json.dumps({"op": op, **arguments}) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            self.process.wait()
            self.errors.seek(0)
            raise SystemExit(f"the measuring side failed: {self.errors.read().strip()[-2000:]}")
        answer = json.loads(line)
        if "error" in answer:
            raise SystemExit(f"the measuring side failed: {answer['error']}")
        return answer

    def close(self):
        self.process.stdin.close()
        self.process.wait(timeout=60)
        self.errors.close()


def outside(args):
    import host_load
    from deploy import _median_steps

    os.environ["ENSEMBLE_LOG_LEVEL"] = "DEBUG"  # machine 0's agent: every pass, with its requests
    result = {"machines": args.machines, "units": args.units, "samples": args.samples, "interleaved": True}
    with tempfile.TemporaryDirectory(prefix="ensemble-scale-", dir="/var/tmp") as tmp, \
            contextlib.ExitStack() as stack:
        labs = {}
        for kind in LABS:
            labs[kind] = stack.enter_context(Lab(os.path.join(tmp, kind), hosts=1, mode="vxlan", cidr=NETWORK,
                                                 zookeeper_heap_mb=args.zookeeper_heap_mb))
            labs[kind].ensemble("deploy", IDLE, "--to", "0")
        workers = {}
        for kind in LABS:
            workers[kind] = Worker(labs[kind])
            stack.callback(workers[kind].close)
        watched = {f"{kind}_{what}": pid for kind in LABS
                   for what, pid in (("zookeeper", labs[kind].zookeeper.pid()),
                                     ("machine_agent", labs[kind].agents[0].pid),
                                     ("benchmark", workers[kind].process.pid))}

        def measured(phase, work, *arguments, **keywords):
            before = host_load.sample(watched, labs["full"].zookeeper.pid())
            value = work(*arguments, **keywords)
            after = host_load.sample(watched, labs["full"].zookeeper.pid())
            result.setdefault("load", {})[phase] = host_load.spent(before, after)
            return value

        result["populate_s"] = measured("populate", workers["full"].request, "populate",
                                        machines=args.machines, units=args.units)["seconds"]
        deploys = {kind: [] for kind in LABS}
        around = {kind: [] for kind in LABS}  # (before, after) host readings of each deploy
        for n in range(args.samples):
            for kind in (LABS if n % 2 == 0 else LABS[::-1]):
                before = host_load.sample(watched)
                deploys[kind].append(workers[kind].request("deploy"))
                around[kind].append((before, host_load.sample(watched)))
        for kind in LABS:
            result["load"][f"{kind}_deploys"] = host_load.spent_over(around[kind])
            latencies = [d["ms"] for d in deploys[kind]]
            result[f"{kind}_add_unit_p50_ms"] = round(statistics.median(latencies), 1)
            result[f"{kind}_steps_p50_ms"] = _median_steps([d["steps"] for d in deploys[kind]])
            result[f"{kind}_add_unit_requests"] = statistics.median(d["requests"] for d in deploys[kind])
            # The most the hypervisor took of any one deploy: whether it slowed some
            # samples, even where the sum over all of them is small.
            result[f"{kind}_deploys_stolen_max"] = max(host_load.spent(b, a)["host_stolen"] or 0
                                                       for b, a in around[kind])
        result["full_to_empty_p50"] = round(result["full_add_unit_p50_ms"] / result["empty_add_unit_p50_ms"], 2)
        for kind in LABS:
            result[f"{kind}_passes"] = measured(f"{kind}_passes", workers[kind].request, "passes")["passes"]
        result.update(workers["full"].request("census"))
        result["zookeeper_rss_mb"] = _rss_mb(labs["full"].zookeeper.pid())
        result["zookeeper_heap_mb"] = labs["full"].zookeeper.heap_mb
        print(json.dumps(result))


def _rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    return None


async def inside(reactor, args):
    """Serves the outside's requests (Worker) in this lab until its stdin closes."""
    from deploy import started
    from deploy_timeline import durations, timeline

    # The unit agents' logs are bound over their directories in the machine agent's
    # mount namespace (each unit's disk, container/disk.py): read them through it.
    agent_home = f"/proc/{args.agent_pid}/root{args.agent_home}"
    client = await connection.connect()

    async def deploy():
        """add-unit to `started` (ms), each step's own time and the add-unit's requests."""
        begin = reactor.seconds()
        requests = []
        (name,) = await add_unit(client, requests)
        added = (reactor.seconds() - begin) * 1000
        took = await started(reactor, client, [name], timeout=120, since=begin)
        if name not in took:
            raise RuntimeError(f"{name} did not start within 120 s")
        ms = took[name] * 1000
        steps = durations({"added": added, **timeline(agent_home, 0, name, begin, machine_log=args.agent_log),
                           "seen": ms})
        return {"ms": ms, "steps": steps, "requests": requests[0]}

    async def populated(machines, units):
        began = time.monotonic()
        await populate(client, machines, units)
        return {"seconds": round(time.monotonic() - began, 1)}

    async def census():
        return {"units_in_environment": len(await client.get_children("/units")),
                "machines_in_environment": len(await MachineStateManager(client).machine_ids()),
                "zookeeper": await server_load(reactor, client.servers.split(",")[0])}

    async def measured_passes():
        return {"passes": await passes(reactor, args.agent_log)}

    operations = {"deploy": deploy, "populate": populated, "census": census, "passes": measured_passes}
    try:
        while True:
            line = await threads.deferToThread(sys.stdin.readline)
            if not line:
                return
            request = json.loads(line)
            try:
                answer = await operations[request.pop("op")](**request)
            except Exception as e:  # the outside says it and stops the run
                answer = {"error": f"{type(e).__name__}: {e}"}
            sys.stdout.write(json.dumps(answer) + "\n")
            sys.stdout.flush()
    finally:
        await client.close()


async def add_unit(client, requests):
    """One unit of the idle service on machine 0; appends to `requests` how many
    ZooKeeper requests the add-unit made (counted in its own coroutine)."""
    counted = count_requests()
    try:
        return await ServiceStateManager(client).add_units("idle", n=1, to=0)
    finally:
        requests.append(counted[0])


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
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--agent-log", help=argparse.SUPPRESS)
    parser.add_argument("--agent-pid", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--agent-home", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, HERE)
    if args.inside:
        task.react(lambda reactor: defer.ensureDeferred(inside(reactor, args)))
    else:
        outside(args)


if __name__ == "__main__":
    main()
