"""Cross-host paths to the other machines' subnets, programmed from their leases.

- host-gw: a route to each remote subnet via that machine's host address. Hosts must
  share one L2 network (on EC2: one subnet, source/destination check off).
- vxlan: one VXLAN device per host. For each remote machine: a route to its subnet via
  its VTEP address (the subnet's network address, on-link), a permanent neighbour entry
  (VTEP address -> VTEP MAC) and an FDB entry (VTEP MAC -> the machine's host address).
  Works across L3 networks; container MTU is the underlay's minus VXLAN_OVERHEAD.

VTEP MACs and addresses are derived from the subnet, so the lease (subnet + host
address) is all a machine needs to publish. Routes this module owns carry protocol
ROUTE_PROTO, so a sync can tell them from everyone else's and remove stale ones.
pyroute2 only; calls block for a netlink round trip each: agents run them in a thread.
"""

import dataclasses
import functools
import hashlib
import logging

import netaddr
from pyroute2.netlink.exceptions import NetlinkError

from ensemble.errors import EnsembleError
from ensemble.network import netlink_dumps
from ensemble.network.bridge import IFNAME_MAX, _index, _ipr, _kind

log = logging.getLogger("ensemble.overlay")

HOST_GW, VXLAN = "host-gw", "vxlan"
MODES = (HOST_GW, VXLAN)
ROUTE_PROTO = 77          # unregistered in /etc/iproute2/rt_protos: ours alone
VXLAN_PORT = 4789         # IANA's
VXLAN_OVERHEAD = 50       # outer Ethernet 14 + IPv4 20 + UDP 8 + VXLAN 8
NUD_PERMANENT = 0x80
RTNH_F_ONLINK = 4
MAIN_TABLE = 254
EEXIST, ESRCH, ENOENT, ENETUNREACH = 17, 3, 2, 101


class OverlayError(EnsembleError):
    pass


@dataclasses.dataclass(frozen=True)
class Peer:
    """A remote machine as its lease describes it."""

    machine: int
    subnet: str
    address: str


def validate_mode(mode):
    if mode not in MODES:
        raise OverlayError(f"unknown network mode {mode!r}: use {' or '.join(MODES)}")
    return mode


def vxlan_name(environment):
    """'ensv-<environment>', shortened with a hash to fit the 15-character limit."""
    name = f"ensv-{environment}"
    if len(name) <= IFNAME_MAX:
        return name
    return "ensv-" + hashlib.sha1(environment.encode()).hexdigest()[: IFNAME_MAX - 5]


def default_vni(environment):
    """A VXLAN network id from the environment's name (1 .. 2**24-1)."""
    return int(hashlib.sha1(environment.encode()).hexdigest()[:6], 16) % 0xFFFFFF or 1


# Cached: a sync works out both for every peer, and netaddr's parsing of 1,000
# subnets took 40 ms of each sync at 1,000 machines (bench/overlay_sync.py).
@functools.lru_cache(maxsize=8192)
def vtep_address(subnet):
    return str(netaddr.IPNetwork(subnet).network)


@functools.lru_cache(maxsize=8192)
def vtep_mac(subnet):
    """0e:e5 (locally administered, unicast) followed by the subnet's network address."""
    octets = netaddr.IPNetwork(subnet).network.words
    return "0e:e5:" + ":".join(f"{o:02x}" for o in octets)


def usable_host_address(address, cidr):
    """Why `address` cannot carry overlay traffic, or None if it can."""
    try:
        ip = netaddr.IPAddress(address)
    except (netaddr.AddrFormatError, ValueError, TypeError):
        return f"host address {address!r} is not an IPv4 address"
    if ip.version != 4:
        return f"host address {address} is not IPv4"
    if ip.is_loopback() or ip == netaddr.IPAddress("0.0.0.0") or ip.is_multicast():
        return f"host address {address} cannot be reached from other hosts"
    if ip in netaddr.IPNetwork(cidr):
        return f"host address {address} is inside the container network {cidr}"
    return None


