"""The host's package cache: Debian's apt-cacher-ng, run by the machine agent as a
plain foreground process on the bridge address. Units have no route off their host;
this is their only way to package mirrors, and it serves them only those.

    <directory>/conf/acng.conf         rendered at every start (our only config file)
    <directory>/cache/                 CacheDir: debrep/pool/... holds the .debs
    <directory>/log/                   LogDir: apt-cacher.err, apt-cacher.log
    <directory>/apt-cacher-ng.pid      the running process, to replace it after a crash
"""

import contextlib
import errno
import ipaddress
import logging
import os
import pwd
import re
import shutil
import signal
import socket
import urllib.parse
from collections import namedtuple

from twisted.internet import defer, endpoints, protocol, task, utils

from ensemble import process
from ensemble.errors import EnsembleError, InvalidValue
from ensemble.machine.container.template import apt_sources
from ensemble.network.netns import inside, netns_path

log = logging.getLogger("ensemble.package_cache")

DEFAULT_PORT = 3142
# apt-cacher-ng 3.7.4 formats ports as signed 16-bit numbers: 32768 and up become
# "-3276..." and it can neither listen on them ("Error resolving address for
# binding") nor connect to an upstream on them ("503 Connection refused").
MAX_PORT = 32767
# The account Debian's package creates; when we are root the daemon runs as it, so
# that a unit which breaks apt-cacher-ng does not get root on the host.
DEFAULT_USER = "apt-cacher-ng"
SUPPORT_DIR = "/usr/lib/apt-cacher-ng"
# Seconds apt-cacher-ng waits on an upstream that does not answer before it answers
# "500 Remote or cache error". It does not remember a dead upstream: each uncached
# file costs this much again, so keep it short (a live mirror answers in well under 1s).
NETWORK_TIMEOUT = 10
# A unit's apt waits longer than the cache does, so it sees the cache's error (and
# its one retry), not a timeout of its own: a dead upstream fails one package in
# about 2 x NETWORK_TIMEOUT + 1s.
UNIT_TIMEOUT = 2 * NETWORK_TIMEOUT
UNIT_RETRIES = 1
_TAIL = 20
_NO_SOCKET_NOTE = b"Not creating Unix Domain Socket, fifo_path not specified"

Exit = namedtuple("Exit", "status requested")
Exit.__doc__ = """How a cache process ended: exit status (-N: killed by signal N), and
whether stop() asked for it (if not, its owner will want to start it again)."""


class PackageCacheError(EnsembleError):
    pass


# -- values that end up in config files --------------------------------------------

_URL_RE = re.compile(r"https?://[^\s\x00-\x1f\x7f\"'#;\\]+\Z")


def validate_url(value, what="URL"):
    """`value` if it is an http:// or https:// URL that is safe to write on one
    config line; InvalidValue otherwise."""
    shown = repr(value)[:80]
    if not isinstance(value, str) or not _URL_RE.match(value):
        raise InvalidValue(
            f"{what} must be an http:// or https:// URL without spaces, quotes, '#' or ';', not {shown}"
        )
    parts = urllib.parse.urlsplit(value)
    try:
        parts.port
    except ValueError:
        raise InvalidValue(f"{what} has an invalid port: {shown}") from None
    if not parts.hostname:
        raise InvalidValue(f"{what} names no host: {shown}")
    return value


def validate_upstream_url(value, what):
    validate_url(value, what)
    port = urllib.parse.urlsplit(value).port
    if port is not None and port > MAX_PORT:
        raise InvalidValue(f"{what} uses port {port}: apt-cacher-ng 3.7.4 cannot connect to ports above {MAX_PORT}")
    return value


def _validate_address(address):
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        raise InvalidValue(f"package cache address must be an IP address, not {str(address)[:70]!r}") from None
    if ip.is_unspecified:
        raise InvalidValue(f"the package cache binds one address (the bridge's), never {address}")
    return str(ip)


def _validate_port(port):
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= MAX_PORT:
        raise InvalidValue(
            f"package cache port must be 1-{MAX_PORT} (apt-cacher-ng 3.7.4 cannot bind higher ones), not {port!r}"
        )
    return port


