"""Netlink dumps that cost what they return.

pyroute2's own dumps (0.9.7) turn its event loop once for every message, about
0.1 ms each, and filter in Python after the kernel has sent every entry on the host:
with 1,000 machines in an environment, the host's VXLAN device holds an entry for
each other machine in both its neighbour and its forwarding table, and a machine
agent's layer-2 pass spent most of its time reading those to find its bridge's few.
These ask the kernel to filter where it can (one device's neighbours, one bridge's or
one port's forwarding entries) and read the whole answer in one turn.

Blocking netlink round trips, on an IPRoute the caller holds: agents run them in a
thread.
"""

import itertools

from pyroute2.netlink import NLM_F_DUMP, NLM_F_REQUEST
from pyroute2.netlink.rtnl import RTM_GETLINK, RTM_GETNEIGH, RTM_GETROUTE
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
from pyroute2.netlink.rtnl.ndmsg import ndmsg
from pyroute2.netlink.rtnl.rtmsg import rtmsg

AF_INET, AF_BRIDGE = 2, 7

# Sequence numbers of our own, far above those pyroute2 allocates for its requests on
# the same socket, so that neither takes the other's answer.
_sequence = itertools.count(0x40000000)


def _dump(ipr, msg, msg_type):
    # Not ipr.nlm_request: in pyroute2 0.9.7 its synchronous form fails (KeyError
    # 'nlm_generator') and its generator form is the per-message cost above.
    seq = next(_sequence) & 0x7FFFFFFF
    ipr.put(msg, msg_type, msg_flags=NLM_F_REQUEST | NLM_F_DUMP, msg_seq=seq)
    return list(ipr.get(msg_seq=seq))


def neighbours(ipr, index, family=AF_INET):
    """The neighbour entries of device `index` alone (the kernel filters on
    NDA_IFINDEX, strict checking or not)."""
    msg = ndmsg()
    msg["family"] = family
    msg["attrs"] = [("NDA_IFINDEX", index)]
    return [entry for entry in _dump(ipr, msg, RTM_GETNEIGH) if entry["ifindex"] == index]


def forwarding(ipr, master=None, port=None):
    """Forwarding-database entries: those of bridge `master` and its ports, or those
    of device `port` alone (with both, those of `port` that `master` holds). The request is the ifinfomsg form `bridge fdb show br|dev`
    sends, which kernels filter on without strict checking."""
    msg = ifinfmsg()
    msg["family"] = AF_BRIDGE
    if port is not None:
        msg["index"] = port
    if master is not None:
        msg["attrs"] = [("IFLA_MASTER", master)]
    return _dump(ipr, msg, RTM_GETNEIGH)


def routes(ipr, family=AF_INET):
    """Every route of `family`, all tables (without strict checking the kernel does
    not filter route dumps: callers pick theirs)."""
    msg = rtmsg()
    msg["family"] = family
    return _dump(ipr, msg, RTM_GETROUTE)


def bridge_ports(ipr):
    """Every bridge port on the host, with its bridge attributes (IFLA_PROTINFO)."""
    msg = ifinfmsg()
    msg["family"] = AF_BRIDGE
    return _dump(ipr, msg, RTM_GETLINK)
