"""Layer 2 bound to each unit's identity (issue 15 §1), attacked from inside a unit.

First on a host namespace with a bridge and "units" (namespaces on veths named like our
containers', each interface given its unit's MAC) held by the firewall's port filter and
the bridge's static entries; then on a real local environment: a machine agent on this
host, real LXC units, the forged frames sent as root from inside one of them.

A unit sends, with AF_PACKET: ARP replies and gratuitous ARP claiming another unit's
address (or the gateway's), frames with another unit's source MAC, IPv4 with another
unit's source address, IPv6 and ethertype 0x88b5 frames, to broadcast and to the other
unit's MAC. Sniffers (AF_PACKET) on the other unit's interface and on the host's bridge
must see none of them, while the legitimate frames sent with them (the controls) do
arrive; the host's neighbour entry for the victim and the bridge's forwarding entry for
its MAC stay what they were.
"""

import contextlib
import json
import os
import socket
import threading
import uuid

import pytest
import pytest_twisted
from pyroute2 import IPRoute, netns as pyroute2_netns
from twisted.internet import defer, reactor, task, threads

import l2frames
from ensemble.network import bridge, bridge_ports
from ensemble.network.bridge_ports import UnitPort
from ensemble.network.firewall import Firewall
from ensemble.network.ipam import unit_mac
from ensemble.network.netns import inside

BRIDGE = "ens-l2t"
SUBNET = "10.96.0.0/24"
GATEWAY, WEB, DB, STRAY = "10.96.0.1", "10.96.0.2", "10.96.0.3", "10.96.0.4"
ZOOKEEPER_PORT = 2181
ECHO_PORT = 40000
UNITS = {"web": WEB, "db": DB, "stray": STRAY}   # stray: a unit port nobody put an entry in for
STRANGER = "0a:00:5e:00:00:99"  # a MAC no unit has


def mac_of(address):
    return unit_mac(SUBNET, address)


def ports(*names):
    return [UnitPort(f"ve-{n}", mac_of(UNITS[n]), UNITS[n]) for n in names]


@pytest.fixture
def lab():
    tag = uuid.uuid4().hex[:6]
    names = {"host": f"l2-{tag}-h", **{unit: f"l2-{tag}-{unit[0]}" for unit in UNITS}}
    for name in names.values():
        pyroute2_netns.create(name)
    try:
        bridge.ensure_bridge(BRIDGE, SUBNET, names["host"])
        with IPRoute(netns=names["host"], flags=0) as ipr:
            for unit, address in UNITS.items():
                ipr.link("add", ifname=f"ve-{unit}", kind="veth",
                         peer={"ifname": "eth0", "net_ns_fd": names[unit], "address": mac_of(address)})
                index = ipr.link_lookup(ifname=f"ve-{unit}")[0]
                ipr.link("set", index=index, master=ipr.link_lookup(ifname=BRIDGE)[0], state="up")
                with IPRoute(netns=names[unit], flags=0) as inner:
                    eth = inner.link_lookup(ifname="eth0")[0]
                    inner.addr("add", index=eth, address=address, prefixlen=24)
                    inner.link("set", index=eth, state="up")
                    inner.link("set", index=inner.link_lookup(ifname="lo")[0], state="up")
                    inner.route("add", dst="0.0.0.0/0", gateway=GATEWAY)
        firewall = Firewall("l2t", BRIDGE, GATEWAY, [ZOOKEEPER_PORT], netns=names["host"], subnet=SUBNET)
        units = ports("web", "db")
        # The host may send to db's echo port (an opened port of an exposed service).
        firewall.sync({DB: [(ECHO_PORT, "udp")]}, set(), [(p.port, p.mac, p.address) for p in units])
        assert bridge_ports.secure(BRIDGE, units, SUBNET, names["host"]) == {}
        yield names
    finally:
        for name in names.values():
            pyroute2_netns.remove(name)


@contextlib.contextmanager
def sniffing(netns, ifname, markers, seconds=2.5):
    """A sniffer on `ifname` in `netns` for the body's duration (and a little after):
    yields the dict it fills with what it saw."""
    seen = {}
    ready = threading.Event()

    def run():
        with inside(netns):
            seen.update(l2frames.sniff(ifname, seconds, markers, ready.set))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    ready.wait()
    try:
        yield seen
    finally:
        thread.join()


def send(netns, specs):
    with inside(netns):
        l2frames.send("eth0", specs)


