"""Network state in ZooKeeper: subnet leases and per-machine address reservations.

    /network/subnets/<a.b.c.d-len>                 {machine, address}: the lease
    /network/addresses/<machine-key>               {subnet}
    /network/addresses/<machine-key>/tickets       its version hands out round-robin positions
    /network/addresses/<machine-key>/ips/<ip>      owning unit name
    /network/addresses/<machine-key>/units/<unit>  its address
    /network/addresses/<machine-key>/macs/<unit>   its MAC (ipam.unit_mac)

Both directions of a reservation, and its MAC, are created and deleted in one
transaction, so "is this address free?" and "has this unit an address?" are each one
read and never disagree. Create is take: a node that exists is someone else's. (A
reservation made before MACs were recorded gets its `macs` node on its next allocation.)
"""

from twisted.internet import defer

from ensemble.names import machine_key, unit_key, unit_name_from_key
from ensemble.network.ipam import (
    AddressTaken,
    SubnetPlan,
    SubnetsExhausted,
    UnitHasAddress,
    lease_key,
    subnet_from_key,
)
from ensemble.state import nodes
from ensemble.state.client import BadVersion, NodeExists, NoNode
from ensemble.state.environment import get_environment
from ensemble.state.watch import ChildrenWatch


CHILDREN = ("ips", "units", "tickets", "macs")


class ZooKeeperAddressStore:
    """Reservations of one machine's addresses, for `ipam.Allocator`."""

    def __init__(self, client, machine_id):
        self.client = client
        self.path = f"{nodes.ADDRESSES}/{machine_key(machine_id)}"

    async def ensure(self, subnet):
        # Where the environment has ACLs, add-machine made the (empty) top node and this
        # machine may not create it (ZooKeeper checks that before whether it exists).
        if await self.client.exists(self.path) is None:
            tx = self.client.transaction()
            tx.create(self.path, nodes.dump({"subnet": subnet}))
            for child in CHILDREN:
                tx.create(f"{self.path}/{child}", b"")
            try:
                await tx.commit()
                return
            except NodeExists:
                pass
        for child in CHILDREN:
            try:
                await self.client.create(f"{self.path}/{child}", b"")
            except NodeExists:
                pass
        await nodes.update(self.client, self.path, lambda d: d if d.get("subnet") == subnet else {**d, "subnet": subnet})

    async def reservation(self, unit):
        try:
            data, _ = await self.client.get(f"{self.path}/units/{unit_key(unit)}")
        except NoNode:
            return None
        return data.decode()

    async def reservations(self):
        try:
            keys = await self.client.get_children(f"{self.path}/units")
        except NoNode:
            return {}
        results = await defer.DeferredList(
            [self.client.get(f"{self.path}/units/{k}") for k in keys], consumeErrors=True
        )
        found = {}
        for key, (ok, value) in zip(keys, results):
            if ok:
                found[unit_name_from_key(key)] = value[0].decode()
        return found

    async def macs(self):
        try:
            keys = await self.client.get_children(f"{self.path}/macs")
        except NoNode:
            return {}
        results = await defer.DeferredList(
            [self.client.get(f"{self.path}/macs/{k}") for k in keys], consumeErrors=True
        )
        return {unit_name_from_key(k): value[0].decode() for k, (ok, value) in zip(keys, results) if ok}

    async def record_mac(self, unit, mac):
        try:
            await self.client.create(f"{self.path}/macs/{unit_key(unit)}", mac.encode())
        except NodeExists:
            await self.client.set(f"{self.path}/macs/{unit_key(unit)}", mac.encode())

    async def taken(self):
        try:
            return await self.client.get_children(f"{self.path}/ips")
        except NoNode:
            return []

    async def ticket(self):
        """A round-robin position no other caller gets: an unversioned set never fails
        under contention, and each bumps the node's version by exactly one."""
        stat = await self.client.set(f"{self.path}/tickets", b"")
        return stat.version

    async def take(self, unit, address, mac=None):
        tx = self.client.transaction()
        tx.create(f"{self.path}/ips/{address}", unit.encode())
        tx.create(f"{self.path}/units/{unit_key(unit)}", address.encode())
        if mac is not None:
            tx.create(f"{self.path}/macs/{unit_key(unit)}", mac.encode())
        # The next position for this allocator, in the same write (see `ticket`).
        tx.set(f"{self.path}/tickets", b"")
        try:
            results = await tx.commit()
        except NodeExists:
            existing = await self.reservation(unit)
            if existing is not None:
                raise UnitHasAddress(existing)
            if mac is not None and await self.client.exists(f"{self.path}/macs/{unit_key(unit)}") is not None:
                # A MAC left without its reservation (freed by an older agent): dropped,
                # so that the next take can record this unit's.
                await self._drop_mac(unit)
            raise AddressTaken(address)
        return results[-1].version

    async def free(self, unit):
        address = await self.reservation(unit)
        if address is None:
            return None
        has_mac = await self.client.exists(f"{self.path}/macs/{unit_key(unit)}") is not None
        tx = self.client.transaction()
        tx.delete(f"{self.path}/units/{unit_key(unit)}")
        tx.delete(f"{self.path}/ips/{address}")
        if has_mac:
            tx.delete(f"{self.path}/macs/{unit_key(unit)}")
        try:
            await tx.commit()
        except NoNode:
            return None
        return address

    async def _drop_mac(self, unit):
        try:
            await self.client.delete(f"{self.path}/macs/{unit_key(unit)}")
        except NoNode:
            pass

    async def delete_ops(self, tx):
        """Add deletes of this machine's whole address tree to `tx`."""
        if await self.client.exists(self.path) is None:
            return
        # Only the top node exists if the machine's agent never got as far as ensure().
        for sub in await self.client.get_children(self.path):
            if sub in ("ips", "units", "macs"):
                for child in await self.client.get_children(f"{self.path}/{sub}"):
                    tx.delete(f"{self.path}/{sub}/{child}")
            tx.delete(f"{self.path}/{sub}")
        tx.delete(self.path)


