"""The bridge's side of each unit's identity, through netlink (pyroute2; nothing shells
out to `ip` or `bridge`): learning and unknown-unicast flooding off on unit ports, a
static forwarding entry for each unit's MAC on its own port, and a permanent neighbour
entry on the bridge for each unit's address, so that neither the bridge's forwarding
table nor the host's neighbour table takes anything a unit says about itself or others.
(The nftables port filter, ensemble/network/port_filter.py, keeps forged frames from
reaching either; these entries make the tables right by construction.)

Blocking netlink round trips: agents run them in a thread. `netns`: a named namespace to
act in (None: this one).
"""

import ipaddress
from dataclasses import dataclass

from pyroute2.netlink.exceptions import NetlinkError

from ensemble.network import netlink_dumps
from ensemble.network.bridge import _index, _ipr

NUD_NOARP, NUD_PERMANENT = 0x40, 0x80   # a bridge's "static" entry; "permanent" (local / neighbour)
NTF_MASTER = 0x04
ENOENT, ENODEV = 2, 19


@dataclass(frozen=True)
class UnitPort:
    """A unit's identity on the bridge: its host-side veth, MAC and address."""
    port: str
    mac: str
    address: str


class _Forwarding:
    """The bridge's forwarding entries, (port index, MAC, state), by port and by MAC."""

    def __init__(self, entries):
        self.on_port, self.of_mac = {}, {}
        for entry in entries:
            self.on_port.setdefault(entry[0], []).append(entry)
            self.of_mac.setdefault(entry[1], []).append(entry)


def _fdb(ipr, bridge_index, port=None):
    """[(port index, MAC, state)] of the bridge's forwarding entries (its own local ones
    included), or of those on its port of index `port` alone."""
    entries = []
    for entry in netlink_dumps.forwarding(ipr, master=bridge_index, port=port):
        # The bridge device's own entries come too, without NDA_MASTER.
        if entry.get_attr("NDA_MASTER") != bridge_index or entry.get_attr("NDA_VLAN") is not None:
            continue
        entries.append((entry["ifindex"], (entry.get_attr("NDA_LLADDR") or "").lower(), entry["state"]))
    return entries


def _neighbours(ipr, bridge_index):
    """{address: (MAC, state)} of the IPv4 neighbour entries on the bridge."""
    return {
        n.get_attr("NDA_DST"): ((n.get_attr("NDA_LLADDR") or "").lower(), n["state"])
        for n in netlink_dumps.neighbours(ipr, bridge_index)
        if n.get_attr("NDA_DST")
    }


def _quietly(call, *args, **kwargs):
    try:
        call(*args, **kwargs)
    except NetlinkError as e:
        if e.code not in (ENOENT, ENODEV):
            raise


def secure(bridge, units, subnet=None, netns=None):
    """Make the bridge hold each of `units` (UnitPort) to its identity: the permanent
    neighbour entry for every unit; for each unit whose port exists (its container runs),
    learning and unknown-unicast flooding off and the static forwarding entry of its MAC
    on its port and nowhere else, and no other entry learned on its port. Neighbour
    entries this made for addresses of `subnet` that no unit holds any more are removed.

    Returns {port: why not} for the ports that exist and could not be secured; a port
    that does not exist is not a problem (it has nothing to secure yet), nor is a bridge
    that does not exist (nothing reaches a unit through it; its own layer says so)."""
    problems = {}
    with _ipr(netns) as ipr:
        bridge_index = _index(ipr, bridge)
        if bridge_index is None:
            return problems
        wanted = {u.address: u.mac for u in units}
        network = ipaddress.IPv4Network(subnet, strict=False) if subnet else None
        for address, (mac, state) in _neighbours(ipr, bridge_index).items():
            if address in wanted:
                if (mac, state) != (wanted[address], NUD_PERMANENT):
                    ipr.neigh("replace", dst=address, lladdr=wanted[address], ifindex=bridge_index,
                              state=NUD_PERMANENT)
                del wanted[address]
            elif state & NUD_PERMANENT and network is not None and ipaddress.IPv4Address(address) in network:
                _quietly(ipr.neigh, "del", dst=address, lladdr=mac, ifindex=bridge_index)
        for address, mac in wanted.items():
            ipr.neigh("replace", dst=address, lladdr=mac, ifindex=bridge_index, state=NUD_PERMANENT)

        # One dump each of the bridge's ports and forwarding entries, whatever the
        # number of units: a lookup per port made a pass over 250 units take seconds.
        ports = _ports(ipr, bridge_index)
        fdb = _Forwarding(_fdb(ipr, bridge_index))
        for unit in units:
            port = ports.get(unit.port)
            # Missing, or not a port yet (LXC makes the veth, then enslaves it, while a
            # start is under way): nothing of it reaches the bridge. The pass right after
            # the start holds it.
            if port is None:
                continue
            try:
                _secure_port(ipr, port, unit, fdb)
            except NetlinkError as e:
                problems[unit.port] = str(e) or type(e).__name__
    return problems