def peers_from_leases(leases, machine_id, cidr):
    """(peers, problems) from {subnet: lease}: every other machine's lease that can be
    routed to, and one line for each that cannot (bad data must not stop the rest)."""
    peers, problems = [], []
    network = netaddr.IPNetwork(cidr)
    for subnet, lease in sorted(leases.items()):
        lease = lease if isinstance(lease, dict) else {}
        owner = lease.get("machine")
        if owner == machine_id:
            continue
        try:
            if netaddr.IPNetwork(subnet) not in network:
                problems.append(f"lease {subnet} of machine {owner} is outside {cidr}")
                continue
        except (netaddr.AddrFormatError, ValueError, TypeError):
            problems.append(f"lease {subnet!r} of machine {owner} is not a subnet")
            continue
        reason = usable_host_address(lease.get("address"), cidr)
        if reason:
            problems.append(f"machine {owner} ({subnet}): {reason}")
            continue
        peers.append(Peer(owner, subnet, lease["address"]))
    return peers, problems


@dataclasses.dataclass
class SyncReport:
    added: list = dataclasses.field(default_factory=list)
    removed: list = dataclasses.field(default_factory=list)
    errors: list = dataclasses.field(default_factory=list)
    paths: int = 0  # remote subnets this host has a path to after the sync

    @property
    def changed(self):
        return bool(self.added or self.removed)


def _holds(ipr, address):
    return any(a.get("address") == address for a in ipr.get_addr(family=2))


def _vxlan_entries(ipr, index):
    neighbours = {
        n.get_attr("NDA_DST"): n.get_attr("NDA_LLADDR")
        for n in netlink_dumps.neighbours(ipr, index)
        if n.get_attr("NDA_LLADDR")
    }
    # Only entries with a remote (NDA_DST) are ours; the kernel adds its own
    # multicast ones to the dump.
    fdb = {
        f.get_attr("NDA_LLADDR"): f.get_attr("NDA_DST")
        for f in netlink_dumps.forwarding(ipr, port=index)
        if f["ifindex"] == index and f.get_attr("NDA_DST")
    }
    return neighbours, fdb


