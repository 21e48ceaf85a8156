"""A name server for the environment's unit and service names, on twisted.names.

Each machine agent serves every name of the environment on its bridge address, to
the units on that host. A query for `LABEL` or `LABEL.DOMAIN` (case-insensitive)
answers from an address source: `db-0` is unit db/0, `db` the started units of
service db. Units have no route off the host, so this server is their whole DNS:
every other name gets NXDOMAIN at once, never a forward or a wait.

    name                                   answer
    unit or service with addresses         A (IPv4) / AAAA (IPv6) records
    known name, other type or no address   NOERROR, no records (NODATA) + SOA
    unknown label, any other name          NXDOMAIN + SOA
    the source failed or took too long     SERVFAIL

TTLs are a few seconds, so a removed unit's name stops resolving soon after.
"""

import ipaddress
import logging
import re
from typing import Protocol

from twisted.internet import defer, task
from twisted.internet.error import CannotListenError
from twisted.names import dns, server
from twisted.protocols import policies
from twisted.python.failure import Failure

from ensemble.errors import EnsembleError, InvalidName
from ensemble.network.netns import inside
from ensemble.names import unit_name_from_key, validate_environment_name, validate_service_name

log = logging.getLogger("ensemble.dns")

# `.internal` is reserved for private use (ICANN, 2024): it never clashes with a
# public name. `ensemble.` keeps us apart from other private users of `.internal`.
DOMAIN_SUFFIX = "ensemble.internal"
# Seconds a client may keep an answer, positive or negative. A unit's name must go
# soon after the unit does; the cache below keeps ZooKeeper reads bounded anyway.
TTL = 2
# Seconds this server reuses an answer of the source: the worst staleness a client
# sees is CACHE_TTL + TTL.
CACHE_TTL = 1.0
# Seconds a lookup may take before the answer is SERVFAIL. Well under a stub
# resolver's own timeout (glibc: 5 s), so a unit's tools fail fast, not slowly.
LOOKUP_TIMEOUT = 1.0
CACHE_MAX = 4096
# How long past its expiry an answer is still given while a fresh one is fetched.
STALE_FOR = 4.0
# Seconds between log lines about a failing source.
WARN_EVERY = 10.0
# UDP answers beyond this are truncated (TC set) and the client asks over TCP.
UDP_MAX = 512
# Units share the agent's process: bound what TCP clients can hold on to.
TCP_IDLE_TIMEOUT = 10
TCP_MAX_CONNECTIONS = 64

_DOMAIN_LABEL_RE = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?\Z")


class AddressSource(Protocol):
    """Where names get their addresses.

    `addresses(label)` takes one lowercase label (`db-0`, `db`) and returns the
    addresses it resolves to (an empty list: the name exists but has none now), or
    None if there is no such name. It raises when it cannot tell (ZooKeeper
    unreachable); the server then answers SERVFAIL.
    """

    async def addresses(self, label: str) -> list[str] | None: ...


class DNSServerError(EnsembleError):
    pass


class LookupFailed(EnsembleError):
    """The source could not say what a name resolves to."""

    def __init__(self, label, reason):
        super().__init__(f"cannot look up {label!r}: {reason}")


def domain_for(environment):
    """The domain of an environment's names: 'prod' -> 'prod.ensemble.internal'."""
    return f"{validate_environment_name(environment)}.{DOMAIN_SUFFIX}"


def validate_domain(domain):
    text = str(domain).strip(".").lower()
    labels = text.split(".")
    if not text or len(text) > 190 or not all(_DOMAIN_LABEL_RE.match(label) for label in labels):
        # 190: room left for a 63-character label in front, within DNS's 253.
        raise InvalidName(f"invalid DNS domain {str(domain)[:60]!r}: use dot-separated [a-z0-9-] labels")
    return text


def is_unit_or_service_label(label):
    """Whether `label` could name a unit ('db-0') or a service ('db')."""
    try:
        unit_name_from_key(label)
        return True
    except InvalidName:
        pass
    try:
        validate_service_name(label)
        return True
    except InvalidName:
        return False


