"""Paths to other machines' subnets: routes or VXLAN entries, by the environment's
network mode, from the subnet leases in ZooKeeper; and IP forwarding in this
machine's namespace once there is another machine to reach.

Comparing the kernel's paths with the leases reads an entry per other machine (three
under VXLAN): with 1,000 machines, about 0.25 s of a core. A pass does it once every
DRIFT_CHECK seconds (what someone changed by hand is put back within that) and when
the last pass could not make every path; in between, a change of the leases changes
only the paths of the machines that came, went or moved."""

import logging

from ensemble.machine.reconciler import Reconciler
from ensemble.network import netns as namespaces
from ensemble.network.overlay import Overlay, OverlayError, peers_from_leases
from ensemble.state.network import watch_leases

log = logging.getLogger("ensemble.machine")

DRIFT_CHECK = 60.0  # seconds between comparisons with the kernel while no lease changes


class OverlayReconciler(Reconciler):
    name = "overlay"

    def __init__(self, host):
        super().__init__(host)
        self.overlay = None
        self._leases = None
        self._watch = None
        self._clean = None      # (peers, when compared): the kernel's paths as wanted, since that comparison
        self._paths = 0         # paths to other machines after it
        self._peers = None      # (leases, (peers, problems)): peers_from_leases of those leases

    async def prepare(self):
        """Make the overlay for this host; returns the containers' MTU (None: the
        default). A host that cannot have one says why on its machine node."""
        network = self.host.environment.get("network") or {}
        try:
            self.overlay = Overlay(
                network.get("mode", "host-gw"), self.host.environment["name"], network.get("cidr", "10.77.0.0/16"),
                self.host.subnet, self.host.machine.address, self.host.netns, network.get("vni"),
            )
        except OverlayError as e:
            log.error("%s: %s; no paths to other machines", self.host.name, e)
            await self.host.machine.update(**{"network-error": str(e)})
            return None
        return await self.host.in_thread(self.overlay.container_mtu)

    async def start(self):
        if self.overlay is not None:
            self._watch = await watch_leases(self.host.client, self._leases_changed)

    async def _leases_changed(self, leases):
        self._leases = leases
        await self.sync_quietly()

    def tick(self):
        if self._leases is None:
            return None
        return super().tick()

    async def converge(self):
        """Make this host's paths match the leases seen last; report what could not
        be done on the machine node (`network-error`), and what changed in the log."""
        host = self.host
        leases = self._leases or {}
        if self._peers is None or self._peers[0] is not leases:
            # Once per change of the leases, not on every tick, and in a thread: 21 ms
            # for 1,000 machines.
            self._peers = (leases, await host.in_thread(peers_from_leases, leases, host.machine_id, self.overlay.cidr))
        peers, problems = self._peers[1][0], list(self._peers[1][1])
        paths = await self._sync(peers, problems)
        if paths:
            # Only once there is a path to another machine: a lone host (a laptop's
            # local environment) never has its forwarding switched on. Checked on
            # every pass, since someone may have switched it off.
            if not await host.in_thread(namespaces.ip_forwarding, host.netns):
                await host.in_thread(namespaces.set_ip_forwarding, host.netns)
                log.info("%s: IP forwarding on, for containers on other machines", host.name)
        error = "; ".join(problems) or None
        if error != host.machine.data.get("network-error"):
            if error:
                log.error("%s: %s", host.name, error)
            await host.machine.update(**{"network-error": error})

    async def _sync(self, peers, problems):
        """Make the kernel's paths those to `peers`: compared with the kernel's, or,
        while the last comparison (less than DRIFT_CHECK ago) and every pass since left
        them all as wanted, changed from those. Returns how many paths there are; adds
        what could not be done to `problems`."""
        host = self.host
        now = host.reactor.seconds()
        since, compared = None, now
        if self._clean is not None and now - self._clean[1] < DRIFT_CHECK:
            if self._clean[0] == peers:
                return self._paths
            since, compared = self._clean
        self._clean = None
        try:
            report = await host.in_thread(self.overlay.sync, peers, since)
        except Exception as e:
            log.exception("%s: programming paths to other machines failed", host.name)
            problems.append(f"overlay: {e}")
            return 0
        problems.extend(report.errors)
        if report.changed:
            log.info(
                "%s: %s paths: %d peers; added %s; removed %s", host.name, self.overlay.mode, len(peers),
                ", ".join(report.added) or "nothing", ", ".join(report.removed) or "nothing",
            )
        self._paths = report.paths
        if not report.errors:
            # What failed is compared again on every pass; what worked, when the drift
            # check is due.
            self._clean = (peers, compared)
        return report.paths

    async def stop(self):
        await super().stop()
        if self._watch:
            self._watch.stop()