class Overlay:
    """The paths from one host to its peers' subnets, in `netns` (None: this one)."""

    def __init__(self, mode, environment, cidr, subnet, address, netns=None, vni=None):
        self.mode = validate_mode(mode)
        self.cidr = str(netaddr.IPNetwork(cidr).cidr)
        self.subnet = subnet
        self.address = address
        self.netns = netns
        self.device = vxlan_name(environment)
        self.vni = vni or default_vni(environment)

    # -- what the host has -------------------------------------------------------------

    def underlay_mtu(self, ipr=None):
        """The MTU of the interface holding this host's address (None if none does)."""
        if ipr is None:
            with _ipr(self.netns) as ipr:
                return self.underlay_mtu(ipr)
        for addr in ipr.get_addr(family=2, address=self.address):
            return ipr.get_links(addr["index"])[0].get("mtu")
        return None

    def container_mtu(self, ipr=None):
        """What containers' veths should use: lower under VXLAN so packets fit."""
        if self.mode != VXLAN:
            return None
        return (self.underlay_mtu(ipr) or 1500) - VXLAN_OVERHEAD

    def routes(self):
        """{subnet: (gateway, device index)} of the routes this module owns."""
        with _ipr(self.netns) as ipr:
            return self._routes(ipr)

    def vxlan_entries(self):
        """({vtep address: mac} neighbours, {mac: host address} FDB) on the device."""
        with _ipr(self.netns) as ipr:
            index = _index(ipr, self.device)
            return ({}, {}) if index is None else _vxlan_entries(ipr, index)

    # -- making it so ------------------------------------------------------------------

    def sync(self, peers, since=None):
        """Make this host's paths exactly those to `peers`; returns a SyncReport. Each
        peer's failure is reported and the others still go in. With `since`, the peers
        whose paths the kernel was found to hold exactly: only the paths that differ
        between the two are changed, without reading the kernel's (up to three entries
        per machine); what someone changed by hand waits for a sync without."""
        report = SyncReport()
        with _ipr(self.netns) as ipr:
            # Peers route back to us by our address. Without a usable one (a laptop's
            # local environment records 127.0.0.1), or with one this host does not
            # have (a mistyped --address), no path can work, so none is made.
            unusable = usable_host_address(self.address, self.cidr)
            if unusable is None and not _holds(ipr, self.address):
                unusable = f"host address {self.address} is not on any interface of this host"
            wanted = self._wanted(peers)
            if unusable and wanted:
                report.errors.append(f"no paths to other machines: this machine's {unusable}")
                wanted = {}
            # Unusable now, usable before: the kernel's paths say which to remove.
            held = None if since is None or unusable else self._wanted(since)
            if self.mode == VXLAN and not unusable:
                index = self._ensure_device(ipr, report)
                if index is None:
                    return report
                if report.added or report.removed:
                    held = None  # a new device holds none of the old one's entries
                self._sync_vxlan_entries(ipr, index, wanted, report, held)
                desired = {s: (vtep_address(s), index) for s in wanted}
                held_routes = None if held is None else {s: (vtep_address(s), index) for s in held}
            else:
                self._remove_device(ipr, report)
                desired = {s: (p.address, None) for s, p in wanted.items()}
                held_routes = None if held is None else {s: (p.address, None) for s, p in held.items()}
            report.paths = self._sync_routes(ipr, desired, wanted, report, held_routes)
        return report

    def _wanted(self, peers):
        """{subnet: peer} of `peers` but this host."""
        return {p.subnet: p for p in peers if p.subnet != self.subnet}

    def _ensure_device(self, ipr, report):
        mtu = self.container_mtu(ipr)  # on the sync's own netlink socket
        index = _index(ipr, self.device)
        if index is not None:
            link = ipr.get_links(index)[0]
            data = link.get_attr("IFLA_LINKINFO").get_attr("IFLA_INFO_DATA") if _kind(link) == "vxlan" else None
            if (
                data is None
                or data.get_attr("IFLA_VXLAN_ID") != self.vni
                or data.get_attr("IFLA_VXLAN_LOCAL") != self.address
            ):
                # Wrong kind, id or local address (the host was re-addressed): rebuild.
                ipr.link("del", index=index)
                report.removed.append(f"device {self.device}")
                index = None
        if index is None:
            try:
                ipr.link(
                    "add", ifname=self.device, kind="vxlan", vxlan_id=self.vni,
                    vxlan_local=self.address, vxlan_port=VXLAN_PORT, vxlan_learning=0,
                )
            except NetlinkError as e:
                report.errors.append(f"cannot create {self.device}: {e}")
                return None
            index = _index(ipr, self.device)
            report.added.append(f"device {self.device}")
        link = ipr.get_links(index)[0]
        if link.get_attr("IFLA_ADDRESS") != vtep_mac(self.subnet) or link.get("mtu") != mtu or not link["flags"] & 1:
            ipr.link("set", index=index, address=vtep_mac(self.subnet), mtu=mtu, state="up")
        mine = vtep_address(self.subnet)
        present = {(a.get("address"), a.get("prefixlen")) for a in ipr.get_addr(index=index, family=2)}
        for address, prefixlen in present - {(mine, 32)}:
            ipr.addr("del", index=index, address=address, prefixlen=prefixlen)
        if (mine, 32) not in present:
            ipr.addr("add", index=index, address=mine, prefixlen=32)
        return index

    def _remove_device(self, ipr, report):
        index = _index(ipr, self.device)
        if index is not None:
            ipr.link("del", index=index)
            report.removed.append(f"device {self.device}")

    def _sync_vxlan_entries(self, ipr, index, wanted, report, held=None):
        """The device's entries made those of `wanted`, from those of `held` (the
        peers the kernel holds entries for) or, without, from the kernel's own."""
        if held is None:
            neighbours, fdb = _vxlan_entries(ipr, index)
        else:
            neighbours = {vtep_address(s): vtep_mac(s) for s in held}
            fdb = {vtep_mac(s): p.address for s, p in held.items()}
        want_neigh = {vtep_address(s): vtep_mac(s) for s in wanted}
        want_fdb = {vtep_mac(s): p.address for s, p in wanted.items()}
        for dst, mac in neighbours.items():
            if want_neigh.get(dst) != mac:
                self._quietly(ipr.neigh, "del", dst=dst, lladdr=mac, ifindex=index)
                report.removed.append(f"neighbour {dst}")
        for mac, dst in fdb.items():
            if want_fdb.get(mac) != dst:
                self._quietly(ipr.fdb, "del", ifindex=index, lladdr=mac, dst=dst)
                report.removed.append(f"fdb {mac} -> {dst}")
        for dst, mac in want_neigh.items():
            if neighbours.get(dst) != mac:
                ipr.neigh("replace", dst=dst, lladdr=mac, ifindex=index, state=NUD_PERMANENT)
                report.added.append(f"neighbour {dst}")
        for mac, dst in want_fdb.items():
            if fdb.get(mac) != dst:
                ipr.fdb("append", ifindex=index, lladdr=mac, dst=dst)
                report.added.append(f"fdb {mac} -> {dst}")

    def _sync_routes(self, ipr, desired, wanted, report, held=None):
        """Routes made those of `desired`, from `held` ({subnet: (gateway, oif)} the
        kernel holds) or, without, from the kernel's own."""
        present = self._routes(ipr) if held is None else dict(held)
        for subnet, (gateway, oif) in present.items():
            want = desired.get(subnet)
            if want is None or want[0] != gateway or (want[1] is not None and want[1] != oif):
                network = netaddr.IPNetwork(subnet)
                self._quietly(
                    ipr.route, "del", dst=str(network.network), dst_len=network.prefixlen,
                    table=MAIN_TABLE, proto=ROUTE_PROTO,
                )
                report.removed.append(f"route {subnet}")
                present[subnet] = None
        for subnet, (gateway, oif) in sorted(desired.items()):
            if present.get(subnet) is not None:
                continue
            network = netaddr.IPNetwork(subnet)
            route = dict(
                dst=str(network.network), dst_len=network.prefixlen, gateway=gateway,
                table=MAIN_TABLE, proto=ROUTE_PROTO,
            )
            if oif is not None:
                route.update(oif=oif, flags=RTNH_F_ONLINK)
            try:
                ipr.route("replace", **route)
            except NetlinkError as e:
                report.errors.append(self._route_error(wanted[subnet], e))
                continue
            present[subnet] = (gateway, oif)
            report.added.append(f"route {subnet} via {gateway}")
        return sum(1 for subnet in desired if present.get(subnet) is not None)

    def _routes(self, ipr):
        network = netaddr.IPNetwork(self.cidr)
        found = {}
        for route in netlink_dumps.routes(ipr):
            dst = route.get_attr("RTA_DST")
            if route["proto"] != ROUTE_PROTO or route.get_attr("RTA_TABLE") != MAIN_TABLE or dst is None:
                continue
            subnet = f"{dst}/{route['dst_len']}"
            if netaddr.IPNetwork(subnet) in network:
                found[subnet] = (route.get_attr("RTA_GATEWAY"), route.get_attr("RTA_OIF"))
        return found

    def _route_error(self, peer, error):
        where = f"route to machine {peer.machine}'s {peer.subnet} via {peer.address}"
        if self.mode == HOST_GW and error.code == ENETUNREACH:
            return (f"cannot add {where}: {peer.address} is not on a network this host is attached to; "
                    f"host-gw needs every host on one L2 network (use --network-mode vxlan)")
        return f"cannot add {where}: {error}"

    @staticmethod
    def _quietly(call, *args, **kwargs):
        # Gone already (someone else removed it): the goal is met.
        try:
            call(*args, **kwargs)
        except NetlinkError as e:
            if e.code not in (ESRCH, ENOENT):
                raise

    def remove(self):
        """Take every path this module made away (its routes and the VXLAN device)."""
        with _ipr(self.netns) as ipr:
            for subnet in self._routes(ipr):
                network = netaddr.IPNetwork(subnet)
                self._quietly(
                    ipr.route, "del", dst=str(network.network), dst_len=network.prefixlen,
                    table=MAIN_TABLE, proto=ROUTE_PROTO,
                )
            index = _index(ipr, self.device)
            if index is not None:
                ipr.link("del", index=index)
