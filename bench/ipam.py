"""IPAM benchmark: allocation rate and latency with 1 and 8 concurrent allocating
processes (bench/ipam_worker.py) against a real ZooKeeper. Prints one JSON object.

    .venv/bin/python bench/ipam.py [--count-1 1000] [--per-worker-8 250]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter

from twisted.internet import defer, task, threads

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from stats import percentile  # noqa: E402

from ensemble.state.client import ZKClient  # noqa: E402
from ensemble.state.network import ZooKeeperAddressStore  # noqa: E402
from ensemble.zookeeper import ZooKeeperServer  # noqa: E402

ROOT = "/bench"


def run_workers(spec, machine, subnet, workers, count):
    """Blocking: start `workers` processes together; (allocations, elapsed seconds)."""
    # Enough for every process to import and connect on 2 busy cores first.
    start_at = time.time() + 2.0 + 0.5 * workers
    processes = [
        subprocess.Popen(
            [sys.executable, os.path.join(HERE, "ipam_worker.py"), "--zookeeper", spec,
             "--machine", str(machine), "--subnet", subnet, "--service", f"w{i}",
             "--count", str(count), "--after-exhausted", "0", "--start-at", str(start_at)],
            stdout=subprocess.PIPE, text=True,
        )
        for i in range(workers)
    ]
    results = [json.loads(p.communicate(timeout=300)[0]) for p in processes]
    errors = [e for r in results for e in r["errors"]]
    if errors:
        raise RuntimeError(f"worker errors: {errors}")
    late = max(r["late_s"] for r in results)
    if late > 0:
        raise RuntimeError(f"a worker missed the common start by {late:.2f}s")
    allocated = [a for r in results for a in r["allocated"]]
    elapsed = max(r["finished"] for r in results) - min(r["started"] for r in results)
    return allocated, elapsed


def duplicates(allocated):
    return sum(n - 1 for n in Counter(a[1] for a in allocated).values() if n > 1)


async def benchmark(reactor, args, server):
    client = await ZKClient(server.address, ROOT).connect(create_root=True)
    await client.ensure_path("/network/addresses")
    # One machine per run, each with a /21 (2045 addresses): room for every allocation.
    for machine in (1, 2):
        await ZooKeeperAddressStore(client, machine).ensure(f"10.{machine}.0.0/21")
    await client.close()
    spec = f"{server.address}{ROOT}"
    pool = reactor.getThreadPool()
    one, one_s = await threads.deferToThreadPool(reactor, pool, run_workers, spec, 1, "10.1.0.0/21", 1, args.count_1)
    eight, eight_s = await threads.deferToThreadPool(
        reactor, pool, run_workers, spec, 2, "10.2.0.0/21", 8, args.per_worker_8
    )
    latencies = [a[2] for a in eight]
    print(json.dumps({
        "allocs_per_s_1": round(len(one) / one_s, 1),
        "allocs_per_s_8": round(len(eight) / eight_s, 1),
        "p50_ms": round(statistics.median(latencies), 2),
        "p99_ms": round(percentile(latencies, 99), 2),
        "p50_ms_1": round(statistics.median(a[2] for a in one), 2),
        "p99_ms_1": round(percentile([a[2] for a in one], 99), 2),
        "duplicates": duplicates(one) + duplicates(eight),
        "allocations_1": len(one),
        "allocations_8": len(eight),
    }))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count-1", type=int, default=1000, help="allocations by the single process")
    parser.add_argument("--per-worker-8", type=int, default=250, help="allocations by each of 8 processes")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server = ZooKeeperServer(os.path.join(tmp, "zk"))
        server.start()
        try:
            task.react(lambda reactor: defer.ensureDeferred(benchmark(reactor, args, server)))
        finally:
            server.stop()


if __name__ == "__main__":
    main()
