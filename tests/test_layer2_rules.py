"""Layer 2 bound to each unit's identity, fast: the MAC each unit gets and where it is
recorded, its container's config, the port filter's rules, and the gate that keeps a
unit's container from starting before its port's entry is loaded (in-memory ZooKeeper,
the nftables part replaced by a recorder). On namespaces and real units: test_layer2.py."""

import ipaddress

import pytest
import pytest_twisted
from twisted.internet import task

from ensemble.errors import InvalidValue
from ensemble.machine import safeguards
from ensemble.machine.container import config as lxc_config
from ensemble.machine.container.driver import ContainerSpec
from ensemble.machine.container.names import container_name, veth_name
from ensemble.machine.reconcilers.layer2 import NOT_LOADED, Layer2Reconciler, unit_ports
from ensemble.network import port_filter
from ensemble.network.bridge import bridge_mac
from ensemble.network.ipam import Allocator, unit_mac, valid_mac
from ensemble.state.environment import initialize
from ensemble.state.network import ZooKeeperAddressStore
from ensemble.state.service import ServiceStateManager
from ensemble.state.unit import UnitStateManager

from fakes import FakeZooKeeper
from test_firewall_rules import Environment

SUBNET = "10.77.3.0/24"


def test_each_address_gets_its_own_fixed_locally_administered_unicast_mac():
    addresses = [str(a) for a in ipaddress.ip_network(SUBNET).hosts()]
    macs = [unit_mac(SUBNET, a) for a in addresses]
    assert len(set(macs)) == len(addresses)  # distinct within a subnet, by construction
    assert macs == [unit_mac(SUBNET, a) for a in addresses]  # and always the same
    for mac in macs:
        first = int(mac.split(":")[0], 16)
        assert first & 0b10 and not first & 0b01, mac  # locally administered, unicast
        assert valid_mac(mac) == mac
    assert unit_mac(SUBNET, "10.77.3.2").endswith(":0a:4d:03:02")
    # Not the bridge's (nor LXC's random 00:16:3e:...), and another subnet's differ.
    assert bridge_mac("ens-x", SUBNET) not in macs
    assert unit_mac("10.77.4.0/24", "10.77.3.2") != unit_mac(SUBNET, "10.77.3.2")
    with pytest.raises(ValueError):
        unit_mac(SUBNET, "fe80::1")


def test_valid_mac_takes_only_unicast_hex_pairs():
    assert valid_mac("0A:4D:03:02:00:01") == "0a:4d:03:02:00:01"
    for bad in ("", "0a:4d:03:02:00", "0a:4d:03:02:00:0g", "01:00:5e:00:00:01", "ff:ff:ff:ff:ff:ff", None, 5):
        assert valid_mac(bad) is None, bad


@pytest_twisted.ensureDeferred
async def test_the_mac_is_recorded_with_the_reservation_and_freed_with_it():
    client = FakeZooKeeper(task.Clock()).client()
    await initialize(client, "fast")
    store = ZooKeeperAddressStore(client, 1)
    await store.ensure(SUBNET)
    allocator = Allocator(store, SUBNET)
    address = await allocator.allocate("web/0")
    mac = unit_mac(SUBNET, address)
    data, _ = await client.get(f"{store.path}/macs/web-0")
    assert data.decode() == mac
    assert await store.macs() == {"web/0": mac}
    assert await allocator.hardware() == {"web/0": (address, mac)}
    # One unit's alone: what a pass asks for each unit.
    db = await allocator.allocate("db/0")
    assert await allocator.hardware(only="db/0") == {"db/0": (db, unit_mac(SUBNET, db))}
    assert await allocator.hardware(only="nosuch/0") == {}
    await allocator.release("db/0")
    # Another allocator (an agent restarted) reads it back.
    assert await Allocator(store, SUBNET).hardware() == {"web/0": (address, mac)}
    assert await allocator.release("web/0") == address
    assert await client.exists(f"{store.path}/macs/web-0") is None
    assert await store.macs() == {}


@pytest_twisted.ensureDeferred
async def test_a_reservation_from_before_macs_were_recorded_gets_one():
    client = FakeZooKeeper(task.Clock()).client()
    await initialize(client, "fast")
    store = ZooKeeperAddressStore(client, 1)
    await store.ensure(SUBNET)
    await store.take("db/0", "10.77.3.7")  # as an older agent made it: no MAC
    assert await store.macs() == {}
    allocator = Allocator(store, SUBNET)
    assert await allocator.allocate("db/0") == "10.77.3.7"
    assert await store.macs() == {"db/0": unit_mac(SUBNET, "10.77.3.7")}
    # A recorded MAC is the unit's, whatever the derivation says.
    await store.record_mac("db/0", "0a:00:00:00:00:07")
    assert (await Allocator(store, SUBNET).hardware())["db/0"] == ("10.77.3.7", "0a:00:00:00:00:07")
    assert await allocator.release("db/0") == "10.77.3.7"
    assert await client.get_children(f"{store.path}/macs") == []


def test_the_container_is_given_its_mac():
    spec = ContainerSpec("ens-test-web-0", "web-0", "10.231.0.5", 24, "10.231.0.1", "ens-test",
                         mac="0A:11:0A:E7:00:05")
    assert spec.mac == "0a:11:0a:e7:00:05"
    text = lxc_config.render(spec, "/l/ens-test-web-0", "/cache/rootfs", "ve-0123456789ab")
    assert "lxc.net.0.hwaddr = 0a:11:0a:e7:00:05" in text.splitlines()
    plain = ContainerSpec("ens-test-web-0", "web-0", "10.231.0.5", 24, "10.231.0.1", "ens-test")
    assert "hwaddr" not in lxc_config.render(plain, "/l/x", "/r", "ve-x")
    for bad in ("01:00:5e:00:00:01", "0a:11:0a:e7:00", "0a:11:0a:e7:00:05\nlxc.hook.pre-start = /x"):
        with pytest.raises(InvalidValue):
            ContainerSpec("ens-test-web-0", "web-0", "10.231.0.5", 24, "10.231.0.1", "ens-test", mac=bad)