class CachedSource:
    """An AddressSource in front of another: answers are kept for `ttl` seconds of
    `reactor` time (and for STALE_FOR more, answered while being asked again),
    concurrent misses for one label share one call, and a call that takes longer than
    `timeout` fails. Failures are not kept."""

    def __init__(self, source, ttl=CACHE_TTL, timeout=LOOKUP_TIMEOUT, reactor=None, size=CACHE_MAX):
        if reactor is None:
            from twisted.internet import reactor
        self._source = source
        self._ttl = ttl
        self._timeout = timeout
        self._reactor = reactor
        self._size = size
        self._entries = {}  # label -> (expires, addresses or None), oldest first
        self._calls = {}  # label -> (the source's Deferred, waiting Deferreds)
        self._quiet_until, self._quiet = 0.0, 0

    async def addresses(self, label):
        entry = self._entries.get(label)
        now = self._reactor.seconds()
        if entry is not None and entry[0] > now:
            return _copy(entry[1])
        if entry is not None and entry[0] + STALE_FOR > now:
            # Lately expired: answered from memory while the source is asked again, so
            # a name in use never waits for ZooKeeper; a change shows one answer later.
            if label not in self._calls:
                refresh = defer.Deferred()
                refresh.addErrback(lambda f: None)  # warned about in _settle
                self._call(label, refresh)
                entry = self._entries.get(label, entry)  # a source that answered at once
            return _copy(entry[1])
        waiter = defer.Deferred()
        if label in self._calls:
            self._calls[label][1].append(waiter)
        else:
            self._call(label, waiter)
        return _copy(await waiter)

    def _call(self, label, waiter):
        call = defer.maybeDeferred(self._source.addresses, label)
        call.addTimeout(self._timeout, self._reactor)
        self._calls[label] = (call, [waiter])
        # Added last: a source that answers at once settles after registration.
        call.addBoth(self._settle, label)

    def _settle(self, result, label):
        _, waiters = self._calls.pop(label)
        if isinstance(result, Failure):
            if not result.check(defer.CancelledError):
                reason = (f"no answer in {self._timeout:g}s" if result.check(defer.TimeoutError)
                          else result.getErrorMessage())
                result = Failure(LookupFailed(label, reason))
                self._warn(result.value)
        elif result is not None and not (isinstance(result, list) and all(isinstance(a, str) for a in result)):
            log.error("dns: the source gave %r for %r, not a list of addresses or None", result, label)
            result = Failure(LookupFailed(label, "the source gave something other than addresses"))
        else:
            self._remember(label, result)
        for waiter in waiters:
            if waiter.called:
                continue  # cancelled: its query was given up
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)

    def _warn(self, error):
        # Every query fails while ZooKeeper is away: say so now and then, not each time.
        now = self._reactor.seconds()
        if now >= self._quiet_until:
            more = f" ({self._quiet} more failures since the last report)" if self._quiet else ""
            log.warning("dns: %s%s", error, more)
            self._quiet_until, self._quiet = now + WARN_EVERY, 0
        else:
            self._quiet += 1

    def _remember(self, label, addresses):
        now = self._reactor.seconds()
        if len(self._entries) >= self._size:
            self._entries = {k: v for k, v in self._entries.items() if v[0] > now}
            while len(self._entries) >= self._size:
                del self._entries[next(iter(self._entries))]
        self._entries.pop(label, None)
        self._entries[label] = (now + self._ttl, None if addresses is None else tuple(addresses))

    def close(self):
        """Give up the calls in flight (their waiters fail with CancelledError)."""
        for call, _ in list(self._calls.values()):
            call.cancel()


def _copy(addresses):
    return None if addresses is None else list(addresses)