def _host_part(url):
    """A URL as apt-cacher-ng's Remap merging lists take it: no scheme, no trailing slash."""
    return re.sub(r"^[a-z]+://", "", url).rstrip("/")


# -- the unit side -------------------------------------------------------------------

def unit_apt_config(proxy_url):
    """The text of a unit's /etc/apt/apt.conf.d/NN-ensemble-proxy: every download
    goes through the host's cache at `proxy_url` (http://GATEWAY:PORT)."""
    validate_url(proxy_url, "the package cache URL")
    if not proxy_url.startswith("http://"):
        raise InvalidValue(f"units reach the package cache over plain http, not {proxy_url!r}")
    return f"""\
// Written by ensemble. This unit has no route off its host: apt reaches package
// mirrors only through the host's package cache (apt-cacher-ng on the gateway).
Acquire::http::Proxy "{proxy_url}";
// https:// sources cannot work here: the cache cannot cache TLS and refuses to
// tunnel it (403 CONNECT denied), and there is no direct route. Pointing https at
// the cache makes them fail at once with that answer; use the mirror's http:// URI
// (apt checks packages by the archive's signatures, not by TLS).
Acquire::https::Proxy "{proxy_url}";
// Longer than the cache's own upstream timeout ({NETWORK_TIMEOUT}s), so apt reports the
// cache's error rather than a timeout; one retry rides over a transient 503. A dead
// upstream then fails a package in ~{2 * NETWORK_TIMEOUT + 1}s instead of hanging.
Acquire::http::Timeout "{UNIT_TIMEOUT}";
Acquire::https::Timeout "{UNIT_TIMEOUT}";
Acquire::Retries "{UNIT_RETRIES}";
// Fewer index files for 'apt-get update' to fetch; 'apt-get install' needs no update:
// the template keeps the package lists it was built with.
Acquire::Languages "none";
"""


# -- upstream: the host's apt, or what the operator says ----------------------------

def parse_apt_proxy(dump, environ=None):
    """The proxy the host's apt uses for http, from `apt-config dump` output (or
    $http_proxy, which apt also honours); None when it connects directly."""
    for line in dump.splitlines():
        match = re.match(r'\s*Acquire::http::Proxy\s+"(.*)";\s*$', line, re.IGNORECASE)
        if match:
            value = match.group(1).strip()
            return None if value.upper() in ("", "DIRECT", "FALSE") else value
    value = (environ or {}).get("http_proxy", "").strip()
    return value or None


async def host_apt_proxy(reactor=None):
    """The host's apt proxy for http (see parse_apt_proxy), asked of `apt-config`."""
    apt_config = shutil.which("apt-config")
    if apt_config is None:
        return None
    out, err, code = await utils.getProcessOutputAndValue(
        apt_config, ["dump"], env=dict(os.environ), reactor=reactor
    )
    if code != 0:
        raise PackageCacheError(
            f"apt-config dump failed ({code}): {err.decode('utf-8', 'replace').strip()[-200:]}"
        )
    return parse_apt_proxy(out.decode("utf-8", "replace"), os.environ)


def host_source_uris(root="/etc/apt"):
    """The distinct http(s) URIs of the host's apt sources."""
    uris = []
    for source in apt_sources(root):
        uri = source.uri.rstrip("/")
        if re.match(r"https?://", uri) and uri not in uris:
            uris.append(uri)
    return uris


_SECURITY_MERGE = (
    "security.debian.org security.debian.org/debian-security deb.debian.org/debian-security "
    "cdn-fastly.deb.debian.org/debian-security /debian-security"
)


