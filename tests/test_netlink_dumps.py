"""The kernel-filtered netlink dumps (ensemble/network/netlink_dumps.py) against
pyroute2's own dumps filtered in Python, in a namespace holding what a machine with
other machines in its environment holds: a bridge with unit ports and their entries,
and a VXLAN device with an entry per other machine in both of its tables."""

import subprocess

import pytest
from pyroute2 import IPRoute

from ensemble.network import bridge, netlink_dumps
from ensemble.network.overlay import Overlay, Peer

from netns import temporary_netns

BRIDGE = "ens-nld"
PEERS = 40
NUD_PERMANENT = 0x80


@pytest.fixture
def host():
    with temporary_netns() as ns:
        # No IPv6: its multicast entries come and go as interfaces come up, between the
        # two dumps each test compares.
        subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1",
                        "net.ipv6.conf.default.disable_ipv6=1"], check=True)
        with IPRoute(netns=ns, flags=0) as ipr:
            # The uplink: a veth whose peer stays here, so nothing leaves the namespace.
            ipr.link("add", ifname="uplink", kind="veth", peer={"ifname": "uplink-peer"})
            index = ipr.link_lookup(ifname="uplink")[0]
            ipr.addr("add", index=index, address="192.0.2.1", prefixlen=24)
            ipr.link("set", index=index, state="up")
        bridge.ensure_bridge(BRIDGE, "10.77.0.0/24", ns)
        peers = [Peer(i, f"10.77.{i}.0/24", f"192.0.2.{i + 1}") for i in range(1, PEERS + 1)]
        overlay = Overlay("vxlan", "nld", "10.77.0.0/16", "10.77.0.0/24", "192.0.2.1", ns)
        assert not overlay.sync(peers).errors
        with IPRoute(netns=ns, flags=0) as ipr:
            br = ipr.link_lookup(ifname=BRIDGE)[0]
            for n in range(2):
                ipr.link("add", ifname=f"ve-u{n}", kind="veth", peer={"ifname": f"vp-u{n}"})
                port = ipr.link_lookup(ifname=f"ve-u{n}")[0]
                ipr.link("set", index=port, master=br, state="up")
                ipr.fdb("replace", ifindex=port, lladdr=f"02:00:00:00:00:0{n}", flags=4, state=0x40)
                ipr.neigh("replace", dst=f"10.77.0.{n + 2}", lladdr=f"02:00:00:00:00:0{n}", ifindex=br, state=0x80)
            yield ns, ipr, br, ipr.link_lookup(ifname=overlay.device)[0]


def keys(entries):
    return sorted((e["ifindex"], e.get_attr("NDA_DST") or "", e.get_attr("NDA_LLADDR") or "", e["state"]) for e in entries)


def made(entries):
    """The permanent entries, which this fixture made: the kernel makes others of its own
    as interfaces come up (multicast, NOARP), at any moment between two dumps."""
    return [e for e in entries if e["state"] & NUD_PERMANENT]


def test_neighbours_of_one_device_are_the_kernels_whole_dump_filtered(host):
    _, ipr, br, vxlan = host
    everything = list(ipr.neigh("dump", family=2))
    for index, expected in ((br, 2), (vxlan, PEERS)):
        got = netlink_dumps.neighbours(ipr, index)
        assert all(e["ifindex"] == index for e in got)
        assert keys(made(got)) == keys(e for e in made(everything) if e["ifindex"] == index)
        assert len(made(got)) == expected
    assert len(made(everything)) >= 2 + PEERS


def test_forwarding_entries_of_a_bridge_or_of_one_port(host):
    _, ipr, br, vxlan = host
    everything = list(ipr.fdb("dump"))
    ports = {link["index"] for link in ipr.get_links() if link.get_attr("IFLA_MASTER") == br}
    of_bridge = netlink_dumps.forwarding(ipr, master=br)
    assert keys(of_bridge) == keys(e for e in everything if e["ifindex"] in ports | {br})
    assert {"02:00:00:00:00:00", "02:00:00:00:00:01"} <= {e.get_attr("NDA_LLADDR") for e in of_bridge}
    of_vxlan = netlink_dumps.forwarding(ipr, port=vxlan)
    assert keys(of_vxlan) == keys(e for e in everything if e["ifindex"] == vxlan)
    assert sum(1 for e in of_vxlan if e.get_attr("NDA_DST")) == PEERS
    assert not {e["ifindex"] for e in of_bridge} & {vxlan}


def test_routes_and_bridge_ports_are_the_libraries_own(host):
    _, ipr, br, _ = host
    ours = keys_of_routes(netlink_dumps.routes(ipr))
    assert ours == keys_of_routes(ipr.get_routes(family=2))
    assert sum(1 for r in ours if r[2] == 77) == PEERS   # the overlay's, by protocol
    ports = {link.get_attr("IFLA_IFNAME"): link.get_attr("IFLA_PROTINFO") is not None
             for link in netlink_dumps.bridge_ports(ipr) if link.get_attr("IFLA_MASTER") == br}
    assert ports == {"ve-u0": True, "ve-u1": True}


def keys_of_routes(routes):
    return sorted((r.get_attr("RTA_TABLE"), r.get_attr("RTA_DST") or "", r["proto"], r["dst_len"]) for r in routes)
