"""The physical floor of a deploy, for bench/deploy.py --floor: a plain LXC snapshot
clone of the units' template (`lxc-copy -s -B overlayfs`), `lxc-start -d` with a veth
on a bridge of its own, and inside it a minimal Python process (floor_agent.py, the host's venv bind-mounted as the
units get it) that connects to the environment's ZooKeeper and creates one ephemeral
node. Timed from before the clone to the node seen by the benchmark's own session, the
same way a unit's `started` is.

The floor's bridge holds the last /24 of the environment's network (no machine leases
it while the environment has fewer machines than /24s): the firewall lets that network
reach ZooKeeper, and the floor pays none of what the units' bridge does for them (the
layer-2 binding and the firewall between units).
"""

import os
import shutil
import subprocess
import sys
import tempfile
import time

from twisted.internet import task, threads

from ensemble.machine.container.template import Template
from ensemble.machine.content import agent_python, ensemble_mounts
import netaddr

from ensemble.network.bridge import ensure_bridge, gateway_of, remove_bridge
from ensemble.state import auth
from ensemble.state.client import NodeExists

HERE = os.path.dirname(os.path.abspath(__file__))
NODE = "/bench-floor"
OPEN = (auth.ALL, "world", "anyone")  # the floor agent has no credential


class Floor:
    def __init__(self, reactor, client, network, leased, zookeeper):
        self.reactor = reactor
        self.client = client
        self.zookeeper = zookeeper + client.root  # as the units' sessions see it
        self.template = Template()
        self.lxc_path = None
        self.subnet = list(netaddr.IPNetwork(network).subnet(24))[-1]
        if any(self.subnet in netaddr.IPNetwork(s) or netaddr.IPNetwork(s) in self.subnet for s in leased):
            raise SystemExit(f"the floor's subnet {self.subnet} is leased by a machine")
        self.bridge = f"ensfl{os.getpid()}"[:15]
        self.gateway = gateway_of(str(self.subnet))
        self.running = []

    async def prepare(self):
        self.lxc_path = tempfile.mkdtemp(prefix="ensemble-floor-", dir="/var/tmp")
        ensure_bridge(self.bridge, str(self.subnet))
        try:
            await self.client.create(NODE, acl=[OPEN])
        except NodeExists:  # left by a run that was killed
            pass

    def _lxc(self, *argv):
        result = subprocess.run(argv, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(argv[:2])}: {result.stderr.strip()}")

    def _clone_and_start(self, name, address, node):
        """(ms the clone took, ms lxc-start took)."""
        begin = time.perf_counter()
        self._lxc("lxc-copy", "-P", self.template.lxc_path, "-n", self.template.name,
                  "-p", self.lxc_path, "-N", name, "-s", "-B", "overlayfs")
        settings = {
            "lxc.net.0.type": "veth", "lxc.net.0.link": self.bridge, "lxc.net.0.flags": "up",
            "lxc.net.0.ipv4.address": f"{address}/{self.subnet.prefixlen}",
            "lxc.net.0.ipv4.gateway": self.gateway,
            "lxc.init.cmd": f"{agent_python()} {os.path.join(HERE, 'floor_agent.py')} {self.zookeeper} {node}",
        }
        cloned = time.perf_counter()
        argv = ["lxc-start", "-d", "-n", name, "-P", self.lxc_path]
        for key, value in settings.items():
            argv += ["-s", f"{key}={value}"]
        for host, inside, _ in ensemble_mounts() + [(HERE, HERE, True)]:
            argv += ["-s", f"lxc.mount.entry={host} {inside.lstrip('/')} none bind,ro,create=dir 0 0"]
        self._lxc(*argv)
        return (cloned - begin) * 1000, (time.perf_counter() - cloned) * 1000

    async def sample(self, i):
        """{step: ms}: the clone, lxc-start, from there to the floor agent's node seen
        here, and "total"."""
        name, node = f"floor-{i}", f"{NODE}/{i}"
        address = self.subnet[2 + i % (self.subnet.size - 3)]
        begin = self.reactor.seconds()
        self.running.append((name, i))
        clone, start = await threads.deferToThread(self._clone_and_start, name, address, node)
        while await self.client.exists(node) is None:
            if self.reactor.seconds() - begin > 60:
                raise RuntimeError(f"the floor agent in {name} made no node within 60 s")
            await task.deferLater(self.reactor, 0.01, lambda: None)
        took = (self.reactor.seconds() - begin) * 1000
        steps = {"clone": clone, "lxc_start": start, "agent": took - clone - start, "total": took}
        await threads.deferToThread(self._remove, name)
        self.running.remove((name, i))
        return {k: round(v, 1) for k, v in steps.items()}

    def _remove(self, name):
        subprocess.run(["lxc-stop", "-k", "-n", name, "-P", self.lxc_path], capture_output=True)
        subprocess.run(["lxc-destroy", "-n", name, "-P", self.lxc_path], capture_output=True)

    async def close(self):
        for name, i in list(self.running):
            await threads.deferToThread(self._remove, name)
        if self.lxc_path:
            shutil.rmtree(self.lxc_path, ignore_errors=True)
        remove_bridge(self.bridge)
        try:
            await self.client.delete_tree(NODE)
        except Exception as e:  # the benchmark's result stands; say what was left
            print(f"floor: could not remove {NODE}: {e}", file=sys.stderr)
