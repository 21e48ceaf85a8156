"""ensemble/network/overlay.py against real namespaces (a lab network, no agents), and
the machine agent's use of it: what it programs, repairs, removes and reports."""

from types import SimpleNamespace

import pytest
import pytest_twisted
from pyroute2 import IPRoute
from twisted.internet import defer, reactor, task

from ensemble.lab import LabNetwork
from ensemble.machine.agent import MachineAgent
from ensemble.machine.reconcilers import overlay as reconciler_module
from ensemble.network import bridge, netlink_dumps
from ensemble.network.netns import ip_forwarding
from ensemble.network.overlay import (
    ROUTE_PROTO, Overlay, OverlayError, Peer, SyncReport, peers_from_leases, vtep_address, vtep_mac, vxlan_name,
)
from ensemble.state.client import ZKClient
from ensemble.state.machine import MachineStateManager
from ensemble.state.network import lease_subnet
from ensemble.status import collect

from conftest import SESSION_TIMEOUT, eventually
from netns import temporary_netns

CIDR = "10.90.0.0/16"
SUBNETS = ["10.90.0.0/24", "10.90.1.0/24", "10.90.2.0/24"]


@pytest.fixture
def network(request):
    marker = request.node.get_closest_marker("routed")
    net = LabNetwork(routed=marker is not None)
    try:
        net.create()
        for _ in range(3):
            net.add_host()
        yield net
    finally:
        net.remove()


def overlays(net, mode):
    return [
        Overlay(mode, "ovtest", CIDR, SUBNETS[i], net.addresses[i], netns=net.hosts[i]) for i in range(3)
    ]


def peers_of(net, i, hosts=range(3)):
    return [Peer(j, SUBNETS[j], net.addresses[j]) for j in hosts if j != i]


def wire(net, mode):
    """Bridges with each host's gateway, and every host synced to every other."""
    result = overlays(net, mode)
    for i, overlay in enumerate(result):
        bridge.ensure_bridge("ens-ovtest", SUBNETS[i], net.hosts[i], overlay.container_mtu())
        report = overlay.sync(peers_of(net, i))
        assert report.errors == []
    return result


def gateway(i):
    return SUBNETS[i].replace(".0/24", ".1")


def reachable(net, i, j):
    # From host i's gateway address to host j's: both directions must be routed.
    return net.connect(i, gateway(j), 9, source=gateway(i))


def test_peers_from_leases_keeps_the_good_and_names_the_bad():
    leases = {
        "10.90.0.0/24": {"machine": 0, "address": "192.168.1.10"},      # ours
        "10.90.1.0/24": {"machine": 1, "address": "192.168.1.11"},
        "10.90.2.0/24": {"machine": 2, "address": None},
        "10.90.3.0/24": {"machine": 3, "address": "127.0.0.1"},
        "10.90.4.0/24": {"machine": 4, "address": "10.90.9.9"},
        "10.91.0.0/24": {"machine": 5, "address": "192.168.1.15"},
        "10.90.6.0/24": "not a mapping",
        "10.90.7.0/24": {"machine": 7, "address": "not-an-ip"},
    }
    peers, problems = peers_from_leases(leases, 0, CIDR)
    assert peers == [Peer(1, "10.90.1.0/24", "192.168.1.11")]
    text = "\n".join(problems)
    assert len(problems) == 6
    for fragment in ("machine 2", "127.0.0.1 cannot be reached", "inside the container network",
                     "10.91.0.0/24 of machine 5 is outside", "machine None", "'not-an-ip' is not"):
        assert fragment in text


def test_names_and_derived_addresses():
    assert vxlan_name("x" * 40).startswith("ensv-") and len(vxlan_name("x" * 40)) == 15
    assert vtep_address("10.90.2.0/24") == "10.90.2.0"
    assert vtep_mac("10.90.2.0/24") == "0e:e5:0a:5a:02:00"
    with pytest.raises(OverlayError, match="unknown network mode"):
        Overlay("flannel", "e", CIDR, SUBNETS[0], "192.168.1.1")