def remap_lines(source_uris, mirror=None):
    """apt-cacher-ng Remap lines: which requests it serves (everything else is
    refused: ForceManaged) and where it fetches them.

    - debrep: the Debian archive as any known Debian mirror names it, fetched from
      `mirror` if given, else from the host's own Debian mirror(s);
    - secdeb: Debian security, from the host's security source if it has one;
    - every other source of the host: as itself."""
    uris = [u.rstrip("/") for u in source_uris]
    debian = [u for u in uris if u.endswith("/debian")]
    security = [u for u in uris if u.endswith("/debian-security")]
    others = [u for u in uris if u not in debian and u not in security]
    targets = [mirror.rstrip("/")] if mirror else (debian or ["http://deb.debian.org/debian"])
    security_targets = security or ["http://deb.debian.org/debian-security"]
    lines = [
        # deb_mirrors.gz (in SupportDir) lists Debian's mirrors; a unit asking any
        # of them, or the host's own, shares one cache.
        "Remap-debrep: file:deb_mirrors.gz /debian "
        + " ".join(_host_part(u) for u in debian)
        + " ; " + " ".join(u + "/" for u in targets),
        f"Remap-secdeb: {_SECURITY_MERGE} "
        + " ".join(_host_part(u) for u in security)
        + " ; " + " ".join(u + "/" for u in security_targets),
    ]
    for uri in others:
        name = "ens-" + re.sub(r"[^A-Za-z0-9]+", "-", _host_part(uri)).strip("-").lower()
        lines.append(f"Remap-{name}: {_host_part(uri)} ; {uri}/")
    return [_dedupe(line) for line in lines]


def _dedupe(line):
    """One Remap line with each URL once (the host's source may be a known mirror)."""
    key, rest = line.split(": ", 1)
    merge, targets = rest.split(" ; ")
    unique = lambda words: " ".join(dict.fromkeys(words.split()))
    return f"{key}: {unique(merge)} ; {unique(targets)}"


def render_config(directory, address, port, proxy=None, remaps=()):
    """The text of acng.conf. Every option apt-cacher-ng would otherwise take from a
    default that matters is set here: we use no other config file."""
    directory = os.path.abspath(directory)
    lines = [
        "# Written by ensemble (ensemble/machine/package_cache.py) at every start.",
        f"CacheDir: {directory}/cache",
        f"LogDir: {directory}/log",
        # Where the mirror lists (deb_mirrors.gz) and page templates are.
        f"SupportDir: {SUPPORT_DIR}",
        # Units and this host reach it on the bridge address; nothing else may.
        f"BindAddress: {address}",
        f"Port: {port}",
        "ForeGround: 1",
        # No admin socket: the default path (/run/apt-cacher-ng/socket) is shared by
        # every instance on the host, and the maintenance jobs that use it are not run.
        "SocketPath:",
        # No report page. Even with AdminAuth set, its "harmless" actions (statistics,
        # scans of the whole cache) stay open to anyone who can connect, i.e. any unit,
        # and it shows every unit's downloads. Units need only the proxy; the cost is
        # that expiration (which runs through this page) cannot: the cache only grows.
        "ReportPage:",
        # Serve only the Remap'd repositories below: otherwise any unit could use it as
        # an open HTTP proxy to any host on port 80.
        "ForceManaged: 1",
        # No CONNECT tunnels (the default allows bugs.debian.org:443), no SOAP
        # pass-through to bugs.debian.org, no unit addresses sent upstream.
        "PassThroughPattern: ^$",
        "ForwardBtsSoap: 0",
        "ExposeOrigin: 0",
        # The host's hosts.allow/hosts.deny are not meant for it.
        "UseWrap: 0",
        # Bounded waits on an upstream; see NETWORK_TIMEOUT.
        f"NetworkTimeout: {NETWORK_TIMEOUT}",
        # Log lines reach the file at once: start errors quote them.
        "UnbufferLogs: 1",
    ]
    if proxy:
        lines.append(f"Proxy: {proxy}")
    lines += list(remaps)
    return "\n".join(lines) + "\n"


# -- the process ---------------------------------------------------------------------

class _Daemon(protocol.ProcessProtocol):
    """Its output lines (kept as a tail, logged), and `ended` firing with the status."""

    def __init__(self, name):
        self.name = name
        self.tail = []
        self.status = None
        self.pid = None
        self.ended = defer.Deferred()
        self._partial = b""

    def connectionMade(self):
        self.pid = self.transport.pid  # the transport forgets it once the process ends
        self.transport.closeStdin()

    def childDataReceived(self, fd, data):
        *lines, self._partial = (self._partial + data).split(b"\n")
        for line in lines:
            self._line(line)

    def _line(self, raw):
        # Printed without a newline (so it would prefix the next message), and expected:
        # we give it no SocketPath on purpose.
        line = raw.replace(_NO_SOCKET_NOTE, b"").decode("utf-8", "replace").strip()
        if line:
            self.tail = (self.tail + [line])[-_TAIL:]
            log.info("%s: %s", self.name, line)

    def processEnded(self, reason):
        if self._partial:
            self._line(self._partial)
            self._partial = b""
        code = reason.value.exitCode
        self.status = code if code is not None else -(reason.value.signal or 1)
        self.ended.callback(self.status)