def arp_table(netns):
    """{address: MAC} of the namespace's ARP cache."""
    with inside(netns), open("/proc/thread-self/net/arp") as arp:
        rows = [line.split() for line in arp.read().splitlines()[1:]]
    return {row[0]: row[3] for row in rows if len(row) >= 4}


def host_view(lab):
    return bridge_ports.state(BRIDGE, lab["host"])


def connects(netns, address, port, timeout=1.0):
    with inside(netns):
        try:
            socket.create_connection((address, port), timeout=timeout).close()
            return True
        except OSError:
            return False


@contextlib.contextmanager
def zookeeper_stand_in(lab):
    with inside(lab["host"]):
        server = socket.create_server((GATEWAY, ZOOKEEPER_PORT))
    stop = threading.Event()

    def serve():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
                conn.close()
            except OSError:
                continue

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        server.close()


def forgeries(attacker_mac, attacker_ip, victim_mac, victim_ip, gateway_mac, gateway_ip):
    """{marker: frame spec}: what a hostile unit sends to take over its victim's
    identity, each to broadcast and to the victim (or the host)."""
    frames = {}
    for target, dst in (("bcast", l2frames.BROADCAST), ("victim", victim_mac), ("host", gateway_mac)):
        # ARP reply / gratuitous ARP: "the victim's address is at my MAC".
        frames[f"arp-claim-{target}"] = dict(kind="arp", dst=dst, src=attacker_mac, op=2, sha=attacker_mac,
                                             spa=victim_ip, tha=dst, tpa=victim_ip)
        # The same, with the victim's MAC in the ARP body only.
        frames[f"arp-sha-{target}"] = dict(kind="arp", dst=dst, src=attacker_mac, op=2, sha=victim_mac,
                                           spa=victim_ip, tha=dst, tpa=victim_ip)
        # ARP sent as the victim (its MAC as the Ethernet source): the bridge would
        # learn the victim's MAC on the attacker's port.
        frames[f"arp-as-victim-{target}"] = dict(kind="arp", dst=dst, src=victim_mac, op=1, sha=victim_mac,
                                                 spa=victim_ip, tpa=gateway_ip)
        # "The gateway is at my MAC": poisons the victim's (and everyone's) gateway.
        frames[f"arp-gateway-{target}"] = dict(kind="arp", dst=dst, src=attacker_mac, op=2, sha=attacker_mac,
                                               spa=gateway_ip, tha=dst, tpa=victim_ip)
        # IPv4 with the victim's source address, from the attacker's MAC and from the victim's.
        frames[f"ip-forged-addr-{target}"] = dict(kind="udp", dst=dst, src=attacker_mac, saddr=victim_ip,
                                                  daddr=gateway_ip if target == "host" else victim_ip)
        frames[f"ip-forged-mac-{target}"] = dict(kind="udp", dst=dst, src=victim_mac, saddr=victim_ip,
                                                 daddr=gateway_ip if target == "host" else victim_ip)
        # Other ethertypes, from its own MAC.
        frames[f"ipv6-{target}"] = dict(kind="raw", dst=dst, src=attacker_mac, ethertype=l2frames.ETH_P_IPV6)
        frames[f"local-88b5-{target}"] = dict(kind="raw", dst=dst, src=attacker_mac, ethertype=0x88B5)
    return frames


def controls(mac, ip, victim_ip, gateway_mac, gateway_ip):
    """Legitimate frames sent along: a broadcast ARP request for the victim's address
    (which the victim gets) and an IPv4 datagram to the gateway (which the host gets)."""
    return {
        "ok-arp-request": dict(kind="arp", dst=l2frames.BROADCAST, src=mac, op=1, sha=mac, spa=ip,
                               tpa=victim_ip),
        "ok-ip-to-host": dict(kind="udp", dst=gateway_mac, src=mac, saddr=ip, daddr=gateway_ip),
    }


def marked(frames, tag):
    return {f"{tag}-{marker}": {**spec, "marker": f"{tag}-{marker}"} for marker, spec in frames.items()}


