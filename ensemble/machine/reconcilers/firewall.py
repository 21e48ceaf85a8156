"""The firewall between units: opened ports as the units here published them, at the
addresses this machine reserved for them (a unit may write its own node, its
private-address included, so the address never comes from there)."""

import logging

from ensemble.machine.reconciler import Reconciler
from ensemble.network.firewall import Firewall, parse_port, zookeeper_ports

log = logging.getLogger("ensemble.machine")


class FirewallReconciler(Reconciler):
    name = "firewall"

    def __init__(self, host, host_ports=()):
        """`host_ports`: what else units may reach on their gateway besides ZooKeeper
        (the host's name server and package cache: 'PORT/proto')."""
        super().__init__(host)
        self.firewall = Firewall(
            host.environment["name"], host.bridge, host.gateway,
            [*zookeeper_ports(host.unit_zookeeper, host.gateway), *host_ports], host.netns, subnet=host.subnet,
            cidr=(host.environment.get("network") or {}).get("cidr"),
        )
        self._openings = {}       # unit -> ["7070/tcp", ...] it published
        self._watches = {}        # unit -> its node's watch (for its opened ports)

    async def unit_addressed(self, unit):
        """`unit` has an address here: follow the ports it opens."""
        name = unit.name
        if name in self._watches:
            return
        self._watches[name] = None  # claimed: one watch per unit
        try:
            self._watches[name] = await unit.watch(lambda data: self._unit_node_changed(name, data))
        except Exception:
            del self._watches[name]  # the next pass tries again
            raise

    async def unit_leaving(self, name):
        """`name` is being torn down: close its ports before its address is freed."""
        watch = self._watches.pop(name, None)
        if watch is not None:
            watch.stop()
        if self._openings.pop(name, None) is not None:
            await self.sync()

    async def _unit_node_changed(self, name, data):
        if data is None or "malformed" in data:
            opening = None
        else:
            ports = data.get("open-ports") or []
            opening = list(ports) if isinstance(ports, list) else [str(ports)]
        if self._openings.get(name) != opening:
            if opening is None:
                self._openings.pop(name, None)
            else:
                self._openings[name] = opening
            await self.sync_quietly()

    async def converge(self):
        """The firewall's opened ports made those the units here published."""
        host = self.host
        openings = {}
        reserved = await host.allocator.reserved()
        for name, ports in sorted(self._openings.items()):
            address = reserved.get(name)
            if not address:
                continue
            parsed = []
            for port in ports:
                try:
                    parsed.append(parse_port(port))
                except ValueError:
                    host.report_once(f"{name} published an invalid port {str(port)[:40]!r}; ignored")
            openings[address] = parsed
        try:
            await host.in_thread(self.firewall.sync, openings)
        except Exception as e:
            host.report_once(f"firewall: {e}")

    async def stop(self):
        await super().stop()
        for watch in self._watches.values():
            if watch is not None:
                watch.stop()
