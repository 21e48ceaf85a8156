"""The firewall between units (ensemble/network/firewall.py), on a host namespace with
a bridge and three "units" (namespaces on veths named like our containers')."""

import contextlib
import json
import socket
import subprocess
import threading
import uuid

import pytest
import pytest_twisted
from pyroute2 import IPRoute, netns as pyroute2_netns
from twisted.internet import reactor, task, threads

from ensemble.network import bridge
from ensemble.network.firewall import Firewall
from ensemble.network.ports import parse_port
from ensemble.network.netns import inside

BRIDGE = "ens-fw"
GATEWAY, WEB, DB, OTHER = "10.93.0.1", "10.93.0.2", "10.93.0.3", "10.93.0.4"
ZOOKEEPER_PORT = 2181


@pytest.fixture
def host():
    tag = uuid.uuid4().hex[:6]
    names = {"host": f"fw-{tag}-h", "web": f"fw-{tag}-w", "db": f"fw-{tag}-d", "other": f"fw-{tag}-x"}
    for name in names.values():
        pyroute2_netns.create(name)
    try:
        bridge.ensure_bridge(BRIDGE, "10.93.0.0/24", names["host"])
        with IPRoute(netns=names["host"], flags=0) as ipr:
            for unit, address in (("web", WEB), ("db", DB), ("other", OTHER)):
                ipr.link("add", ifname=f"ve-{unit}", kind="veth", peer={"ifname": "eth0", "net_ns_fd": names[unit]})
                index = ipr.link_lookup(ifname=f"ve-{unit}")[0]
                ipr.link("set", index=index, master=ipr.link_lookup(ifname=BRIDGE)[0], state="up")
                with IPRoute(netns=names[unit], flags=0) as inner:
                    eth = inner.link_lookup(ifname="eth0")[0]
                    inner.addr("add", index=eth, address=address, prefixlen=24)
                    inner.link("set", index=eth, state="up")
                    inner.link("set", index=inner.link_lookup(ifname="lo")[0], state="up")
                    inner.route("add", dst="0.0.0.0/0", gateway=GATEWAY)
        yield names
    finally:
        for name in names.values():
            pyroute2_netns.remove(name)


@contextlib.contextmanager
def listening(netns, address, ports):
    """TCP listeners that answer 'hi' to every connection."""
    with inside(netns):
        servers = [socket.create_server((address, port)) for port in ports]
    stop = threading.Event()

    def serve(server):
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            with conn:
                conn.sendall(b"hi")

    threads = [threading.Thread(target=serve, args=(s,), daemon=True) for s in servers]
    for t in threads:
        t.start()
    try:
        yield
    finally:
        stop.set()
        for t in threads:
            t.join()
        for s in servers:
            s.close()


