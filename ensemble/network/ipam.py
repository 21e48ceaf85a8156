"""Address management: which subnet a machine gets, which address a unit gets.

The policy lives here; where reservations are kept is a store's business
(`ensemble/state/network.py` keeps them in ZooKeeper).

- The environment's CIDR is cut into host subnets (default /24); each machine leases one.
- In a machine's subnet, the network address, `.1` (the bridge and gateway) and the
  broadcast address are never handed out.
- Allocation walks the range round-robin from positions handed out by a counter kept
  with the reservations: an address just freed is not handed out again until the walk
  comes round, even after a restart. No two allocations get the same position (each
  take hands its allocator the next one in the same write), so allocators racing on
  one machine aim at different addresses instead of colliding.
- Each unit also gets a fixed MAC (`unit_mac`), derived from its address and recorded
  with the reservation: its container's interface has it, and the host's bridge accepts
  nothing else from the unit's port (ensemble/network/port_filter.py).
"""

import hashlib
from typing import Optional, Protocol

import netaddr
from twisted.internet import defer

from ensemble.errors import EnsembleError



class AddressesExhausted(EnsembleError):
    def __init__(self, subnet, in_use):
        super().__init__(f"no free address in {subnet} ({in_use} in use)")
        self.subnet = subnet


class SubnetsExhausted(EnsembleError):
    def __init__(self, cidr, prefix, leased):
        super().__init__(f"no free /{prefix} subnet left in {cidr} ({leased} leased); use a larger --network")


def unit_mac(subnet, address):
    """The MAC of the unit holding `address` in `subnet`: locally administered and
    unicast (first octet 0x0a; the bridge's own starts 0x02, see bridge.bridge_mac, and
    LXC's random ones 00:16:3e), one octet of a hash of the subnet, then the four octets
    of the address. Distinct for every address of a subnet by construction, so no two
    units on a bridge can be given the same one; the same address always gets the same
    MAC, so a unit keeps it across restarts and its neighbours' caches stay right."""
    ip = netaddr.IPAddress(address)
    if ip.version != 4:
        raise ValueError(f"{address} is not an IPv4 address")
    salt = hashlib.sha256(str(netaddr.IPNetwork(subnet).cidr).encode()).digest()[0]
    return ":".join(f"{b:02x}" for b in (0x0A, salt, *ip.packed))


def valid_mac(mac):
    """`mac` as six lower-case hex pairs if it is a unicast MAC, else None."""
    text = str(mac).strip().lower()
    parts = text.split(":")
    if len(parts) != 6 or not all(len(p) == 2 and all(c in "0123456789abcdef" for c in p) for p in parts):
        return None
    return None if int(parts[0], 16) & 1 else text


class AddressTaken(Exception):
    """The store already has this address reserved (for another unit)."""


class UnitHasAddress(Exception):
    """The store already has a reservation for this unit."""

    def __init__(self, address):
        super().__init__(address)
        self.address = address


class AddressStore(Protocol):
    """Where one machine's reservations are kept (ZooKeeper in ensemble/state/network.py;
    memory in tests). Every change is atomic: both directions of a reservation, and
    the round-robin position handed out with it."""

    async def reservation(self, unit: str) -> Optional[str]:
        """The unit's address, or None."""

    async def reservations(self) -> dict:
        """{unit: address} of every reservation."""

    async def taken(self) -> list:
        """Every reserved address."""

    async def ticket(self) -> int:
        """A round-robin position no other caller gets."""

    async def take(self, unit: str, address: str, mac: Optional[str] = None) -> int:
        """Reserve `address` for `unit` (with its `mac`, in the same change); the next
        position. AddressTaken if the address is someone's; UnitHasAddress if the unit
        has one."""

    async def macs(self) -> dict:
        """{unit: MAC} of every reservation that has one recorded."""

    async def record_mac(self, unit: str, mac: str) -> None:
        """Record `mac` for a reservation made before MACs were recorded."""

    async def free(self, unit: str) -> Optional[str]:
        """Drop the unit's reservation; its address, or None if it had none."""


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

    def from_index(self, index):
        """Every usable address once, starting at position `index` (mod size), wrapping."""
        size = len(self)
        for offset in range(size):
            yield str(netaddr.IPAddress(self._first + (index + offset) % size))

    def first_free(self, index, taken):
        for address in self.from_index(index):
            if address not in taken:
                return address
        return None


