"""The host bridge that containers' veths join, and cleanup of stale veth ends.

pyroute2 only; nothing shells out to `ip`. Calls are blocking netlink round trips of a
millisecond or so: agents run them through a thread. `netns` names a network
namespace to act in (tests, labs); None is the caller's own.
"""

import hashlib
from contextlib import contextmanager

import netaddr
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from ensemble.errors import EnsembleError

IFNAME_MAX = 15
EEXIST, ENODEV = 17, 19
# Host-side veth names that LXC is told to use for our containers.
VETH_PREFIX = "ve-"


class BridgeError(EnsembleError):
    pass


def bridge_name(environment):
    """'ens-<environment>', shortened with a hash to fit the 15-character limit."""
    name = f"ens-{environment}"
    if len(name) <= IFNAME_MAX:
        return name
    return "ens-" + hashlib.sha1(environment.encode()).hexdigest()[: IFNAME_MAX - 4]


@contextmanager
def _ipr(netns):
    # flags=0: never create a namespace by accident (pyroute2 would, silently).
    ipr = IPRoute(netns=netns, flags=0) if netns else IPRoute()
    try:
        yield ipr
    finally:
        ipr.close()


def _index(ipr, name):
    found = ipr.link_lookup(ifname=name)
    return found[0] if found else None


def _kind(link):
    info = link.get_attr("IFLA_LINKINFO")
    return info.get_attr("IFLA_INFO_KIND") if info else None


def gateway_of(subnet):
    """The subnet's .1: the bridge's address and the containers' gateway."""
    return str(netaddr.IPNetwork(subnet).network + 1)


def bridge_mac(name, subnet):
    """A fixed, locally administered MAC for the bridge. Without one a Linux bridge
    takes the lowest MAC of its ports: removing that unit's veth would change the
    gateway's MAC under every other unit, cutting them off until their ARP entries
    expire (long enough for their ZooKeeper sessions to)."""
    digest = hashlib.sha256(f"{name}/{netaddr.IPNetwork(subnet).cidr}".encode()).digest()
    return ":".join(f"{b:02x}" for b in (0x02,) + tuple(digest[:5]))


def ensure_bridge(name, subnet, netns=None, mtu=None):
    """Make bridge `name` exist, up, with a fixed MAC (`bridge_mac`), holding the
    subnet's gateway (.1). Idempotent; returns the gateway address."""
    if len(name) > IFNAME_MAX:
        raise BridgeError(f"interface name {name!r} is longer than {IFNAME_MAX} characters")
    network = netaddr.IPNetwork(subnet)
    gateway = gateway_of(subnet)
    with _ipr(netns) as ipr:
        index = _index(ipr, name)
        if index is None:
            try:
                ipr.link("add", ifname=name, kind="bridge")
            except NetlinkError as e:
                if e.code != EEXIST:
                    raise BridgeError(f"cannot create bridge {name}: {e}")
            index = _index(ipr, name)
        else:
            link = ipr.get_links(index)[0]
            if _kind(link) != "bridge":
                raise BridgeError(f"{name} exists and is not a bridge")
        present = {(a.get("address"), a.get("prefixlen")) for a in ipr.get_addr(index=index, family=2)}
        if (gateway, network.prefixlen) not in present:
            try:
                ipr.addr("add", index=index, address=gateway, prefixlen=network.prefixlen)
            except NetlinkError as e:
                if e.code != EEXIST:
                    raise BridgeError(f"cannot give {name} the address {gateway}/{network.prefixlen}: {e}")
        settings = {"state": "up"}
        mac = bridge_mac(name, subnet)
        if ipr.get_links(index)[0].get_attr("IFLA_ADDRESS") != mac:
            settings["address"] = mac
        if mtu:
            settings["mtu"] = mtu
        ipr.link("set", index=index, **settings)
    return gateway


def bridge_state(name, netns=None):
    """{'addresses': [...], 'up': bool, 'mtu': n} or None if there is no such bridge."""
    with _ipr(netns) as ipr:
        index = _index(ipr, name)
        if index is None:
            return None
        link = ipr.get_links(index)[0]
        addresses = [
            f"{a.get('address')}/{a.get('prefixlen')}" for a in ipr.get_addr(index=index, family=2)
        ]
        return {
            "kind": _kind(link),
            "mac": link.get_attr("IFLA_ADDRESS"),
            "addresses": sorted(addresses),
            "up": bool(link["flags"] & 1),
            "mtu": link.get("mtu"),
        }


def remove_bridge(name, netns=None):
    """Delete the bridge; True if it existed."""
    with _ipr(netns) as ipr:
        index = _index(ipr, name)
        if index is None:
            return False
        try:
            ipr.link("del", index=index)
        except NetlinkError as e:
            if e.code != ENODEV:
                raise BridgeError(f"cannot remove bridge {name}: {e}")
        return True


def attached_veths(bridge, netns=None):
    """Names of the veth ends enslaved to `bridge`."""
    with _ipr(netns) as ipr:
        index = _index(ipr, bridge)
        if index is None:
            return []
        return sorted(
            link.get("ifname")
            for link in ipr.get_links()
            if link.get("master") == index and _kind(link) == "veth"
        )


def remove_stale_veths(bridge, keep, netns=None):
    """Delete our veth ends on `bridge` that belong to no container in `keep` (the
    host-side names of live containers); returns what was removed. Veths not named
    by us are left alone."""
    removed = []
    stale = [v for v in attached_veths(bridge, netns) if v.startswith(VETH_PREFIX) and v not in keep]
    if not stale:
        return removed
    with _ipr(netns) as ipr:
        for name in stale:
            index = _index(ipr, name)
            if index is None:
                continue
            try:
                ipr.link("del", index=index)
                removed.append(name)
            except NetlinkError as e:
                if e.code != ENODEV:
                    raise BridgeError(f"cannot remove stale veth {name}: {e}")
    return removed


def host_routes(netns=None):
    """IPv4 networks this host already reaches directly or by route (for overlap checks)."""
    networks = []
    with _ipr(netns) as ipr:
        for route in ipr.get_routes(family=2, table=254):
            dst = route.get_attr("RTA_DST")
            if dst:
                networks.append(f"{dst}/{route['dst_len']}")
        for addr in ipr.get_addr(family=2):
            networks.append(str(netaddr.IPNetwork(f"{addr.get('address')}/{addr.get('prefixlen')}").cidr))
    return sorted(set(networks))
