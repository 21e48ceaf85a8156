"""The host's package cache: a real apt-cacher-ng on a loopback address. Traffic goes
only to loopback and, through the cache, to the host's own Debian mirror."""

import hashlib
import os
import random
import re
import shutil
import signal
import socket
import tempfile
import time

import pytest
import pytest_twisted
from pyroute2 import IPRoute
from twisted.internet import defer, endpoints, protocol, utils
from twisted.web import resource, server
from twisted.web.client import Agent, ProxyAgent, ResponseDone
from twisted.web.http import PotentialDataLoss

from ensemble import process
from ensemble.errors import InvalidValue
from ensemble.machine import package_cache
from ensemble.machine.package_cache import (
    MAX_PORT, PackageCache, PackageCacheError, host_source_uris, parse_apt_proxy, remap_lines,
    render_config, unit_apt_config,
)

from netns import temporary_netns

# Not in any cache these tests make: asking for it must reach upstream.
UNCACHED = "http://deb.debian.org/debian/pool/main/s/sl/sl_5.02-1+b1_amd64.deb"
REQUEST_BOUND = 90  # seconds: a request still unanswered by then counts as a hang


# -- helpers ---------------------------------------------------------------------------

def loopback(address=None):
    """A loopback address of our own and a port below apt-cacher-ng's limit, free on it."""
    address = address or f"127.0.0.{random.randint(20, 250)}"
    for _ in range(200):
        port = random.randint(20000, MAX_PORT)
        if package_cache._bind_problem(address, port) is None:
            return address, port
    raise RuntimeError("no free port")


@pytest.fixture
def directory():
    # Not under pytest's tmp_path: /tmp/pytest-of-root is 0700, and the daemon runs as
    # the apt-cacher-ng user, which must reach its directory.
    path = tempfile.mkdtemp(prefix="ensemble-acng-", dir="/tmp")
    os.chmod(path, 0o755)
    yield os.path.join(path, "cache")
    shutil.rmtree(path, ignore_errors=True)


@pytest_twisted.async_yield_fixture
async def caches():
    """Make PackageCaches through this; every one is stopped afterwards."""
    made = []

    def make(*args, **kwargs):
        cache = PackageCache(*args, **kwargs)
        made.append(cache)
        return cache

    yield make
    for cache in made:
        await cache.stop()


async def hello_deb():
    """(url, size, sha256) of the 'hello' package, as the host's apt knows it."""
    out, err, code = await utils.getProcessOutputAndValue(
        shutil.which("apt-get"), ["download", "--print-uris", "hello"], env=dict(os.environ)
    )
    match = re.search(rb"'(http://\S+)' \S+ (\d+) SHA256:([0-9a-f]{64})", out)
    if code != 0 or not match:
        pytest.skip(f"the host's apt does not know 'hello': {err.decode()[-200:]}")
    url = match.group(1).decode()
    # Network safety: only the host's own mirror, only through the cache.
    assert any(url.startswith(u + "/") for u in host_source_uris()), url
    return url, int(match.group(2)), match.group(3).decode()


class _Body(protocol.Protocol):
    def __init__(self, done):
        self.done, self.chunks = done, []

    def dataReceived(self, data):
        self.chunks.append(data)

    def connectionLost(self, reason):
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self.chunks))
        else:
            self.done.errback(reason)


def read(response):
    """(status, body) of a response."""
    done = defer.Deferred()
    response.deliverBody(_Body(done))
    return done.addCallback(lambda body: (response.code, body))


async def fetch(cache, url):
    """GET `url` with the cache as HTTP proxy: (status, body, seconds)."""
    from twisted.internet import reactor

    endpoint = endpoints.TCP4ClientEndpoint(reactor, cache.address, cache.port)
    started = time.monotonic()
    d = ProxyAgent(endpoint, reactor).request(b"GET", url.encode())
    d.addCallback(read)
    d.addTimeout(REQUEST_BOUND, reactor)
    code, body = await d
    return code, body, time.monotonic() - started


