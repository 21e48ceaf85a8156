"""Address management: which subnet a machine gets, which address a unit gets.

The policy lives here; where reservations are kept is a store's business
(`ipam_store.py`): ZooKeeper for real, memory for property tests of the policy.

- The environment's CIDR is cut into host subnets (default /24); each machine leases one.
- In a machine's subnet, the network address, `.1` (the bridge and gateway) and the
  broadcast address are never handed out.
- Allocation walks the range round-robin from a cursor kept with the reservations, so
  an address just freed is not handed out again at once, even after a restart.
"""

import random

import netaddr

from ensemble.errors import EnsembleError

# Under contention, pick among this many free addresses after the cursor rather than
# all racing for the first one.
CONTENTION_WINDOW = 16


class AddressesExhausted(EnsembleError):
    def __init__(self, subnet, in_use):
        super().__init__(f"no free address in {subnet} ({in_use} in use)")
        self.subnet = subnet


class SubnetsExhausted(EnsembleError):
    def __init__(self, cidr, prefix, leased):
        super().__init__(f"no free /{prefix} subnet left in {cidr} ({leased} leased); use a larger --network")


class AddressTaken(Exception):
    """The store already has this address reserved (for another unit)."""


class UnitHasAddress(Exception):
    """The store already has a reservation for this unit."""

    def __init__(self, address):
        super().__init__(address)
        self.address = address


class SubnetPlan:
    """The environment's CIDR cut into equal host subnets."""

    def __init__(self, cidr, host_prefix=24):
        self.network = netaddr.IPNetwork(cidr)
        self.host_prefix = int(host_prefix)
        if self.host_prefix < self.network.prefixlen or self.host_prefix > 30:
            raise EnsembleError(f"host prefix /{self.host_prefix} does not fit in {cidr}")

    def __len__(self):
        return 2 ** (self.host_prefix - self.network.prefixlen)

    def subnets(self):
        return (str(s) for s in self.network.subnet(self.host_prefix))


def lease_key(subnet):
    """'10.77.3.0/24' -> '10.77.3.0-24' (a node name cannot hold '/')."""
    return subnet.replace("/", "-")


def subnet_from_key(key):
    return key.replace("-", "/")


class AddressRange:
    """The addresses of a host subnet that units may have, in order."""

    def __init__(self, subnet):
        self.subnet = netaddr.IPNetwork(subnet)
        if self.subnet.size < 4:
            raise EnsembleError(f"subnet {subnet} is too small for units")
        self.gateway = str(self.subnet.network + 1)
        self._first = int(self.subnet.network) + 2
        self._last = int(self.subnet.broadcast) - 1

    def __len__(self):
        return self._last - self._first + 1

    def __contains__(self, address):
        try:
            value = int(netaddr.IPAddress(address))
        except (netaddr.AddrFormatError, ValueError, TypeError):
            return False
        return self._first <= value <= self._last

    def after(self, cursor):
        """Every usable address once, starting just after `cursor` and wrapping."""
        size = len(self)
        if cursor in self:
            start = int(netaddr.IPAddress(cursor)) - self._first + 1
        else:
            start = 0
        for offset in range(size):
            yield str(netaddr.IPAddress(self._first + (start + offset) % size))

    def free_after(self, cursor, taken, limit):
        free = []
        for address in self.after(cursor):
            if address not in taken:
                free.append(address)
                if len(free) == limit:
                    break
        return free


class Allocator:
    """Addresses for the units of one machine, reserved in `store`.

    Safe with several allocators on one store (agents restarting, processes racing):
    the store's take is atomic, and a lost race just tries another address.
    """

    def __init__(self, store, subnet, rng=None):
        self.store = store
        self.range = AddressRange(subnet)
        self.subnet = str(self.range.subnet)
        self._rng = rng or random.Random()
        self._taken = None
        self._cursor = None

    async def _refresh(self):
        self._taken = set(await self.store.taken())
        self._cursor = await self.store.cursor()

    async def allocate(self, unit):
        """The unit's address: its existing reservation, or a new one."""
        existing = await self.store.reservation(unit)
        if existing is not None:
            return existing
        if self._taken is None:
            await self._refresh()
        contended = False
        while True:
            candidates = self.range.free_after(
                self._cursor, self._taken, CONTENTION_WINDOW if contended else 1
            )
            if not candidates:
                await self._refresh()
                candidates = self.range.free_after(self._cursor, self._taken, 1)
                if not candidates:
                    raise AddressesExhausted(self.subnet, len(self._taken))
            address = self._rng.choice(candidates)
            try:
                await self.store.take(unit, address)
            except AddressTaken:
                contended = True
                await self._refresh()
                continue
            except UnitHasAddress as e:
                return e.address
            self._taken.add(address)
            self._cursor = address
            return address

    async def release(self, unit):
        """Free the unit's address; returns it, or None if it had none."""
        address = await self.store.free(unit)
        if address is not None and self._taken is not None:
            self._taken.discard(address)
        return address

    async def reconcile(self, assigned):
        """Free the reservations of units not in `assigned`; returns {unit: address} freed."""
        freed = {}
        for unit, address in sorted((await self.store.reservations()).items()):
            if unit not in assigned:
                if await self.release(unit) is not None:
                    freed[unit] = address
        return freed
