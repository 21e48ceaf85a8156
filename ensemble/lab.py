"""A lab of simulated hosts on one machine, for tests and benchmarks of cross-host
networking.

The lab is a network namespace with no route off the machine; each host is a network
namespace attached to it by a veth:

- flat (host-gw): every host on one provider bridge, one L2 network;
- routed (vxlan): hosts alternate between two L3 networks that the lab namespace joins
  as their router, so host-gw cannot work and only the overlay can.

Host 0 plays the bootstrap machine: it runs ZooKeeper (listening on all of its own
namespace's addresses). Agents reach it at host 0's provider address; units reach it at
host 0's container gateway, across the overlay. Every host runs its own
`ensemble machine-agent` process with its own ENSEMBLE_HOME (so its own lxc path and
bridge), inside its namespace and that namespace's sysfs: to the agent it is a host.

With `package_upstream` (HOST:PORT of an HTTP proxy in the machine's own namespace,
such as an apt-cacher-ng of the test's), the hosts' package caches fetch through it: a
relay in the lab namespace (Twisted's portforward, listening there, connecting from
the machine's namespace) is the lab's only way to packages, as a site proxy would be.

Blocking API (subprocesses and netlink); call it from plain test code or a thread.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid

import netaddr
from pyroute2 import IPRoute, netns as pyroute2_netns
from pyroute2.netlink.exceptions import NetlinkError

from ensemble.connection import AUTH_VARIABLE
from ensemble.home import EnsembleHome
from ensemble.network.ipam import SubnetPlan
from ensemble.network.netns import host_argv, inside, netns_path, set_ip_forwarding
from ensemble.zookeeper import ZooKeeperServer

SEGMENTS = ("192.168.250.0/24", "192.168.251.0/24")
ROOT = "/ensemble"
RELAY_PORT = 3142
ENETUNREACH = 101

# Run inside a container: connect to each HOST:PORT, read one line; print JSON
# {target: answer or "error: ..."}.
PROBE = r"""
import json, socket, sys
port = int(sys.argv[1]); results = {}
for host in sys.argv[2:]:
    try:
        with socket.create_connection((host, port), timeout=3) as s:
            results[host] = s.makefile().readline().strip()
    except OSError as e:
        results[host] = f"error: {e}"
