"""Run a standalone ZooKeeper server from the Debian package, as a plain process.

Blocking by design: it is used before the reactor runs (tests, bootstrap) or through
`deferToThread`.
"""

import os
import socket
import subprocess
import time

from ensemble import process
from ensemble.errors import ZooKeeperStartFailed
from ensemble.network.netns import inside, netns_path

JARS = ["/usr/share/java/zookeeper.jar", "/usr/share/java/slf4j-simple.jar"]
# Connections one client address may hold. Units reach ZooKeeper each from its own
# address and hold one session (two across an agent's restart); the host's address
# carries its machine agent's session and the admin's commands (up to two sessions
# each, and status's `srvr` probe). 64 leaves that room to spare, while one unit can
# hold no more than 64 sockets open however it tries.
MAX_CLIENT_CONNECTIONS = 64
# The four-letter words the project uses: `srvr` (is it serving, and as what: start-up,
# status) and `ruok` (tests from inside units). No `stat` or `cons`: they list every
# client's address, and `dump` every session's ephemeral nodes.
FOUR_LETTER_WORDS = ("ruok", "srvr")
MAIN_CLASS = "org.apache.zookeeper.server.ZooKeeperServerMain"
QUORUM_MAIN_CLASS = "org.apache.zookeeper.server.quorum.QuorumPeerMain"