def _rules(objects, chain):
    return [o["rule"]["expr"] for o in objects if "rule" in o and o["rule"]["chain"] == chain]


def test_the_port_filter_binds_each_port_to_its_mac_and_address():
    ports = [("ve-aaaa", "0A:01:0a:4d:03:02", "10.77.3.2"), ("ve-bbbb", "0a:01:0a:4d:03:03", "10.77.3.3"),
             # Malformed: left out, so such a port would get nothing through.
             ("ve-cccc", "01:00:5e:00:00:01", "10.77.3.4"), ("ve-dddd", "0a:01:0a:4d:03:05", "nowhere"),
             ("ve-name-far-too-long", "0a:01:0a:4d:03:06", "10.77.3.6")]
    elements = port_filter.elements(ports)
    assert elements["unit_ports"] == {("ve-aaaa", "0a:01:0a:4d:03:02", "10.77.3.2"),
                                      ("ve-bbbb", "0a:01:0a:4d:03:03", "10.77.3.3")}
    assert elements["unit_hosts"] == {("ve-aaaa", "10.77.3.2"), ("ve-bbbb", "10.77.3.3")}
    assert elements["unit_ifnames"] == {"ve-aaaa", "ve-bbbb"}
    assert elements["unit_macs"] == {"0a:01:0a:4d:03:02", "0a:01:0a:4d:03:03"}
    objects = port_filter.rules("ens-x", SUBNET)
    hooks = {o["chain"]["name"]: o["chain"].get("hook") for o in objects if "chain" in o}
    assert hooks["ports_in"] == "prerouting" and hooks["ports_out"] == "postrouting"
    # Every unit port's chain ends in a drop: what no rule accepts, nothing gets through.
    assert _rules(objects, "unit_port_in")[-1] == [{"drop": None}]
    assert _rules(objects, "unit_port_out")[-1] == [{"drop": None}]
    # No other port may use a unit's MAC or claim an address of the subnet.
    ins = _rules(objects, "ports_in")
    assert [{"match": {"op": "==", "left": {"payload": {"protocol": "ether", "field": "saddr"}},
                       "right": "@unit_macs"}}, {"drop": None}] in ins
    prefixes = [e for rule in ins for e in rule if "prefix" in str(e)]
    assert len(prefixes) == 2 and all("10.77.3.0" in str(p) for p in prefixes)
    # Without a subnet, only what the ports themselves say is checked.
    assert not [e for rule in _rules(port_filter.rules("ens-x"), "ports_in") for e in rule
                if "prefix" in str(e)]


def test_no_ports_is_still_a_filter():
    assert port_filter.elements([])["unit_ports"] == set()
    objects = port_filter.rules("ens-x", SUBNET)
    assert _rules(objects, "unit_port_in")[-1] == [{"drop": None}]
    assert any("prefix" in str(rule) for rule in _rules(objects, "ports_in"))


def test_unit_ports_name_each_units_container_veth():
    found = unit_ports("prod", {"web/0": ("10.77.3.2", "0a:01:0a:4d:03:02"), "bad name": ("10.77.3.3", "x")})
    assert list(found) == ["web/0"]
    assert found["web/0"].port == veth_name(container_name("prod", "web/0"))
    assert (found["web/0"].mac, found["web/0"].address) == ("0a:01:0a:4d:03:02", "10.77.3.2")


@pytest_twisted.async_yield_fixture
async def env(tmp_path):
    env = Environment(task.Clock(), tmp_path)
    await env.setup()
    yield env
    await env.reconciler.stop()
    assert env.zookeeper.errors == []


@pytest_twisted.ensureDeferred
async def test_a_units_port_entry_is_loaded_before_the_gate_lets_it_start(env):
    host = env.reconciler.host
    layer2 = Layer2Reconciler(host, env.reconciler)
    assert (safeguards.LAYER2, layer2.problem) in host.safeguards.start_checks
    name = host.environment["name"]
    # Every unit here has its entry, with the MAC recorded with its address.
    loaded = env.firewall.ports[-1]
    for unit in ("db/0", "db/1", "web/0", "other/0"):
        address = env.addresses[unit]
        entry = (veth_name(container_name(name, unit)), unit_mac(host.subnet, address), address)
        assert entry in loaded
        assert env.reconciler.port_loaded(unit)
    # A new unit: the firewall's pass for it (asked by unit_addressed, which the units
    # reconciler calls before the gate) loads its entry.
    [new] = await ServiceStateManager(env.admin).add_units("other", to=0)
    unit = await UnitStateManager(env.admin).get_unit(new)
    assert await layer2.problem(None, unit) == NOT_LOADED
    address = await host.allocator.allocate(new)
    await env.reconciler.unit_addressed(unit)
    assert (veth_name(container_name(name, new)), unit_mac(host.subnet, address), address) in env.firewall.ports[-1]
    assert await layer2.problem(None, unit) is None
    passes = len(env.firewall.syncs)
    await env.reconciler.unit_addressed(unit)
    assert len(env.firewall.syncs) == passes  # loaded already: no pass
    # A port netlink could not hold to its identity holds its unit too.
    layer2.problems[new] = "cannot turn learning off"
    assert await layer2.problem(None, unit) == "cannot turn learning off"
