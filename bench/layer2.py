"""Layer 2 pass benchmark: how long `bridge_ports.secure` (the machine agent's layer-2
pass) takes with N unit ports on one bridge, in a network namespace made for the run.
Prints one JSON object.

    .venv/bin/python bench/layer2.py [--ports 250] [--passes 5]
"""

import argparse
import json
import os
import statistics
import sys
import time

from pyroute2 import IPRoute, netns

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ensemble.network import bridge, bridge_ports  # noqa: E402
from ensemble.network.ipam import unit_mac  # noqa: E402

SUBNET = "10.99.0.0/16"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ports", type=int, default=250)
    parser.add_argument("--passes", type=int, default=5)
    args = parser.parse_args()
    name = f"ensbl2-{os.getpid()}"
    netns.create(name)
    try:
        bridge.ensure_bridge("br-bench", SUBNET, name)
        ports = []
        with IPRoute(netns=name) as ipr:
            master = ipr.link_lookup(ifname="br-bench")[0]
            for i in range(args.ports):
                ipr.link("add", ifname=f"ve-b{i}", kind="veth", peer=f"vp-b{i}")
                index = ipr.link_lookup(ifname=f"ve-b{i}")[0]
                ipr.link("set", index=index, master=master, state="up")
                address = f"10.99.{(i + 2) // 256}.{(i + 2) % 256}"
                ports.append(bridge_ports.UnitPort(f"ve-b{i}", unit_mac(SUBNET, address), address))
        began = time.perf_counter()
        bridge_ports.secure("br-bench", ports, SUBNET, name)
        first = (time.perf_counter() - began) * 1000
        passes = []
        for _ in range(args.passes):
            began = time.perf_counter()
            bridge_ports.secure("br-bench", ports, SUBNET, name)
            passes.append((time.perf_counter() - began) * 1000)
        print(json.dumps({"ports": args.ports, "first_pass_ms": round(first, 1),
                          "pass_p50_ms": round(statistics.median(passes), 1),
                          "pass_max_ms": round(max(passes), 1)}))
    finally:
        netns.remove(name)  # its links go with it


if __name__ == "__main__":
    main()