def test_host_gw_routes_are_idempotent_repaired_and_removed(network):
    net = network
    hosts = wire(net, "host-gw")
    assert hosts[0].routes() == {SUBNETS[1]: (net.addresses[1], 2), SUBNETS[2]: (net.addresses[2], 2)}
    assert all(reachable(net, i, j) for i in range(3) for j in range(3) if i != j)
    assert not hosts[0].sync(peers_of(net, 0)).changed
    # Someone else's route in the same range is not ours to touch.
    with IPRoute(netns=net.hosts[0], flags=0) as ipr:
        ipr.route("add", dst="10.90.200.0", dst_len=24, gateway=net.addresses[1])
        ipr.route("del", dst="10.90.1.0", dst_len=24, proto=ROUTE_PROTO)
    assert not reachable(net, 0, 1)
    report = hosts[0].sync(peers_of(net, 0))
    assert report.added == [f"route {SUBNETS[1]} via {net.addresses[1]}"] and report.removed == []
    assert reachable(net, 0, 1)
    report = hosts[0].sync(peers_of(net, 0, hosts=(0, 2)))
    assert report.removed == [f"route {SUBNETS[1]}"]
    assert SUBNETS[1] not in hosts[0].routes()
    with IPRoute(netns=net.hosts[0], flags=0) as ipr:
        assert any(r.get_attr("RTA_DST") == "10.90.200.0" for r in ipr.get_routes(family=2))


@pytest.mark.routed
def test_host_gw_across_l3_says_why_and_still_routes_the_reachable(network):
    net = network
    # Hosts 0 and 2 share a segment; host 1 is behind the lab's router.
    report = overlays(net, "host-gw")[0].sync(peers_of(net, 0))
    assert report.added == [f"route {SUBNETS[2]} via {net.addresses[2]}"]
    assert len(report.errors) == 1
    assert "machine 1" in report.errors[0] and "one L2 network" in report.errors[0]


@pytest.mark.routed
def test_vxlan_entries_follow_the_peers_across_l3(network):
    net = network
    hosts = wire(net, "vxlan")
    device = vxlan_name("ovtest")
    assert hosts[0].container_mtu() == 1450
    assert bridge.bridge_state("ens-ovtest", net.hosts[0])["mtu"] == 1450
    neighbours, fdb = hosts[0].vxlan_entries()
    assert neighbours == {vtep_address(SUBNETS[j]): vtep_mac(SUBNETS[j]) for j in (1, 2)}
    assert fdb == {vtep_mac(SUBNETS[j]): net.addresses[j] for j in (1, 2)}
    assert all(reachable(net, i, j) for i in range(3) for j in range(3) if i != j)
    assert not hosts[1].sync(peers_of(net, 1)).changed
    # Host 2 goes: its entries go from host 0, and only they.
    report = hosts[0].sync(peers_of(net, 0, hosts=(0, 1)))
    assert sorted(report.removed) == sorted(
        [f"route {SUBNETS[2]}", f"neighbour {vtep_address(SUBNETS[2])}",
         f"fdb {vtep_mac(SUBNETS[2])} -> {net.addresses[2]}"]
    )
    assert hosts[0].vxlan_entries() == (
        {vtep_address(SUBNETS[1]): vtep_mac(SUBNETS[1])}, {vtep_mac(SUBNETS[1]): net.addresses[1]}
    )
    assert reachable(net, 0, 1) and not reachable(net, 0, 2)
    # A change of mode takes the device, and with it every entry, away.
    host_gw = Overlay("host-gw", "ovtest", CIDR, SUBNETS[0], net.addresses[0], netns=net.hosts[0])
    report = host_gw.sync([])
    assert f"device {device}" in report.removed
    assert host_gw.routes() == {}
    with IPRoute(netns=net.hosts[0], flags=0) as ipr:
        assert not ipr.link_lookup(ifname=device)


@pytest.mark.parametrize("mode", ["host-gw", "vxlan"])
def test_a_sync_from_peers_in_place_changes_their_paths_without_reading_the_kernels(network, mode, monkeypatch):
    """A machine added to 1,000 costs every host three entries, not a read of 3,000."""
    net = network
    hosts = wire(net, mode)
    one, both = peers_of(net, 0, hosts=(0, 1)), peers_of(net, 0)
    hosts[0].sync(one)
    assert not reachable(net, 0, 2)
    dumps = []
    for name in ("routes", "neighbours", "forwarding"):
        real = getattr(netlink_dumps, name)
        monkeypatch.setattr(netlink_dumps, name, lambda *a, _real=real, _name=name, **k: dumps.append(_name) or _real(*a, **k))
    report = hosts[0].sync(both, since=one)
    assert dumps == [] and report.errors == [] and report.removed == [] and report.paths == 2
    assert len(report.added) == (3 if mode == "vxlan" else 1)
    assert all(SUBNETS[2] in entry or vtep_address(SUBNETS[2]) in entry or vtep_mac(SUBNETS[2]) in entry
               for entry in report.added)
    assert reachable(net, 0, 2) and reachable(net, 0, 1)
    report = hosts[0].sync(one, since=both)
    assert dumps == [] and report.added == [] and len(report.removed) == (3 if mode == "vxlan" else 1)
    assert not reachable(net, 0, 2) and reachable(net, 0, 1)
    # What is changed by hand waits for a sync that reads the kernel's paths.
    with IPRoute(netns=net.hosts[0], flags=0) as ipr:
        ipr.route("del", dst="10.90.1.0", dst_len=24, proto=ROUTE_PROTO)
    assert not hosts[0].sync(one, since=one).changed and not reachable(net, 0, 1)
    report = hosts[0].sync(one)
    assert report.added and all(SUBNETS[1] in entry for entry in report.added) and reachable(net, 0, 1)


