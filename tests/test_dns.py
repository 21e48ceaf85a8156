"""The name server: its cache and answers with an in-memory source and a Clock, and
real UDP and TCP queries to it on a loopback address."""

import ipaddress
from types import SimpleNamespace

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.names import dns

from ensemble.errors import EnsembleError, InvalidName
from ensemble.network.dns import (
    STALE_FOR,
    TTL,
    WARN_EVERY,
    CachedSource,
    DNSServerError,
    LookupFailed,
    NameServer,
    Zone,
    domain_for,
    is_unit_or_service_label,
)

# Loopback only; 127.0.0.0/8 is all on `lo`, so this needs no setup.
ADDRESS = "127.0.0.77"
DOMAIN = domain_for("test")


class MemorySource:
    """An AddressSource from a dict; while `hold` is set, answers wait for `release()`."""

    def __init__(self, names=None):
        self.names = dict(names or {})
        self.calls = []
        self.error = None
        self.hold = False
        self._held = []

    async def addresses(self, label):
        self.calls.append(label)
        if self.hold:
            waiting = defer.Deferred()
            self._held.append(waiting)
            await waiting
        if self.error is not None:
            raise self.error
        found = self.names.get(label)
        return None if found is None else list(found)

    def release(self):
        self.hold = False
        held, self._held = self._held, []
        for waiting in held:
            if not waiting.called:  # else cancelled by its caller
                waiting.callback(None)


NAMES = {"db-0": ["10.77.0.2"], "db-1": ["10.77.0.3"], "db": ["10.77.0.2", "10.77.0.3"], "web": []}


# -- the cache -------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_cache_answers_repeats_until_its_ttl_passes():
    clock = task.Clock()
    source = MemorySource(NAMES)
    cache = CachedSource(source, ttl=1.0, reactor=clock)
    assert await cache.addresses("db-0") == ["10.77.0.2"]
    clock.advance(0.9)
    assert await cache.addresses("db-0") == ["10.77.0.2"]
    assert source.calls == ["db-0"]
    source.names["db-0"] = ["10.77.0.9"]
    clock.advance(0.1)
    assert await cache.addresses("db-0") == ["10.77.0.9"]
    assert source.calls == ["db-0", "db-0"]


@pytest_twisted.ensureDeferred
async def test_cache_keeps_unknown_names_too():
    clock = task.Clock()
    source = MemorySource(NAMES)
    cache = CachedSource(source, ttl=1.0, reactor=clock)
    assert await cache.addresses("nope") is None
    assert await cache.addresses("nope") is None
    assert source.calls == ["nope"]


@pytest_twisted.ensureDeferred
async def test_concurrent_misses_share_one_source_call():
    clock = task.Clock()
    source = MemorySource(NAMES)
    source.hold = True
    cache = CachedSource(source, ttl=1.0, reactor=clock)
    waiting = [defer.ensureDeferred(cache.addresses("db-0")) for _ in range(3)]
    other = defer.ensureDeferred(cache.addresses("db-1"))
    assert source.calls == ["db-0", "db-1"]
    assert not any(d.called for d in waiting)
    source.release()
    assert [d.result for d in waiting] == [["10.77.0.2"]] * 3
    assert other.result == ["10.77.0.3"]
    # Each caller gets its own list: one changing it does not change the others'.
    waiting[0].result.append("x")
    assert await cache.addresses("db-0") == ["10.77.0.2"]
    assert source.calls == ["db-0", "db-1"]


@pytest_twisted.ensureDeferred
async def test_cache_does_not_keep_failures():
    clock = task.Clock()
    source = MemorySource(NAMES)
    source.error = RuntimeError("zookeeper is away")
    cache = CachedSource(source, ttl=1.0, reactor=clock)
    with pytest.raises(LookupFailed, match="zookeeper is away"):
        await cache.addresses("db-0")
    source.error = None
    assert await cache.addresses("db-0") == ["10.77.0.2"]
    assert source.calls == ["db-0", "db-0"]


@pytest_twisted.ensureDeferred
async def test_failures_are_logged_now_and_then_not_each_time(caplog):
    clock = task.Clock()
    source = MemorySource(NAMES)
    source.error = RuntimeError("zookeeper is away")
    cache = CachedSource(source, reactor=clock)
    for _ in range(3):
        with pytest.raises(LookupFailed):
            await cache.addresses("db-0")
    clock.advance(WARN_EVERY)
    with pytest.raises(LookupFailed):
        await cache.addresses("db-1")
    warnings = [r.getMessage() for r in caplog.records if r.name == "ensemble.dns"]
    assert warnings == [
        "dns: cannot look up 'db-0': zookeeper is away",
        "dns: cannot look up 'db-1': zookeeper is away (2 more failures since the last report)",
    ]