class Zone:
    """What to answer to one question, as (response code, answers, authority)."""

    def __init__(self, source, domain, ttl=TTL):
        self.source = source
        self.domain = validate_domain(domain)
        self.ttl = ttl
        soa = dns.Record_SOA(
            mname=self.domain, rname=f"hostmaster.{self.domain}", serial=1,
            refresh=3600, retry=600, expire=86400, minimum=ttl, ttl=ttl,
        )
        # In every negative answer: caches that follow RFC 2308 keep it `ttl` seconds.
        self.soa = dns.RRHeader(self.domain.encode(), dns.SOA, dns.IN, ttl, soa, auth=True)

    async def answer(self, query):
        name = _name_text(query.name.name)
        if name == self.domain:
            if query.type in (dns.SOA, dns.ALL_RECORDS):
                return dns.OK, [self._rr(query, dns.SOA, self.soa.payload)], []
            return dns.OK, [], [self.soa]
        label = self._label(name)
        if label is None:
            return dns.ENAME, [], [self.soa]
        addresses = await self.source.addresses(label)
        if addresses is None:
            return dns.ENAME, [], [self.soa]
        records = self._address_records(query, addresses)
        return dns.OK, records, [] if records else [self.soa]

    def _label(self, name):
        """The label asked for, if `name` could be one of ours."""
        if name is None:
            return None
        if name.endswith("." + self.domain):
            name = name[: -len(self.domain) - 1]
        if "." in name or not is_unit_or_service_label(name):
            return None
        return name

    def _address_records(self, query, addresses):
        if query.cls not in (dns.IN, dns.ANY):
            return []
        wanted = {dns.A: (4,), dns.AAAA: (6,), dns.ALL_RECORDS: (4, 6)}.get(query.type, ())
        records = []
        for text in dict.fromkeys(addresses):
            try:
                address = ipaddress.ip_address(text)
            except ValueError:
                continue  # one bad private-address must not spoil the others
            if address.version in wanted:
                if address.version == 4:
                    records.append(self._rr(query, dns.A, dns.Record_A(str(address), self.ttl)))
                else:
                    records.append(self._rr(query, dns.AAAA, dns.Record_AAAA(str(address), self.ttl)))
        return records

    def _rr(self, query, type, payload):
        # The owner is the name as asked, in its case: resolvers that randomise the
        # case of a question (0x20) check the answer against it.
        return dns.RRHeader(query.name.name, type, dns.IN, self.ttl, payload, auth=True)


def _name_text(name):
    try:
        return name.decode("ascii").rstrip(".").lower()
    except UnicodeDecodeError:
        return None


class _TCPProtocol(dns.DNSProtocol, policies.TimeoutMixin):
    """twisted.names' TCP protocol, closed after TCP_IDLE_TIMEOUT seconds idle."""

    def connectionMade(self):
        super().connectionMade()
        self.setTimeout(TCP_IDLE_TIMEOUT)

    def stringReceived(self, data):
        self.resetTimeout()
        super().stringReceived(data)

    def connectionLost(self, reason):
        self.setTimeout(None)
        super().connectionLost(reason)

    def callLater(self, period, func):
        return self.factory.reactor.callLater(period, func)


