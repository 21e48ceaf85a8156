"""One allocating process for the IPAM concurrency test and benchmark.

Allocates addresses for units SERVICE/0, SERVICE/1, ... of one machine until COUNT
are allocated or the range is exhausted, then prints one JSON object:
{"allocated": [[unit, address, ms, finished_at], ...], "exhausted": n, "errors": [...]}.
All workers start together at --start-at (epoch seconds) so they really race.
"""

import argparse
import json
import sys
import time

from twisted.internet import defer, task

from ensemble.network.ipam import AddressesExhausted, Allocator
from ensemble.state.client import ZKClient
from ensemble.state.network import ZooKeeperAddressStore


async def work(reactor, args):
    servers, _, root = args.zookeeper.partition("/")
    client = await ZKClient(servers, "/" + root).connect()
    allocator = Allocator(ZooKeeperAddressStore(client, args.machine), args.subnet)
    result = {"allocated": [], "exhausted": 0, "errors": []}
    delay = args.start_at - time.time()
    result["late_s"] = max(0.0, -delay)
    if delay > 0:
        await task.deferLater(reactor, delay, lambda: None)
    n = 0
    result["started"] = time.time()
    try:
        while args.count is None or len(result["allocated"]) < args.count:
            unit = f"{args.service}/{n}"
            n += 1
            started = time.perf_counter()
            try:
                address = await allocator.allocate(unit)
            except AddressesExhausted:
                result["exhausted"] += 1
                if result["exhausted"] > args.after_exhausted:
                    break
                continue
            result["allocated"].append([unit, address, (time.perf_counter() - started) * 1000, time.time()])
        result["collisions"] = allocator.collisions
    except Exception as e:  # reported, so the parent sees what went wrong
        result["errors"].append(f"{type(e).__name__}: {e}")
    finally:
        result["finished"] = time.time()
        await client.close()
    print(json.dumps(result))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--zookeeper", required=True, help="HOST:PORT/ROOT")
    parser.add_argument("--machine", type=int, default=0)
    parser.add_argument("--subnet", required=True)
    parser.add_argument("--service", required=True)
    parser.add_argument("--count", type=int)
    parser.add_argument("--after-exhausted", type=int, default=3, help="requests to make after exhaustion")
    parser.add_argument("--start-at", type=float, default=0.0)
    args = parser.parse_args()
    task.react(lambda reactor: defer.ensureDeferred(work(reactor, args)))


if __name__ == "__main__":
    sys.exit(main())