@pytest.mark.parametrize("mode", ["host-gw", "vxlan"])
@pytest.mark.parametrize("address,why", [
    ("127.0.0.1", "host address 127.0.0.1 cannot be reached from other hosts"),
    ("192.168.250.99", "host address 192.168.250.99 is not on any interface of this host"),
])
def test_no_paths_without_an_address_peers_can_route_back_to(network, mode, address, why):
    overlay = Overlay(mode, "ovtest", CIDR, SUBNETS[0], address, netns=network.hosts[0])
    report = overlay.sync(peers_of(network, 0))
    assert report.errors == [f"no paths to other machines: this machine's {why}"]
    assert overlay.routes() == {} and report.paths == 0
    with IPRoute(netns=network.hosts[0], flags=0) as ipr:
        assert not ipr.link_lookup(ifname=vxlan_name("ovtest"))


async def run_agent(zk_server, zk_root, ns):
    client = await ZKClient(zk_server.address, zk_root, session_timeout=SESSION_TIMEOUT).connect()
    agent = MachineAgent(client, 0, netns=ns, overlay=True)
    agent.resync_interval = 0.2
    await agent.start()
    return agent


async def network_error(client):
    return (await collect(client))["machines"][0].get("network-error")


@pytest_twisted.ensureDeferred
async def test_agent_forwards_only_once_it_has_a_path_to_another_machine(env_client, zk_server, zk_root):
    """A lone machine never gets forwarding switched on; a second machine's lease
    brings a route and forwarding; a host that cannot be reached is reported."""
    forwarding_here = ip_forwarding(None)
    machine = await MachineStateManager(env_client).get_machine(0)
    await machine.update(address="192.0.2.76")
    with temporary_netns() as ns:
        with IPRoute(netns=ns, flags=0) as ipr:
            # The "provider network" this host is on: a veth whose peer stays in the
            # same namespace, so nothing can leave it.
            ipr.link("add", ifname="uplink", kind="veth", peer={"ifname": "uplink-peer"})
            index = ipr.link_lookup(ifname="uplink")[0]
            ipr.link("set", index=ipr.link_lookup(ifname="uplink-peer")[0], state="up")
            ipr.addr("add", index=index, address="192.0.2.76", prefixlen=24)
            ipr.link("set", index=index, state="up")
        agent = await run_agent(zk_server, zk_root, ns)
        try:
            await task.deferLater(reactor, 0.5, lambda: None)
            assert agent.overlay.routes() == {}
            assert not ip_forwarding(ns)
            near = await MachineStateManager(env_client).add_machine(address="192.0.2.77")
            near_subnet = await lease_subnet(env_client, near.id)

            async def routed():
                return agent.overlay.routes().get(near_subnet)

            assert (await eventually(routed))[0] == "192.0.2.77"

            async def forwarding():
                return ip_forwarding(ns)

            # Switched on right after the route is in (overlay.py), not in the same step.
            assert await eventually(forwarding)
            far = await MachineStateManager(env_client).add_machine(address="198.51.100.7")
            far_subnet = await lease_subnet(env_client, far.id)
            error = await eventually(lambda: network_error(env_client))
            assert f"route to machine 2's {far_subnet} via 198.51.100.7" in error and "one L2 network" in error
            assert list(agent.overlay.routes()) == [near_subnet]
        finally:
            await agent.stop()
            await agent.client.close()
    assert ip_forwarding(None) == forwarding_here  # the machine's own: untouched


