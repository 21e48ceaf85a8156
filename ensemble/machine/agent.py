"""The machine agent: presence for its machine, its subnet and bridge, and one
reconciler per concern (ensemble/machine/reconcilers/), all driven by their watches
and by one resync tick. The reconcilers that put a layer of the units' isolation in
place (the bridge, the id range, the firewall) report into the host's safeguards,
which every unit's container passes before it is created or started (safeguards.py)."""

import logging

from twisted.internet import defer, task

from ensemble import limits
from ensemble.agent import BaseAgent
from ensemble.errors import EnsembleError
from ensemble.machine import host as hosts
from ensemble.machine.content import UnrunnableInstallation, check_installation, compile_agent_code
from ensemble.machine.deploy import UnitDeployer
from ensemble.machine.reconcilers.bridge import BridgeReconciler
from ensemble.machine.reconcilers.firewall import FirewallReconciler
from ensemble.machine.reconcilers.id_range import IdRangeReconciler
from ensemble.machine.reconcilers.layer2 import Layer2Reconciler
from ensemble.machine.reconcilers.limits import LimitsReconciler
from ensemble.machine.reconcilers.names import NamesReconciler
from ensemble.machine.reconcilers.package_cache import PackageCacheReconciler
from ensemble.machine.reconcilers.overlay import OverlayReconciler
from ensemble.machine.reconcilers.units import UnitsReconciler
from ensemble.machine.template_build import ensure_template
from ensemble.state.environment import package_cache_settings
from ensemble.state.machine import MachineStateManager

log = logging.getLogger("ensemble.machine")


