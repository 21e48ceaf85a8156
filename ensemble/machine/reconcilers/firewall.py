"""The firewall between units, from ZooKeeper: which services are related (/relations),
which are exposed (their service nodes), which ports the units here opened (their unit
nodes), and every address as a machine agent reserved it. A unit may write its own
node, its private-address included, so an address never comes from there.

Watches make a change apply at once: /relations' children, the service node of each
service with units here, their unit nodes, and the reservations of each other machine
that runs units of a related service. The agent's tick re-reads the rest.

The same tables bind each unit's port here to its MAC and address (layer 2: from every
reservation here, a leaving unit's included until its address is freed); a unit's
container starts only once its port's entry is loaded (reconcilers/layer2.py).

A pass changes only the sets' elements that changed (firewall.py). A tick replaces
both tables whole once a minute, so that an edit by hand inside them (an element or a
rule deleted, which no change runs into) stands a minute at most; tables deleted
outright are loaded again by the next pass.

Until a pass has loaded the tables, and whenever one cannot (no nftables binding, a
batch nftables refuses), the firewall is not in place: no unit's container is created
or started here (safeguards.py)."""

import collections
import ipaddress
import itertools
import logging

from twisted.internet import defer

from ensemble.errors import MalformedState
from ensemble.machine import safeguards
from ensemble.machine.reconciler import Reconciler
from ensemble.machine.reconcilers.layer2 import unit_ports
from ensemble.network.firewall import Firewall, zookeeper_ports
from ensemble.network.ports import parse_port
from ensemble.state import nodes
from ensemble.state.client import NoNode
from ensemble.state.network import ZooKeeperAddressStore
from ensemble.state.relation import RelationState, relation_path
from ensemble.state.service import service_path
from ensemble.state.unit import OPEN_PORTS, UnitStateManager, unit_path
from ensemble.state.watch import ChildrenWatch, DataWatch

log = logging.getLogger("ensemble.machine")

REPLACE_EVERY = 60.0  # seconds between ticks that replace both tables whole


def service_of(unit):
    return unit.rpartition("/")[0]


def _ipv4(address):
    try:
        return str(ipaddress.IPv4Address(address))
    except (ipaddress.AddressValueError, ValueError, TypeError):
        return None


def reachability(local, remote, relations, exposed, ports):
    """What this machine's firewall holds, as (openings, related).

    `local`: {unit: address} reserved on this machine; `remote`: {unit: address}
    reserved on other machines; `relations`: the services of each relation (a single
    service: a peer relation, which relates its units to each other); `exposed`: the
    names of exposed services; `ports`: {unit here: [(port, proto)]} it opened.

    `openings` ({address: [(port, proto)]}) holds the opened ports of units here whose
    service is exposed. `related` ({(source, destination)}) holds both directions of
    every pair of units of two related services, if at least one of the two is here."""
    here = {u: a for u, a in ((u, _ipv4(a)) for u, a in local.items()) if a}
    addresses = collections.defaultdict(set)
    for unit, address in remote.items():
        address = _ipv4(address)
        if address and unit not in here:
            addresses[service_of(unit)].add(address)
    for unit, address in here.items():
        addresses[service_of(unit)].add(address)
    mine = set(here.values())
    related = set()
    for services in relations:
        services = sorted(set(services))
        pairs = [(services[0], services[0])] if len(services) == 1 else itertools.combinations(services, 2)
        for a, b in pairs:
            for x in addresses.get(a, ()):
                for y in addresses.get(b, ()):
                    if x != y and (x in mine or y in mine):
                        related.update([(x, y), (y, x)])
    openings = {}
    for unit, opened in ports.items():
        if opened and unit in here and service_of(unit) in exposed:
            openings[here[unit]] = sorted(set(opened))
    return openings, related


def _machine_id(value):
    # A unit may write its own node: this only says where to look for its reservation.
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


