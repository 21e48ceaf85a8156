"""Cross-host container networking, in a lab of simulated hosts (ensemble/lab.py): three
hosts, each running its own `ensemble machine-agent` process, two echo units on each.

One lab per mode, shared by the tests of this module in order: the mesh first, then an
agent killed and restarted, then a machine removed.
"""

import os
import signal

import netaddr
import pytest
from pyroute2 import IPRoute

from ensemble.lab import Lab
from ensemble.network.overlay import ROUTE_PROTO, Overlay, vtep_address, vtep_mac

ECHO = os.path.join(os.path.dirname(__file__), "..", "examples", "charms", "echo")
PORT = 7000
HOSTS = 3
UNITS = [f"echo/{n}" for n in range(2 * HOSTS)]
# TEST-NET addresses: no packet goes to them; the kernel is only asked for a route.
OUTSIDE = ["192.0.2.1", "198.51.100.1", "203.0.113.1", "8.8.8.8"]


@pytest.fixture(scope="module", params=["host-gw", "vxlan"])
def lab(request, tmp_path_factory):
    lab = Lab(tmp_path_factory.mktemp(f"lab-{request.param}"), hosts=HOSTS, mode=request.param)
    with lab:
        lab.ensemble("deploy", ECHO, "--to", "0", "-n", "2")
        for i in range(1, HOSTS):
            lab.ensemble("add-unit", "echo", "--to", str(i), "-n", "2")
        lab.wait_started(UNITS)
        yield lab


def overlay_of(lab, i):
    subnet = lab.machine(i)["subnet"]
    return Overlay(lab.mode, lab.environment, lab.cidr, subnet, lab.network.addresses[i], lab.network.hosts[i])


def placement(lab):
    """{unit: (host index, container, address)}."""
    return {
        name: (int(unit["machine"]), unit["container"], unit["private-address"])
        for name, unit in lab.units().items()
    }


def mesh(lab, sources=None, targets=None):
    """{(from, to): answer} for TCP from each source unit to each target's address."""
    units = placement(lab)
    sources = sources or sorted(units)
    targets = targets or sorted(units)
    answers = {}
    for source in sources:
        host, container, _ = units[source]
        got = lab.probe(host, container, [units[t][2] for t in targets], PORT)
        for target in targets:
            answers[(source, target)] = got[units[target][2]]
    return answers


def assert_full_mesh(answers):
    wrong = {pair: answer for pair, answer in answers.items() if answer != pair[1]}
    assert not wrong, f"{len(wrong)} of {len(answers)} pairs failed: {wrong}"


def expected_paths(lab, i, hosts):
    """What host i should have for the other `hosts` (indices): routes, and under vxlan
    neighbour and FDB entries."""
    machines = lab.status()["machines"]
    routes, neighbours, fdb = {}, {}, {}
    for j in hosts:
        if j == i:
            continue
        subnet, address = machines[str(j)]["subnet"], machines[str(j)]["address"]
        if lab.mode == "vxlan":
            routes[subnet] = vtep_address(subnet)
            neighbours[vtep_address(subnet)] = vtep_mac(subnet)
            fdb[vtep_mac(subnet)] = address
        else:
            routes[subnet] = address
    return routes, neighbours, fdb


def actual_paths(lab, i):
    overlay = overlay_of(lab, i)
    routes = {subnet: gateway for subnet, (gateway, _) in overlay.routes().items()}
    neighbours, fdb = overlay.vxlan_entries()
    return routes, neighbours, fdb


def test_every_unit_reaches_every_other_at_its_published_address(lab):
    units = placement(lab)
    assert sorted(units) == UNITS
    # Two units per host, each in its host's subnet.
    for name, (host, _, address) in units.items():
        assert netaddr.IPAddress(address) in netaddr.IPNetwork(lab.machine(host)["subnet"]), name
    assert sorted(h for h, _, _ in units.values()) == [0, 0, 1, 1, 2, 2]
    answers = mesh(lab)
    assert len(answers) == len(UNITS) ** 2
    assert_full_mesh(answers)
    for i in range(HOSTS):
        assert actual_paths(lab, i) == expected_paths(lab, i, range(HOSTS))
        assert "network-error" not in lab.machine(i)


def test_vxlan_lowers_the_container_mtu(lab):
    host, container, _ = placement(lab)["echo/2"]
    result = lab.container_run(host, container, ["cat", "/sys/class/net/eth0/mtu"])
    assert result.returncode == 0, result.stderr
    # The lab's provider links are 1500: VXLAN needs 50 bytes of each packet.
    assert int(result.stdout) == (1450 if lab.mode == "vxlan" else 1500)