class MachineAgent(BaseAgent):
    """With a container `driver`, every assigned unit gets its own running container;
    without one (tests of the other duties), units get addresses only. With `overlay`,
    the agent also keeps this host's paths to every other machine's subnet (routes or
    VXLAN entries, by the environment's network mode) and turns IP forwarding on in
    its network namespace once there is another machine to reach. With `firewall`,
    units of related services reach each other, opened ports of exposed services are
    reachable from anywhere, and nothing else reaches a unit. With `names`, it serves
    units' names to its units on its bridge address; with `package_cache_dir`, a
    package cache there (unless the environment turned it off). With containers on
    its bridge, each unit's port is held to the unit's MAC and address (layer 2). A
    unit's container is created or started only while each of these layers (and the
    units' id range, credentials and limits) is in place; the machine node's
    `security-error` says which is not."""

    lease_retry_delay = 10.0
    template_retry_delay = 30.0
    resync_interval = 5.0

    def __init__(
        self, client, machine_id, reactor=None, manage_bridge=True, netns=None,
        driver=None, template=None, unit_zookeeper=None, unit_log_dir=None, overlay=False, firewall=False,
        names=False, package_cache_dir=None, units_memory=None, units_pids=None,
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
        self.manage_firewall = firewall
        self.serve_names = names
        self.package_cache_dir = package_cache_dir
        # The cap on all units together (None: the default share of the host's; see
        # ensemble/limits.py), put on the machine's parent cgroup.
        self.units_memory = units_memory
        self.units_pids = units_pids
        self.machine = None
        self.host = None
        self.units = None
        self.reconcilers = []
        self._overlay = None
        self._resync = None

    # What tests and tools look at.

    @property
    def assigned(self):
        return self.units.assigned if self.units is not None else []

    @property
    def bridge(self):
        return self.host.bridge if self.host is not None else None

    @property
    def subnet(self):
        return self.host.subnet if self.host is not None else None

    @property
    def overlay(self):
        """This host's Overlay once its reconciler runs (paths to other machines)."""
        if self._overlay is None or self._overlay not in self.reconcilers:
            return None
        return self._overlay.overlay

    async def register_presence(self, info):
        if self.machine is None:
            self.machine = await MachineStateManager(self.client).get_machine(self.machine_id)
        await self.machine.register_agent(info)

    async def started(self):
        host = await self._network()
        if host is None:
            return
        # What the host offers its units on their gateway: reachable through the
        # firewall, named in their containers' files, running before any unit starts.
        names = NamesReconciler(host) if self.serve_names else None
        cache = await self._package_cache(host)
        services = [s for s in (names, cache) if s is not None]
        listeners = []
        firewall = None
        if self.manage_firewall:
            firewall = FirewallReconciler(host, [port for s in services for port in s.ports])
            listeners.append(firewall)
            # Closed from the start: until a unit's ports are known, nothing is open.
            await self._start(firewall)
        if self.driver is not None and self.manage_bridge:
            # Each unit's port held to its MAC and address (with the firewall's filter).
            layer2 = Layer2Reconciler(host, firewall)
            listeners.append(layer2)
            await self._start(layer2)
        deployer = refusal = None
        if self.driver is not None:
            refusal = await self._template(host)
            if self._stopping:
                return
            if refusal is None:
                await self.driver.prepare_agents()
            await self._start(IdRangeReconciler(host, self.driver.id_ranges))
            await self._start(LimitsReconciler(
                host, self.driver, limits.machine_caps(self.units_memory, self.units_pids)))
            deployer = UnitDeployer(
                host, self.driver, self.unit_log_dir,
                name_domain=names.domain if names else None, apt_proxy=cache.apt_config if cache else None,
            )
        for service in services:
            await self._start(service)
        self.units = UnitsReconciler(host, deployer, listeners, refusal)
        await self._start(self.units)
        if self._overlay is not None and self._overlay.overlay is not None:
            await self._start(self._overlay)
        # Last: every layer has made its first pass, so the machine node says at once
        # what holds the units (and no longer what held them before a restart).
        await self._start(host.safeguards)
        if self._stopping:
            return
        self._resync = task.LoopingCall(self._tick)
        self._resync.clock = self.reactor
        self._resync.start(self.resync_interval, now=False)

    async def _network(self):
        """This machine's subnet, its bridge and the Host over them (None: stopped
        while waiting for a lease)."""
        subnet = await hosts.lease(
            self.client, self.machine, self.reactor, self.lease_retry_delay, lambda: self._stopping,
        )
        if subnet is None:
            return None
        self.host = host = await hosts.prepare_host(
            self.client, self.machine, self.reactor, subnet, self.netns, self.unit_zookeeper,
        )
        self.unit_zookeeper = host.unit_zookeeper
        if self.manage_overlay:
            self._overlay = OverlayReconciler(host)
            host.mtu = await self._overlay.prepare()  # the bridge takes the containers' MTU
        if self.manage_bridge:
            # A bridge that cannot be made holds the units, not the agent: it says why
            # on the machine, and its next pass tries again.
            await self._start(BridgeReconciler(host))
        await hosts.publish_network(host)
        return host

    async def _package_cache(self, host):
        if self.package_cache_dir is None:
            return None
        if not package_cache_settings(host.environment)["enabled"]:
            await host.publish("package-cache", {"state": "off"})
            return None
        try:
            return PackageCacheReconciler(host, self.package_cache_dir)
        except EnsembleError as e:
            # Settings written by hand into the environment node, say: the units go on
            # without a cache, and status says why.
            log.error("%s: package cache: %s", self.name, e)
            await host.publish("package-cache", {"state": "error", "error": str(e)})
            return None

    async def _template(self, host):
        """The container template built, and why units cannot run here, if they cannot."""
        await ensure_template(host, self.template, self.template_retry_delay, lambda: self._stopping)
        if self._stopping:
            return None
        try:
            check_installation(self.template.rootfs)
        except UnrunnableInstallation as e:
            # Every unit's agent would fail the same way, each in its own log.
            log.error("%s: %s", self.name, e)
            await self.machine.update(error=str(e))
            return str(e)
        await host.in_thread(compile_agent_code)
        return None

    async def _start(self, reconciler):
        self.reconcilers.append(reconciler)
        await reconciler.start()

    def _tick(self):
        if self._stopping:
            return None
        passes = [d for d in (r.tick() for r in self.reconcilers) if d is not None]
        d = defer.gatherResults(passes, consumeErrors=True)
        # A failed pass must not end the loop: the next one may well succeed.
        d.addErrback(lambda f: log.error("%s: resync failed: %s", self.name, f.value.subFailure.getErrorMessage()))
        return d

    async def stopping(self):
        # Containers keep running: units survive an agent restart or upgrade.
        if self._resync is not None and self._resync.running:
            self._resync.stop()
        for reconciler in reversed(self.reconcilers):
            await reconciler.stop()