def free_port(host="127.0.0.1"):
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_free(host, port):
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def four_letter(host, port, command, timeout=1.0):
    """Send a four-letter command; return the answer, or None if nothing answered."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(command.encode())
            chunks = []
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    break
                chunks.append(chunk)
            return b"".join(chunks).decode(errors="replace")
    except OSError:
        return None


class ZooKeeperServer:
    """One server whose config, data, log and pid file live in `directory`: standalone,
    or with `server_id` and `peers` ([(id, host, quorum port, election port)]) one
    member of an ensemble."""

    def __init__(
        self, directory, host="127.0.0.1", port=None, tick_time=2000, heap_mb=256, netns=None,
        server_id=None, peers=None, max_client_connections=MAX_CLIENT_CONNECTIONS,
    ):
        self.directory = os.path.abspath(directory)
        self.host = host
        # In a named network namespace (a lab's simulated host), checks included.
        self.netns = netns
        with inside(netns):
            self.port = port or free_port(host)
        self.server_id = server_id
        self.peers = peers or []
        self.tick_time = tick_time
        self.heap_mb = heap_mb
        self.max_client_connections = max_client_connections

    @property
    def address(self):
        return f"{self.host}:{self.port}"

    @property
    def config_path(self):
        return os.path.join(self.directory, "zoo.cfg")

    @property
    def pid_path(self):
        return os.path.join(self.directory, "zookeeper.pid")

    @property
    def log_path(self):
        return os.path.join(self.directory, "zookeeper.log")

    def _write_config(self):
        data_dir = os.path.join(self.directory, "data")
        os.makedirs(data_dir, exist_ok=True)
        lines = [
            f"tickTime={self.tick_time}",
            f"dataDir={data_dir}",
            f"clientPort={self.port}",
            f"clientPortAddress={self.host}",
            f"maxClientCnxns={self.max_client_connections}",
            "admin.enableServer=false",
            f"4lw.commands.whitelist={','.join(FOUR_LETTER_WORDS)}",
            # Local environments and tests create many small transactions; keep the disk bounded.
            "autopurge.snapRetainCount=3",
            "autopurge.purgeInterval=1",
        ]
        if self.peers:
            lines += ["initLimit=10", "syncLimit=5"]
            lines += [f"server.{i}={host}:{quorum}:{election}" for i, host, quorum, election in self.peers]
            with open(os.path.join(data_dir, "myid"), "w") as f:
                f.write(f"{self.server_id}\n")
        with open(self.config_path, "w") as f:
            f.write("\n".join(lines) + "\n")

    def pid(self):
        """The pid of this server if it is running, else None."""
        try:
            with open(self.pid_path) as f:
                pid = int(f.read().strip())
        except (OSError, ValueError):
            return None
        if process.alive(pid) and self.config_path.encode() in process.cmdline(pid):
            return pid
        return None

    def down(self):
        """[0] if the server is not running, else [] (as for an ensemble's members)."""
        return [] if self.pid() is not None else [0]

    def start(self, timeout=30.0):
        """Start the server detached from the caller and wait until it serves sessions."""
        server = self.launch()
        try:
            self.wait_ready(timeout, server)
        except ZooKeeperStartFailed:
            self.stop()
            raise
        return server.pid

    def launch(self):
        """Start the server process without waiting for it (an ensemble member serves
        only once a quorum is up); returns the Popen."""
        for jar in JARS:
            if not os.path.exists(jar):
                raise ZooKeeperStartFailed(f"{jar} is missing: install the 'zookeeper' package")
        if self.pid() is not None:
            raise ZooKeeperStartFailed(f"a ZooKeeper server already runs from {self.directory}")
        with inside(self.netns):
            free = port_free(self.host, self.port)
        if not free:
            raise ZooKeeperStartFailed(f"cannot start ZooKeeper: {self.address} is already in use")
        os.makedirs(self.directory, exist_ok=True)
        self._write_config()
        command = [
            "java",
            f"-Xmx{self.heap_mb}m",
            # A fixed heap: growing it stalled every client at once. C1 only: C2's
            # compilation bursts took the cores from request handling on small hosts
            # (IPAM p99 with 8 allocators 20-50 ms -> 8-13 ms; docs/benchmarks.md).
            f"-Xms{self.heap_mb}m",
            "-XX:TieredStopAtLevel=1",
            "-Dorg.slf4j.simpleLogger.defaultLogLevel=warn",
            "-Dzookeeper.jmx.log4j.disable=true",
            # Hard quotas refuse writes past them (ensemble/state/quota.py): without
            # this ZooKeeper only logs that a quota was passed.
            "-Dzookeeper.enforceQuota=true",
            "-cp",
            ":".join(JARS),
            QUORUM_MAIN_CLASS if self.peers else MAIN_CLASS,
            self.config_path,
        ]
        if self.netns is not None:
            command = ["nsenter", f"--net={netns_path(self.netns)}", "--", *command]
        with open(self.log_path, "ab") as log, open(os.devnull, "rb") as null:
            server = subprocess.Popen(
                command, stdin=null, stdout=log, stderr=log, start_new_session=True, close_fds=True
            )
        with open(self.pid_path, "w") as f:
            f.write(f"{server.pid}\n")
        return server

    def mode(self):
        """'standalone', 'leader' or 'follower' while serving; None otherwise."""
        with inside(self.netns):
            answer = four_letter(self.host, self.port, "srvr", timeout=0.5)
        for line in (answer or "").splitlines():
            if line.startswith("Mode:"):
                return line.split(":", 1)[1].strip()
        return None

    def wait_ready(self, timeout=30.0, server=None):
        # `ruok` answers before the server accepts sessions; `srvr` showing a Mode does not.
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with inside(self.netns):
                answer = four_letter(self.host, self.port, "srvr", timeout=0.5)
            exited = server is not None and server.poll() is not None
            if answer and "Mode:" in answer and not exited:
                return
            if exited:
                raise ZooKeeperStartFailed(
                    f"ZooKeeper exited with status {server.returncode} on {self.address}; "
                    f"see {self.log_path}"
                )
            time.sleep(0.05)
        raise ZooKeeperStartFailed(
            f"ZooKeeper on {self.address} did not answer within {timeout:g}s; see {self.log_path}"
        )

    def stop(self, timeout=10.0):
        pid = self.pid()
        if pid is not None:
            process.stop(pid, timeout, marker=self.config_path)
        try:
            os.unlink(self.pid_path)
        except FileNotFoundError:
            pass


class ZooKeeperEnsemble:
    """`size` servers on one host address, each in `directory`/server-N; clients are
    given all of them ("h:p1,h:p2,h:p3") and fail over between them. `ports`: one
    (client, quorum, election) triple per server, to restart an ensemble as it was."""

    def __init__(self, directory, size=3, host="127.0.0.1", ports=None, tick_time=2000, heap_mb=256):
        if ports is None:
            ports = _distinct_free_ports(host, 3 * size)
            ports = [tuple(ports[3 * i: 3 * i + 3]) for i in range(size)]
        if len(ports) != size:
            raise ValueError(f"{size} servers need {size} port triples, not {len(ports)}")
        self.directory = os.path.abspath(directory)
        self.host = host
        self.ports = [tuple(p) for p in ports]
        peers = [(i + 1, host, quorum, election) for i, (_, quorum, election) in enumerate(self.ports)]
        self.servers = [
            ZooKeeperServer(
                os.path.join(self.directory, f"server-{i + 1}"), host, client, tick_time, heap_mb,
                server_id=i + 1, peers=peers,
            )
            for i, (client, _, _) in enumerate(self.ports)
        ]

    @property
    def address(self):
        return ",".join(s.address for s in self.servers)

    def pid(self):
        """A running member's pid, or None when none runs (the single server's API)."""
        pids = [s.pid() for s in self.servers]
        return next((p for p in pids if p is not None), None)

    def down(self):
        """Indices of the members whose process is not running."""
        return [i for i, s in enumerate(self.servers) if s.pid() is None]

    def start(self, timeout=60.0):
        """Start every member that is not running; wait until each serves."""
        launched = {i: self.servers[i].launch() for i in self.down()}
        try:
            for i, server in launched.items():
                self.servers[i].wait_ready(timeout, server)
        except ZooKeeperStartFailed:
            for i in launched:
                self.servers[i].stop()
            raise

    def leader(self):
        """The index of the member that leads now, or None."""
        return next((i for i, s in enumerate(self.servers) if s.mode() == "leader"), None)

    def stop(self, timeout=10.0):
        for server in self.servers:
            server.stop(timeout)


def server_modes(servers, timeout=0.5):
    """{"host:port": "leader" | "follower" | "standalone" | "down"} for a client's
    server list ("h:p,h:p"), asked with `srvr`. Blocking."""
    modes = {}
    for server in servers.split(","):
        host, _, port = server.rpartition(":")
        answer = four_letter(host, int(port), "srvr", timeout=timeout) or ""
        mode = next((line.split(":", 1)[1].strip() for line in answer.splitlines() if line.startswith("Mode:")), None)
        modes[server] = mode or "down"
    return modes


def _distinct_free_ports(host, n):
    ports = set()
    while len(ports) < n:
        ports.add(free_port(host))
    return sorted(ports)
