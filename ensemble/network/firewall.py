"""The firewall between units on one host: nftables, through libnftables' own JSON
API (Debian's python3-nftables), never through rule strings.

- Units of related services reach each other on any port (the `related` set: both
  directions of every pair of addresses).
- A port a unit opened (`open-port`) is reachable from anywhere, this host included,
  once its service is exposed (the `tcp_open`/`udp_open` sets hold only those).
- Nothing else reaches a unit: not other units on this host (bridged: a `bridge`
  table), not what is routed to it (an `inet` table), not the host itself (the `inet`
  output hook), except replies to connections the unit made.
- From its host, a unit reaches only the services the host offers its units: ZooKeeper
  (when it runs on this host), the name server and the package cache.

Units on one bridge talk at L2, so their traffic is filtered in the bridge family.
Kernels without nf_conntrack_bridge (like this project's machines) have no connection
tracking there, so the bridge rules are stateless: between a related pair (both
directions are in the set), into an opened port, or back out of one with ACK set, which
a connection attempt never has. Where br_netfilter also hands bridged IPv4 to the inet
hooks (bridge-nf-call-iptables, on by default when built in), the stateful inet rules
apply to it as well. The routed, host-bound and host-originated rules use conntrack.

Layer 2 is bound to each unit's identity in the same bridge table, by the same batch:
from a unit's port only its own MAC and address, ARP only for that pair, no other
ethertype; to it only what is meant for it (ensemble/network/port_filter.py).

Each sync is one atomic batch. The rules depend only on the host, so a sync after the
first changes only the sets' elements that differ from those it loaded last: a new unit
costs its own entries, not a reload of every unit's (bench/firewall.py: at 250 units of
two services related to each other, 295 ms reloading against 14.5 ms). The whole
tables are replaced on the first sync, when asked (`replace`: the agent does so every
minute, to undo hand edits inside them) and when a change cannot apply (the tables
deleted, an element gone). Blocking (netlink): agents run it in a thread. `netns`: a
named namespace to act in (None: this one).
"""

import threading

from ensemble.errors import EnsembleError
from ensemble.network import port_filter
from ensemble.network.nft_json import match as _match, meta as _meta, payload as _payload
from ensemble.network.netns import inside
from ensemble.network.ports import parse_port

VETH_GLOB = "ve-*"  # host-side names of our containers' veths (bridge.VETH_PREFIX)


class FirewallError(EnsembleError):
    pass


def _nftables():
    # Debian ships the binding for its own python3; scripts/install links it into the
    # venv (which is built on that python3).
    try:
        import nftables
    except ImportError:
        raise FirewallError(
            "the nftables Python binding is missing: install the 'python3-nftables' package "
            "and run scripts/install"
        )
    return nftables


def zookeeper_ports(servers, gateway):
    """The ports of the ZooKeeper servers in 'h:p,h:p[/root]' that listen on `gateway`
    (this host's bridge address), which its units may reach."""
    ports = []
    for server in servers.split("/", 1)[0].split(","):
        host, _, port = server.strip().rpartition(":")
        if host == gateway and port.isdigit():
            ports.append(int(port))
    return sorted(ports)




def _pair(direction, proto):
    ip = "daddr" if direction == "to" else "saddr"
    port = "dport" if direction == "to" else "sport"
    return {"concat": [_payload("ip", ip), _payload(proto, port)]}