print(json.dumps(results))
"""


class LabError(Exception):
    pass


class LabNetwork:
    """The namespaces and links of a lab: `hosts` host namespaces on a flat or
    routed provider network, inside a lab namespace with no way out."""

    def __init__(self, routed=False, lab_id=None):
        self.id = lab_id or uuid.uuid4().hex[:6]
        self.routed = routed
        self.lab = f"ensl-{self.id}"
        self.hosts = []
        self.addresses = []

    def segment(self, index):
        return netaddr.IPNetwork(SEGMENTS[index % 2 if self.routed else 0])

    def create(self):
        pyroute2_netns.create(self.lab)
        with IPRoute(netns=self.lab, flags=0) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
            for n in range(2 if self.routed else 1):
                segment = self.segment(n)
                ipr.link("add", ifname=f"prov{n}", kind="bridge")
                index = ipr.link_lookup(ifname=f"prov{n}")[0]
                ipr.addr("add", index=index, address=str(segment.network + 1), prefixlen=segment.prefixlen)
                ipr.link("set", index=index, state="up")
        if self.routed:
            # The lab namespace is the router between the two segments; it has no link
            # to anything outside, so forwarding here reaches only the lab.
            set_ip_forwarding(self.lab)

    def add_host(self):
        """Attach one more host; returns its index."""
        i = len(self.hosts)
        name = f"{self.lab}-h{i}"
        segment = self.segment(i)
        address = str(segment.network + 10 + i)
        pyroute2_netns.create(name)
        self.hosts.append(name)
        self.addresses.append(address)
        with IPRoute(netns=self.lab, flags=0) as ipr:
            ipr.link("add", ifname=f"h{i}", kind="veth", peer={"ifname": "eth0", "net_ns_fd": name})
            index = ipr.link_lookup(ifname=f"h{i}")[0]
            bridge = ipr.link_lookup(ifname=f"prov{i % 2 if self.routed else 0}")[0]
            ipr.link("set", index=index, master=bridge, state="up")
        with IPRoute(netns=name, flags=0) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
            index = ipr.link_lookup(ifname="eth0")[0]
            ipr.addr("add", index=index, address=address, prefixlen=segment.prefixlen)
            ipr.link("set", index=index, state="up")
            if self.routed:
                ipr.route("add", dst="0.0.0.0/0", gateway=str(segment.network + 1))
        return i

    def remove(self):
        for name in self.hosts + [self.lab]:
            if os.path.exists(f"/run/netns/{name}"):
                pyroute2_netns.remove(name)

    def connect(self, i, address, port, source=None, timeout=1.0):
        """True if a TCP connection from host i's namespace reaches `address` (a refusal
        counts: the SYN arrived and the answer came back)."""
        with inside(self.hosts[i]):
            s = socket.socket()
        try:
            s.settimeout(timeout)
            if source:
                s.bind((source, 0))
            s.connect((address, port))
            return True
        except ConnectionRefusedError:
            return True
        except OSError:
            return False
        finally:
            s.close()

    def route_lookup(self, netns, address):
        """The kernel's route to `address` from `netns`, or None if unreachable (a
        lookup only: no packet is sent)."""
        with IPRoute(netns=netns, flags=0) as ipr:
            try:
                return ipr.route("get", dst=address)[0]
            except NetlinkError as e:
                if e.code == ENETUNREACH:
                    return None
                raise


class Lab:
    """An Ensemble environment across `hosts` simulated hosts (see the module doc)."""

    def __init__(self, directory, hosts=3, mode="host-gw", cidr="10.77.0.0/16", routed=None, tick_time=500,
                 package_upstream=None, zookeeper_heap_mb=None):
        self.directory = os.path.abspath(directory)
        self.zookeeper_heap_mb = zookeeper_heap_mb
        self.mode = mode
        self.cidr = cidr
        self.initial_hosts = hosts
        self.network = LabNetwork(routed=(mode == "vxlan") if routed is None else routed)
        self.environment = f"lab{self.network.id}"
        self.tick_time = tick_time
        self.zookeeper = None
        self.agents = {}
        self.admin_auth = None  # from create-environment
        self.package_upstream = package_upstream
        self.relay = None

    # -- life cycle ----------------------------------------------------------------------

    def ensure_template(self):
        """Build the container template here if it is not cached: lab hosts have no
        way to the apt mirror, so their agents could not."""
        result = subprocess.run(
            [sys.executable, "-m", "ensemble.lab", "ensure-template"], capture_output=True, text=True, timeout=900
        )
        if result.returncode != 0:
            raise LabError(f"building the container template failed: {result.stderr.strip()[-500:]}")

    def start(self):
        self.ensure_template()
        try:
            self.network.create()
            for _ in range(self.initial_hosts):
                self.network.add_host()
            self.zookeeper = ZooKeeperServer(
                os.path.join(self.directory, "zookeeper"), host="0.0.0.0", port=2181,
                tick_time=self.tick_time, netns=self.network.hosts[0],
                **({"heap_mb": self.zookeeper_heap_mb} if self.zookeeper_heap_mb else {}),
            )
            self.zookeeper.start()
            gateway = str(netaddr.IPNetwork(next(SubnetPlan(self.cidr, 24).subnets())).network + 1)
            packages = []
            if self.package_upstream:
                packages = ["--package-proxy", f"http://{self._start_relay()}"]
            created = self.ensemble(
                "create-environment", "--name", self.environment, "--network", self.cidr,
                "--network-mode", self.mode, "--units-zookeeper", f"{gateway}:{self.zookeeper.port}", *packages,
            )
            # The admin's credential, printed once; every later command runs with it.
            self.admin_auth = created.stdout.rpartition(f"{AUTH_VARIABLE}=")[2].strip()
            for i in range(self.initial_hosts):
                self.ensemble("add-machine", "--address", self.network.addresses[i])
                self.start_agent(i)
                if i == 0:
                    # Units reach ZooKeeper at host 0's gateway: it must hold the first subnet.
                    self.wait_for(lambda: self.machine(0).get("subnet"), 30, "host 0's subnet lease")
                    if self.machine(0)["subnet"] != next(SubnetPlan(self.cidr, 24).subnets()):
                        raise LabError(f"host 0 leased {self.machine(0)['subnet']}, not the first subnet")
        except BaseException:
            self.close()
            raise
        return self

    def _start_relay(self):
        """The relay to `package_upstream`, on the lab's own provider address; returns
        where it listens."""
        listen = f"{self.network.segment(0).network + 1}:{RELAY_PORT}"
        self.relay = subprocess.Popen(
            ["setpriv", "--pdeathsig", "KILL", "--", sys.executable, "-m", "ensemble.lab", "relay",
             self.network.lab, listen, self.package_upstream],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
        )
        ready = self.relay.stdout.readline().strip()
        if ready != "ready":
            raise LabError(f"the package relay did not start: {ready or self.relay.stdout.read()[-300:]}")
        return listen

    def add_host(self, start_agent=True):
        """One more host, registered as the next machine; returns its index."""
        i = self.network.add_host()
        self.ensemble("add-machine", "--address", self.network.addresses[i])
        if start_agent:
            self.start_agent(i)
        return i

    def close(self):
        for i in list(self.agents):
            self.stop_agent(i)
        for i, name in enumerate(self.network.hosts):
            storage = EnsembleHome(self.home(i)).storage_dir
            if os.path.isdir(storage):
                subprocess.run(
                    host_argv(name, [sys.executable, "-m", "ensemble.lab", "destroy-containers", self.home(i)]),
                    capture_output=True, timeout=300,
                )
                shutil.rmtree(storage, ignore_errors=True)
        if self.zookeeper is not None:
            self.zookeeper.stop()
        if self.relay is not None:
            self.relay.kill()
            self.relay.wait()
        self.network.remove()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()

    # -- hosts and their agents ------------------------------------------------------------

    def home(self, i):
        return os.path.join(self.directory, f"host{i}")

    def lxc_path(self, i):
        return os.path.join(EnsembleHome(self.home(i)).lxc_dir, f"machine-{i}")

    def agent_log(self, i):
        return os.path.join(self.home(i), "agent.log")

    @property
    def zookeeper_address(self):
        return f"{self.network.addresses[0]}:{self.zookeeper.port}{ROOT}"

    def start_agent(self, i):
        os.makedirs(self.home(i), exist_ok=True)
        credential = self.ensemble("machine-credential", str(i)).stdout.strip()
        env = dict(os.environ, ENSEMBLE_HOME=self.home(i), ENSEMBLE_SESSION_TIMEOUT="4")
        env.pop("ENSEMBLE_ZOOKEEPER", None)
        env[AUTH_VARIABLE] = credential
        argv = [sys.executable, "-m", "ensemble", "machine-agent", "--machine-id", str(i),
                "--zookeeper", self.zookeeper_address]
        with open(self.agent_log(i), "ab") as log, open(os.devnull, "rb") as null:
            self.agents[i] = subprocess.Popen(
                host_argv(self.network.hosts[i], argv), stdin=null, stdout=log, stderr=log,
                env=env, start_new_session=True,
            )

    def stop_agent(self, i, sig=signal.SIGTERM, timeout=30):
        agent = self.agents.pop(i, None)
        if agent is None:
            return
        if agent.poll() is None:
            agent.send_signal(sig)
            try:
                agent.wait(timeout)
            except subprocess.TimeoutExpired:
                agent.kill()
                agent.wait()

    # -- talking to the environment ----------------------------------------------------------

    def ensemble(self, *args, check=True, timeout=60):
        """Run an `ensemble` command from the lab namespace against the lab's environment."""
        env = dict(os.environ, ENSEMBLE_ZOOKEEPER=self.zookeeper_address)
        env.pop(AUTH_VARIABLE, None)
        if self.admin_auth:
            env[AUTH_VARIABLE] = self.admin_auth
        result = subprocess.run(
            ["nsenter", f"--net={netns_path(self.network.lab)}", "--", sys.executable, "-m", "ensemble", *args],
            capture_output=True, text=True, env=env, timeout=timeout,
        )
        if check and result.returncode != 0:
            raise LabError(f"ensemble {' '.join(args)}: {result.stderr.strip() or result.stdout.strip()}")
        return result

    def status(self):
        return json.loads(self.ensemble("status", "--format", "json").stdout)

    def machine(self, i):
        return self.status()["machines"].get(str(i)) or {}

    def units(self):
        """{unit: its status entry} across services."""
        found = {}
        for service in self.status()["services"].values():
            found.update(service.get("units") or {})
        return found

    def wait_for(self, predicate, timeout, what, interval=0.2):
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise LabError(f"timed out after {timeout}s waiting for {what}")
            time.sleep(interval)

    def wait_started(self, names, timeout=120):
        def ready():
            units = self.units()
            failed = {n: units[n].get("error") for n in names if units.get(n, {}).get("agent-state") == "error"}
            if failed:
                raise LabError(f"units failed: {failed}")
            return all(units.get(n, {}).get("agent-state") == "started" for n in names) and units

        return self.wait_for(ready, timeout, f"{', '.join(names)} to start")

    # -- inside containers -------------------------------------------------------------------

    def container_run(self, i, container, argv, timeout=60):
        """Run `argv` in a container of host `i` (lxc-attach in that host's namespace)."""
        return subprocess.run(
            ["nsenter", f"--net={netns_path(self.network.hosts[i])}", "--",
             "lxc-attach", "-P", self.lxc_path(i), "-n", container, "--clear-env", "--", *argv],
            capture_output=True, text=True, timeout=timeout,
        )

    def probe(self, i, container, addresses, port):
        """{address: what it answered, or 'error: ...'} from inside the container."""
        result = self.container_run(i, container, ["/usr/bin/python3", "-c", PROBE, str(port), *addresses])
        if result.returncode != 0:
            raise LabError(f"probe from {container} failed: {result.stderr.strip()}")
        return json.loads(result.stdout)

    def connect_from_host(self, i, address, port, source=None, timeout=1.0):
        return self.network.connect(i, address, port, source, timeout)


