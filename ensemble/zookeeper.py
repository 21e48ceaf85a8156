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
MAIN_CLASS = "org.apache.zookeeper.server.ZooKeeperServerMain"


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
    """One standalone server whose config, data, log and pid file live in `directory`."""

    def __init__(self, directory, host="127.0.0.1", port=None, tick_time=2000, heap_mb=256, netns=None):
        self.directory = os.path.abspath(directory)
        self.host = host
        # In a named network namespace (a lab's simulated host), checks included.
        self.netns = netns
        with inside(netns):
            self.port = port or free_port(host)
        self.tick_time = tick_time
        self.heap_mb = heap_mb

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
            "maxClientCnxns=0",
            "admin.enableServer=false",
            "4lw.commands.whitelist=ruok,srvr,mntr,envi,stat",
            # Local environments and tests create many small transactions; keep the disk bounded.
            "autopurge.snapRetainCount=3",
            "autopurge.purgeInterval=1",
        ]
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

    def start(self, timeout=30.0):
        """Start the server detached from the caller and wait until it serves sessions."""
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
            "-cp",
            ":".join(JARS),
            MAIN_CLASS,
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
        try:
            self.wait_ready(timeout, server)
        except ZooKeeperStartFailed:
            self.stop()
            raise
        return server.pid

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