class Firewall:
    def __init__(self, environment, bridge, gateway, host_ports=(), netns=None, subnet=None, cidr=None):
        """`host_ports`: what units may reach at `gateway` (ports: TCP; or 'PORT/udp').
        `subnet`: this host's unit subnet (CIDR), so that the bridged rules leave
        other environments' units on this host alone; None: all bridged units.
        `cidr`: the environment's network: the only place units' traffic is routed to
        (other machines' units); None: wherever the host routes it."""
        self.table = f"ens-{environment}"
        self.bridge = bridge
        self.gateway = gateway
        self.subnet = str(subnet) if subnet is not None else None
        self.cidr = str(cidr) if cidr is not None else None
        self.host_ports = sorted({parse_port(p) for p in host_ports})
        self.netns = netns
        # (rules and sets, {(family, set): {element}}) as the last batch loaded them;
        # None: not known (nothing loaded yet, or a batch failed).
        self._loaded = None
        self._built = {}  # layer2 -> _rules(layer2)
        self._nft = None  # libnftables' context, made in `netns`
        self._lock = threading.Lock()  # one batch at a time through it

    def _run(self, commands):
        """Run the JSON commands in one batch; returns the parsed JSON output."""
        nftables = _nftables()
        with self._lock, inside(self.netns):
            if self._nft is None:
                # Kept: freeing a context costs ~12 ms (measured), more than a batch of
                # changes does.
                self._nft = nftables.Nftables()
                self._nft.set_json_output(True)
            rc, output, error = self._nft.json_cmd({"nftables": commands})
        if rc != 0:
            raise FirewallError(f"nftables refused the firewall: {error.strip() or rc}")
        return output

    def _contents(self, openings, related, ports=None):
        """{(family, set): {element}} for `openings` ({address: [(port, proto)]}),
        `related` ({(source, destination)}) and the unit `ports` ([(veth, MAC,
        address)]; None: no layer 2 binding); a concatenation is a tuple."""
        opened = {"tcp": set(), "udp": set()}
        for address, ports_ in openings.items():
            for port, proto in ports_:
                opened[proto].add((address, port))
        sets = {"tcp_open": opened["tcp"], "udp_open": opened["udp"], "related": set(related)}
        contents = {(family, name): elements for family in ("bridge", "inet") for name, elements in sets.items()}
        if ports is not None:
            contents.update((("bridge", name), elements) for name, elements in port_filter.elements(ports).items())
        return contents

    def _rules(self, layer2):
        """Both tables: their sets (empty: `_contents` fills them), chains and rules;
        `layer2`: with the unit ports' binding (port_filter.py). Built once: they
        depend only on the host."""
        cached = self._built.get(layer2)
        if cached is not None:
            return cached
        types = {"tcp_open": ["ipv4_addr", "inet_service"], "udp_open": ["ipv4_addr", "inet_service"],
                 "related": ["ipv4_addr", "ipv4_addr"]}
        objects = []
        for family in ("bridge", "inet"):
            objects.append({"table": {"family": family, "name": self.table}})
            for name, type_ in types.items():
                objects.append({"set": {"family": family, "table": self.table, "name": name, "type": type_}})

        def rule(family, chain, *expr):
            objects.append({"rule": {"family": family, "table": self.table, "chain": chain, "expr": list(expr)}})

        def chain(family, name, hook=None):
            body = {"family": family, "table": self.table, "name": name}
            if hook:
                body.update(type="filter", hook=hook, prio=0, policy="accept")
            objects.append({"chain": body})

        # Unit to unit on this host (bridged): stateless, see the module doc.
        chain("bridge", "forward", "forward")
        chain("bridge", "between_units")
        rule("bridge", "forward", _match(_meta("iifname"), VETH_GLOB), _match(_meta("oifname"), VETH_GLOB),
             {"jump": {"target": "between_units"}})
        rule("bridge", "between_units", _match(_payload("ether", "type"), "arp"), {"accept": None})
        if self.subnet is not None:
            # The bridge family's forward hook sees every bridge on the host, and this
            # kernel cannot match a port's bridge (no meta ibrname). So IPv4 to other
            # subnets is left to the environment whose subnet it is: a frame here with
            # such an address is not for any of our units. (Every environment drops
            # what is neither ARP nor IPv4, so sharing that rule is harmless.)
            rule("bridge", "between_units", _match(_payload("ether", "type"), "ip", "!="), {"drop": None})
            network, _, length = self.subnet.partition("/")
            rule("bridge", "between_units",
                 _match(_payload("ip", "daddr"), {"prefix": {"addr": network, "len": int(length)}}, "!="),
                 {"return": None})
        between = {"concat": [_payload("ip", "saddr"), _payload("ip", "daddr")]}
        rule("bridge", "between_units", _match(between, "@related"), {"accept": None})
        for proto in ("tcp", "udp"):
            rule("bridge", "between_units", _match(_pair("to", proto), f"@{proto}_open"), {"accept": None})
        rule("bridge", "between_units", _match(_pair("from", "tcp"), "@tcp_open"),
             _match({"&": [_payload("tcp", "flags"), "ack"]}, "ack"), {"accept": None})
        rule("bridge", "between_units", _match(_pair("from", "udp"), "@udp_open"), {"accept": None})
        rule("bridge", "between_units", {"drop": None})

        established = _match({"ct": {"key": "state"}}, ["established", "related"], "in")
        # Routed to a unit (from units on other machines, or anything else).
        chain("inet", "forward", "forward")
        chain("inet", "to_units")
        rule("inet", "forward", _match(_meta("oifname"), self.bridge), {"jump": {"target": "to_units"}})
        if self.cidr is not None:
            # Routed from a unit: only to other machines' units. A host that forwards
            # (it has peers) would otherwise carry units' traffic to its own network
            # and beyond; replies to connections made to a unit still leave.
            chain("inet", "from_units_routed")
            rule("inet", "forward", _match(_meta("iifname"), self.bridge), {"jump": {"target": "from_units_routed"}})
            rule("inet", "from_units_routed", established, {"accept": None})
            rule("inet", "from_units_routed", _match(_meta("nfproto"), "ipv4", "!="), {"drop": None})
            network, _, length = self.cidr.partition("/")
            rule("inet", "from_units_routed",
                 _match(_payload("ip", "daddr"), {"prefix": {"addr": network, "len": int(length)}}, "!="),
                 {"drop": None})
        rule("inet", "to_units", established, {"accept": None})
        rule("inet", "to_units", _match(between, "@related"), {"accept": None})
        for proto in ("tcp", "udp"):
            rule("inet", "to_units", _match(_pair("to", proto), f"@{proto}_open"), {"accept": None})
        rule("inet", "to_units", {"drop": None})
        # This host to a unit: its answers to the unit (ZooKeeper, names, the package
        # cache) and exposed ports only. An operator's shell on the host is no more
        # trusted by a unit than anything else outside it.
        chain("inet", "output", "output")
        chain("inet", "host_to_units")
        rule("inet", "output", _match(_meta("oifname"), self.bridge), {"jump": {"target": "host_to_units"}})
        rule("inet", "host_to_units", established, {"accept": None})
        for proto in ("tcp", "udp"):
            rule("inet", "host_to_units", _match(_pair("to", proto), f"@{proto}_open"), {"accept": None})
        rule("inet", "host_to_units", {"drop": None})
        # A unit to this host: only the services it offers units, at the gateway.
        chain("inet", "input", "input")
        chain("inet", "from_units")
        rule("inet", "input", _match(_meta("iifname"), self.bridge), {"jump": {"target": "from_units"}})
        if self.cidr is not None:
            # Other machines' units come in over the uplink (or the VXLAN device), to
            # the gateway or any other address of this host: the same rules hold.
            network, _, length = self.cidr.partition("/")
            rule("inet", "input", _match(_meta("iifname"), "lo", "!="),
                 _match(_payload("ip", "saddr"), {"prefix": {"addr": network, "len": int(length)}}),
                 {"jump": {"target": "from_units"}})
        rule("inet", "from_units", established, {"accept": None})
        for proto in ("tcp", "udp"):
            ports = [port for port, p in self.host_ports if p == proto]
            if ports:
                rule("inet", "from_units", _match(_payload("ip", "daddr"), self.gateway),
                     _match(_payload(proto, "dport"), {"set": ports}), {"accept": None})
        rule("inet", "from_units", {"drop": None})
        if layer2:
            objects += port_filter.rules(self.table, self.subnet)
        self._built[layer2] = objects
        return objects

    def sync(self, openings, related=(), ports=None, replace=False):
        """Make both tables hold, atomically: `openings` ({address: [(port, proto)]}) the
        exposed ports, reachable from anywhere; `related` ({(source, destination)}) the
        address pairs that may reach each other on any port (give both directions);
        `ports` ([(veth, MAC, address)]) this host's units' ports, each bound to its
        unit's MAC and address (port_filter.py); None: no layer 2 binding.

        Changes only the elements that differ from the last sync's, unless `replace`
        (see the module doc). Returns True if it replaced the tables whole."""
        structure = self._rules(ports is not None)
        contents = self._contents(openings, related, ports)
        loaded, self._loaded = self._loaded, None
        if not replace and loaded is not None and loaded[0] is structure:
            try:
                self._run(self._changes(structure, loaded[1], contents))
            except FirewallError:
                pass  # not as it was loaded: replaced whole below
            else:
                self._loaded = (structure, contents)
                return False
        tables = [o for o in structure if "table" in o]
        commands = [{"add": t} for t in tables] + [{"delete": t} for t in tables]
        commands += [{"add": o} for o in structure]
        commands += [self._element_command("add", key, elements) for key, elements in sorted(contents.items())
                     if elements]
        self._run(commands)
        self._loaded = (structure, contents)
        return True

    def _changes(self, structure, before, after):
        """The commands that take the sets from `before` to `after`; they fail where
        the tables are not as loaded: each family's first regular chain is added again
        (a no-op while it exists), and an element deleted must be there."""
        commands = []
        probed = set()
        for o in structure:
            chain = o.get("chain")
            if chain and "hook" not in chain and chain["family"] not in probed:
                probed.add(chain["family"])
                commands.append({"add": o})
        for verb, first, second in (("delete", before, after), ("add", after, before)):
            for key in sorted(set(first) | set(second)):
                changed = first.get(key, set()) - second.get(key, set())
                if changed:
                    commands.append(self._element_command(verb, key, changed))
        return commands

    def _element_command(self, verb, key, elements):
        family, name = key
        elem = [{"concat": list(e)} if isinstance(e, tuple) else e for e in sorted(elements)]
        return {verb: {"element": {"family": family, "table": self.table, "name": name, "elem": elem}}}

    def _elements(self, name):
        """The elements of set `name` as the kernel has it now (bridge table)."""
        output = self._run([{"list": {"set": {"family": "bridge", "table": self.table, "name": name}}}])
        return [tuple(elem["concat"]) for item in (output or {}).get("nftables", [])
                for elem in (item.get("set") or {}).get("elem", [])]

    def ports(self):
        """{(veth, MAC, address)} of the unit ports as the kernel has them now."""
        try:
            return set(self._elements("unit_ports"))
        except FirewallError:
            return set()

    def opened(self):
        """{(address, port, proto)} as the kernel has them now."""
        found = set()
        for proto in ("tcp", "udp"):
            try:
                found.update((address, port, proto) for address, port in self._elements(f"{proto}_open"))
            except FirewallError:
                return set()
        return found

    def related(self):
        """{(source, destination)} as the kernel has them now."""
        try:
            return set(self._elements("related"))
        except FirewallError:
            return set()

    def present(self):
        """The families ('bridge', 'inet') in which this firewall's table exists."""
        found = []
        for family in ("bridge", "inet"):
            try:
                self._run([{"list": {"table": {"family": family, "name": self.table}}}])
            except FirewallError:
                continue
            found.append(family)
        return found

    def remove(self):
        """Delete both tables (idempotent)."""
        self._loaded = None
        tables = [{"table": {"family": f, "name": self.table}} for f in ("bridge", "inet")]
        self._run([{"add": t} for t in tables] + [{"delete": t} for t in tables])