async def get_direct(url):
    from twisted.internet import reactor

    d = Agent(reactor).request(b"GET", url.encode())
    d.addCallback(read)
    d.addTimeout(REQUEST_BOUND, reactor)
    return await d


class _StatusLine(protocol.Protocol):
    def __init__(self, request):
        self.request, self.received, self.status = request, b"", defer.Deferred()

    def connectionMade(self):
        self.transport.write(self.request)

    def dataReceived(self, data):
        self.received += data
        if b"\r\n" in self.received and not self.status.called:
            self.status.callback(self.received.split(b"\r\n", 1)[0].decode())
            self.transport.loseConnection()

    def connectionLost(self, reason):
        if not self.status.called:
            self.status.callback("")


async def connect_status(cache, target):
    """The status line apt-cacher-ng answers to CONNECT `target` (host:port)."""
    from twisted.internet import reactor

    request = f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode()
    endpoint = endpoints.TCP4ClientEndpoint(reactor, cache.address, cache.port)
    client = await endpoints.connectProtocol(endpoint, _StatusLine(request))
    return await client.status.addTimeout(REQUEST_BOUND, reactor)


class BlackHole(protocol.Protocol):
    """Accepts and never answers: an upstream proxy that is there and dead."""

    def connectionMade(self):
        self.factory.accepted += 1


class Mirror(resource.Resource):
    """A loopback 'mirror' that records what it was asked for."""

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.paths = []

    def render_GET(self, request):
        self.paths.append(request.path.decode())
        request.setHeader(b"content-type", b"application/vnd.debian.binary-package")
        return b"!<arch>\nfrom the loopback mirror " + request.path


@pytest_twisted.async_yield_fixture
async def listening():
    """listening(factory) -> port on 127.0.0.1; closed afterwards."""
    from twisted.internet import reactor

    ports = []

    def listen(factory):
        # Below MAX_PORT: apt-cacher-ng 3.7.4 cannot connect to higher ports either.
        port = reactor.listenTCP(loopback("127.0.0.1")[1], factory, interface="127.0.0.1")
        ports.append(port)
        return port.getHost().port

    yield listen
    for port in ports:
        await port.stopListening()


async def apt_download(workdir, conf, package):
    """`apt-get download` with a unit's apt config added to the host's: (code, output)."""
    out, err, code = await utils.getProcessOutputAndValue(
        shutil.which("apt-get"), ["-c", conf, "-q", "download", package], env=dict(os.environ), path=workdir
    )
    return code, (out + err).decode("utf-8", "replace")


# -- the unit side, validation, rendering (no process) -------------------------------

def test_unit_apt_config_sends_everything_through_the_cache():
    text = unit_apt_config("http://10.77.0.1:3142")
    settings = dict(re.findall(r'^(\S+) "([^"]*)";$', text, re.MULTILINE))
    assert settings["Acquire::http::Proxy"] == "http://10.77.0.1:3142"
    # No route out: https goes to the cache too (which refuses it at once), never DIRECT.
    assert settings["Acquire::https::Proxy"] == "http://10.77.0.1:3142"
    assert "DIRECT" not in text
    # Bounded, and longer than the cache's own upstream timeout.
    assert package_cache.NETWORK_TIMEOUT < int(settings["Acquire::http::Timeout"]) <= 30
    assert 0 < int(settings["Acquire::Retries"]) <= 2
    # Every non-comment line is an apt statement.
    for line in text.splitlines():
        assert line.startswith("//") or re.match(r'^\S+ "[^"]*";$', line), line