class Allocator:
    """Addresses for the units of one machine, reserved in `store` (an AddressStore).

    Safe with several allocators on one store (agents restarting, processes racing):
    the store's take is atomic, and a lost race just tries again with a new ticket.
    """

    def __init__(self, store, subnet):
        self.store = store
        self.range = AddressRange(subnet)
        self.subnet = str(self.range.subnet)
        self._taken = None
        self._reserved = None
        self._macs = None
        self._position = None
        self._lock = defer.DeferredLock()
        self.collisions = 0

    async def _load(self):
        # One read of the store; after that this allocator's own takes and releases
        # keep the view current, and the store's atomic take settles any staleness.
        self._reserved = await self.store.reservations()
        self._taken = set(await self.store.taken())
        self._macs = await self.store.macs()

    async def refresh(self):
        """Read the reservations again: the view is otherwise kept by this allocator's
        own takes and releases, and misses what others wrote."""
        async with self._lock:
            await self._load()

    async def reserved(self):
        """{unit: address} of every reservation here, from this allocator's view."""
        if self._reserved is None:
            await self._load()
        return dict(self._reserved)

    def mac(self, unit, address):
        """The MAC of `unit`, which holds `address`: as recorded with its reservation
        (from this allocator's view), else derived (`unit_mac`)."""
        recorded = valid_mac((self._macs or {}).get(unit, ""))
        return recorded or unit_mac(self.subnet, address)

    async def hardware(self, only=None):
        """{unit: (address, MAC)} of every reservation here, from this allocator's view;
        `only`: of that unit's alone (a pass that asks per unit must not pay for all)."""
        reserved = await self.reserved()
        units = [only] if only is not None else list(reserved)
        return {unit: (reserved[unit], self.mac(unit, reserved[unit])) for unit in units if unit in reserved}

    async def allocate(self, unit):
        """The unit's address: its existing reservation, or a new one (its MAC recorded
        with it; a reservation from before MACs were recorded gets one now)."""
        # One at a time per allocator: concurrent calls would share a position and
        # collide with each other.
        async with self._lock:
            return await self._allocate(unit)

    async def _allocate(self, unit):
        if self._reserved is None:
            await self._load()
        if unit in self._reserved:
            return await self._recorded(unit, self._reserved[unit])
        reloaded = False
        while True:
            if self._position is None:
                self._position = await self.store.ticket()
            address = self.range.first_free(self._position - 1, self._taken)
            if address is None:
                if reloaded:
                    raise AddressesExhausted(self.subnet, len(self._taken))
                # The local view may be stale in either direction: ask the store.
                self._taken = set(await self.store.taken())
                existing = await self.store.reservation(unit)
                if existing is not None:
                    self._reserved[unit] = existing
                    return await self._recorded(unit, existing)
                reloaded = True
                continue
            mac = unit_mac(self.subnet, address)
            try:
                self._position = await self.store.take(unit, address, mac)
            except AddressTaken:
                # Someone walked past a taken address onto ours (only once the range
                # has wrapped). A fresh position is enough; re-reading every
                # reservation on each lost race is what makes contention expensive.
                self._taken.add(address)
                self._position = None
                self.collisions += 1
                continue
            except UnitHasAddress as e:
                self._reserved[unit] = e.address
                self._taken.add(e.address)
                return await self._recorded(unit, e.address)
            self._reserved[unit] = address
            self._taken.add(address)
            self._macs[unit] = mac
            return address

    async def _recorded(self, unit, address):
        """`address`, once the reservation has its MAC recorded (reservations made
        before MACs were, or by another allocator whose MAC this view has not read)."""
        if valid_mac(self._macs.get(unit, "")) is None:
            self._macs = await self.store.macs()
            if valid_mac(self._macs.get(unit, "")) is None:
                mac = unit_mac(self.subnet, address)
                await self.store.record_mac(unit, mac)
                self._macs[unit] = mac
        return address

    async def release(self, unit):
        """Free the unit's address; returns it, or None if it had none."""
        address = await self.store.free(unit)
        if self._reserved is not None:
            self._reserved.pop(unit, None)
            self._macs.pop(unit, None)
            if address is not None:
                self._taken.discard(address)
        return address

    async def reconcile(self, assigned):
        """Free the reservations of units not in `assigned`; returns {unit: address} freed."""
        freed = {}
        for unit, address in sorted((await self.reserved()).items()):
            if unit not in assigned:
                if await self.release(unit) is not None:
                    freed[unit] = address
        return freed
