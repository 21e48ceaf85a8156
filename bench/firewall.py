"""Firewall sync benchmark: what one `Firewall.sync` costs with N units on a host, in a
network namespace made for the run, for a unit added (the deploy's sync), a pass that
changes nothing (a tick), and both tables replaced whole (the first sync, and the
once-a-minute resync). The units are two services of N/2 each, related to each other
(both directions of every pair in the `related` set), one of them exposed with a port
open. Prints one JSON object.

    .venv/bin/python bench/firewall.py [--units 31 100 250] [--samples 7]
"""

import argparse
import json
import os
import statistics
import sys
import time

from pyroute2 import netns

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ensemble.network.firewall import Firewall  # noqa: E402
from ensemble.network.ipam import unit_mac  # noqa: E402

SUBNET = "10.99.0.0/16"


def units(n):
    """(openings, related, ports) of `n` units, as the firewall reconciler gives them."""
    addresses = [f"10.99.{(i + 2) // 256}.{(i + 2) % 256}" for i in range(n)]
    first, second = addresses[: (n + 1) // 2], addresses[(n + 1) // 2:]
    related = {pair for a in first for b in second for pair in ((a, b), (b, a))}
    openings = {a: [(80, "tcp")] for a in first}
    ports = [(f"ve-b{i}", unit_mac(SUBNET, a), a) for i, a in enumerate(addresses)]
    return openings, related, ports


def ms(samples):
    return round(statistics.median(samples) * 1000, 1)


def measure(firewall, n, samples):
    before, after = units(n - 1), units(n)
    added, unchanged, replaced = [], [], []
    for _ in range(samples):
        firewall.sync(*before)
        began = time.perf_counter()
        assert firewall.sync(*after) is False
        added.append(time.perf_counter() - began)
        began = time.perf_counter()
        firewall.sync(*after)
        unchanged.append(time.perf_counter() - began)
        began = time.perf_counter()
        firewall.sync(*after, replace=True)
        replaced.append(time.perf_counter() - began)
    if firewall.related() != after[1] or len(firewall.ports()) != n:
        raise SystemExit("the tables do not hold what was synced")
    return {"related_pairs": len(after[1]), "unit_added_ms": ms(added), "unchanged_ms": ms(unchanged),
            "replaced_ms": ms(replaced)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--units", type=int, nargs="+", default=[31, 100, 250])
    parser.add_argument("--samples", type=int, default=7)
    args = parser.parse_args()
    name = f"ensbfw-{os.getpid()}"
    netns.create(name)
    try:
        firewall = Firewall("bench", "br-bench", "10.99.0.1", ["53/udp", "3142"], netns=name, subnet=SUBNET,
                            cidr=SUBNET)
        firewall.sync(*units(1))
        print(json.dumps({"samples": args.samples,
                          "units": {n: measure(firewall, n, args.samples) for n in args.units}}))
    finally:
        netns.remove(name)  # its tables go with it


if __name__ == "__main__":
    main()