def secure_unit(bridge, unit, netns=None):
    """secure() for one unit whose container has just started, and nothing else of the
    bridge's: its neighbour entry, and its port held to its MAC. Why not, or None (also
    when there is no such bridge or port). What is stale elsewhere is a pass's to undo."""
    with _ipr(netns) as ipr:
        bridge_index = _index(ipr, bridge)
        if bridge_index is None:
            return None
        try:
            ipr.neigh("replace", dst=unit.address, lladdr=unit.mac, ifindex=bridge_index, state=NUD_PERMANENT)
            port = _port(ipr, bridge_index, unit.port)
            if port is not None:
                # Its port's entries alone, not the bridge's: a bridge holds one entry per
                # MAC, so the static one made on this port takes the unit's MAC from
                # wherever else it was learned.
                _secure_port(ipr, port, unit, _Forwarding(_fdb(ipr, bridge_index, port=port[0])))
        except NetlinkError as e:
            return str(e) or type(e).__name__
    return None


def _port(ipr, bridge_index, name):
    """(index, bridge port settings) of the bridge's port `name`, or None: one request,
    whatever the number of ports (a dump of them all took 9 ms at 31 units, each deploy)."""
    try:
        (link,) = ipr.link("get", ifname=name)
    except NetlinkError as e:
        if e.code == ENODEV:
            return None
        raise
    if link.get_attr("IFLA_MASTER") != bridge_index:
        return None
    info = link.get_attr("IFLA_LINKINFO")
    if info is None or info.get_attr("IFLA_INFO_SLAVE_KIND") != "bridge":
        return link["index"], None
    return link["index"], info.get_attr("IFLA_INFO_SLAVE_DATA")


def _ports(ipr, bridge_index):
    """{name: (index, protinfo)} of the bridge's ports."""
    found = {}
    for link in netlink_dumps.bridge_ports(ipr):
        if link.get_attr("IFLA_MASTER") == bridge_index:
            found[link.get_attr("IFLA_IFNAME")] = (link["index"], link.get_attr("IFLA_PROTINFO"))
    return found


def _secure_port(ipr, port, unit, fdb):
    index, info = port
    if info is None or info.get_attr("IFLA_BRPORT_LEARNING") != 0 or info.get_attr("IFLA_BRPORT_UNICAST_FLOOD") != 0:
        ipr.brport("set", index=index, learning=0, unicast_flood=0)
    present = False
    for entry in fdb.on_port.get(index, []) + [e for e in fdb.of_mac.get(unit.mac, []) if e[0] != index]:
        port_index, mac, state = entry
        if state & NUD_PERMANENT:
            continue  # the bridge's own (the ports' MACs, multicast groups)
        if port_index == index and mac == unit.mac and state & NUD_NOARP:
            present = True
        else:
            # Learned on its port before learning was off, or its MAC anywhere else.
            _quietly(ipr.fdb, "del", ifindex=port_index, lladdr=mac, flags=NTF_MASTER)
    if not present:
        ipr.fdb("replace", ifindex=index, lladdr=unit.mac, flags=NTF_MASTER, state=NUD_NOARP)


def state(bridge, netns=None):
    """What the bridge holds now, for checks and tests: {'ports': {port: {'learning',
    'unicast_flood'}}, 'fdb': {MAC: [(port, 'static'|'learned'|'local')]},
    'neighbours': {address: (MAC, 'permanent'|other state number)}}."""
    with _ipr(netns) as ipr:
        bridge_index = _index(ipr, bridge)
        if bridge_index is None:
            return None
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        ports = {
            name: {
                "learning": bool(info.get_attr("IFLA_BRPORT_LEARNING")),
                "unicast_flood": bool(info.get_attr("IFLA_BRPORT_UNICAST_FLOOD")),
            }
            for name, (_, info) in _ports(ipr, bridge_index).items() if info is not None
        }
        fdb = {}
        for port, mac, st in _fdb(ipr, bridge_index):
            kind = "local" if st & NUD_PERMANENT else "static" if st & NUD_NOARP else "learned"
            fdb.setdefault(mac, []).append((names.get(port, port), kind))
        neighbours = {
            address: (mac, "permanent" if st & NUD_PERMANENT else st)
            for address, (mac, st) in _neighbours(ipr, bridge_index).items()
        }
        return {"ports": ports, "fdb": fdb, "neighbours": neighbours}