@contextlib.contextmanager
def echoing_udp(netns, address, port):
    """A UDP server that sends every datagram back."""
    with inside(netns):
        server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind((address, port))
    server.settimeout(0.2)
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                data, peer = server.recvfrom(100)
            except OSError:
                continue
            server.sendto(data, peer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        server.close()


def ask_udp(netns, address, port, timeout=1.0):
    with inside(netns):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(timeout)
    try:
        s.sendto(b"hi", (address, port))
        return s.recv(2).decode()
    except OSError as e:
        return type(e).__name__
    finally:
        s.close()


def both(*pairs):
    return {p for a, b in pairs for p in ((a, b), (b, a))}


def talk(netns, address, port, timeout=1.0, source=None):
    """'hi' if a connection got an answer, else why not."""
    with inside(netns):
        s = socket.socket()
    s.settimeout(timeout)
    try:
        if source:
            s.bind((source, 0))
        s.connect((address, port))
        return s.recv(2).decode()
    except OSError as e:
        return type(e).__name__
    finally:
        s.close()


def test_ports_parse():
    assert parse_port("7070/tcp") == (7070, "tcp")
    assert parse_port("53/UDP") == (53, "udp")
    assert parse_port("80") == (80, "tcp")
    for bad in ("0/tcp", "70000/tcp", "80/icmp", "http", "80/tcp; drop"):
        with pytest.raises(ValueError):
            parse_port(bad)


def test_units_reach_only_exposed_ports_and_only_zookeeper_on_the_host(host):
    firewall = Firewall("fw", BRIDGE, GATEWAY, [ZOOKEEPER_PORT], netns=host["host"], subnet="10.93.0.0/24")
    with listening(host["db"], DB, [7070, 7071]), listening(host["web"], WEB, [8080]), \
            listening(host["host"], GATEWAY, [ZOOKEEPER_PORT, 2222]):
        # Without the firewall everything is open (what the test's setup proves).
        assert talk(host["web"], DB, 7071) == "hi"
        assert talk(host["web"], GATEWAY, 2222) == "hi"
        # The openings the firewall is given are those of exposed services.
        firewall.sync({DB: [(7070, "tcp"), (7072, "tcp")], WEB: [(8080, "tcp")]})
        assert firewall.opened() == {(DB, 7070, "tcp"), (DB, 7072, "tcp"), (WEB, 8080, "tcp")}
        assert firewall.related() == set()
        assert talk(host["web"], DB, 7070) == "hi"          # db's exposed port
        assert talk(host["db"], WEB, 8080) == "hi"          # and web's, the other way
        assert talk(host["web"], DB, 7071) == "TimeoutError"  # db listens, but did not open it
        assert talk(host["web"], GATEWAY, ZOOKEEPER_PORT) == "hi"
        assert talk(host["web"], GATEWAY, 2222) == "TimeoutError"  # another service on the host
        # Replies leave an opened port freely, but a connection cannot be started from
        # one: db binds its client socket to its opened (idle) 7072 and tries web's
        # closed 9090. Refused would mean the SYN got through; it must time out.
        with inside(host["db"]):
            s = socket.socket()
        s.settimeout(1.0)
        try:
            s.bind((DB, 7072))
            with pytest.raises(TimeoutError):
                s.connect((WEB, 9090))
        finally:
            s.close()
        # The host itself reaches an exposed port, and no other.
        assert talk(host["host"], DB, 7070) == "hi"
        assert talk(host["host"], DB, 7071) == "TimeoutError"
        # Closing a port takes effect at the next sync.
        firewall.sync({WEB: [(8080, "tcp")]})
        assert talk(host["web"], DB, 7070) == "TimeoutError"
        firewall.remove()
        assert talk(host["web"], DB, 7071) == "hi"
        firewall.remove()  # idempotent


def test_related_units_reach_each_other_on_any_port_and_strangers_only_exposed_ports(host):
    firewall = Firewall("fw", BRIDGE, GATEWAY, [ZOOKEEPER_PORT, "5353/udp"], netns=host["host"],
                        subnet="10.93.0.0/24")
    with listening(host["db"], DB, [7070, 7071]), listening(host["web"], WEB, [8080]), \
            listening(host["host"], GATEWAY, [ZOOKEEPER_PORT]), echoing_udp(host["host"], GATEWAY, 5353):
        # web and db related; db opened 7070, but db is not exposed.
        firewall.sync({}, both((WEB, DB)))
        assert firewall.related() == both((WEB, DB))
        assert talk(host["web"], DB, 7071) == "hi"    # any port, though db opened none of them
        assert talk(host["db"], WEB, 8080) == "hi"    # and the other way
        # other is related to nobody: not even db's opened port answers it, nor web's.
        assert talk(host["other"], DB, 7070) == "TimeoutError"
        assert talk(host["other"], WEB, 8080) == "TimeoutError"
        # Nor does the host.
        assert talk(host["host"], DB, 7070) == "TimeoutError"
        # Yet what the host serves its units still answers them, over TCP and UDP.
        assert talk(host["other"], GATEWAY, ZOOKEEPER_PORT) == "hi"
        assert ask_udp(host["other"], GATEWAY, 5353) == "hi"

        # db exposed: its opened port (only) answers everyone.
        firewall.sync({DB: [(7070, "tcp")]}, both((WEB, DB)))
        assert talk(host["other"], DB, 7070) == "hi"
        assert talk(host["host"], DB, 7070) == "hi"
        assert talk(host["other"], DB, 7071) == "TimeoutError"
        assert talk(host["host"], DB, 7071) == "TimeoutError"
        assert talk(host["web"], DB, 7071) == "hi"

        # The relation removed: web is a stranger too, left with db's exposed port.
        firewall.sync({DB: [(7070, "tcp")]}, set())
        assert talk(host["web"], DB, 7071) == "TimeoutError"
        assert talk(host["db"], WEB, 8080) == "TimeoutError"
        assert talk(host["web"], DB, 7070) == "hi"
        firewall.remove()


def _nft(netns, *args):
    return subprocess.run(["ip", "netns", "exec", netns, "nft", *args], capture_output=True, text=True, check=True)


def _table_handles(netns):
    """Both tables' handles: a table loaded again is a new table, with a new handle."""
    listed = json.loads(_nft(netns, "-j", "list", "tables").stdout)["nftables"]
    return {i["table"]["family"]: i["table"]["handle"] for i in listed if i.get("table", {}).get("name") == "ens-fw"}


def test_a_sync_changes_only_the_sets_and_undoes_what_was_changed_by_hand(host):
    netns = host["host"]
    firewall = Firewall("fw", BRIDGE, GATEWAY, [ZOOKEEPER_PORT], netns=netns, subnet="10.93.0.0/24")
    # Ports named like no interface here: only the sets' contents are looked at.
    ports = [("ve-aaaa", "0a:01:0a:5d:00:02", WEB)]
    assert firewall.sync({}, both((WEB, DB)), ports) is True  # the first: both tables whole
    loaded = _table_handles(netns)
    # A unit added, a relation taken out and another made, a port opened: the sets
    # change, the tables stay the ones loaded.
    ports.append(("ve-bbbb", "0a:01:0a:5d:00:03", DB))
    assert firewall.sync({DB: [(7070, "tcp")]}, both((WEB, OTHER)), ports) is False
    assert _table_handles(netns) == loaded
    assert firewall.related() == both((WEB, OTHER))
    assert firewall.opened() == {(DB, 7070, "tcp")}
    assert firewall.ports() == set(ports)
    inet_related = json.loads(_nft(netns, "-j", "list", "set", "inet", "ens-fw", "related").stdout)
    assert {tuple(e["concat"]) for i in inet_related["nftables"] if "set" in i
            for e in i["set"]["elem"]} == both((WEB, OTHER))  # the inet table's too

    # An element deleted by hand, which the next change deletes as well: that change
    # cannot apply, so both tables are loaded whole, as they should be.
    _nft(netns, "delete", "element", "bridge", "ens-fw", "related", f"{{ {WEB} . {OTHER} }}")
    assert firewall.sync({DB: [(7070, "tcp")]}, set(), ports) is True
    assert firewall.related() == set() and firewall.opened() == {(DB, 7070, "tcp")}
    # The tables deleted by hand (`nft flush ruleset`, say): the next sync, with
    # nothing to change, finds them gone and loads them.
    _nft(netns, "delete", "table", "bridge", "ens-fw")
    assert firewall.sync({DB: [(7070, "tcp")]}, set(), ports) is True
    assert firewall.present() == ["bridge", "inet"] and firewall.ports() == set(ports)
    # A hand edit that no change runs into stays until a sync is asked to replace.
    _nft(netns, "delete", "element", "bridge", "ens-fw", "tcp_open", f"{{ {DB} . 7070 }}")
    assert firewall.sync({DB: [(7070, "tcp")]}, set(), ports) is False
    assert firewall.opened() == set()
    assert firewall.sync({DB: [(7070, "tcp")]}, set(), ports, replace=True) is True
    assert firewall.opened() == {(DB, 7070, "tcp")}
    assert _table_handles(netns) != loaded
    firewall.remove()
    assert firewall.present() == []


def test_units_traffic_is_routed_only_to_the_environments_network(host):
    """A host with peers forwards; what a unit sends may go only to other machines'
    units (the environment's network), not to the host's own network or beyond."""
    outside = host["host"].replace("-h", "-o")
    pyroute2_netns.create(outside)
    try:
        with IPRoute(netns=host["host"], flags=0) as ipr:
            # The uplink: a veth to a namespace standing for the rest of the world,
            # which also holds "another machine's unit" (10.93.1.5, in the network).
            ipr.link("add", ifname="uplink", kind="veth", peer={"ifname": "eth0", "net_ns_fd": outside})
            index = ipr.link_lookup(ifname="uplink")[0]
            ipr.addr("add", index=index, address="198.51.100.1", prefixlen=24)
            ipr.link("set", index=index, state="up")
            ipr.route("add", dst="10.93.1.0/24", gateway="198.51.100.2")
        with IPRoute(netns=outside, flags=0) as ipr:
            eth = ipr.link_lookup(ifname="eth0")[0]
            for address in ("198.51.100.2", "10.93.1.5", "192.0.2.9"):
                ipr.addr("add", index=eth, address=address, prefixlen=32 if address != "198.51.100.2" else 24)
            ipr.link("set", index=eth, state="up")
            ipr.route("add", dst="10.93.0.0/24", gateway="198.51.100.1")
        from ensemble.network.netns import set_ip_forwarding

        set_ip_forwarding(host["host"])  # the test's host namespace, as with peers
        with IPRoute(netns=host["host"], flags=0) as ipr:
            ipr.route("add", dst="0.0.0.0/0", gateway="198.51.100.2")
        firewall = Firewall("fw", BRIDGE, GATEWAY, [ZOOKEEPER_PORT], netns=host["host"], subnet="10.93.0.0/24",
                            cidr="10.93.0.0/16")
        with listening(outside, "0.0.0.0", [9000]), listening(host["web"], WEB, [8080]):
            assert talk(host["web"], "192.0.2.9", 9000) == "hi"    # the setup routes it out
            firewall.sync({WEB: [(8080, "tcp")]})
            assert talk(host["web"], "10.93.1.5", 9000) == "hi"    # another machine's unit
            assert talk(host["web"], "192.0.2.9", 9000) == "TimeoutError"     # beyond: dropped
            assert talk(host["web"], "198.51.100.2", 9000) == "TimeoutError"  # the host's network
            # A connection made to a unit's exposed port, from outside, is answered.
            assert talk(outside, WEB, 8080) == "hi"
        # Another machine's unit reaches a unit here on any port once related to it,
        # and on exposed ports only otherwise.
        with listening(host["web"], WEB, [8080, 8081]):
            assert talk(outside, WEB, 8081, source="10.93.1.5") == "TimeoutError"
            firewall.sync({WEB: [(8080, "tcp")]}, both(("10.93.1.5", WEB)))
            assert talk(outside, WEB, 8081, source="10.93.1.5") == "hi"
            assert talk(outside, WEB, 8081) == "TimeoutError"  # the outside's own address: a stranger
            firewall.sync({WEB: [(8080, "tcp")]}, set())
            assert talk(outside, WEB, 8081, source="10.93.1.5") == "TimeoutError"
        # Another machine's unit (10.93.1.5) comes in over the uplink: to this host it
        # is a unit like its own, reaching only ZooKeeper at the gateway.
        with listening(host["host"], "0.0.0.0", [ZOOKEEPER_PORT, 2222]):
            assert talk(outside, GATEWAY, 2222, source="10.93.1.5") == "TimeoutError"
            assert talk(outside, "198.51.100.1", 2222, source="10.93.1.5") == "TimeoutError"
            assert talk(outside, GATEWAY, ZOOKEEPER_PORT, source="10.93.1.5") == "hi"
            assert talk(outside, "198.51.100.1", 2222) == "hi"  # the host's own network: not ours to filter
        firewall.remove()
    finally:
        pyroute2_netns.remove(outside)


# -- end to end: the machine agent keeps the firewall for its units ---------------------------


PROBE = (
    "import socket, sys\n"
    "for target in sys.argv[1:]:\n"
    "    host, port = target.rsplit(':', 1)\n"
    "    try:\n"
    "        socket.create_connection((host, int(port)), timeout=2).close(); print(target, 'open')\n"
    "    except OSError as e:\n"
    "        print(target, type(e).__name__)\n"
)


@pytest_twisted.ensureDeferred
async def test_units_reach_what_relations_and_exposure_allow_and_nothing_else(tmp_path):
    from test_deploy import Environment, all_started, sh, until, write_as_unit

    from conftest import make_charm

    env = Environment(tmp_path / "home")
    # Not the range of test_deploy's first environment, which another run may hold.
    env.network = f"10.{uuid.uuid4().int % 20 + 225}.0.0/16"
    env.cli("bootstrap", "--network", env.network)
    name = env.config["name"]
    driver = env.driver()
    quiet = {"start": "true", "stop": "true"}
    charms = {
        "db": make_charm(tmp_path / "db", "db", hooks={"install": "open-port 7070/tcp", **quiet}),
        "web": make_charm(tmp_path / "web", "web", hooks={"install": "open-port 80/tcp", **quiet}),
        # It may relate to any service: every service provides juju-info.
        "client": make_charm(tmp_path / "client", "client", hooks={"install": "true", **quiet},
                             metadata_extra="requires:\n  host: juju-info\n"),
    }
    try:
        for charm in charms.values():
            env.cli("deploy", charm, "--to", "0")
        units = await all_started(env, ["db/0", "web/0", "client/0"])
        db, web, client = units["db/0"], units["web/0"], units["client/0"]
        assert Firewall(name, "unused", None).present() == ["bridge", "inet"]
        assert db["open-ports"] == ["7070/tcp"] and web["open-ports"] == ["80/tcp"]
        gateway = env.config["subnet"].rsplit(".", 1)[0] + ".1"
        zookeeper_port = int(env.config["zookeeper"].rpartition(":")[2])
        # db listens on the port it opened and on one it did not; the host on the
        # bridge address too.
        for port in (7070, 7071):
            code, _, err = await sh(driver, db["container"], (
                f"setsid python3 -c \"import socket,time; s=socket.create_server(('0.0.0.0', {port})); "
                "time.sleep(600)\" >/dev/null 2>&1 & sleep 0.5"
            ))
            assert code == 0, err
        opened, unopened = f"{db['private-address']}:7070", f"{db['private-address']}:7071"

        async def probe(unit, *targets):
            code, out, err = await driver.exec(unit["container"], ["/usr/bin/python3", "-c", PROBE, *targets],
                                               timeout=30)
            assert code == 0, err
            return dict(line.split() for line in out.decode().splitlines())

        def from_host(target):
            address, port = target.rsplit(":", 1)
            try:
                socket.create_connection((address, int(port)), timeout=2).close()
                return "open"
            except OSError as e:
                return type(e).__name__

        async def host_probe(target):
            return await threads.deferToThread(from_host, target)

        host_service = socket.create_server((gateway, 0))
        try:
            on_host = [f"{gateway}:{zookeeper_port}", f"{gateway}:{host_service.getsockname()[1]}"]
            # Nothing related, nothing exposed: db's opened port is closed to web, and
            # to the host; on the host, web reaches ZooKeeper and nothing else.
            assert await probe(web, opened, unopened, *on_host) == {
                opened: "TimeoutError", unopened: "TimeoutError", on_host[0]: "open", on_host[1]: "TimeoutError",
            }
            assert await host_probe(opened) == "TimeoutError"

            # Exposed, db's opened port (only) answers web and the host.
            assert env.cli("expose", "db").stdout.strip() == "exposed service db"
            assert env.status()["services"]["db"]["exposed"] is True
            await until(lambda: _is_open(probe(web, opened), opened), timeout=30, what="db's 7070 exposed")
            assert (await probe(web, unopened))[unopened] == "TimeoutError"
            assert await host_probe(opened) == "open"
            assert await host_probe(unopened) == "TimeoutError"

            # A compromised web may write its own node only: claiming db's address there
            # and opening 7071 opens nothing on db, since the firewall takes addresses
            # from the machine's reservations. (Waits past the agent's 5 s resync.)
            env.cli("expose", "web")
            forged = {"private-address": db["private-address"], "open-ports": ["7071/tcp"]}
            assert await write_as_unit(driver, web["container"], "/units/web-0", forged) == "changed"
            await task.deferLater(reactor, 7, lambda: None)
            assert (await probe(client, unopened))[unopened] == "TimeoutError"

            # Related to db, client reaches every port of db; web, unrelated, still does not.
            env.cli("add-relation", "client", "db")
            await until(lambda: _is_open(probe(client, unopened), unopened), timeout=30, what="client related to db")
            assert (await probe(web, unopened))[unopened] == "TimeoutError"
            # Removing the relation closes the path again (watches, not only the tick).
            env.cli("remove-relation", "client", "db")
            await until(lambda: _is_closed(probe(client, unopened), unopened), timeout=30, what="relation closed")
            # And unexposing db closes its opened port.
            assert env.cli("unexpose", "db").stdout.strip() == "unexposed service db"
            await until(lambda: _is_closed(probe(web, opened), opened), timeout=30, what="db unexposed")
            assert "exposed" not in env.status()["services"]["db"]
        finally:
            host_service.close()
    finally:
        await driver.close()
        result = env.cli("destroy-environment", "-y", check=False)
    assert result.returncode == 0, result.stderr
    # destroy-environment takes the firewall's tables with it.
    assert Firewall(name, "unused", None).present() == []


async def _is_open(results, target):
    return (await results)[target] == "open"


async def _is_closed(results, target):
    return (await results)[target] == "TimeoutError"


def test_another_environments_firewall_leaves_this_bridge_alone(host):
    # Two environments on one host: the bridge family's forward hook sees both
    # bridges, so each firewall must act on its own bridge only.
    bridge.ensure_bridge("fw-other", "10.94.0.0/24", host["host"])
    other = Firewall("other", "fw-other", "10.94.0.1", [ZOOKEEPER_PORT], netns=host["host"], subnet="10.94.0.0/24")
    ours = Firewall("fw", BRIDGE, GATEWAY, [ZOOKEEPER_PORT], netns=host["host"], subnet="10.93.0.0/24")
    with listening(host["db"], DB, [7070, 7071]):
        other.sync({"10.94.0.5": [(80, "tcp")]})
        assert talk(host["web"], DB, 7071) == "hi"  # ours has no firewall: all open
        ours.sync({DB: [(7070, "tcp")]})
        assert talk(host["web"], DB, 7070) == "hi"
        assert talk(host["web"], DB, 7071) == "TimeoutError"
        other.remove()
        assert talk(host["web"], DB, 7070) == "hi"
        ours.remove()
