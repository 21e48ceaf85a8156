"""Cross-host networking benchmark, in a lab of simulated hosts (ensemble/lab.py), for
each network mode. Prints one JSON object:

- mesh_ok / mesh_total: TCP from every unit to every other unit's published address,
  5 hosts x 4 echo units (380 ordered pairs);
- join_to_reachable_ms: from a new host's subnet lease appearing in ZooKeeper until
  every existing host reaches it (TCP between the two hosts' container gateways, so
  both directions are routed); p50 (and all values) over 5 joins.

    .venv/bin/python bench/overlay.py [--modes host-gw vxlan] [--hosts 5] [--units 4] [--joins 5]

Needs root and the cached container template.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time

import netaddr
from twisted.internet import defer, task, threads

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from ensemble.lab import Lab  # noqa: E402
from ensemble.network.ipam import lease_key, subnet_from_key  # noqa: E402
from ensemble.network.netns import inside  # noqa: E402
from ensemble import connection  # noqa: E402
from ensemble.state import auth, nodes  # noqa: E402
from ensemble.state.watch import ChildrenWatch  # noqa: E402

ECHO = os.path.join(os.path.dirname(HERE), "examples", "charms", "echo")
PORT = 7000


def gateway(subnet):
    return str(netaddr.IPNetwork(subnet).network + 1)


def mesh(lab):
    units = {
        name: (int(u["machine"]), u["container"], u["private-address"]) for name, u in lab.units().items()
    }
    ok = total = 0
    failures = []
    for source, (host, container, _) in sorted(units.items()):
        targets = {address: name for name, (_, _, address) in units.items() if name != source}
        answers = lab.probe(host, container, sorted(targets), PORT)
        for address, name in targets.items():
            total += 1
            if answers.get(address) == name:
                ok += 1
            else:
                failures.append(f"{source} -> {name}: {answers.get(address)}")
    return ok, total, failures[:10]


class Leases:
    """Records when each subnet lease first appears (a ZooKeeper watch)."""

    def __init__(self):
        self.seen = {}
        self.events = {}
        self.lock = threading.Lock()

    def changed(self, keys):
        now = time.time()
        with self.lock:
            for key in keys or []:
                subnet = subnet_from_key(key)
                if subnet not in self.seen:
                    self.seen[subnet] = now
                    self.events.setdefault(subnet, threading.Event()).set()

    def wait_new(self, known, timeout=60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                new = [s for s in self.seen if s not in known]
            if new:
                return new[0], self.seen[new[0]]
            time.sleep(0.001)
        raise SystemExit("no new lease appeared")


def reach(lab, i, source, target, timeout=30):
    """Wall time at which host i first reaches `target` from `source`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if lab.connect_from_host(i, target, 9, source=source, timeout=0.02):
            return time.time()
        time.sleep(0.005)
    return None


async def join(lab, client, leases):
    """ms from the new host's lease to reachability from every existing host."""
    known = set(leases.seen)
    existing = sorted(lab.agents)
    subnets = {i: lab.machine(i)["subnet"] for i in existing}
    k = await threads.deferToThread(lab.add_host, False)
    probing = threads.deferToThread(leases.wait_new, known)
    await threads.deferToThread(lab.start_agent, k)
    subnet, _ = await probing
    # The lease's own creation time, by ZooKeeper's clock (the same machine's).
    leased_at = (await client.exists(f"{nodes.SUBNETS}/{lease_key(subnet)}")).ctime
    reached = await defer.gatherResults([
        threads.deferToThread(reach, lab, i, gateway(subnets[i]), gateway(subnet)) for i in existing
    ])
    if any(t is None for t in reached):
        return None
    return round((max(reached) - leased_at) * 1000, 1)


async def run_mode(reactor, mode, hosts, units, joins, directory):
    lab = Lab(os.path.join(directory, mode), hosts=hosts, mode=mode)
    await threads.deferToThread(lab.start)
    client = watch = None
    try:
        await threads.deferToThread(lab.ensemble, "deploy", ECHO, "--to", "0", "-n", str(units))
        for i in range(1, hosts):
            await threads.deferToThread(lab.ensemble, "add-unit", "echo", "--to", str(i), "-n", str(units))
        names = [f"echo/{n}" for n in range(hosts * units)]
        await threads.deferToThread(lab.wait_started, names, 300)
        ok, total, failures = await threads.deferToThread(mesh, lab)
        # kazoo's threads must be born in the lab, where ZooKeeper is reachable.
        with inside(lab.network.lab):
            # As the admin: nothing of the environment is open to a session without a credential.
            connecting = defer.ensureDeferred(connection.connect(
                lab.zookeeper_address, credential=auth.Credential.parse(lab.admin_auth)))
        client = await connecting
        leases = Leases()
        watch = await ChildrenWatch(client, nodes.SUBNETS, leases.changed).start()
        samples = [await join(lab, client, leases) for _ in range(joins)]
        measured = [s for s in samples if s is not None]
        return {
            "mesh_ok": ok,
            "mesh_total": total,
            "mesh_failures": failures,
            "join_to_reachable_ms": round(statistics.median(measured), 1) if measured else None,
            "join_samples_ms": samples,
            "hosts_at_end": len(lab.network.hosts),
        }
    finally:
        if watch is not None:
            watch.stop()
        if client is not None:
            await client.close()
        await threads.deferToThread(lab.close)


async def main(reactor, args):
    reactor.suggestThreadPoolSize(32)
    results = {"hosts": args.hosts, "units_per_host": args.units, "joins": args.joins}
    with tempfile.TemporaryDirectory(prefix="ensemble-bench-overlay-") as directory:
        for mode in args.modes:
            results[mode] = await run_mode(reactor, mode, args.hosts, args.units, args.joins, directory)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", nargs="+", default=["host-gw", "vxlan"], choices=["host-gw", "vxlan"])
    parser.add_argument("--hosts", type=int, default=5)
    parser.add_argument("--units", type=int, default=4)
    parser.add_argument("--joins", type=int, default=5)
    arguments = parser.parse_args()
    task.react(lambda reactor: defer.ensureDeferred(main(reactor, arguments)))