def test_forged_frames_reach_neither_the_host_nor_another_unit(lab):
    gateway_mac = bridge.bridge_mac(BRIDGE, SUBNET)
    web_mac, db_mac = mac_of(WEB), mac_of(DB)
    before = host_view(lab)
    assert before["neighbours"][DB] == (db_mac, "permanent")
    assert before["fdb"][db_mac] == [("ve-db", "static")]
    tag = uuid.uuid4().hex[:8]
    forged = marked(forgeries(web_mac, WEB, db_mac, DB, gateway_mac, GATEWAY), tag)
    legit = marked(controls(web_mac, WEB, DB, gateway_mac, GATEWAY), tag)
    markers = [*forged, *legit]
    with sniffing(lab["db"], "eth0", markers) as at_db, sniffing(lab["host"], BRIDGE, markers) as at_host:
        send(lab["web"], [*forged.values(), *legit.values()])
    assert set(at_db) == {f"{tag}-ok-arp-request"}, at_db
    assert set(at_host) == {f"{tag}-ok-arp-request", f"{tag}-ok-ip-to-host"}, at_host
    after = host_view(lab)
    assert after["neighbours"][DB] == (db_mac, "permanent")
    assert after["fdb"][db_mac] == [("ve-db", "static")]
    assert after["fdb"][web_mac] == [("ve-web", "static")]
    assert GATEWAY not in after["neighbours"]
    # db's own view of its gateway was not poisoned (web's own entry is there: its
    # legitimate ARP request).
    assert arp_table(lab["db"]).get(GATEWAY, gateway_mac) == gateway_mac


def test_replies_go_to_the_port_of_the_unit_that_owns_the_address(lab):
    # web claims db's address as loudly as it can, then the host sends to db.
    gateway_mac = bridge.bridge_mac(BRIDGE, SUBNET)
    tag = uuid.uuid4().hex[:8]
    forged = marked(forgeries(mac_of(WEB), WEB, mac_of(DB), DB, gateway_mac, GATEWAY), tag)
    send(lab["web"], list(forged.values()))
    marker = f"{tag}-to-db"
    with sniffing(lab["db"], "eth0", [marker]) as at_db, sniffing(lab["web"], "eth0", [marker]) as at_web:
        with inside(lab["host"]), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for _ in range(3):
                s.sendto(marker.encode(), (DB, ECHO_PORT))
    assert marker in at_db and marker not in at_web, (at_db, at_web)


def test_a_unit_port_without_an_entry_gets_nothing_through(lab):
    gateway_mac = bridge.bridge_mac(BRIDGE, SUBNET)
    stray_mac = mac_of(STRAY)
    tag = uuid.uuid4().hex[:8]
    # Its own, truthful identity: still nothing, since nothing vouches for its port.
    frames = marked({
        **controls(stray_mac, STRAY, DB, gateway_mac, GATEWAY),
        "udp-to-db": dict(kind="udp", dst=mac_of(DB), src=stray_mac, saddr=STRAY, daddr=DB),
        "ipv6": dict(kind="raw", dst=l2frames.BROADCAST, src=stray_mac, ethertype=l2frames.ETH_P_IPV6),
    }, tag)
    with sniffing(lab["db"], "eth0", list(frames)) as at_db, sniffing(lab["host"], BRIDGE, list(frames)) as at_host:
        send(lab["stray"], list(frames.values()))
    assert at_db == {} and at_host == {}, (at_db, at_host)
    with zookeeper_stand_in(lab):
        assert connects(lab["web"], GATEWAY, ZOOKEEPER_PORT)
        assert not connects(lab["stray"], GATEWAY, ZOOKEEPER_PORT)
    assert STRAY not in host_view(lab)["neighbours"] or host_view(lab)["neighbours"][STRAY][1] != "permanent"


def test_the_bridge_is_held_to_the_units_and_repaired(lab):
    host = lab["host"]
    view = host_view(lab)
    for port in ("ve-web", "ve-db"):
        assert view["ports"][port] == {"learning": False, "unicast_flood": False}
    assert view["ports"]["ve-stray"] == {"learning": True, "unicast_flood": True}  # no entry: not ours
    # A host admin (or anything else) undoes it all.
    with IPRoute(netns=host, flags=0) as ipr:
        br = ipr.link_lookup(ifname=BRIDGE)[0]
        web = ipr.link_lookup(ifname="ve-web")[0]
        ipr.brport("set", index=web, learning=1, unicast_flood=1)
        ipr.fdb("del", ifindex=ipr.link_lookup(ifname="ve-db")[0], lladdr=mac_of(DB), flags=bridge_ports.NTF_MASTER)
        ipr.fdb("replace", ifindex=web, lladdr=mac_of(DB), flags=bridge_ports.NTF_MASTER, state=bridge_ports.NUD_NOARP)
        ipr.neigh("replace", dst=DB, lladdr=mac_of(WEB), ifindex=br, state=0x02)
        # A permanent entry for an address no unit holds (a unit removed while its
        # agent was down).
        ipr.neigh("replace", dst="10.96.0.9", lladdr=mac_of("10.96.0.9"), ifindex=br,
                  state=bridge_ports.NUD_PERMANENT)
    assert bridge_ports.secure(BRIDGE, ports("web", "db"), SUBNET, host) == {}
    view = host_view(lab)
    assert view["ports"]["ve-web"] == {"learning": False, "unicast_flood": False}
    assert view["fdb"][mac_of(DB)] == [("ve-db", "static")]
    assert view["neighbours"][DB] == (mac_of(DB), "permanent")
    assert "10.96.0.9" not in view["neighbours"]
    # A unit whose container is not running has no port: its neighbour entry is made
    # all the same, and nothing is wrong.
    gone = UnitPort("ve-gone", mac_of("10.96.0.7"), "10.96.0.7")
    assert bridge_ports.secure(BRIDGE, [*ports("web", "db"), gone], SUBNET, host) == {}
    assert host_view(lab)["neighbours"]["10.96.0.7"] == (gone.mac, "permanent")


