"""Layer 2 bound to each unit's identity: what the host's bridge takes from and gives
to a unit's port, as nftables objects in the firewall's `bridge` table (the firewall
loads them in the same atomic batch as the rest: ensemble/network/firewall.py).

Each unit here is a port entry (its host-side veth, its MAC, its address), known from
its reservation before its container exists (an interface name matches in nftables
whether or not the interface exists yet), so a unit's first frame already meets it.

From a unit's port (prerouting, before the bridge learns or forwards anything):
- IPv4 only with the port's MAC as source and its address as source;
- ARP only for Ethernet/IPv4, requests and replies, with that MAC and address as the
  sender (in the Ethernet header and in the ARP body);
- nothing else: no other ethertype (IPv6, VLAN tags, 0x88b5, ...), no other source.
From any other port of any bridge (another environment's units, say): no frame with
one of this environment's units' MACs, and none claiming an address of this subnet
(IPv4 or ARP sender) - those are this environment's units' alone. A unit port of ours
that has no entry yet is such a port: its traffic (from its own address) gets nothing
through.

To a unit's port (postrouting, after the bridge chose its ports, flooding included):
- IPv4 only to the port's MAC and address;
- ARP only about the port's address (broadcast requests for it, or unicast to its MAC);
- nothing else: another unit's broadcast ARP for a third address, multicast, IPv6.
So a frame that reaches a unit is one meant for that unit; what the host sends to a
unit's address goes to the port that owns it (with the static FDB and neighbour
entries of ensemble/network/bridge_ports.py, not to whoever answered ARP last).

Ports are told apart by name (`ve-` + a hash: machine/container/names.veth_name): the
bridge family here cannot match a port's bridge (no nft_meta_bridge), so each
environment checks the ports it knows and the identities (MACs, subnet) it owns.
"""

import netaddr

from ensemble.network.ipam import valid_mac
from ensemble.network.nft_json import match as _match, meta as _meta, payload as _payload

VETH_GLOB = "ve-*"
BROADCAST = "ff:ff:ff:ff:ff:ff"
# The sets, in the bridge table: (port, MAC, address), (port, address), port, MAC.
SETS = {
    "unit_ports": ["ifname", "ether_addr", "ipv4_addr"],
    "unit_hosts": ["ifname", "ipv4_addr"],
    "unit_ifnames": "ifname",
    "unit_macs": "ether_addr",
}
# Before the firewall's own bridge chain (prio 0) and the bridge's learning.
PRIORITY_IN = -300
PRIORITY_OUT = 300




def _concat(*items):
    return {"concat": list(items)}


def entries(ports):
    """The port entries (veth, MAC, address) `ports` holds, normalized and checked; a
    malformed one is left out (and so its port, if it exists, gets nothing through)."""
    found = set()
    for veth, mac, address in ports:
        mac = valid_mac(mac)
        try:
            ip = netaddr.IPAddress(address)
        except (netaddr.AddrFormatError, ValueError, TypeError):
            continue
        if mac is None or ip.version != 4 or not isinstance(veth, str) or not 0 < len(veth) <= 15:
            continue
        found.add((veth, mac, str(ip)))
    return sorted(found)


def elements(ports):
    """{set name: {element}} for `ports` ([(veth, MAC, address)]): a concatenation as a
    tuple."""
    ports = entries(ports)
    return {
        "unit_ports": set(ports),
        "unit_hosts": {(v, a) for v, _, a in ports},
        "unit_ifnames": {v for v, _, _ in ports},
        "unit_macs": {m for _, m, _ in ports},
    }


def rules(table, subnet=None):
    """The sets (empty: `elements` fills them), chains and rules in the bridge table
    `table`; `subnet`: this environment's unit subnet (CIDR) on this host, whose
    addresses no other port may claim (None: not checked)."""
    t = {"family": "bridge", "table": table}
    result = [{"set": {**t, "name": name, "type": type_}} for name, type_ in SETS.items()]

    def chain(name, hook=None, prio=0):
        body = {**t, "name": name}
        if hook:
            body.update(type="filter", hook=hook, prio=prio, policy="accept")
        result.append({"chain": body})

    def rule(chain_name, *expr):
        result.append({"rule": {**t, "chain": chain_name, "expr": list(expr)}})

    ether_type = _payload("ether", "type")
    arp_ethernet_ipv4 = [
        _match(_payload("arp", "htype"), 1),
        _match(_payload("arp", "ptype"), "ip"),
        _match(_payload("arp", "hlen"), 6),
        _match(_payload("arp", "plen"), 4),
        _match(_payload("arp", "operation"), {"set": ["request", "reply"]}),
    ]

    # From a port.
    chain("ports_in", "prerouting", PRIORITY_IN)
    chain("unit_port_in")
    rule("ports_in", _match(_meta("iifname"), "@unit_ifnames"), {"jump": {"target": "unit_port_in"}})
    rule("ports_in", _match(_payload("ether", "saddr"), "@unit_macs"), {"drop": None})
    if subnet is not None:
        network = netaddr.IPNetwork(subnet).cidr
        prefix = {"prefix": {"addr": str(network.network), "len": network.prefixlen}}
        rule("ports_in", _match(ether_type, "ip"), _match(_payload("ip", "saddr"), prefix), {"drop": None})
        rule("ports_in", _match(ether_type, "arp"), _match(_payload("arp", "saddr ip"), prefix), {"drop": None})
    rule("unit_port_in", _match(ether_type, "ip"),
         _match(_concat(_meta("iifname"), _payload("ether", "saddr"), _payload("ip", "saddr")), "@unit_ports"),
         {"accept": None})
    rule("unit_port_in", _match(ether_type, "arp"), *arp_ethernet_ipv4,
         _match(_concat(_meta("iifname"), _payload("ether", "saddr"), _payload("arp", "saddr ip")), "@unit_ports"),
         _match(_concat(_meta("iifname"), _payload("arp", "saddr ether"), _payload("arp", "saddr ip")), "@unit_ports"),
         {"accept": None})
    rule("unit_port_in", {"drop": None})

    # To a port.
    chain("ports_out", "postrouting", PRIORITY_OUT)
    chain("unit_port_out")
    rule("ports_out", _match(_meta("oifname"), "@unit_ifnames"), {"jump": {"target": "unit_port_out"}})
    rule("unit_port_out", _match(ether_type, "ip"),
         _match(_concat(_meta("oifname"), _payload("ether", "daddr"), _payload("ip", "daddr")), "@unit_ports"),
         {"accept": None})
    rule("unit_port_out", _match(ether_type, "arp"),
         _match(_concat(_meta("oifname"), _payload("ether", "daddr"), _payload("arp", "daddr ip")), "@unit_ports"),
         {"accept": None})
    rule("unit_port_out", _match(ether_type, "arp"), _match(_payload("ether", "daddr"), BROADCAST),
         _match(_concat(_meta("oifname"), _payload("arp", "daddr ip")), "@unit_hosts"),
         {"accept": None})
    rule("unit_port_out", {"drop": None})
    return result