class _ServerFactory(server.DNSServerFactory):
    """twisted.names' server, answering every query from a Zone.

    Answers are authoritative (AA) and say recursion is available (RA): units use
    this server as their only resolver, and its answer for any name is final.
    Some stub resolvers (Go's) take a NODATA reply with neither flag for a lame
    server and try elsewhere.
    """

    protocol = _TCPProtocol

    def __init__(self, zone, reactor):
        super().__init__()
        self.canRecurse = True
        self.zone = zone
        self.reactor = reactor
        self._in_flight = set()

    def buildProtocol(self, addr):
        if len(self.connections) >= TCP_MAX_CONNECTIONS:
            return None  # refuses the connection
        return super().buildProtocol(addr)

    def handleQuery(self, message, protocol, address):
        d = defer.ensureDeferred(self._respond(message, protocol, address))
        self._in_flight.add(d)
        d.addBoth(self._done, d)
        return d

    def _done(self, result, d):
        self._in_flight.discard(d)
        if isinstance(result, Failure) and not result.check(defer.CancelledError):
            log.error("dns: answering failed: %s", result.getTraceback())

    async def _respond(self, message, protocol, address):
        try:
            rcode, answers, authority = await self.zone.answer(message.queries[0])
        except LookupFailed:
            rcode, answers, authority = dns.ESERVER, [], []
        except defer.CancelledError:
            return  # the server is stopping
        except Exception:
            log.exception("dns: cannot answer %s", message.queries[0])
            rcode, answers, authority = dns.ESERVER, [], []
        response = self._responseFromMessage(message, rCode=rcode, answers=answers, authority=authority)
        response.auth = rcode != dns.ESERVER
        if address is not None:
            response.maxSize = UDP_MAX
        if protocol.transport is not None:  # else stopped meanwhile
            self.sendReply(protocol, response, address)

    def cancel_queries(self):
        for d in list(self._in_flight):
            d.cancel()


class NameServer:
    """Serves unit and service names over UDP and TCP on one address.

    `source` is an AddressSource; `domain` the environment's (see `domain_for`).
    `port=0` picks a free port, the same for UDP and TCP; `port` says which after
    `start()`.
    """

    def __init__(self, source, address, port=53, *, domain, ttl=TTL, cache_ttl=CACHE_TTL,
                 timeout=LOOKUP_TIMEOUT, reactor=None, netns=None):
        if reactor is None:
            from twisted.internet import reactor
        self.address = _listen_address(address)
        self.netns = netns  # the bridge's namespace, when it is not this process's
        self.port = int(port)
        self.domain = validate_domain(domain)
        self._reactor = reactor
        self.cache = CachedSource(source, cache_ttl, timeout, reactor)
        self.zone = Zone(self.cache, self.domain, ttl)
        self._factory = _ServerFactory(self.zone, reactor)
        self._udp = self._tcp = None

    async def start(self):
        if self._udp is not None:
            return
        attempts = 20 if self.port == 0 else 1
        for attempt in range(attempts):
            tcp = self._listen(self._reactor.listenTCP, self.port, self._factory)
            port = tcp.getHost().port
            try:
                udp = self._listen(
                    self._reactor.listenUDP, port, dns.DNSDatagramProtocol(self._factory, reactor=self._reactor)
                )
            except DNSServerError:
                await tcp.stopListening()
                if attempt + 1 < attempts:
                    continue  # the port TCP picked is taken for UDP: pick again
                raise
            break
        self._tcp, self._udp, self.port = tcp, udp, port
        log.info("dns: serving *.%s on %s port %d", self.domain, self.address, port)

    def _listen(self, listen, port, factory):
        try:
            # Sockets keep the namespace they were made in.
            with inside(self.netns):
                return listen(port, factory, interface=self.address)
        except CannotListenError as e:
            raise DNSServerError(f"cannot serve DNS on {self.address} port {port}: {e.socketError}")

    async def stop(self):
        """Stop listening, drop TCP clients and give up the queries in flight."""
        udp, tcp, self._udp, self._tcp = self._udp, self._tcp, None, None
        self._factory.cancel_queries()
        self.cache.close()
        for listener in (udp, tcp):
            if listener is not None:
                await defer.maybeDeferred(listener.stopListening)
        for protocol in list(self._factory.connections):
            protocol.transport.abortConnection()
        # An abort completes on the next turns of the reactor.
        for _ in range(100):
            if not self._factory.connections:
                break
            await task.deferLater(self._reactor, 0.01, lambda: None)


def _listen_address(address):
    try:
        parsed = ipaddress.ip_address(str(address))
    except ValueError:
        raise DNSServerError(f"cannot serve DNS on {str(address)[:60]!r}: not an IP address")
    if parsed.is_unspecified:
        # Never every interface: the names are for the units of this host only.
        raise DNSServerError(f"cannot serve DNS on {address}: give the bridge's own address")
    return str(parsed)