class FirewallReconciler(Reconciler):
    name = "firewall"

    def __init__(self, host, host_ports=()):
        """`host_ports`: what else units may reach on their gateway besides ZooKeeper
        (the host's name server and package cache: 'PORT/proto')."""
        super().__init__(host)
        # Until its first pass has loaded the tables, no unit starts.
        host.safeguards.require(safeguards.FIREWALL)
        self.firewall = Firewall(
            host.environment["name"], host.bridge, host.gateway,
            [*zookeeper_ports(host.unit_zookeeper, host.gateway), *host_ports], host.netns, subnet=host.subnet,
            cidr=(host.environment.get("network") or {}).get("cidr"),
        )
        self._openings = {}       # unit here -> ["7070/tcp", ...] it published
        self._watches = {}        # unit here -> its node's watch (for its opened ports)
        self._leaving = set()     # units here being torn down: related to nothing any more
        self._relation_keys = None
        self._relations = {}      # relation key -> its services (a relation never changes)
        self._exposed = {}        # service with units here -> exposed? (kept by its watch)
        self._machine_of = {}     # unit elsewhere -> the machine its node names
        self._followed = {}       # ("service", name) or ("machine", id) -> its watch
        self._relations_watch = None
        self._loaded_ports = {}   # unit here -> its UnitPort, as the last loaded tables hold it
        self._replaced_at = None  # when a pass last replaced both tables whole
        self._replace = False     # the next pass replaces them (a tick asked)

    def port_loaded(self, name):
        """Whether the tables loaded last bind `name`'s port to its identity."""
        return name in self._loaded_ports

    async def start(self):
        def keys(children):
            self._relation_keys = list(children or [])
            return self._relation_keys

        self._relations_watch = await self._watched(ChildrenWatch, nodes.RELATIONS, keys)
        await self.sync()

    async def _watched(self, kind, path, value_of):
        """A watch (`kind`) on `path`: `value_of(value)` keeps what the firewall uses of
        it; a change of that after the watch's start asks for a pass."""
        state = {"started": False, "last": object()}

        def changed(value):
            value = value_of(value)
            if value == state["last"]:
                return None  # re-read after a reconnect, say
            state["last"] = value
            return self.sync_quietly() if state["started"] else None

        watch = await kind(self.host.client, path, changed).start()
        # Until now the pass that started it reads the value itself.
        state["started"] = True
        return watch

    def tick(self):
        now = self.host.reactor.seconds()
        if self._replaced_at is not None and now - self._replaced_at >= REPLACE_EVERY:
            self._replace = True
        return super().tick()

    async def unit_addressed(self, unit):
        """`unit` has an address here: follow the ports it opens."""
        name = unit.name
        self._leaving.discard(name)
        if name not in self._watches:
            # What it published so far, as its watch would say: the watch's first call
            # then changes nothing, and the new unit's container waits for one sync,
            # not two.
            self._note_opening(name, unit.data)
        wanted = unit_ports(self.host.environment["name"], await self.host.allocator.hardware(only=name)).get(name)
        if wanted is not None and self._loaded_ports.get(name) != wanted:
            # Its port's entry loaded before its container is made (the gate asks).
            await self.sync_quietly()
        if name in self._watches:
            return
        self._watches[name] = None  # claimed: one watch per unit
        try:
            self._watches[name] = await unit.watch(lambda data: self._unit_node_changed(name, data))
        except Exception:
            del self._watches[name]  # the next pass tries again
            raise

    async def unit_leaving(self, name):
        """`name` is being torn down: close its ports and its relations' paths before
        its address is freed (and perhaps soon given to another unit)."""
        watch = self._watches.pop(name, None)
        if watch is not None:
            watch.stop()
        self._openings.pop(name, None)
        if name not in self._leaving:
            self._leaving.add(name)
            await self.sync()

    async def _unit_node_changed(self, name, data):
        if self._note_opening(name, data):
            await self.sync_quietly()

    def _note_opening(self, name, data):
        """Keep the ports `name` published in `data` (its node; None: gone); True if
        that changed them."""
        if data is None or "malformed" in data:
            opening = None
        else:
            ports = data.get(OPEN_PORTS) or []
            opening = list(ports) if isinstance(ports, list) else [str(ports)]
        if self._openings.get(name) == opening:
            return False
        if opening is None:
            self._openings.pop(name, None)
        else:
            self._openings[name] = opening
        return True

    async def converge(self):
        """The firewall made what ZooKeeper says of the units here and their relations."""
        host = self.host
        reserved = await host.allocator.reserved()
        identities = unit_ports(host.environment["name"], await host.allocator.hardware())
        self._leaving &= set(reserved)
        local = {u: a for u, a in reserved.items() if u not in self._leaving}
        services_here = {service_of(u) for u in local}
        relations = await self._read_relations()
        await self._follow("service", services_here, self._watch_service)
        related_services = set()
        for services in relations:
            for service in set(services) & services_here:
                related_services |= (set(services) - {service}) or {service}
        remote = await self._remote_addresses(related_services, set(reserved))
        ports = {}
        for name, published in sorted(self._openings.items()):
            parsed = []
            for port in published:
                try:
                    parsed.append(parse_port(port))
                except ValueError:
                    host.report_once(f"{name} published an invalid port {str(port)[:40]!r}; ignored")
            ports[name] = parsed
        exposed = {s for s in services_here if self._exposed.get(s)}
        entries = [(p.port, p.mac, p.address) for p in identities.values()]

        def load(replace):
            # Both in a thread: the pairs of two related services of 125 units each
            # take 24 ms to list, the sync's set arithmetic on them as long again.
            openings, related = reachability(local, remote, relations, exposed, ports)
            return self.firewall.sync(openings, related, entries, replace)

        try:
            replaced = await host.in_thread(load, self._replace)
        except Exception as e:
            # Each sync is one atomic batch: a refused one leaves the tables as they were.
            host.safeguards.report(safeguards.FIREWALL, f"{e}; units running here keep the rules loaded last")
        else:
            self._loaded_ports = identities
            if replaced:
                self._replaced_at, self._replace = host.reactor.seconds(), False
            host.safeguards.report(safeguards.FIREWALL, None)

    async def _read_relations(self):
        """The services of each relation; a relation's node is read once."""
        keys = self._relation_keys or []
        self._relations = {k: v for k, v in self._relations.items() if k in keys}
        missing = [k for k in keys if k not in self._relations]
        results = await defer.DeferredList(
            [defer.ensureDeferred(nodes.read(self.host.client, relation_path(k))) for k in missing],
            consumeErrors=True,
        )
        for key, (ok, value) in zip(missing, results):
            if not ok:
                if value.check(MalformedState):
                    self.host.report_once(f"{value.value}; the firewall relates nothing by it")
                    self._relations[key] = []
                elif not value.check(NoNode):  # gone: the watch says so next
                    value.raiseException()
                continue
            try:
                self._relations[key] = RelationState(key, value[0]).services
            except (KeyError, TypeError, AttributeError):
                self.host.report_once(f"relation {key} has malformed endpoints; the firewall relates nothing by it")
                self._relations[key] = []
        return [self._relations[k] for k in keys if k in self._relations]

    async def _remote_addresses(self, services, here):
        """{unit: address} of the units of `services` on other machines, as their
        machines reserved them."""
        client = self.host.client
        names = set()
        if services:
            names = {n for n in await UnitStateManager(client).unit_names() if service_of(n) in services} - here
        self._machine_of = {n: m for n, m in self._machine_of.items() if n in names}
        unknown = sorted(names - set(self._machine_of))
        results = await defer.DeferredList(
            [defer.ensureDeferred(nodes.read(client, unit_path(n))) for n in unknown], consumeErrors=True
        )
        for name, (ok, value) in zip(unknown, results):
            if ok:
                machine = _machine_id(value[0].get("machine"))
                if machine is not None:
                    self._machine_of[name] = machine
            elif not value.check(NoNode, MalformedState):
                value.raiseException()
        machines = set(self._machine_of.values()) - {self.host.machine_id}
        await self._follow("machine", machines, self._watch_reservations)
        ordered = sorted(machines)
        stores = await defer.gatherResults(
            [defer.ensureDeferred(ZooKeeperAddressStore(client, m).reservations()) for m in ordered],
            consumeErrors=True,
        )
        remote = {}
        for reservations in stores:
            remote.update((u, a) for u, a in reservations.items() if u in names)
        return remote

    async def _follow(self, kind, wanted, start):
        """One watch (from `start(key)`) for each key of `kind` in `wanted`, no more."""
        for (k, key) in [f for f in self._followed if f[0] == kind and f[1] not in wanted]:
            self._followed.pop((k, key)).stop()
            if kind == "service":
                self._exposed.pop(key, None)
        for key in sorted(wanted):
            if (kind, key) in self._followed or self.stopping:
                continue
            self._followed[(kind, key)] = await start(key)
            if self.stopping:
                self._followed.pop((kind, key)).stop()

    async def _watch_service(self, name):
        def exposed(value):
            try:
                flag = value is not None and nodes.load(value[0], service_path(name)).get("exposed") is True
            except MalformedState:
                flag = False
            self._exposed[name] = flag
            return flag

        return await self._watched(DataWatch, service_path(name), exposed)

    async def _watch_reservations(self, machine_id):
        # Each pass reads the reservations; this only says when they changed.
        path = f"{ZooKeeperAddressStore(self.host.client, machine_id).path}/units"
        return await self._watched(ChildrenWatch, path, lambda keys: keys)

    async def stop(self):
        await super().stop()
        watches = [*self._watches.values(), *self._followed.values(), self._relations_watch]
        for watch in watches:
            if watch is not None:
                watch.stop()