class _Probe(protocol.Protocol):
    """Asks for / and tells (`answer`) whether apt-cacher-ng's usage page came back."""

    def connectionMade(self):
        self.answer = defer.Deferred()
        self.received = b""
        self.transport.write(b"GET / HTTP/1.0\r\n\r\n")

    def dataReceived(self, data):
        self.received += data
        if b"apt-cacher" in self.received.lower() or len(self.received) > 65536:
            self.transport.loseConnection()

    def connectionLost(self, reason):
        self.answer.callback(b"apt-cacher" in self.received.lower())


class PackageCache:
    """apt-cacher-ng for the units of one host, at http://ADDRESS:PORT.

    `upstream`: None for the host's own apt setup (its proxy, its mirrors), or a dict
    overriding "mirror" (the Debian archive is fetched from there) and/or "proxy"
    (None: connect directly). `user`: the account it runs as when we are root.
    `netns`: a named network namespace to run it in (a simulated host).
    `ended`: a Deferred per run, firing with an Exit when the process ends."""

    stop_timeout = 5.0

    def __init__(self, directory, address, port=DEFAULT_PORT, upstream=None, reactor=None,
                 user=DEFAULT_USER, netns=None, start_timeout=10.0):
        self.directory = os.path.abspath(directory)
        self.address = _validate_address(address)
        self.port = _validate_port(port)
        self.upstream = self._validate_upstream(upstream)
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.user = user if os.geteuid() == 0 else None
        self.netns = netns
        if netns is not None:
            netns_path(netns)
        self.start_timeout = start_timeout
        self.ended = None
        self._daemon = None
        self._stop_requested = False
        self._starting = defer.DeferredLock()

    @staticmethod
    def _validate_upstream(upstream):
        if upstream is None:
            return {}
        if not isinstance(upstream, dict) or set(upstream) - {"mirror", "proxy"}:
            raise InvalidValue(
                f"package cache upstream takes 'mirror' and 'proxy' (URLs or None), not {str(upstream)[:80]}"
            )
        for key, value in upstream.items():
            if value is not None:
                validate_upstream_url(value, f"package cache {key}")
        return dict(upstream)

    def __repr__(self):
        return f"PackageCache({self.url}, {self.directory})"

    @property
    def url(self):
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"http://{host}:{self.port}"

    @property
    def running(self):
        return self._daemon is not None and self._daemon.status is None

    @property
    def pid(self):
        return self._daemon.pid if self.running else None

    @property
    def conf_dir(self):
        return os.path.join(self.directory, "conf")

    @property
    def cache_dir(self):
        return os.path.join(self.directory, "cache")

    @property
    def log_dir(self):
        return os.path.join(self.directory, "log")

    @property
    def pid_path(self):
        return os.path.join(self.directory, "apt-cacher-ng.pid")

    # -- start ------------------------------------------------------------------------

    async def start(self):
        """Start apt-cacher-ng (replacing one left running from this directory) and
        return once it answers on its address. Does nothing if it is running."""
        await self._starting.acquire()
        try:
            await self._start()
        finally:
            self._starting.release()

    async def _start(self):
        if self.running:
            return
        binary = shutil.which("apt-cacher-ng", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
        if binary is None:
            raise PackageCacheError(
                "apt-cacher-ng is not installed: install the apt-cacher-ng package (scripts/install does)"
            )
        await self._replace_stale()
        with inside(self.netns):
            problem = _bind_problem(self.address, self.port)
        if problem:
            raise PackageCacheError(f"cannot start the package cache on {self.address}:{self.port}: {problem}")
        proxy = self.upstream["proxy"] if "proxy" in self.upstream else await host_apt_proxy(self.reactor)
        if proxy is not None:
            try:
                validate_upstream_url(proxy, "the host's apt proxy (Acquire::http::Proxy)")
            except InvalidValue as e:
                raise PackageCacheError(f"{e}; pass upstream={{'proxy': URL or None}}") from None
        remaps = remap_lines(host_source_uris(), self.upstream.get("mirror"))
        self._prepare(render_config(self.directory, self.address, self.port, proxy, remaps))

        argv = ["setpriv", "--pdeathsig", "KILL"]
        if self.user is not None:
            argv += [f"--reuid={self.user}", f"--regid={self.user}", "--clear-groups"]
        argv += ["--", binary, "-c", self.conf_dir, "ForeGround=1"]
        if self.netns is not None:
            argv = ["nsenter", f"--net={netns_path(self.netns)}", "--"] + argv
        daemon = _Daemon(f"apt-cacher-ng {self.address}:{self.port}")
        self._stop_requested = False
        self.ended = defer.Deferred()
        try:
            self.reactor.spawnProcess(
                daemon, argv[0], argv, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"},
                path=self.directory,
            )
        except OSError as e:
            raise PackageCacheError(f"cannot run apt-cacher-ng: {e}") from None
        self._daemon = daemon
        with open(self.pid_path, "w") as f:
            f.write(f"{daemon.pid}\n")
        daemon.ended.addCallback(self._ended, daemon, self.ended)
        try:
            await self._wait_ready(daemon)
        except BaseException:
            await self.stop()
            raise
        log.info("package cache at %s (pid %s, cache %s)", self.url, daemon.pid, self.cache_dir)

    def _prepare(self, config):
        os.makedirs(self.conf_dir, exist_ok=True)
        os.chmod(self.directory, 0o755)  # the daemon's user must get through to conf/ cache/ log/
        uid = gid = -1
        if self.user is not None:
            try:
                account = pwd.getpwnam(self.user)
            except KeyError:
                raise PackageCacheError(
                    f"no user {self.user!r} for the package cache: install the apt-cacher-ng package "
                    "(scripts/install does)"
                ) from None
            uid, gid = account.pw_uid, account.pw_gid
            blocked = _unreachable_ancestor(self.directory, uid, gid)
            if blocked:
                raise PackageCacheError(
                    f"the package cache runs as {self.user!r}, which cannot enter {blocked}: "
                    f"put {self.directory} somewhere it can reach"
                )
        for path in (self.cache_dir, self.log_dir):
            os.makedirs(path, exist_ok=True)
            os.chown(path, uid, gid)
            os.chmod(path, 0o750)
        # It may hold a proxy's credentials: readable by root and the daemon only.
        conf = os.path.join(self.conf_dir, "acng.conf")
        with open(conf + ".new", "w") as f:
            os.fchmod(f.fileno(), 0o640)
            os.fchown(f.fileno(), -1, gid)
            f.write(config)
        os.rename(conf + ".new", conf)

    async def _wait_ready(self, daemon):
        deadline = self.reactor.seconds() + self.start_timeout
        while True:
            if daemon.status is not None:
                raise PackageCacheError(
                    f"apt-cacher-ng on {self.address}:{self.port} exited with status {daemon.status}: "
                    f"{self._last_lines(daemon)}"
                )
            if await self._answers():
                return
            if self.reactor.seconds() > deadline:
                raise PackageCacheError(
                    f"apt-cacher-ng on {self.address}:{self.port} did not answer within "
                    f"{self.start_timeout:g}s: {self._last_lines(daemon)}"
                )
            await task.deferLater(self.reactor, 0.05, lambda: None)

    async def _answers(self):
        """Whether apt-cacher-ng answers HTTP on our address: not merely that something
        accepts connections there (another listener may, until ours gives up)."""
        kind = endpoints.TCP6ClientEndpoint if ":" in self.address else endpoints.TCP4ClientEndpoint
        # The socket is made inside connect(): in the namespace, if there is one.
        with inside(self.netns):
            connecting = kind(self.reactor, self.address, self.port, timeout=1).connect(
                protocol.Factory.forProtocol(_Probe)
            )
        try:
            probe = await connecting
        except Exception:
            return False
        timer = self.reactor.callLater(1, probe.transport.abortConnection)
        try:
            return await probe.answer
        finally:
            if timer.active():
                timer.cancel()

    def _last_lines(self, daemon, n=5):
        lines = list(daemon.tail)
        try:
            with open(os.path.join(self.log_dir, "apt-cacher.err"), errors="replace") as f:
                lines += [line.split("|", 1)[-1].strip() for line in f.readlines()[-n:]]
        except OSError:
            pass
        seen = []
        for line in lines:
            if line and line not in seen:
                seen.append(line)
        return " | ".join(seen[-n:]) or "no output"

    async def _replace_stale(self):
        """Stop an apt-cacher-ng an earlier run left on this directory (its agent was
        killed some way pdeathsig did not cover), by its recorded pid, only if its
        command line names our config directory."""
        try:
            with open(self.pid_path) as f:
                pid = int(f.read().strip())
        except (OSError, ValueError):
            return
        argv = process.cmdline(pid)
        ours = (
            bool(argv) and os.path.basename(argv[0]) == b"apt-cacher-ng"
            and argv[1:3] == [b"-c", self.conf_dir.encode()]
        )
        if ours and process.alive(pid):
            log.info("stopping apt-cacher-ng pid %s left from an earlier run of %s", pid, self.directory)
            await _stop_pid(self.reactor, pid, self.stop_timeout)
        with contextlib.suppress(FileNotFoundError):  # its own instance may have removed it
            os.unlink(self.pid_path)

    # -- stop -------------------------------------------------------------------------

    async def stop(self):
        """SIGTERM, then SIGKILL after `stop_timeout`; returns once it has exited.
        Does nothing if it is not running."""
        daemon = self._daemon
        if daemon is None:
            return
        if daemon.status is None:
            self._stop_requested = True
            _signal(daemon, "TERM")
            killer = self.reactor.callLater(self.stop_timeout, _signal, daemon, "KILL")
            try:
                await _observe(daemon.ended)
            finally:
                if killer.active():
                    killer.cancel()

    def _ended(self, status, daemon, ended):
        requested = self._stop_requested
        try:
            with open(self.pid_path) as f:
                if int(f.read().strip()) == daemon.pid:
                    os.unlink(self.pid_path)
        except (OSError, ValueError):
            pass
        if requested:
            log.info("package cache at %s stopped", self.url)
        else:
            log.warning("package cache at %s exited with status %s: %s", self.url, status, self._last_lines(daemon))
        ended.callback(Exit(status, requested))
        return status


def _signal(daemon, name):
    try:
        daemon.transport.signalProcess(name)
    except Exception:  # already gone (ProcessExitedAlready)
        pass


def _observe(deferred):
    """A Deferred that fires when `deferred` does, without taking its result away."""
    waiter = defer.Deferred()

    def relay(result):
        waiter.callback(None)
        return result

    deferred.addBoth(relay)
    return waiter


async def _stop_pid(reactor, pid, timeout):
    """SIGTERM `pid`, SIGKILL it after `timeout`; wait without blocking until it is gone."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = reactor.seconds() + timeout
    killed = False
    while process.alive(pid):
        if not killed and reactor.seconds() > deadline:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                return
            killed = True
        await task.deferLater(reactor, 0.05, lambda: None)


def _bind_problem(address, port):
    """Why apt-cacher-ng could not listen on address:port, or None."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((address, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return "the port is already in use"
            if e.errno == errno.EADDRNOTAVAIL:
                return "that is not an address of this host (is the bridge up?)"
            return e.strerror
    return None


def _unreachable_ancestor(path, uid, gid):
    """The first directory on the way to `path` that `uid`/`gid` may not enter, or None."""
    groups = set(os.getgrouplist(pwd.getpwuid(uid).pw_name, gid))
    current = "/"
    for part in [p for p in path.split("/") if p][:-1]:
        current = os.path.join(current, part)
        st = os.stat(current)
        if st.st_uid == uid:
            allowed = st.st_mode & 0o100
        elif st.st_gid in groups:
            allowed = st.st_mode & 0o010
        else:
            allowed = st.st_mode & 0o001
        if not allowed:
            return current
    return None