@pytest_twisted.ensureDeferred
async def test_a_source_that_does_not_answer_fails_every_waiter_at_the_timeout():
    clock = task.Clock()
    source = MemorySource(NAMES)
    source.hold = True  # never released
    cache = CachedSource(source, ttl=1.0, timeout=1.0, reactor=clock)
    waiting = [defer.ensureDeferred(cache.addresses("db-0")) for _ in range(2)]
    clock.advance(0.5)
    assert not any(d.called for d in waiting)
    clock.advance(0.5)
    for d in waiting:
        with pytest.raises(LookupFailed, match="no answer in 1s"):
            await d
    # Nothing stuck: the next lookup asks the source again.
    source.hold = False
    assert await cache.addresses("db-0") == ["10.77.0.2"]
    assert source.calls == ["db-0", "db-0"]


@pytest_twisted.ensureDeferred
async def test_a_source_answering_nonsense_is_a_lookup_failure():
    class Nonsense:
        async def addresses(self, label):
            return "10.77.0.2"  # a string, not a list

    with pytest.raises(LookupFailed):
        await CachedSource(Nonsense(), reactor=task.Clock()).addresses("db-0")


@pytest_twisted.ensureDeferred
async def test_cache_holds_at_most_its_size():
    clock = task.Clock()
    source = MemorySource(NAMES)
    cache = CachedSource(source, ttl=10.0, reactor=clock, size=2)
    for label in ("db-0", "db-1", "db"):
        await cache.addresses(label)
    await cache.addresses("db")
    await cache.addresses("db-1")
    await cache.addresses("db-0")  # the oldest, dropped for `db`
    assert source.calls == ["db-0", "db-1", "db", "db-0"]


# -- answers, without a network ------------------------------------------------------


def ask(zone, name, type=dns.A, cls=dns.IN):
    return defer.ensureDeferred(zone.answer(dns.Query(name, type, cls)))


@pytest_twisted.ensureDeferred
async def test_zone_answers_by_type():
    source = MemorySource({**NAMES, "v6": ["fd00::5", "10.77.0.5", "not-an-address"]})
    zone = Zone(source, DOMAIN)
    rcode, answers, authority = await ask(zone, "v6", dns.ALL_RECORDS)
    assert rcode == dns.OK and authority == []
    assert [(a.type, ipaddress.ip_address(a.payload.address)) for a in answers] == [
        (dns.AAAA, ipaddress.ip_address("fd00::5")), (dns.A, ipaddress.ip_address("10.77.0.5")),
    ]
    rcode, answers, _ = await ask(zone, "v6", dns.AAAA)
    assert [a.type for a in answers] == [dns.AAAA]
    # Another class, or a type that names do not have: the name is there, no records.
    for type, cls in ((dns.A, dns.CH), (dns.MX, dns.IN), (dns.TXT, dns.IN)):
        rcode, answers, authority = await ask(zone, "db-0", type, cls)
        assert (rcode, answers, [a.type for a in authority]) == (dns.OK, [], [dns.SOA])
    # The apex has the SOA and nothing else.
    rcode, answers, _ = await ask(zone, DOMAIN, dns.SOA)
    assert rcode == dns.OK and answers[0].payload.minimum == TTL
    rcode, answers, _ = await ask(zone, DOMAIN, dns.A)
    assert (rcode, answers) == (dns.OK, [])


@pytest_twisted.ensureDeferred
async def test_zone_asks_the_source_only_about_unit_and_service_labels():
    source = MemorySource(NAMES)
    zone = Zone(source, DOMAIN)
    outside = [
        "deb.debian.org", "db-0.example.com", f"x.db-0.{DOMAIN}", "db_0", "-db", "1db",
        "a" * 63, "", "ensemble.internal", "2.0.77.10.in-addr.arpa", "caf\xe9".encode("latin-1"),
    ]
    for name in outside:
        rcode, answers, authority = await ask(zone, name)
        assert (rcode, answers, [a.type for a in authority]) == (dns.ENAME, [], [dns.SOA]), name
    assert source.calls == []


