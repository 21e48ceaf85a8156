"""The machine agent: presence for its machine, its subnet and bridge, and convergence
of the units assigned to it (addresses reserved and published, removals finished)."""

import logging

from twisted.internet import defer, task, threads

from ensemble.agent import BaseAgent
from ensemble.errors import EnsembleError, MalformedState, UnitNotFound
from ensemble.network import bridge, netns as namespaces
from ensemble.network.ipam import Allocator, AddressesExhausted, SubnetsExhausted
from ensemble.network.firewall import Firewall, parse_port, zookeeper_ports
from ensemble.network.overlay import Overlay, OverlayError, peers_from_leases
from ensemble.state.client import NoNode
from ensemble.state.environment import get_environment
from ensemble.state.machine import MachineStateManager
from ensemble.state.network import ZooKeeperAddressStore, lease_subnet, watch_leases
from ensemble.state.service import ServiceStateManager
from ensemble.state.unit import DYING, ERROR, PENDING, UnitStateManager

log = logging.getLogger("ensemble.machine")

ADDRESS_ERROR_PREFIX = "no free address"


class MachineAgent(BaseAgent):
    """With a container `driver`, every assigned unit gets its own running container;
    without one (tests of the other duties), units get addresses only. With `overlay`,
    the agent also keeps this host's paths to every other machine's subnet (routes or
    VXLAN entries, by the environment's network mode) and turns IP forwarding on in
    its network namespace once there is another machine to reach."""

    lease_retry_delay = 10.0
    template_retry_delay = 30.0
    resync_interval = 5.0
    # Reservations are re-read from ZooKeeper this often (and at start): between
    # reads the allocator's own view serves, which misses what others wrote.
    audit_interval = 30.0
    max_concurrent_deploys = 8

    def __init__(
        self, client, machine_id, reactor=None, manage_bridge=True, netns=None,
        driver=None, template=None, unit_zookeeper=None, unit_log_dir=None, overlay=False, firewall=False,
    ):
        super().__init__(client, reactor)
        self.machine_id = machine_id
        self.name = f"machine-{machine_id}"
        self.manage_bridge = manage_bridge
        self.netns = netns
        self.driver = driver
        self.template = template
        self.unit_zookeeper = unit_zookeeper
        self.unit_log_dir = unit_log_dir
        self.manage_overlay = overlay
        self.overlay = None
        self._leases = None
        self._lease_watch = None
        self._overlay_lock = defer.DeferredLock()
        self._audited = None
        self.manage_firewall = firewall
        self.firewall = None
        self._openings = {}       # unit -> ["7070/tcp", ...] it published
        self._unit_watches = {}   # unit -> its node's watch (for its opened ports)
        self._firewall_lock = defer.DeferredLock()
        self._reported = set()
        self.machine = None
        self.subnet = None
        self.bridge = None
        self.allocator = None
        self.deployer = None
        self.assigned = []
        self._watch = None
        self._running = None
        self._limits = {}
        self._resync = None
        self._lock = defer.DeferredLock()
        self._deploys = defer.DeferredSemaphore(self.max_concurrent_deploys)

    async def register_presence(self, info):
        if self.machine is None:
            self.machine = await MachineStateManager(self.client).get_machine(self.machine_id)
        await self.machine.register_agent(info)

    async def started(self):
        await self.setup_network()
        if self._stopping:
            return
        await self.finish_orphaned_removals()
        self._watch = await self.machine.watch_assigned_units(self.assignments_changed)
        if self.overlay is not None:
            self._lease_watch = await watch_leases(self.client, self.leases_changed)
        if self.driver is not None or self.overlay is not None or self.firewall is not None:
            # Containers stop and routes vanish behind our back (OOM, a host admin, a
            # reboot): look again regularly, not only when ZooKeeper changes.
            self._resync = task.LoopingCall(self._resync_now)
            self._resync.clock = self.reactor
            self._resync.start(self.resync_interval, now=False)

    def _resync_now(self):
        if self._stopping:
            return None
        passes = []
        if self.driver is not None and not self._lock.locked:
            passes.append(defer.ensureDeferred(self._locked_reconcile(list(self.assigned))))
        if self.overlay is not None and self._leases is not None and not self._overlay_lock.locked:
            passes.append(defer.ensureDeferred(self.sync_overlay()))
        if self.firewall is not None and not self._firewall_lock.locked:
            passes.append(defer.ensureDeferred(self.sync_firewall()))
        d = defer.gatherResults(passes, consumeErrors=True)
        # A failed pass must not end the loop: the next one may well succeed.
        d.addErrback(lambda f: log.error("%s: resync failed: %s", self.name, f.value.subFailure.getErrorMessage()))
        return d

    # -- network -------------------------------------------------------------------

    async def setup_network(self):
        while not self._stopping:
            try:
                self.subnet = await lease_subnet(self.client, self.machine_id)
                break
            except SubnetsExhausted as e:
                log.error("%s: %s; retrying in %gs", self.name, e, self.lease_retry_delay)
                await self.machine.update(error=str(e))
                await task.deferLater(self.reactor, self.lease_retry_delay, lambda: None)
        if self._stopping:
            return
        store = ZooKeeperAddressStore(self.client, self.machine_id)
        await store.ensure(self.subnet)
        self.allocator = Allocator(store, self.subnet)
        environment = await get_environment(self.client)
        self.bridge = bridge.bridge_name(environment["name"])
        if self.unit_zookeeper is None:
            # Units may need another address for ZooKeeper than this agent: one inside
            # the container network, reached over the overlay.
            servers = environment.get("units-zookeeper") or self.client.servers
            self.unit_zookeeper = f"{servers}{self.client.root}"
        mtu = None
        if self.manage_overlay:
            network = environment.get("network") or {}
            try:
                self.overlay = Overlay(
                    network.get("mode", "host-gw"), environment["name"], network.get("cidr", "10.77.0.0/16"),
                    self.subnet, self.machine.address, self.netns, network.get("vni"),
                )
            except OverlayError as e:
                log.error("%s: %s; no paths to other machines", self.name, e)
                await self.machine.update(**{"network-error": str(e)})
            else:
                mtu = await self._in_thread(self.overlay.container_mtu)
        if self.manage_bridge:
            await self._in_thread(bridge.ensure_bridge, self.bridge, self.subnet, self.netns, mtu)
        await self.machine.update(subnet=self.subnet, bridge=self.bridge, error=None)
        log.info("%s: subnet %s on bridge %s", self.name, self.subnet, self.bridge)
        if self.manage_firewall:
            self.firewall = Firewall(
                environment["name"], self.bridge, bridge.gateway_of(self.subnet),
                zookeeper_ports(self.unit_zookeeper, bridge.gateway_of(self.subnet)), self.netns,
                subnet=self.subnet,
            )
            # Closed from the start: until a unit's ports are known, nothing is open.
            await self.sync_firewall()
        if self.driver is not None:
            from ensemble.machine.deploy import UnitDeployer

            await self._ensure_template()
            if self._stopping:
                return
            self.deployer = UnitDeployer(
                self.client, self.driver, environment["name"], self.bridge, self.subnet,
                self.unit_zookeeper, self.reactor, self.unit_log_dir, mtu,
            )

    def _in_thread(self, f, *args):
        return threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), f, *args)

    # -- paths to other machines -----------------------------------------------------

    async def leases_changed(self, leases):
        self._leases = leases
        await self.sync_overlay()

    async def sync_overlay(self):
        """Make this host's paths match the leases seen last; report what could not
        be done on the machine node (`network-error`), and what changed in the log."""
        async with self._overlay_lock:
            if self._stopping:
                return
            peers, problems = peers_from_leases(
                self._leases or {}, self.machine_id, self.overlay.cidr
            )
            try:
                report = await self._in_thread(self.overlay.sync, peers)
            except Exception as e:
                log.exception("%s: programming paths to other machines failed", self.name)
                problems.append(f"overlay: {e}")
                report = None
            if report is not None:
                problems.extend(report.errors)
                if report.changed:
                    log.info(
                        "%s: %s paths: %d peers; added %s; removed %s", self.name, self.overlay.mode, len(peers),
                        ", ".join(report.added) or "nothing", ", ".join(report.removed) or "nothing",
                    )
            if report is not None and report.paths:
                # Only once there is a path to another machine: a lone host (a laptop's
                # local environment) never has its forwarding switched on. Checked on
                # every pass, since someone may have switched it off.
                if not await self._in_thread(namespaces.ip_forwarding, self.netns):
                    await self._in_thread(namespaces.set_ip_forwarding, self.netns)
                    log.info("%s: IP forwarding on, for containers on other machines", self.name)
            error = "; ".join(problems) or None
            if error != self.machine.data.get("network-error"):
                if error:
                    log.error("%s: %s", self.name, error)
                await self.machine.update(**{"network-error": error})

    async def _ensure_template(self):
        # Built once per host (debootstrap from the host's mirror). A failure, such as
        # no network on first use, shows on the machine and is retried, not fatal.
        while not self._stopping:
            try:
                await self.template.ensure(progress=lambda line: log.info("%s: template: %s", self.name, line))
            except EnsembleError as e:
                log.error("%s: container template: %s; retrying in %gs", self.name, e, self.template_retry_delay)
                await self.machine.update(error=f"container template: {e}")
                await task.deferLater(self.reactor, self.template_retry_delay, lambda: None)
                continue
            if self.machine.data.get("error", "").startswith("container template:"):
                await self.machine.update(error=None)
            return

    # -- convergence -----------------------------------------------------------------

    async def assignments_changed(self, names):
        if names is None:
            log.warning("%s: machine removed from the environment", self.name)
            names = []
        previous = self.assigned
        added = [n for n in names if n not in previous]
        removed = [n for n in previous if n not in names]
        self.assigned = list(names)
        log.info(
            "%s: assigned units: %s (added: %s; removed: %s)",
            self.name,
            ", ".join(names) or "none",
            ", ".join(added) or "none",
            ", ".join(removed) or "none",
        )
        async with self._lock:
            await self.reconcile(names, removed)

    async def _locked_reconcile(self, assigned, removed=()):
        async with self._lock:
            now = self.reactor.seconds()
            if self._audited is None or now - self._audited >= self.audit_interval:
                if self._audited is not None:
                    await self.allocator.refresh()
                self._audited = now
            await self.reconcile(assigned, removed)

    async def reconcile(self, assigned, removed=()):
        """Converge this machine on `assigned`: units leaving are torn down (container,
        address, nodes), containers nobody owns are destroyed, and every assigned unit
        has its address published and its container running."""
        wanted = set(assigned)
        # The allocator's view, read from ZooKeeper once per agent start (so it holds
        # leaks from before a crash) and kept current by its own takes and releases.
        leaving = set(removed) | set(await self.allocator.reserved())
        leaving -= wanted
        # Removals first: what they free may be what a waiting unit needs.
        await self._bounded(leaving, self.finish_removal)
        self._running = None
        if self.deployer is not None:
            expected = {self.deployer.container_for(u) for u in wanted | leaving}
            for orphan in sorted(set(await self.driver.list()) - expected):
                log.warning("%s: destroying %s, which no unit here owns", self.name, orphan)
                await self.driver.destroy(orphan)
            self._running = await self.driver.running()
            self._limits = await self._service_limits({u.rpartition("/")[0] for u in wanted})
        await self._bounded(wanted, self.ensure_unit)

    async def _bounded(self, names, work):
        await defer.gatherResults(
            [self._deploys.run(lambda n=n: defer.ensureDeferred(self._guard(n, work(n)))) for n in sorted(names)],
            consumeErrors=True,
        )

    async def _guard(self, name, work):
        # One unit's trouble must never stop the others.
        try:
            await work
        except Exception as e:
            log.exception("%s: unit %s failed", self.name, name)
            await self._mark_error(name, f"machine agent: {e}")

    async def _mark_error(self, name, reason):
        try:
            unit = await UnitStateManager(self.client).get_unit(name)
            await unit.update(state=ERROR, error=reason)
        except (EnsembleError, NoNode):
            pass

    async def ensure_unit(self, name):
        """The unit's address reserved and published, and its container running."""
        try:
            unit = await UnitStateManager(self.client).get_unit(name)
        except UnitNotFound:
            log.warning("%s: assignment of %s, which does not exist; ignored", self.name, name)
            return
        except MalformedState as e:
            # Once per distinct problem, not on every 5 s pass; status shows it all along.
            self._report_once(f"{e}; leaving it alone")
            return
        if unit.life == DYING:
            return
        address = await self.ensure_address(unit)
        if address is not None and self.firewall is not None and name not in self._unit_watches:
            self._unit_watches[name] = None  # claimed: one watch per unit
            try:
                self._unit_watches[name] = await unit.watch(lambda data, n=name: self._unit_node_changed(n, data))
            except Exception:
                del self._unit_watches[name]  # the next pass tries again
                raise
        if address is None or self.deployer is None:
            return
        await self.deployer.deploy(unit, address, self._limits.get(unit.service_name), self._running)

    async def _service_limits(self, names):
        """{service: limits}, one read per service per pass rather than one per unit."""
        services = ServiceStateManager(self.client)
        results = await defer.DeferredList(
            [defer.ensureDeferred(services.get_service(n)) for n in sorted(names)], consumeErrors=True
        )
        return {n: value.limits for n, (ok, value) in zip(sorted(names), results) if ok}

    async def ensure_address(self, unit):
        name = unit.name
        try:
            address = await self.allocator.allocate(name)
        except AddressesExhausted as e:
            log.error("%s: %s: %s", self.name, name, e)
            await unit.update(state=ERROR, error=str(e))
            return None
        changes = {}
        if unit.data.get("private-address") != address:
            changes["private-address"] = address
            log.info("%s: %s has address %s", self.name, name, address)
        if unit.state == ERROR and str(unit.data.get("error", "")).startswith(ADDRESS_ERROR_PREFIX):
            changes.update(state=PENDING, error=None)
        if changes:
            await unit.update(**changes)
        return address

    async def finish_removal(self, name):
        """The unit is no longer assigned here: destroy its container (after its stop
        hook), free its address, and if it is dying remove its nodes (and its
        service's, if that was the last unit). Each step is safe to repeat."""
        watch = self._unit_watches.pop(name, None)
        if watch is not None:
            watch.stop()
        if self._openings.pop(name, None) is not None:
            await self.sync_firewall()
        if self.deployer is not None:
            await self.deployer.teardown(name)
        address = await self.allocator.release(name)
        if address:
            log.info("%s: released %s of %s", self.name, address, name)
        try:
            unit = await UnitStateManager(self.client).get_unit(name)
        except (UnitNotFound, MalformedState):
            return
        if unit.life != DYING or unit.machine_id != self.machine_id:
            return
        await self.client.delete_tree(unit.path)
        log.info("%s: removed %s", self.name, name)
        await ServiceStateManager(self.client).remove_service_if_done(unit.service_name)

    async def finish_orphaned_removals(self):
        """Units of this machine left dying by a crash between their steps."""
        assigned = set(await self.machine.assigned_units())
        for unit in await UnitStateManager(self.client).get_all_units():
            if unit.machine_id == self.machine_id and unit.life == DYING and unit.name not in assigned:
                await self._guard(unit.name, self.finish_removal(unit.name))

    # -- the firewall between units ---------------------------------------------------

    async def _unit_node_changed(self, name, data):
        if data is None or "malformed" in data:
            opening = None
        else:
            # Only the ports: a unit may write its own node, private-address included,
            # so the address comes from this machine's reservations (sync_firewall).
            ports = data.get("open-ports") or []
            opening = list(ports) if isinstance(ports, list) else [str(ports)]
        if self._openings.get(name) != opening:
            if opening is None:
                self._openings.pop(name, None)
            else:
                self._openings[name] = opening
            await self.sync_firewall()

    async def sync_firewall(self):
        """The firewall's opened ports made those the units here published."""
        if self.firewall is None:
            return
        async with self._firewall_lock:
            openings = {}
            reserved = await self.allocator.reserved() if self.allocator is not None else {}
            for name, ports in sorted(self._openings.items()):
                address = reserved.get(name)
                if not address:
                    continue
                parsed = []
                for port in ports:
                    try:
                        parsed.append(parse_port(port))
                    except ValueError:
                        self._report_once(f"{name} published an invalid port {str(port)[:40]!r}; ignored")
                openings[address] = parsed
            try:
                await self._in_thread(self.firewall.sync, openings)
            except Exception as e:
                self._report_once(f"firewall: {e}")

    def _report_once(self, message):
        # Passes repeat every few seconds; the log says each problem once.
        if message not in self._reported:
            self._reported.add(message)
            log.error("%s: %s", self.name, message)

    async def stopping(self):
        # Containers keep running: units survive an agent restart or upgrade.
        if self._resync is not None and self._resync.running:
            self._resync.stop()
        if self._watch:
            self._watch.stop()
        if self._lease_watch:
            self._lease_watch.stop()
        for watch in self._unit_watches.values():
            if watch is not None:
                watch.stop()