def test_units_reach_zookeeper_and_nothing_outside_the_lab(lab):
    host, container, _ = placement(lab)["echo/2"]
    assert host == 1
    # Units are told host 0's container gateway: reached across the overlay.
    zookeeper = str(netaddr.IPNetwork(lab.machine(0)["subnet"]).network + 1)
    ask = (
        "import socket, sys; s = socket.create_connection((sys.argv[1], 2181), timeout=3); "
        "s.sendall(b'ruok'); print(s.recv(10).decode())"
    )
    result = lab.container_run(host, container, ["/usr/bin/python3", "-c", ask, zookeeper])
    assert result.stdout.strip() == "imok", result.stderr
    # Across machines too the firewall follows relations: echo's units are peers, so
    # echo/2 reaches echo/0 on a port echo did not open (nothing listens there: the
    # answer is a refusal, where the firewall would have dropped it).
    target = placement(lab)["echo/0"][2]
    assert "refused" in lab.probe(host, container, [target], 7001)[target]
    # Host 1 is not related to echo: it reaches echo/0 (on host 0) on its opened port
    # only while echo is exposed, and on other ports never.
    assert not lab.connect_from_host(1, target, PORT)
    lab.ensemble("expose", "echo")
    lab.wait_for(lambda: lab.connect_from_host(1, target, PORT), 30, "echo/0's port exposed")
    assert not lab.connect_from_host(1, target, 7001)
    lab.ensemble("unexpose", "echo")
    lab.wait_for(lambda: not lab.connect_from_host(1, target, PORT), 30, "echo/0's port closed again")
    # The unit on host 1 reached units on hosts 0 and 2 in the mesh test. Outside:
    # route lookups (no packet is sent). A host's only way anywhere else is the lab
    # namespace (the routed lab's default gateway), and the lab namespace has none.
    routers = {str(lab.network.segment(n).network + 1) for n in range(2)}
    for i, netns in enumerate(lab.network.hosts):
        for address in OUTSIDE:
            route = lab.network.route_lookup(netns, address)
            assert route is None or route.get_attr("RTA_GATEWAY") in routers, (netns, address)
    for address in OUTSIDE:
        assert lab.network.route_lookup(lab.network.lab, address) is None, address
    # Only the provider bridges and the hosts' veths: no link to the machine's own namespace.
    with IPRoute(netns=lab.network.lab, flags=0) as ipr:
        names = sorted(link.get_attr("IFLA_IFNAME") for link in ipr.get_links())
    assert names == sorted(["lo", *(f"prov{n}" for n in range(2 if lab.network.routed else 1)),
                            *(f"h{i}" for i in range(HOSTS))])


def test_killed_agent_keeps_traffic_flowing_and_converges_on_restart(lab):
    units = placement(lab)
    on = {h: sorted(u for u, (host, _, _) in units.items() if host == h) for h in range(HOSTS)}
    lab.stop_agent(2, signal.SIGKILL)
    # While it is down, a path of host 2's goes missing by hand.
    overlay = overlay_of(lab, 2)
    lost = lab.machine(0)["subnet"]
    with IPRoute(netns=lab.network.hosts[2], flags=0) as ipr:
        network = netaddr.IPNetwork(lost)
        ipr.route("del", dst=str(network.network), dst_len=network.prefixlen, proto=ROUTE_PROTO)
    assert lost not in overlay.routes()
    # The others do not depend on host 2's agent.
    assert_full_mesh(mesh(lab, on[0] + on[1], on[0] + on[1]))
    # Host 2's containers still answer units on host 1 (its route to host 1 is intact).
    assert_full_mesh(mesh(lab, on[1], on[2]))
    lab.start_agent(2)
    lab.wait_for(lambda: actual_paths(lab, 2) == expected_paths(lab, 2, range(HOSTS)), 60, "host 2's paths back")
    assert lab.machine(2)["agent"] == "alive"
    assert_full_mesh(mesh(lab))


def test_removing_a_machine_removes_its_paths_everywhere(lab):
    units = placement(lab)
    gone = sorted(u for u, (host, _, _) in units.items() if host == 2)
    subnet, address = lab.machine(2)["subnet"], lab.network.addresses[2]
    lab.ensemble("remove-unit", *gone)
    lab.wait_for(lambda: not set(gone) & set(lab.units()), 90, "host 2's units to go")
    lab.stop_agent(2)
    lab.wait_for(lambda: lab.machine(2).get("agent") == "down", 30, "host 2's agent to be down")
    lab.ensemble("remove-machine", "2")

    def clean():
        for i in (0, 1):
            routes, neighbours, fdb = actual_paths(lab, i)
            if subnet in routes or vtep_address(subnet) in neighbours or address in fdb.values():
                return False
        return True

    lab.wait_for(clean, 30, "hosts 0 and 1 to drop host 2's paths")
    for i in (0, 1):
        assert actual_paths(lab, i) == expected_paths(lab, i, (0, 1))
    assert_full_mesh(mesh(lab))