@pytest.mark.parametrize("bad", [
    "ftp://mirror.example/debian", "mirror.example/debian", "http://", "http://a b/debian",
    "http://mirror.example/debian\nPort: 1", "http://mirror.example/debian;x", "http://x/#y",
    'http://x/"', "http://x:99999/", "", 42,
])
def test_bad_upstream_urls_are_refused(bad, directory):
    with pytest.raises(InvalidValue) as info:
        PackageCache(directory, "127.0.0.1", upstream={"mirror": bad})
    assert "\n" not in str(info.value)
    with pytest.raises(InvalidValue):
        PackageCache(directory, "127.0.0.1", upstream={"proxy": bad})
    with pytest.raises(InvalidValue):
        unit_apt_config(bad)


def test_bad_addresses_ports_and_keys_are_refused(directory):
    for address in ("0.0.0.0", "::", "example.org", ""):
        with pytest.raises(InvalidValue):
            PackageCache(directory, address)
    for port in (0, MAX_PORT + 1, 40000, "3142", True):
        with pytest.raises(InvalidValue):
            PackageCache(directory, "127.0.0.1", port=port)
    with pytest.raises(InvalidValue):
        PackageCache(directory, "127.0.0.1", upstream={"mirrors": "http://x/debian"})
    with pytest.raises(InvalidValue, match="32767"):
        PackageCache(directory, "127.0.0.1", upstream={"proxy": "http://127.0.0.1:40000"})
    for url in ("https://10.77.0.1:3142", None):
        with pytest.raises(InvalidValue):
            unit_apt_config(url)


def test_config_binds_one_address_and_serves_only_mirrors():
    remaps = remap_lines(["http://deb.debian.org/debian", "http://deb.debian.org/debian-security",
                          "http://archive.example.org/extra"], mirror="http://10.1.2.3:8080/debian")
    text = render_config("/srv/cache", "10.77.0.1", 3142, "http://proxy.example:3128", remaps)
    options = {}
    for line in text.splitlines():
        if not line.startswith("#"):
            key, _, value = line.partition(":")
            options.setdefault(key.strip().lower(), []).append(value.strip())
    assert options["bindaddress"] == ["10.77.0.1"]
    assert "0.0.0.0" not in text and "::" not in options["bindaddress"][0]
    assert options["port"] == ["3142"]
    assert options["cachedir"] == ["/srv/cache/cache"] and options["logdir"] == ["/srv/cache/log"]
    assert options["proxy"] == ["http://proxy.example:3128"]
    assert options["forcemanaged"] == ["1"]
    assert options["reportpage"] == [""] and options["socketpath"] == [""]
    assert options["passthroughpattern"] == ["^$"]
    assert 0 < int(options["networktimeout"][0]) < 30
    # The Debian archive (as any mirror names it) comes from the mirror we were given.
    assert options["remap-debrep"] == ["file:deb_mirrors.gz /debian deb.debian.org/debian ; http://10.1.2.3:8080/debian/"]
    assert options["remap-secdeb"][0].endswith("; http://deb.debian.org/debian-security/")
    assert options["remap-ens-archive-example-org-extra"] == ["archive.example.org/extra ; http://archive.example.org/extra/"]


def test_the_hosts_apt_proxy_is_read_from_apt_config():
    dump = 'Acquire::http "";\nAcquire::http::Proxy "http://squid.corp:3128/";\nAcquire::http::Proxy::deb.example "DIRECT";\n'
    assert parse_apt_proxy(dump) == "http://squid.corp:3128/"
    assert parse_apt_proxy('Acquire::http::Proxy "DIRECT";\n', {"http_proxy": "http://x:1"}) is None
    assert parse_apt_proxy("APT \"\";\n", {"http_proxy": "http://env.proxy:8080"}) == "http://env.proxy:8080"
    assert parse_apt_proxy("APT \"\";\n", {}) is None