def _react(work):
    from twisted.internet import defer, task

    task.react(lambda reactor: defer.ensureDeferred(work(reactor)))


def _destroy_containers(home):
    from ensemble import local

    _react(lambda reactor: local.destroy_containers(reactor, EnsembleHome(home)))


def _relay(netns, listen, target):
    from twisted.internet import reactor
    from twisted.protocols.portforward import ProxyFactory

    host, _, port = listen.rpartition(":")
    target_host, _, target_port = target.rpartition(":")
    with inside(netns):  # the listening socket is the lab's; connections out are ours
        reactor.listenTCP(int(port), ProxyFactory(target_host, int(target_port)), interface=host)
    print("ready", flush=True)
    reactor.run()


def _ensure_template():
    from ensemble.machine.container.template import Template

    _react(lambda reactor: Template(reactor=reactor).ensure(progress=print))


if __name__ == "__main__":
    # Helpers for Lab: `destroy-containers HOME` runs inside a lab host's namespace;
    # `ensure-template` in the machine's own, where the apt mirror can be reached.
    if len(sys.argv) == 3 and sys.argv[1] == "destroy-containers":
        _destroy_containers(sys.argv[2])
    elif sys.argv[1:] == ["ensure-template"]:
        _ensure_template()
    elif len(sys.argv) == 5 and sys.argv[1] == "relay":
        _relay(*sys.argv[2:])
    else:
        sys.exit("usage: python -m ensemble.lab destroy-containers HOME | ensure-template | relay NETNS HOST:PORT TO:PORT")
