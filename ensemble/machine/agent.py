"""The machine agent: presence for its machine, its subnet and bridge, and one
reconciler per concern (ensemble/machine/reconcilers/), all driven by their watches
and by one resync tick."""

import logging

from twisted.internet import defer, task

from ensemble.agent import BaseAgent
from ensemble.machine import host as hosts
from ensemble.machine.content import UnrunnableInstallation, check_installation
from ensemble.machine.reconcilers.firewall import FirewallReconciler
from ensemble.machine.reconcilers.names import NamesReconciler
from ensemble.machine.reconcilers.package_cache import PackageCacheReconciler
from ensemble.machine.reconcilers.overlay import OverlayReconciler
from ensemble.machine.reconcilers.units import UnitsReconciler, ensure_template
from ensemble.state.environment import package_cache_settings
from ensemble.state.machine import MachineStateManager

log = logging.getLogger("ensemble.machine")


class MachineAgent(BaseAgent):
    """With a container `driver`, every assigned unit gets its own running container;
    without one (tests of the other duties), units get addresses only. With `overlay`,
    the agent also keeps this host's paths to every other machine's subnet (routes or
    VXLAN entries, by the environment's network mode) and turns IP forwarding on in
    its network namespace once there is another machine to reach. With `firewall`,
    units reach each other only on the ports they opened. With `names`, it serves
    units' names to its units on its bridge address; with `package_cache_dir`, a
    package cache there (unless the environment turned it off)."""

    lease_retry_delay = 10.0
    template_retry_delay = 30.0
    resync_interval = 5.0

    def __init__(
        self, client, machine_id, reactor=None, manage_bridge=True, netns=None,
        driver=None, template=None, unit_zookeeper=None, unit_log_dir=None, overlay=False, firewall=False,
        names=False, package_cache_dir=None,
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
        self.machine = None
        self.host = None
        self.units = None
        self.reconcilers = []
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
        for reconciler in self.reconcilers:
            if isinstance(reconciler, OverlayReconciler):
                return reconciler.overlay
        return None

    async def register_presence(self, info):
        if self.machine is None:
            self.machine = await MachineStateManager(self.client).get_machine(self.machine_id)
        await self.machine.register_agent(info)

    async def started(self):
        stopping = lambda: self._stopping  # noqa: E731
        subnet = await hosts.lease(self.client, self.machine, self.reactor, self.lease_retry_delay, stopping)
        if subnet is None:
            return
        self.host = host = await hosts.prepare_host(
            self.client, self.machine, self.reactor, subnet, self.netns, self.unit_zookeeper,
        )
        self.unit_zookeeper = host.unit_zookeeper
        overlay = None
        if self.manage_overlay:
            overlay = OverlayReconciler(host)
            host.mtu = await overlay.prepare()
        if self.manage_bridge:
            await hosts.ensure_bridge(host)
        await hosts.publish_network(host)
        # What the host offers its units on their gateway: reachable through the
        # firewall, named in their containers' files, started before any unit.
        names = NamesReconciler(host) if self.serve_names else None
        cache = None
        if self.package_cache_dir is not None:
            if package_cache_settings(host.environment)["enabled"]:
                cache = PackageCacheReconciler(host, self.package_cache_dir)
            else:
                await self.machine.update(**{"package-cache": {"state": "off"}})
        services = [s for s in (names, cache) if s is not None]
        listeners = []
        if self.manage_firewall:
            firewall = FirewallReconciler(host, [p for s in services for p in s.ports])
            listeners.append(firewall)
            # Closed from the start: until a unit's ports are known, nothing is open.
            await self._start(firewall)
        deployer = refusal = None
        if self.driver is not None:
            from ensemble.machine.deploy import UnitDeployer

            await ensure_template(host, self.template, self.template_retry_delay, stopping)
            if self._stopping:
                return
            try:
                check_installation(self.template.rootfs)
            except UnrunnableInstallation as e:
                # Every unit's agent would fail the same way, each in its own log.
                refusal = str(e)
                log.error("%s: %s", self.name, refusal)
                await self.machine.update(error=refusal)
            deployer = UnitDeployer(
                self.client, self.driver, host.environment["name"], host.bridge, host.subnet,
                host.unit_zookeeper, self.reactor, self.unit_log_dir, host.mtu,
            )
        for service in services:
            await self._start(service)
        if deployer is not None:
            deployer.name_domain = names.domain if names is not None else None
            deployer.apt_proxy = cache.apt_config if cache is not None else None
        self.units = UnitsReconciler(host, deployer, listeners, refusal)
        await self._start(self.units)
        if overlay is not None and overlay.overlay is not None:
            await self._start(overlay)
        if self._stopping:
            return
        self._resync = task.LoopingCall(self._tick)
        self._resync.clock = self.reactor
        self._resync.start(self.resync_interval, now=False)

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
