"""What unit and service names resolve to, from ZooKeeper: the address source of the
DNS server (ensemble.network.dns).

- A unit's hostname (`db-0` for db/0) is the unit's private-address while the unit
  is alive; it has no address before its machine agent publishes one.
- A service's name (`db`) is the addresses of its alive units in state `started`.
- A unit's hostname wins over a service of the same name while that unit is alive.

ZooKeeper reads per lookup (the DNS server's cache bounds how often they happen):
- a label that names no unit or service by its form: none;
- a unit hostname of an alive unit: 1 (the unit node);
- a service name: 1 (the service node), and if it exists 1 (the children of
  /units: one round trip, though its size grows with the environment) plus 1 per
  unit of the service, issued in parallel;
- a unit-shaped label with no alive unit: 1, then the service lookup of that label
  (1 more if there is no such service).
"""

from twisted.internet import defer

from ensemble.errors import EnsembleError, InvalidName, MalformedState, ServiceNotFound, UnitNotFound
from ensemble.names import unit_name_from_key, validate_service_name
from ensemble.state.service import ServiceState, ServiceStateManager
from ensemble.state.unit import DYING, STARTED, UnitStateManager


class NamesUnavailable(EnsembleError):
    def __init__(self, servers):
        super().__init__(f"not connected to ZooKeeper at {servers}")


class ZooKeeperNames:
    """An AddressSource (see ensemble.network.dns) over an environment's state."""

    def __init__(self, client):
        self.client = client
        self._units = UnitStateManager(client)
        self._services = ServiceStateManager(client)

    async def addresses(self, label):
        """The addresses `label` resolves to ([]: a name without any now), or None."""
        label = label.lower() if isinstance(label, str) else ""
        unit = _unit_name(label)
        service = _service_name(label)
        if unit is None and service is None:
            return None
        if not self.client.connected:
            # Fail now: the client would otherwise wait for a reconnection, and a
            # DNS answer that late is as bad as none.
            raise NamesUnavailable(self.client.servers)
        if unit is not None:
            found = await self._unit_addresses(unit)
            if found is not None:
                return found
        if service is not None:
            return await self._service_addresses(service)
        return None

    async def _unit_addresses(self, name):
        """[address], [] (alive, no address yet), or None (no alive unit)."""
        try:
            unit = await self._units.get_unit(name)
        except UnitNotFound:
            return None
        except MalformedState:
            return []  # its name is taken, but nothing in it can be trusted
        if unit.life == DYING:
            return None
        return _address_of(unit.data)

    async def _service_addresses(self, name):
        try:
            service = await self._services.get_service(name)
        except ServiceNotFound:
            return None
        except MalformedState:
            service = ServiceState(self.client, name, {})  # it exists; its units may be readable
        names = await service.unit_names()
        results = await defer.DeferredList(
            [defer.ensureDeferred(self._units.get_unit(n)) for n in names], consumeErrors=True
        )
        addresses = []
        for ok, value in results:
            if not ok:
                if value.check(UnitNotFound, MalformedState):
                    continue  # removed meanwhile, or unreadable: not an address
                value.raiseException()
            if value.state == STARTED and value.life != DYING:
                addresses.extend(_address_of(value.data))
        return addresses


def _unit_name(label):
    try:
        return unit_name_from_key(label)
    except InvalidName:
        return None


def _service_name(label):
    try:
        return validate_service_name(label)
    except InvalidName:
        return None


def _address_of(data):
    address = data.get("private-address")
    return [address] if isinstance(address, str) and address else []
