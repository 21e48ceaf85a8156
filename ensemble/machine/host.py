"""What a machine agent's reconcilers share: this machine, its subnet and bridge, its
address allocator, and the agent's ways of running blocking work and reporting."""

import dataclasses
import logging
from typing import Any, Optional

from twisted.internet import task, threads

from ensemble.machine.safeguards import Safeguards
from ensemble.network import bridge
from ensemble.network.ipam import Allocator, SubnetsExhausted
from ensemble.state.environment import get_environment
from ensemble.state.network import ZooKeeperAddressStore, lease_subnet

log = logging.getLogger("ensemble.machine")


@dataclasses.dataclass
class Host:
    client: Any
    reactor: Any
    machine: Any                  # MachineState of this machine
    environment: dict
    subnet: str
    bridge: str
    allocator: Allocator
    unit_zookeeper: str           # where units reach ZooKeeper: 'h:p,h:p/root'
    netns: Optional[str] = None
    mtu: Optional[int] = None     # the containers' (lowered under VXLAN); None: default
    reported: set = dataclasses.field(default_factory=set)
    safeguards: Any = None        # the gate every unit's container passes (safeguards.py)

    def __post_init__(self):
        if self.safeguards is None:
            self.safeguards = Safeguards(self)

    @property
    def machine_id(self):
        return self.machine.id

    @property
    def name(self):
        return f"machine-{self.machine.id}"

    @property
    def gateway(self):
        """The bridge's address: the units' gateway, and where host services listen."""
        return bridge.gateway_of(self.subnet)

    def in_thread(self, f, *args):
        return threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), f, *args)

    async def publish(self, field, value):
        """Say `value` as the machine node's `field` (None removes it), writing only
        a change: passes repeat every few seconds."""
        if self.machine.data.get(field) != value:
            await self.machine.update(**{field: value})

    def report_once(self, message):
        # Passes repeat every few seconds; the log says each problem once.
        if message not in self.reported:
            self.reported.add(message)
            log.error("%s: %s", self.name, message)


async def lease(client, machine, reactor, retry_delay, stopping):
    """This machine's subnet lease (kept across restarts), retried while the
    environment has none free: that shows on the machine, and is not fatal."""
    while not stopping():
        try:
            return await lease_subnet(client, machine.id)
        except SubnetsExhausted as e:
            log.error("machine-%s: %s; retrying in %gs", machine.id, e, retry_delay)
            await machine.update(error=str(e))
            await task.deferLater(reactor, retry_delay, lambda: None)
    return None


async def prepare_host(client, machine, reactor, subnet, netns=None, unit_zookeeper=None):
    """The Host for `subnet`: the address store made ready, the allocator over it."""
    store = ZooKeeperAddressStore(client, machine.id)
    await store.ensure(subnet)
    environment = await get_environment(client)
    if unit_zookeeper is None:
        # Units may need another address for ZooKeeper than this agent: one inside
        # the container network, reached over the overlay.
        servers = environment.get("units-zookeeper") or client.servers
        unit_zookeeper = f"{servers}{client.root}"
    return Host(
        client=client, reactor=reactor, machine=machine, environment=environment, subnet=subnet,
        bridge=bridge.bridge_name(environment["name"]), allocator=Allocator(store, subnet),
        unit_zookeeper=unit_zookeeper, netns=netns,
    )


async def ensure_bridge(host):
    """The bridge up with its fixed MAC and the gateway address, and the machine node
    saying so."""
    await host.in_thread(bridge.ensure_bridge, host.bridge, host.subnet, host.netns, host.mtu)


async def publish_network(host):
    await host.machine.update(subnet=host.subnet, bridge=host.bridge, error=None)
    log.info("%s: subnet %s on bridge %s", host.name, host.subnet, host.bridge)
