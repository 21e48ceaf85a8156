"""Address management: ranges, round-robin allocation over the real ZooKeeper store,
subnet leases, property tests of allocate/release/restart, and 8 racing processes."""

import json
import os
import subprocess
import sys
import time
from collections import Counter

import netaddr
import pytest
import pytest_twisted
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import defer

from conftest import eventually
from ensemble.errors import MachineBusy
from ensemble.network.ipam import AddressesExhausted, AddressRange, Allocator, SubnetsExhausted, lease_key
from ensemble.state.environment import initialize
from ensemble.state.machine import MachineStateManager
from ensemble.state import nodes
from ensemble.state.network import ZooKeeperAddressStore, lease_subnet, leases, watch_leases

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_range_skips_network_gateway_and_broadcast():
    r = AddressRange("10.1.2.0/24")
    assert len(r) == 253 and r.gateway == "10.1.2.1"
    addresses = list(r.from_index(0))
    assert addresses[0] == "10.1.2.2" and addresses[-1] == "10.1.2.254"
    for excluded in ("10.1.2.0", "10.1.2.1", "10.1.2.255", "10.1.3.2", "junk"):
        assert excluded not in r
    assert len(AddressRange("10.0.0.0/22")) == 1021
    assert list(r.from_index(253))[0] == "10.1.2.2"  # wraps
    assert r.first_free(0, {"10.1.2.2", "10.1.2.3"}) == "10.1.2.4"


async def allocator(client, subnet, machine=0):
    store = ZooKeeperAddressStore(client, machine)
    await store.ensure(subnet)
    return Allocator(store, subnet)


@pytest_twisted.ensureDeferred
async def test_round_robin_same_address_back_and_restart(client):
    await client.ensure_path("/network/addresses")
    ipam = await allocator(client, "10.5.0.0/24")
    assert [await ipam.allocate(f"u/{i}") for i in range(3)] == ["10.5.0.2", "10.5.0.3", "10.5.0.4"]
    assert await ipam.allocate("u/1") == "10.5.0.3"  # the same unit keeps its address
    assert await ipam.release("u/1") == "10.5.0.3"
    assert await ipam.release("u/1") is None
    # The freed .3 is not handed out again at once.
    assert await ipam.allocate("u/3") == "10.5.0.5"
    # A restarted agent (a new allocator on the same store) carries on where it was.
    again = await allocator(client, "10.5.0.0/24")
    assert await again.allocate("u/0") == "10.5.0.2"
    fresh = await again.allocate("u/4")
    assert netaddr.IPAddress(fresh) > netaddr.IPAddress("10.5.0.5")


@pytest_twisted.ensureDeferred
async def test_exhaustion_is_an_error_and_reconcile_frees_leaks(client):
    await client.ensure_path("/network/addresses")
    ipam = await allocator(client, "10.6.0.0/29")  # 5 usable
    for i in range(5):
        await ipam.allocate(f"u/{i}")
    with pytest.raises(AddressesExhausted, match=r"no free address in 10.6.0.0/29 \(5 in use\)"):
        await ipam.allocate("u/5")
    freed = await ipam.reconcile({"u/0", "u/2", "u/4"})
    assert freed == {"u/1": "10.6.0.3", "u/3": "10.6.0.5"}
    assert sorted(await ipam.store.taken()) == ["10.6.0.2", "10.6.0.4", "10.6.0.6"]
    assert await ipam.allocate("u/5") in ("10.6.0.3", "10.6.0.5")


operations = st.lists(
    st.one_of(
        st.tuples(st.just("allocate"), st.integers(0, 19)),
        st.tuples(st.just("release"), st.integers(0, 19)),
        st.tuples(st.just("restart"), st.just(0)),
    ),
    max_size=40,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=operations)
@pytest_twisted.ensureDeferred
async def test_any_sequence_keeps_addresses_unique_in_range_and_freeable(client, ops):
    # Each example works under a fresh machine, so examples do not see each other.
    machine = int(time.monotonic_ns() % 10**9)
    await client.ensure_path("/network/addresses")
    subnet = "10.7.0.0/28"  # 13 usable, fewer than the 20 units: exhaustion happens
    ipam = await allocator(client, subnet, machine)
    usable = AddressRange(subnet)
    model = {}
    for op, n in ops:
        unit = f"u/{n}"
        if op == "allocate":
            try:
                address = await ipam.allocate(unit)
            except AddressesExhausted:
                assert len(model) == len(usable) and unit not in model
                continue
            assert address in usable
            assert model.get(unit, address) == address, "a unit's address changed while it held it"
            model[unit] = address
        elif op == "release":
            assert await ipam.release(unit) == model.pop(unit, None)
        else:
            ipam = Allocator(ZooKeeperAddressStore(client, machine), subnet)
        held = await ipam.store.reservations()
        assert held == model
        assert len(set(held.values())) == len(held), "one address given to two units"
        assert sorted(await ipam.store.taken()) == sorted(model.values())
    for unit in list(model):
        await ipam.release(unit)
    assert await ipam.store.taken() == [] and await ipam.store.reservations() == {}


