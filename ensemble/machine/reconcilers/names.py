"""Units' names served on this host's bridge address (ensemble/network/dns.py), from
ZooKeeper state: every unit and service of the environment, whichever host runs it."""

import logging

from ensemble.machine.reconciler import Reconciler
from ensemble.network.dns import DNSServerError, NameServer, domain_for
from ensemble.state.names import ZooKeeperNames

log = logging.getLogger("ensemble.machine")

DNS_PORT = 53


class NamesReconciler(Reconciler):
    """Keeps the name server listening; says on the machine node (`name-server`)
    where it serves, or why it cannot."""

    name = "names"

    def __init__(self, host, port=DNS_PORT):
        super().__init__(host)
        self.ports = [f"{port}/udp", f"{port}/tcp"]  # what units must reach
        self.domain = domain_for(host.environment["name"])
        self.server = NameServer(
            ZooKeeperNames(host.client), host.gateway, port, domain=self.domain, reactor=host.reactor,
            netns=host.netns,
        )

    async def converge(self):
        host = self.host
        try:
            await self.server.start()
        except DNSServerError as e:
            host.report_once(str(e))
            await self.host.publish("name-server", {"state": "error", "error": str(e)})
            return
        await self.host.publish("name-server", {
            "address": f"{self.server.address}:{self.server.port}", "domain": self.domain, "state": "running",
        })

    async def stop(self):
        await super().stop()
        await self.server.stop()