async def subnet_plan(client):
    network = (await get_environment(client)).get("network") or {}
    return SubnetPlan(network.get("cidr", "10.77.0.0/16"), network.get("host-prefix", 24))


async def leases(client):
    """{subnet: lease data} for every leased subnet."""
    return _by_subnet(await _read_leases(client, await client.get_children(nodes.SUBNETS)))


async def _read_leases(client, keys):
    """{key: lease data} of the lease nodes `keys` that could be read."""
    results = await defer.DeferredList(
        [defer.ensureDeferred(nodes.read(client, f"{nodes.SUBNETS}/{k}")) for k in keys], consumeErrors=True
    )
    return {k: value[0] for k, (ok, value) in zip(keys, results) if ok}


def _by_subnet(by_key):
    return {subnet_from_key(k): lease for k, lease in by_key.items()}


async def lease_subnet(client, machine_id):
    """The machine's subnet: its existing lease, or the first free one taken atomically."""
    plan = await subnet_plan(client)
    machine_path = f"{nodes.MACHINES}/{machine_key(machine_id)}"
    while True:
        machine, version = await nodes.read(client, machine_path)
        current = await leases(client)
        mine = sorted(s for s, lease in current.items() if lease.get("machine") == machine_id)
        if mine:
            subnet = machine.get("subnet") if machine.get("subnet") in mine else mine[0]
            if machine.get("subnet") != subnet:
                await nodes.update(client, machine_path, lambda d: {**d, "subnet": subnet})
            return subnet
        free = [s for s in plan.subnets() if s not in current]
        if not free:
            raise SubnetsExhausted(str(plan.network), plan.host_prefix, len(current))
        subnet = free[0]
        lease = {"machine": machine_id, "address": machine.get("address")}
        tx = client.transaction()
        tx.create(f"{nodes.SUBNETS}/{lease_key(subnet)}", nodes.dump(lease))
        tx.set(machine_path, nodes.dump({**machine, "subnet": subnet}), version)
        try:
            await tx.commit()
            return subnet
        except (NodeExists, BadVersion):
            continue


async def release_ops(client, machine_id, tx):
    """Add to `tx` the deletes that free the machine's leases and address reservations."""
    for subnet, lease in (await leases(client)).items():
        if lease.get("machine") == machine_id:
            tx.delete(f"{nodes.SUBNETS}/{lease_key(subnet)}")
    await ZooKeeperAddressStore(client, machine_id).delete_ops(tx)


async def watch_leases(client, callback):
    """Call `callback({subnet: lease})` now and whenever a lease comes or goes (a new
    dict each time). Reads only the leases that came since the last call when that is
    all that changed: with 1,000 machines, every agent read all 1,000 leases again for
    each machine added."""
    known = {}          # key -> lease data, as of `cversion`
    cversion = None

    async def changed(value):
        nonlocal known, cversion
        if value is None:
            known, cversion = {}, None
            await callback({})
            return
        keys, stat = value
        came = [k for k in keys if k not in known]
        went = known.keys() - set(keys)
        # A lease node's data never changes once made, but one can go and another come
        # under the same key (a machine's subnet released and leased again) between two
        # listings. Each child made or removed moves cversion by one, so the changes
        # account for it only if no key changed twice: else read every lease.
        if cversion is None or len(came) + len(went) != stat.cversion - cversion:
            came, kept = keys, {}
        else:
            kept = {k: known[k] for k in keys if k in known}
        read = await _read_leases(client, came)
        known = {**kept, **read}
        # A lease that could not be read (gone since the listing, the connection lost) is
        # left out, and the next call reads them all again.
        cversion = stat.cversion if len(read) == len(came) else None
        await callback(_by_subnet(known))

    return await ChildrenWatch(client, nodes.SUBNETS, changed, stat=True).start()