@pytest_twisted.ensureDeferred
async def test_a_loopback_machine_makes_no_paths_and_says_why(env_client, zk_server, zk_root):
    """Machine 0 of a local environment (127.0.0.1): another machine's lease must not
    produce routes or forwarding on the laptop."""
    with temporary_netns() as ns:
        agent = await run_agent(zk_server, zk_root, ns)
        try:
            other = await MachineStateManager(env_client).add_machine(address="192.0.2.77")
            await lease_subnet(env_client, other.id)
            error = await eventually(lambda: network_error(env_client))
            assert error == "no paths to other machines: this machine's host address 127.0.0.1 " \
                            "cannot be reached from other hosts"
            assert agent.overlay.routes() == {}
            assert not ip_forwarding(ns)
        finally:
            await agent.stop()
            await agent.client.close()


class _Machine:
    def __init__(self):
        self.data = {}

    async def update(self, **fields):
        self.data.update(fields)


class _Overlay:
    """Stands in for Overlay: records each sync as (machines, machines it changed
    from, None for a comparison with the kernel); `errors` are what the next ones report."""

    cidr = CIDR

    def __init__(self):
        self.syncs = []
        self.errors = []

    def sync(self, peers, since=None):
        self.syncs.append(([p.machine for p in peers], None if since is None else [p.machine for p in since]))
        return SyncReport(errors=list(self.errors), paths=len(peers) - len(self.errors))

    @property
    def compared(self):
        return [machines for machines, since in self.syncs if since is None]


def _leases(*machines):
    return {f"10.90.{m}.0/24": {"machine": m, "address": f"192.0.2.{m + 10}"} for m in machines}


@pytest_twisted.ensureDeferred
async def test_the_kernel_is_compared_when_drift_is_due_and_a_new_machine_changes_only_its_paths(monkeypatch):
    """With 1,000 machines a comparison reads thousands of entries: the resync tick
    makes one only every DRIFT_CHECK seconds, and a lease change only changes the paths
    of the machines that came or went, from the peers the last comparison found in
    place; a failure makes the next pass compare. Nor does a tick read the leases
    again (21 ms of the reactor's thread for 1,000 machines) while they have not changed."""
    monkeypatch.setattr(reconciler_module.namespaces, "ip_forwarding", lambda netns: True)
    read = []
    real = reconciler_module.peers_from_leases
    monkeypatch.setattr(reconciler_module, "peers_from_leases", lambda *args: read.append(args[0]) or real(*args))
    clock = task.Clock()
    host = SimpleNamespace(
        reactor=clock, name="machine-0", machine_id=0, netns=None, machine=_Machine(),
        in_thread=lambda f, *args: defer.maybeDeferred(f, *args),
    )
    reconciler = reconciler_module.OverlayReconciler(host)
    reconciler.overlay = fake = _Overlay()
    await reconciler._leases_changed(_leases(0, 1))
    assert fake.syncs == [([1], None)]
    for _ in range(int(reconciler_module.DRIFT_CHECK // MachineAgent.resync_interval) - 2):
        clock.advance(MachineAgent.resync_interval)
        await reconciler.tick()
    assert len(fake.syncs) == 1              # nothing changed: no tick looked
    assert read == [_leases(0, 1)]           # nor read the leases again
    await reconciler._leases_changed(_leases(0, 1, 2))
    assert fake.syncs[-1] == ([1, 2], [1])   # a new machine: at once, its paths alone
    await reconciler._leases_changed(_leases(0, 2))
    assert fake.syncs[-1] == ([2], [1, 2])
    clock.advance(MachineAgent.resync_interval)
    await reconciler.tick()
    assert fake.compared == [[1]]            # the minute counts from the comparison, not the change
    clock.advance(MachineAgent.resync_interval)
    await reconciler.tick()
    assert fake.compared == [[1], [2]]       # the drift check was due
    fake.errors = ["cannot add route to machine 3's subnet"]
    await reconciler._leases_changed(_leases(0, 2, 3) | {"x": {"machine": 9}})
    assert fake.syncs[-1] == ([2, 3], [2])
    assert "cannot add route" in host.machine.data["network-error"]
    clock.advance(MachineAgent.resync_interval)
    await reconciler.tick()
    assert fake.syncs[-1] == ([2, 3], None)  # what failed is compared on the next tick
    fake.errors = []
    clock.advance(MachineAgent.resync_interval)
    await reconciler.tick()
    assert fake.syncs[-1] == ([2, 3], None)
    assert "cannot add route" not in host.machine.data["network-error"]   # the bad lease still says why
    assert "lease 'x'" in host.machine.data["network-error"]
    assert len(read) == 4                    # once for each of the four lease sets
    syncs = len(fake.syncs)
    clock.advance(MachineAgent.resync_interval)
    await reconciler.tick()
    assert len(fake.syncs) == syncs          # and once it worked, the tick leaves it be