@pytest_twisted.ensureDeferred
async def test_subnet_leases(client):
    await initialize(client, "t", {"cidr": "10.8.0.0/22", "host-prefix": 24})
    machines = MachineStateManager(client)
    ids = [(await machines.add_machine(address=f"192.0.2.{i}")).id for i in range(5)]
    subnets = [await lease_subnet(client, i) for i in ids[:4]]
    assert subnets == ["10.8.0.0/24", "10.8.1.0/24", "10.8.2.0/24", "10.8.3.0/24"]
    assert await lease_subnet(client, ids[1]) == "10.8.1.0/24"  # a restarted agent: its own back
    assert (await machines.get_machine(ids[1])).data["subnet"] == "10.8.1.0/24"
    assert (await leases(client))["10.8.1.0/24"] == {"machine": 1, "address": "192.0.2.1"}
    with pytest.raises(SubnetsExhausted, match=r"no free /24 subnet left in 10.8.0.0/22 \(4 leased\)"):
        await lease_subnet(client, ids[4])
    # A removed machine's lease (and its reservations) is freed for the next machine.
    ipam = await allocator(client, "10.8.1.0/24", machine=1)
    await ipam.allocate("u/0")
    await machines.remove_machine(1)
    assert "10.8.1.0/24" not in await leases(client)
    assert await client.exists("/network/addresses/machine-0000000001") is None
    assert await lease_subnet(client, ids[4]) == "10.8.1.0/24"


@pytest_twisted.ensureDeferred
async def test_watched_leases_read_only_those_that_came_unless_one_went_and_came_back(client):
    """Every agent watches the leases: with 1,000 machines, reading them all for each
    machine added made every agent read 1,000 nodes per machine. A lease made under a
    key seen before (its subnet released and leased again) is read again all the same."""
    await client.ensure_path(nodes.SUBNETS)

    def path(subnet):
        return f"{nodes.SUBNETS}/{lease_key(subnet)}"

    async def lease(subnet, machine, tx=None):
        own = tx is None
        tx = tx or client.transaction()
        tx.create(path(subnet), nodes.dump({"machine": machine, "address": f"192.0.2.{machine}"}))
        if own:
            await tx.commit()

    await lease("10.8.0.0/24", 0)
    await lease("10.8.1.0/24", 1)
    seen, read = [], []
    get = client.get
    client.get = lambda path, watch=None: read.append(path) or get(path, watch)

    async def changed(value):
        seen.append(value)

    def until(check):
        return eventually(lambda: defer.succeed(check(seen[-1])))

    watch = await watch_leases(client, changed)
    try:
        assert sorted(seen[-1]) == ["10.8.0.0/24", "10.8.1.0/24"] and len(read) == 2
        del read[:]
        await lease("10.8.2.0/24", 2)
        await until(lambda leases: len(leases) == 3)
        assert seen[-1]["10.8.2.0/24"] == {"machine": 2, "address": "192.0.2.2"}
        assert read == [path("10.8.2.0/24")]  # the new one only

        del read[:]
        await client.delete(path("10.8.0.0/24"))
        await until(lambda leases: "10.8.0.0/24" not in leases)
        assert sorted(seen[-1]) == ["10.8.1.0/24", "10.8.2.0/24"] and read == []

        # Gone and back under the same key in one change: the same names as before.
        tx = client.transaction()
        tx.delete(path("10.8.1.0/24"))
        await lease("10.8.1.0/24", 3, tx)
        await tx.commit()
        await until(lambda leases: leases["10.8.1.0/24"]["machine"] == 3)
        assert sorted(read) == [path("10.8.1.0/24"), path("10.8.2.0/24")]
    finally:
        watch.stop()


@pytest_twisted.ensureDeferred
async def test_remove_machine_refuses_while_it_has_units_or_a_live_agent(env_client):
    machines = MachineStateManager(env_client)
    machine = await machines.get_machine(0)
    await env_client.create(machine.units_path + "/db-0", b"")
    with pytest.raises(MachineBusy, match="still has units: db/0"):
        await machines.remove_machine(0)
    await env_client.delete(machine.units_path + "/db-0")
    await env_client.create(machine.agent_path, b"", ephemeral=True)
    with pytest.raises(MachineBusy, match="agent is running"):
        await machines.remove_machine(0)


def run_workers(zk_spec, subnet, workers, count=None, after_exhausted=3):
    start_at = time.time() + 1.5  # after every worker has connected
    processes = [
        subprocess.Popen(
            [
                sys.executable, os.path.join(REPO, "bench", "ipam_worker.py"),
                "--zookeeper", zk_spec, "--subnet", subnet, "--service", f"w{i}",
                "--start-at", str(start_at), "--after-exhausted", str(after_exhausted),
                *(["--count", str(count)] if count else []),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(workers)
    ]
    results = []
    for p in processes:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0
        results.append(json.loads(out))
    return results


@pytest_twisted.ensureDeferred
async def test_eight_processes_exhaust_a_slash_22_without_duplicates(client, zk_spec):
    await client.ensure_path("/network/addresses")
    subnet = "10.9.0.0/22"
    await ZooKeeperAddressStore(client, 0).ensure(subnet)
    results = run_workers(zk_spec, subnet, workers=8)
    assert [r["errors"] for r in results] == [[]] * 8
    addresses = [a[1] for r in results for a in r["allocated"]]
    duplicates = [a for a, n in Counter(addresses).items() if n > 1]
    assert duplicates == []
    assert len(addresses) == 1021
    assert all(r["exhausted"] == 4 for r in results), "every request after exhaustion must fail"
    network = netaddr.IPNetwork(subnet)
    assert {str(network.network), str(network.network + 1), str(network.broadcast)}.isdisjoint(addresses)
    # ZooKeeper agrees with what the workers were told.
    store = ZooKeeperAddressStore(client, 0)
    assert sorted(await store.taken()) == sorted(addresses)
    held = await store.reservations()
    assert {a[0]: a[1] for r in results for a in r["allocated"]} == held
