"""The firewall between units (ensemble/network/firewall.py), on a host namespace with
a bridge and two "units" (namespaces on veths named like our containers')."""

import contextlib
import socket
import threading
import uuid

import pytest
import pytest_twisted
from pyroute2 import IPRoute, netns as pyroute2_netns
from twisted.internet import reactor, task

from ensemble.network import bridge
from ensemble.network.firewall import Firewall, parse_port
from ensemble.network.netns import inside

BRIDGE = "ens-fw"
GATEWAY, WEB, DB = "10.93.0.1", "10.93.0.2", "10.93.0.3"
ZOOKEEPER_PORT = 2181


@pytest.fixture
def host():
    tag = uuid.uuid4().hex[:6]
    names = {"host": f"fw-{tag}-h", "web": f"fw-{tag}-w", "db": f"fw-{tag}-d"}
    for name in names.values():
        pyroute2_netns.create(name)
    try:
        bridge.ensure_bridge(BRIDGE, "10.93.0.0/24", names["host"])
        with IPRoute(netns=names["host"], flags=0) as ipr:
            for unit, address in (("web", WEB), ("db", DB)):
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


def test_units_reach_only_opened_ports_and_only_zookeeper_on_the_host(host):
    firewall = Firewall("fw", BRIDGE, GATEWAY, [ZOOKEEPER_PORT], netns=host["host"], subnet="10.93.0.0/24")
    with listening(host["db"], DB, [7070, 7071]), listening(host["web"], WEB, [8080]), \
            listening(host["host"], GATEWAY, [ZOOKEEPER_PORT, 2222]):
        # Without the firewall everything is open (what the test's setup proves).
        assert talk(host["web"], DB, 7071) == "hi"
        assert talk(host["web"], GATEWAY, 2222) == "hi"
        firewall.sync({DB: [(7070, "tcp"), (7072, "tcp")], WEB: [(8080, "tcp")]})
        assert firewall.opened() == {(DB, 7070, "tcp"), (DB, 7072, "tcp"), (WEB, 8080, "tcp")}
        assert talk(host["web"], DB, 7070) == "hi"          # db's opened port
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
        # The host itself still reaches every unit port (the operator's view).
        assert talk(host["host"], DB, 7071) == "hi"
        # Closing a port takes effect at the next sync.
        firewall.sync({WEB: [(8080, "tcp")]})
        assert talk(host["web"], DB, 7070) == "TimeoutError"
        firewall.remove()
        assert talk(host["web"], DB, 7071) == "hi"
        firewall.remove()  # idempotent


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
            # A connection made to a unit's opened port, from outside, is answered.
            assert talk(outside, WEB, 8080) == "hi"
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


@pytest_twisted.ensureDeferred
async def test_web_reaches_only_what_db_opened_and_nothing_else_on_the_host(tmp_path):
    from test_deploy import DB, WEB, Environment, all_started, sh, write_as_unit

    env = Environment(tmp_path / "home")
    env.cli("bootstrap", "--network", env.network)
    name = env.config["name"]
    driver = env.driver()
    try:
        env.cli("deploy", DB, "--to", "0")
        env.cli("deploy", WEB, "--to", "0", "--config", "db=db")
        units = await all_started(env, ["db/0", "web/0"])
        db, web = units["db/0"], units["web/0"]
        assert Firewall(name, "unused", None).present() == ["bridge", "inet"]
        assert db["open-ports"] == ["7070/tcp"] and web["open-ports"] == ["80/tcp"]
        gateway = env.config["subnet"].rsplit(".", 1)[0] + ".1"
        zookeeper_port = int(env.config["zookeeper"].rpartition(":")[2])
        # db also listens on a port it did not open; the host on the bridge address too.
        code, _, err = await sh(driver, db["container"], (
            "setsid python3 -c \"import socket,time; s=socket.create_server(('0.0.0.0', 7071)); time.sleep(600)\" "
            ">/dev/null 2>&1 & sleep 0.5"
        ))
        assert code == 0, err
        host_service = socket.create_server((gateway, 0))
        try:
            probe = (
                "import socket, sys\n"
                "for target in sys.argv[1:]:\n"
                "    host, port = target.rsplit(':', 1)\n"
                "    try:\n"
                "        socket.create_connection((host, int(port)), timeout=2).close(); print(target, 'open')\n"
                "    except OSError as e:\n"
                "        print(target, type(e).__name__)\n"
            )
            targets = [f"{db['private-address']}:7070", f"{db['private-address']}:7071",
                       f"{gateway}:{zookeeper_port}", f"{gateway}:{host_service.getsockname()[1]}"]
            code, out, err = await driver.exec(web["container"], ["/usr/bin/python3", "-c", probe, *targets], timeout=30)
            results = dict(line.split() for line in out.decode().splitlines())
            assert results == {
                targets[0]: "open",          # db's opened port
                targets[1]: "TimeoutError",  # db listens there, but did not open it
                targets[2]: "open",          # ZooKeeper on the host
                targets[3]: "TimeoutError",  # anything else on the host
            }, (results, err)
            # The operator on the host still reaches the unit's other ports.
            socket.create_connection((db["private-address"], 7071), timeout=2).close()
            # A compromised web may write its own node only: claiming db's address there
            # and opening 7071 opens nothing on db, since the firewall takes addresses
            # from the machine's reservations. (Waits past the agent's 5 s resync.)
            forged = {"private-address": db["private-address"], "open-ports": ["7071/tcp"]}
            assert await write_as_unit(driver, web["container"], "/units/web-0", forged) == "changed"
            await task.deferLater(reactor, 7, lambda: None)
            code, out, err = await driver.exec(web["container"], ["/usr/bin/python3", "-c", probe, targets[1]],
                                               timeout=30)
            assert out.decode().split() == [targets[1], "TimeoutError"], (out, err)
        finally:
            host_service.close()
    finally:
        await driver.close()
        result = env.cli("destroy-environment", "-y", check=False)
    assert result.returncode == 0, result.stderr
    # destroy-environment takes the firewall's tables with it.
    assert Firewall(name, "unused", None).present() == []


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