def test_a_started_units_port_alone_is_held_at_once(lab):
    host = lab["host"]
    with IPRoute(netns=host, flags=0) as ipr:
        br = ipr.link_lookup(ifname=BRIDGE)[0]
        for name in ("web", "db"):
            port = ipr.link_lookup(ifname=f"ve-{name}")[0]
            ipr.brport("set", index=port, learning=1, unicast_flood=1)
            ipr.fdb("del", ifindex=port, lladdr=mac_of(UNITS[name]), flags=bridge_ports.NTF_MASTER)
            ipr.neigh("del", dst=UNITS[name], lladdr=mac_of(UNITS[name]), ifindex=br)
        # web's MAC where another port claimed it first, and a stranger's on web's port.
        ve_web, ve_db = (ipr.link_lookup(ifname=f"ve-{name}")[0] for name in ("web", "db"))
        ipr.fdb("add", ifindex=ve_db, lladdr=mac_of(WEB), flags=bridge_ports.NTF_MASTER, state=bridge_ports.NUD_NOARP)
        ipr.fdb("add", ifindex=ve_web, lladdr=STRANGER, flags=bridge_ports.NTF_MASTER, state=bridge_ports.NUD_NOARP)
    web, db = ports("web", "db")
    assert host_view(lab)["fdb"][web.mac] == [("ve-db", "static")]
    assert bridge_ports.secure_unit(BRIDGE, web, host) is None
    view = host_view(lab)
    assert held(view, web)
    assert STRANGER not in view["fdb"]
    # Nothing else of the bridge's is touched: db's port is a pass's to repair.
    assert view["ports"]["ve-db"] == {"learning": True, "unicast_flood": True}
    assert db.mac not in view["fdb"] and db.address not in view["neighbours"]
    # A unit whose port is not there yet (or no bridge) is not a problem.
    assert bridge_ports.secure_unit(BRIDGE, UnitPort("ve-gone", mac_of("10.96.0.7"), "10.96.0.7"), host) is None
    assert bridge_ports.secure_unit("ens-nobridge", web, host) is None


# -- real units ------------------------------------------------------------------------

FRAMES_SOURCE = open(l2frames.__file__).read()


async def in_unit(driver, container, *args, timeout=30):
    code, out, err = await driver.exec(container, ["/usr/bin/python3", "-c", FRAMES_SOURCE, *args], timeout=timeout)
    assert code == 0, err.decode()
    return out.decode().strip()


async def unit_mac_inside(driver, container):
    code, out, _ = await driver.exec(container, ["/bin/cat", "/sys/class/net/eth0/address"], timeout=30)
    assert code == 0
    return out.decode().strip()


def held(view, unit_port):
    return (view is not None
            and view["ports"].get(unit_port.port) == {"learning": False, "unicast_flood": False}
            and view["fdb"].get(unit_port.mac) == [(unit_port.port, "static")]
            and view["neighbours"].get(unit_port.address) == (unit_port.mac, "permanent"))


