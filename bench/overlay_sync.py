"""What a machine joining costs each host's overlay: one `Overlay.sync` from N-1 peers
to N, in a network namespace made for the run (a bridge of its own holds the host's
address), for each mode: compared with the kernel's paths (as every join did before,
and the once-a-minute check still does) and changed from the peers in place (a join
now). The median of --samples each. Prints one JSON object.

    .venv/bin/python bench/overlay_sync.py [--machines 100 1000] [--samples 7]
"""

import argparse
import json
import os
import statistics
import sys
import time

import netaddr
from pyroute2 import IPRoute, netns

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ensemble.network.overlay import MODES, Overlay, Peer  # noqa: E402

CIDR = "10.64.0.0/14"
SUBNET = "10.64.0.0/24"  # this host's
HOSTS = netaddr.IPNetwork("192.168.240.0/20")  # on the namespace's own bridge alone


def peers(n):
    """Machines 1..n-1 (this host is machine 0), with a /24 and a host address each."""
    subnets = (str(s) for s in netaddr.IPNetwork(CIDR).subnet(24) if str(s) != SUBNET)
    hosts = HOSTS.iter_hosts()
    next(hosts)
    return [Peer(m, next(subnets), str(next(hosts))) for m in range(1, n)]


def ms(samples):
    return round(statistics.median(samples) * 1000, 1)


def measure(overlay, n, samples):
    before, after = peers(n - 1), peers(n)
    compared, changed = [], []
    overlay.sync(before)
    for _ in range(samples):
        began = time.perf_counter()
        report = overlay.sync(after)
        compared.append(time.perf_counter() - began)
        if report.errors or report.paths != n - 1:
            raise SystemExit(f"sync failed: {report.errors[:3]}")
        overlay.sync(before, since=after)
        began = time.perf_counter()
        report = overlay.sync(after, since=before)
        changed.append(time.perf_counter() - began)
        if report.errors or report.paths != n - 1 or not report.added:
            raise SystemExit(f"sync failed: {report.errors[:3]}")
        overlay.sync(before, since=after)
    return {"compared_ms": ms(compared), "changed_ms": ms(changed)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--machines", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--samples", type=int, default=7)
    args = parser.parse_args()
    name = f"ensbov-{os.getpid()}"
    netns.create(name)
    try:
        with IPRoute(netns=name) as ipr:
            ipr.link("add", ifname="underlay", kind="bridge")
            (index,) = ipr.link_lookup(ifname="underlay")
            ipr.addr("add", index=index, address=str(HOSTS[1]), prefixlen=HOSTS.prefixlen)
            ipr.link("set", index=index, state="up")
        result = {"samples": args.samples}
        for mode in MODES:
            overlay = Overlay(mode, "bench", CIDR, SUBNET, str(HOSTS[1]), netns=name)
            result[mode] = {n: measure(overlay, n, args.samples) for n in args.machines}
            overlay.remove()
        print(json.dumps(result))
    finally:
        netns.remove(name)  # its bridge, routes and VXLAN device go with it


if __name__ == "__main__":
    main()