def test_labels_and_domains():
    assert all(map(is_unit_or_service_label, ["db", "db-0", "my-db-12", "a" * 40]))
    assert not any(map(is_unit_or_service_label, ["DB", "db_0", "db.0", "a" * 41, "", "0db"]))
    assert domain_for("prod") == "prod.ensemble.internal"
    with pytest.raises(InvalidName):
        domain_for("Prod!")
    with pytest.raises(InvalidName):
        NameServer(MemorySource(), ADDRESS, domain="bad_domain..x")


def test_never_listens_on_every_address():
    for address in ("0.0.0.0", "::", "", "localhost"):
        with pytest.raises(DNSServerError) as raised:
            NameServer(MemorySource(), address, domain=DOMAIN)
        assert isinstance(raised.value, EnsembleError)


# -- over the wire ------------------------------------------------------------------


class _Client:
    """The controller twisted.names' client protocols report to."""

    def __init__(self):
        self.closed = defer.Deferred()

    def messageReceived(self, message, protocol, address=None):
        pass

    def connectionMade(self, protocol):
        pass

    def connectionLost(self, protocol):
        self.closed.callback(None)


async def query_udp(server, name, type=dns.A, timeout=5):
    """The response message to one UDP query, sent from 127.0.0.1."""
    protocol = dns.DNSDatagramProtocol(_Client(), reactor=reactor)
    port = reactor.listenUDP(0, protocol, interface="127.0.0.1")
    try:
        return await protocol.query((server.address, server.port), [dns.Query(name, type)], timeout)
    finally:
        await port.stopListening()


async def query_tcp(server, name, type=dns.A, timeout=5):
    """The response message to one query over a TCP connection from 127.0.0.1."""
    client = _Client()
    endpoint = TCP4ClientEndpoint(reactor, server.address, server.port, timeout=timeout,
                                  bindAddress=("127.0.0.1", 0))
    protocol = await connectProtocol(endpoint, dns.DNSProtocol(client, reactor=reactor))
    try:
        return await protocol.query([dns.Query(name, type)], timeout)
    finally:
        protocol.transport.loseConnection()
        await client.closed


QUERIES = [query_udp, query_tcp]


@pytest_twisted.async_yield_fixture
async def served():
    source = MemorySource(NAMES)
    server = NameServer(source, ADDRESS, port=0, domain=DOMAIN, timeout=0.3)
    await server.start()
    try:
        yield server, source
    finally:
        await server.stop()


def addresses(message):
    return sorted(a.payload.dottedQuad() for a in message.answers if a.type == dns.A)


@pytest.mark.parametrize("query", QUERIES)
@pytest_twisted.ensureDeferred
async def test_unit_and_service_names_resolve(served, query):
    server, _ = served
    for name in ("db-0", f"db-0.{DOMAIN}", f"db-0.{DOMAIN}."):
        response = await query(server, name)
        assert (response.rCode, addresses(response)) == (dns.OK, ["10.77.0.2"]), name
        assert response.auth and response.answers[0].ttl == TTL
    response = await query(server, f"db.{DOMAIN}")
    assert addresses(response) == ["10.77.0.2", "10.77.0.3"]


@pytest.mark.parametrize("query", QUERIES)
@pytest_twisted.ensureDeferred
async def test_names_are_case_insensitive(served, query):
    server, source = served
    response = await query(server, "Db-1.TEST.Ensemble.internal")
    assert addresses(response) == ["10.77.0.3"]
    assert response.answers[0].name.name == b"Db-1.TEST.Ensemble.internal"  # as asked
    assert source.calls == ["db-1"]


@pytest.mark.parametrize("query", QUERIES)
@pytest_twisted.ensureDeferred
async def test_unknown_and_outside_names_are_nxdomain_with_a_short_soa(served, query):
    server, source = served
    for name in ("nope", f"nope.{DOMAIN}", "deb.debian.org", "db-0.example.org", "db_0"):
        for type in (dns.A, dns.AAAA, dns.MX):
            response = await query(server, name, type)
            assert (response.rCode, response.answers) == (dns.ENAME, []), (name, type)
            [soa] = response.authority
            assert (soa.type, soa.name.name, soa.ttl) == (dns.SOA, DOMAIN.encode(), TTL)
            assert soa.payload.minimum == TTL
    assert set(source.calls) == {"nope"}  # outside names never reach the source