@pytest_twisted.ensureDeferred
async def test_a_hostile_unit_takes_over_nothing_at_layer_2(tmp_path):
    from test_deploy import Environment, all_started, until

    from conftest import make_charm
    from ensemble.machine.container.names import container_name, veth_name
    from ensemble.network.firewall import Firewall
    from ensemble.state.network import ZooKeeperAddressStore

    env = Environment(tmp_path / "home")
    env.network = f"10.{uuid.uuid4().int % 20 + 225}.0.0/16"
    env.cli("bootstrap", "--network", env.network)
    driver = env.driver()
    client = None
    try:
        quiet = {"install": "true", "start": "true", "stop": "true"}
        for service in ("web", "db"):
            env.cli("deploy", make_charm(tmp_path / service, service, hooks=quiet), "--to", "0")
        units = await all_started(env, ["web/0", "db/0"])
        web, db = units["web/0"], units["db/0"]
        name, subnet = env.config["name"], env.config["subnet"]
        br = bridge.bridge_name(name)
        gateway, gateway_mac = bridge.gateway_of(subnet), bridge.bridge_mac(br, subnet)
        identity = {
            unit: UnitPort(veth_name(container_name(name, unit)), unit_mac(subnet, u["private-address"]),
                           u["private-address"])
            for unit, u in (("web/0", web), ("db/0", db))
        }
        attacker, victim = identity["web/0"], identity["db/0"]
        # Recorded with the reservations, given to the containers, held by the bridge.
        client = await env.client()
        assert await ZooKeeperAddressStore(client, 0).macs() == {u: p.mac for u, p in identity.items()}
        assert await unit_mac_inside(driver, web["container"]) == attacker.mac
        assert await unit_mac_inside(driver, db["container"]) == victim.mac
        assert Firewall(name, br, gateway).ports() == {(p.port, p.mac, p.address) for p in identity.values()}
        await until(lambda: all(held(bridge_ports.state(br), p) for p in identity.values()), 30,
                    "both units' ports held to their identities")
        before = bridge_ports.state(br)

        tag = uuid.uuid4().hex[:8]
        forged = marked(forgeries(attacker.mac, attacker.address, victim.mac, victim.address, gateway_mac,
                                  gateway), tag)
        legit = marked(controls(attacker.mac, attacker.address, victim.address, gateway_mac, gateway), tag)
        markers = ",".join([*forged, *legit])
        # Sniffers in db and on the host's bridge; then web, as root, sends it all.
        at_db = defer.ensureDeferred(in_unit(driver, db["container"], "sniff", "eth0", "6", markers))
        host_seen = {}
        host_ready = threading.Event()

        def host_sniffer():
            host_seen.update(l2frames.sniff(br, 6, markers.split(","), host_ready.set))

        host_thread = threading.Thread(target=host_sniffer, daemon=True)
        host_thread.start()
        host_ready.wait()
        await task.deferLater(reactor, 2, lambda: None)  # db's sniffer up
        assert await in_unit(driver, web["container"], "send", "eth0",
                             json.dumps([*forged.values(), *legit.values()])) == "sent"
        at_db = json.loads(await at_db)
        await threads.deferToThread(host_thread.join)
        assert set(at_db) == {f"{tag}-ok-arp-request"}, (at_db, host_seen)
        assert set(host_seen) == {f"{tag}-ok-arp-request", f"{tag}-ok-ip-to-host"}, host_seen

        after = bridge_ports.state(br)
        assert after["neighbours"][victim.address] == before["neighbours"][victim.address] == (victim.mac, "permanent")
        assert after["fdb"][victim.mac] == [(victim.port, "static")]
        assert held(after, attacker)
        # db's gateway entry is still the bridge's.
        code, out, _ = await driver.exec(db["container"], ["/bin/cat", "/proc/net/arp"], timeout=30)
        rows = {r.split()[0]: r.split()[3] for r in out.decode().splitlines()[1:] if len(r.split()) >= 4}
        assert rows.get(gateway, gateway_mac) == gateway_mac
        # What is allowed still works: web reaches ZooKeeper on its gateway, and both
        # units' agents are still there.
        zookeeper_port = int(env.config["zookeeper"].rpartition(":")[2])
        code, out, err = await driver.exec(web["container"], [
            "/usr/bin/python3", "-c",
            f"import socket; socket.create_connection(({gateway!r}, {zookeeper_port}), timeout=5).close(); print('ok')",
        ], timeout=30)
        assert (code, out.decode().strip()) == (0, "ok"), err
        assert {u: s["agent-state"] for u, s in env.units().items()} == {"web/0": "started", "db/0": "started"}

        # Removed, a unit's neighbour entry goes with it; the other's stays.
        env.cli("remove-unit", "web/0")
        await until(lambda: attacker.address not in bridge_ports.state(br)["neighbours"],
                    60, "web's neighbour entry removed")
        assert held(bridge_ports.state(br), victim)
    finally:
        if client is not None:
            await client.close()
        await driver.close()
        result = env.cli("destroy-environment", "-y", check=False)
    assert result.returncode == 0, result.stderr