# -- a real apt-cacher-ng ------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_fetches_a_real_deb_then_serves_it_offline(directory, caches, listening, tmp_path):
    url, size, sha256 = await hello_deb()
    address, port = loopback()
    cache = caches(directory, address, port)
    await cache.start()
    assert cache.running and cache.url == f"http://{address}:{port}"
    # Bound to its address only: the same port on another loopback address is closed.
    other = "127.0.0.2" if address != "127.0.0.2" else "127.0.0.3"
    assert package_cache._bind_problem(other, port) is None

    code, body, first = await fetch(cache, url)
    assert code == 200 and body.startswith(b"!<arch>\ndebian-binary")
    assert len(body) == size and hashlib.sha256(body).hexdigest() == sha256
    stored = os.path.join(directory, "cache", "debrep", "pool", "main", "h", "hello", url.rsplit("/", 1)[1])
    with open(stored, "rb") as f:
        assert f.read() == body
    code, again, cached = await fetch(cache, url)
    assert code == 200 and again == body
    print(f"\nhello .deb ({size} bytes): first fetch {first * 1000:.1f} ms, from the cache {cached * 1000:.1f} ms")
    await cache.stop()
    assert not cache.running

    # Offline: the upstream proxy accepts connections and never answers.
    hole = protocol.Factory.forProtocol(BlackHole)
    hole.accepted = 0
    hole_port = listening(hole)
    offline = caches(directory, address, port, upstream={"proxy": f"http://127.0.0.1:{hole_port}"})
    await offline.start()
    code, again, cached = await fetch(offline, url)
    assert code == 200 and again == body
    assert hole.accepted == 0  # a cached .deb does not touch upstream at all
    code, _, waited = await fetch(offline, UNCACHED)
    assert code >= 500 and hole.accepted >= 1
    print(f"uncached file, dead upstream: HTTP {code} after {waited:.1f} s")

    # A unit's apt config: the cached package installs, an uncached one fails with the
    # cache's error (proof that apt went through the cache: this host has a direct route).
    conf = tmp_path / "90-ensemble-proxy"
    conf.write_text(unit_apt_config(offline.url))
    code, output = await apt_download(str(tmp_path), str(conf), "hello")
    assert code == 0, output
    with open(tmp_path / url.rsplit("/", 1)[1].replace("%2b", "+"), "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == sha256
    started = time.monotonic()
    code, output = await apt_download(str(tmp_path), str(conf), "sl")
    # The cache answers 500 (remote error) or 503 (connection timeout), depending on
    # where in its wait it gives up; either way the error is the cache's, at its address.
    assert code != 0 and re.search(r" 50[03] ", output) and f"[IP: {address} {port}]" in output, output
    print(f"unit apt-get download of an uncached package, dead upstream: failed after {time.monotonic() - started:.1f} s")


@pytest_twisted.ensureDeferred
async def test_mirror_override_goes_where_told(directory, caches, listening):
    mirror = Mirror()
    mirror_port = listening(server.Site(mirror))
    address, port = loopback()
    cache = caches(directory, address, port,
                   upstream={"mirror": f"http://127.0.0.1:{mirror_port}/mirror/debian", "proxy": None})
    await cache.start()

    code, body, _ = await fetch(cache, "http://deb.debian.org/debian/pool/main/h/hello/hello_0-1_amd64.deb")
    assert code == 200 and body == b"!<arch>\nfrom the loopback mirror /mirror/debian/pool/main/h/hello/hello_0-1_amd64.deb"
    assert mirror.paths == ["/mirror/debian/pool/main/h/hello/hello_0-1_amd64.deb"]

    # Not a mirror it serves: refused, not fetched (no open proxy for units).
    code, _, _ = await fetch(cache, f"http://127.0.0.1/{'x' * 8}.deb")
    assert code == 403
    # No tunnels (here to a loopback port, so that a tunnel would be harmless).
    status = await connect_status(cache, f"127.0.0.1:{mirror_port}")
    assert status.split()[1] == "403", status
    # No report/maintenance page for whoever can connect.
    code, _ = await get_direct(f"{cache.url}/acng-report.html")
    assert code != 200
    assert mirror.paths == ["/mirror/debian/pool/main/h/hello/hello_0-1_amd64.deb"]


@pytest_twisted.ensureDeferred
async def test_a_stale_process_is_replaced_and_stop_is_idempotent(directory, caches):
    from twisted.internet import reactor

    address, port = loopback()
    first = caches(directory, address, port, upstream={"proxy": None})
    await first.start()
    old_pid = first.pid
    ended = first.ended
    # A new agent (the old one 'died' without stopping it) takes over the directory.
    second = caches(directory, address, port, upstream={"proxy": None})
    await second.start()
    assert second.running and second.pid != old_pid
    assert not process.alive(old_pid)
    exit = await ended
    assert exit.requested is False  # its owner learns it died, and was not asked to
    with open(second.pid_path) as f:
        assert int(f.read()) == second.pid

    await second.stop()
    await second.stop()
    assert not second.running and not os.path.exists(second.pid_path)

    # A pid file naming some other process: that process is left alone.
    bystander = protocol.ProcessProtocol()
    bystander_ended = defer.Deferred()
    bystander.processEnded = lambda reason: bystander_ended.callback(None)
    transport = reactor.spawnProcess(bystander, "/bin/sleep", ["sleep", "60"])
    try:
        with open(second.pid_path, "w") as f:
            f.write(f"{transport.pid}\n")
        await second.start()
        assert second.running and process.alive(transport.pid)
    finally:
        transport.signalProcess("KILL")
        await bystander_ended


@pytest_twisted.ensureDeferred
async def test_an_owner_learns_that_it_died_and_can_restart_it(directory, caches):
    address, port = loopback()
    cache = caches(directory, address, port, upstream={"proxy": None})
    await cache.start()
    ended = cache.ended
    os.kill(cache.pid, signal.SIGKILL)
    exit = await ended
    assert exit.status == -signal.SIGKILL and exit.requested is False
    assert not cache.running
    await cache.start()
    assert cache.running
    ended = cache.ended
    await cache.stop()
    assert (await ended).requested is True


@pytest_twisted.ensureDeferred
async def test_start_failures_say_why(directory, caches, monkeypatch, tmp_path):
    address, port = loopback()
    cache = caches(directory, address, port, upstream={"proxy": None})
    with socket.socket() as holder:
        holder.bind((address, port))
        holder.listen()
        with pytest.raises(PackageCacheError, match="already in use"):
            await cache.start()
        # If the port is taken after our check, apt-cacher-ng's own words reach the error.
        monkeypatch.setattr(package_cache, "_bind_problem", lambda address, port: None)
        with pytest.raises(PackageCacheError, match=r"exited with status 1: .*busy"):
            await cache.start()
        assert not cache.running
    # Its user cannot get through a root-only directory (pytest's tmp_path is in one).
    locked = tmp_path / "private"
    locked.mkdir(mode=0o700)
    with pytest.raises(PackageCacheError, match=r"'apt-cacher-ng', which cannot enter /\S*: put .* somewhere it can reach"):
        await caches(str(locked / "cache"), address, port, upstream={"proxy": None}).start()
    monkeypatch.setattr(package_cache.shutil, "which", lambda name, path=None: None)
    with pytest.raises(PackageCacheError, match="install the apt-cacher-ng package"):
        await cache.start()


@pytest_twisted.ensureDeferred
async def test_runs_in_a_network_namespace(directory, caches):
    with temporary_netns() as ns:
        with IPRoute(netns=ns, flags=0) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        cache = caches(directory, "127.0.0.1", random.randint(20000, MAX_PORT), upstream={"proxy": None}, netns=ns)
        await cache.start()
        try:
            assert os.stat(f"/proc/{cache.pid}/ns/net").st_ino == os.stat(f"/run/netns/{ns}").st_ino
        finally:
            await cache.stop()