@pytest.mark.parametrize("query", QUERIES)
@pytest_twisted.ensureDeferred
async def test_other_types_of_known_names_are_nodata(served, query):
    server, _ = served
    for name in ("db-0", "web"):  # web: a service without started units
        response = await query(server, name, dns.AAAA if name == "db-0" else dns.A)
        assert (response.rCode, response.answers) == (dns.OK, [])
        assert [a.type for a in response.authority] == [dns.SOA]


@pytest.mark.parametrize("query", QUERIES)
@pytest_twisted.ensureDeferred
async def test_a_failing_source_is_servfail_and_the_server_goes_on(served, query):
    server, source = served
    source.error = ConnectionError("zookeeper unreachable")
    response = await query(server, "db-0")
    assert (response.rCode, response.answers) == (dns.ESERVER, [])
    source.error = None
    assert addresses(await query(server, "db-0")) == ["10.77.0.2"]


@pytest_twisted.ensureDeferred
async def test_a_source_that_hangs_is_servfail(served):
    server, source = served
    source.hold = True  # never released: the server's timeout (0.3 s) answers
    response = await query_udp(server, "db-0")
    assert response.rCode == dns.ESERVER
    response = await query_tcp(server, "db-1")
    assert response.rCode == dns.ESERVER


@pytest_twisted.ensureDeferred
async def test_a_long_answer_is_truncated_over_udp_and_whole_over_tcp(served):
    server, source = served
    many = [f"10.77.1.{i}" for i in range(1, 61)]
    source.names["big"] = many
    response = await query_udp(server, "big")
    assert response.trunc
    response = await query_tcp(server, "big")
    assert not response.trunc and addresses(response) == sorted(many)


@pytest_twisted.ensureDeferred
async def test_stop_frees_the_port_and_gives_up_queries_in_flight():
    source = MemorySource(NAMES)
    server = NameServer(source, ADDRESS, port=0, domain=DOMAIN)
    await server.start()
    source.hold = True
    pending = defer.ensureDeferred(query_udp(server, "db-0", timeout=0.5))
    await task.deferLater(reactor, 0.05, lambda: None)
    assert source.calls == ["db-0"]
    await server.stop()
    with pytest.raises(dns.DNSQueryTimeoutError):
        await pending  # no answer after stop, and no error in the server
    # Both listeners are gone: another server can take the same port.
    again = NameServer(MemorySource(NAMES), ADDRESS, port=server.port, domain=DOMAIN)
    await again.start()
    try:
        assert addresses(await query_tcp(again, "db-0")) == ["10.77.0.2"]
    finally:
        await again.stop()


@pytest_twisted.ensureDeferred
async def test_listens_on_its_address_only(served):
    server, _ = served
    elsewhere = SimpleNamespace(address="127.0.0.78", port=server.port)  # another loopback address
    with pytest.raises(ConnectionRefusedError):
        await query_tcp(elsewhere, "db-0")
    with pytest.raises(dns.DNSQueryTimeoutError):
        await query_udp(elsewhere, "db-0", timeout=0.3)


@pytest_twisted.ensureDeferred
async def test_a_taken_port_is_a_clear_error():
    server = NameServer(MemorySource(), ADDRESS, port=0, domain=DOMAIN)
    await server.start()
    try:
        other = NameServer(MemorySource(), ADDRESS, port=server.port, domain=DOMAIN)
        with pytest.raises(DNSServerError, match=f"cannot serve DNS on {ADDRESS} port {server.port}"):
            await other.start()
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_a_lately_expired_answer_is_given_at_once_while_the_source_is_asked_again():
    clock = task.Clock()
    source = MemorySource(NAMES)
    cache = CachedSource(source, ttl=1.0, reactor=clock)
    assert await cache.addresses("db-0") == ["10.77.0.2"]
    source.hold = True  # the source now takes its time (ZooKeeper after an idle spell)
    source.names["db-0"] = None  # and the unit is gone
    clock.advance(1.5)
    assert await cache.addresses("db-0") == ["10.77.0.2"]  # no wait: the last answer
    assert source.calls == ["db-0", "db-0"]  # while asking again, once
    assert await cache.addresses("db-0") == ["10.77.0.2"]
    assert source.calls == ["db-0", "db-0"]
    source.release()
    assert await cache.addresses("db-0") is None  # the fresh answer from then on
    clock.advance(1.0 + STALE_FOR)  # long unused: a lookup waits for the source again
    source.names["db-0"] = ["10.77.0.7"]
    source.hold = True
    waiting = defer.ensureDeferred(cache.addresses("db-0"))
    assert not waiting.called
    source.release()
    assert await waiting == ["10.77.0.7"]
