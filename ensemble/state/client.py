"""The one bridge between kazoo (threads) and Twisted (the reactor).

Every call returns a Deferred that fires on the reactor thread; watch callbacks and
connection events are hopped onto the reactor thread too. No other module imports kazoo.
"""

import contextvars
import logging
import warnings

from kazoo import exceptions as kz
from kazoo.client import KazooClient, KazooState
from kazoo.protocol.states import EventType
from kazoo.retry import KazooRetry
from kazoo.security import ACL, Id
from twisted.internet import defer, task, threads
from twisted.python.failure import Failure

from ensemble.errors import ZooKeeperUnreachable

log = logging.getLogger("ensemble.zookeeper")

# A missing root is reported to users as "no environment there"; kazoo's own warning
# about it would only add a second, rawer line.
warnings.filterwarnings("ignore", message="No chroot path exists", category=UserWarning)

DEFAULT_ROOT = "/ensemble"


class StateError(Exception):
    """A ZooKeeper operation failed."""


class NoNode(StateError):
    pass


class NodeExists(StateError):
    pass


class BadVersion(StateError):
    pass


class NotEmpty(StateError):
    pass


class ConnectionLost(StateError):
    """The connection dropped before the answer came; the operation may or may not have happened."""


class SessionExpired(StateError):
    pass


class NoAuth(StateError):
    pass


class QuotaExceeded(StateError):
    """The write would take a subtree past the size or node count the admin allows it
    (ZooKeeper's hard quotas: ensemble/state/quota.py)."""


_TRANSLATE = {
    kz.NoNodeError: NoNode,
    kz.NodeExistsError: NodeExists,
    kz.BadVersionError: BadVersion,
    kz.NotEmptyError: NotEmpty,
    kz.ConnectionLoss: ConnectionLost,
    kz.ConnectionClosedError: ConnectionLost,
    kz.OperationTimeoutError: ConnectionLost,
    kz.SessionExpiredError: SessionExpired,
    kz.NoAuthError: NoAuth,
    kz.QuotaExceededError: QuotaExceeded,
}


def _translate(exc):
    for kind, ours in _TRANSLATE.items():
        if isinstance(exc, kind):
            return ours(str(exc) or kind.__name__)
    return exc


class WatchEvent:
    """What a one-shot watch saw. `session` events mean the watch was dropped by a disconnect."""

    CREATED, DELETED, CHANGED, CHILD, SESSION = "created", "deleted", "changed", "child", "session"
    _TYPES = {
        EventType.CREATED: CREATED,
        EventType.DELETED: DELETED,
        EventType.CHANGED: CHANGED,
        EventType.CHILD: CHILD,
        EventType.NONE: SESSION,
    }

    def __init__(self, type, path):
        self.type = type
        self.path = path

    def __repr__(self):
        return f"WatchEvent({self.type}, {self.path})"


# What a coroutine asks of ZooKeeper, across its awaits and the coroutines it starts
# (each runs in a copy of its context), whichever session it asks through.
_COUNTED = contextvars.ContextVar("ensemble_counted_requests", default=None)


def count_requests():
    """Count the requests this coroutine (and what it starts from now on) issues:
    returns a one-element list that they increment."""
    counter = [0]
    _COUNTED.set(counter)
    return counter


class Stat:
    """The parts of a znode's stat the code uses."""

    def __init__(self, zstat):
        self.version = zstat.version
        self.cversion = zstat.cversion
        self.ephemeral_owner = zstat.ephemeralOwner
        self.ctime = zstat.ctime / 1000.0
        self.mtime = zstat.mtime / 1000.0
        self.num_children = zstat.numChildren


class Transaction:
    """Operations committed atomically: all happen or none."""

    def __init__(self, client):
        self._client = client
        self._tx = client._kazoo.transaction()

    def create(self, path, data=b"", ephemeral=False, acl=None):
        self._tx.create(path, data, acl=self._client._acl(acl), ephemeral=ephemeral)
        return self

    def delete(self, path, version=-1):
        self._tx.delete(path, version)
        return self

    def set(self, path, data, version=-1):
        self._tx.set_data(path, data, version)
        return self

    def check(self, path, version=-1):
        """Abort unless `path` exists (at `version`, unless -1)."""
        self._tx.check(path, version)
        return self

    def commit(self):
        d = self._client._bridge(self._tx.commit_async())
        d.addCallback(_raise_first_failure)
        return d


def _stop_and_close(kazoo):
    kazoo.stop()
    kazoo.close()


def _raise_first_failure(results):
    for result in results:
        if isinstance(result, Exception) and not isinstance(result, kz.RolledBackError):
            raise _translate(result)
    # Per operation: a created path, a Stat for a set, True for a delete or check.
    return [Stat(r) if hasattr(r, "mzxid") else r for r in results]


class ZKClient:
    """A ZooKeeper session seen from the reactor.

    `servers` is "host:port[,host:port...]"; all paths are relative to `root`.
    """

    def __init__(self, servers, root=DEFAULT_ROOT, session_timeout=10.0, reactor=None, credential=None, readers=()):
        if reactor is None:
            from twisted.internet import reactor
        self.servers = servers
        # Who this session is (an auth.Credential; None: anonymous), the shared readers
        # it is too (credentials; its own nodes never name them), and the grants (auth
        # triples) of the nodes it creates without naming others.
        self.credential = credential
        self.readers = list(readers)
        self.default_acl = None
        self.root = root.rstrip("/") or ""
        self.session_timeout = session_timeout
        self._reactor = reactor
        self._session_listeners = []
        self._session_id = None
        self._kazoo = None
        self._outside = None
        self._outside_lock = defer.DeferredLock()
        self._closing = False
        self.connected = False
        self.requests = 0  # issued by this session so far (a transaction counts once)

    # -- connection -----------------------------------------------------------

    async def connect(self, timeout=5.0, create_root=False):
        """Open the session, waiting at most `timeout` seconds for a server to answer.

        The root must exist unless `create_root`; without it every read is NoNode, which
        callers report as "no environment there" rather than leaving stray nodes.
        """
        hosts = self.servers + self.root
        self._kazoo = KazooClient(
            hosts=hosts,
            timeout=self.session_timeout,
            # Agents must ride out server restarts and failovers: retry for ever.
            connection_retry=KazooRetry(max_tries=-1, max_delay=2.0),
            logger=logging.getLogger("ensemble.kazoo"),
            # Sent again on every reconnection, so the session keeps its identity.
            auth_data=self._auth_data(),
        )
        self._kazoo.add_listener(self._on_kazoo_state)
        if self.root and create_root:
            await self._ensure_root(timeout)
        if not await self._started(self._kazoo, timeout):
            await self._stop_kazoo()
            raise ZooKeeperUnreachable(self.servers, timeout)
        self._session_id = self._kazoo.client_id[0]
        self.connected = True
        return self

    async def _started(self, kazoo, timeout):
        # Told by kazoo's thread, not waited for in one (a thread blocked here would
        # hold up shutdown, Ctrl-C, for the whole timeout) nor polled: every agent and
        # command starts here, and a poll's tick is time to the first request.
        answered = defer.Deferred()

        def connected(state):  # kazoo thread
            if state == KazooState.CONNECTED:
                self._reactor.callFromThread(lambda: answered.called or answered.callback(True))
                return True  # done listening
            return False

        kazoo.add_listener(connected)
        event = kazoo.start_async()
        if event.is_set() and kazoo.connected:
            kazoo.remove_listener(connected)
            return True
        timer = self._reactor.callLater(timeout, lambda: answered.called or answered.callback(False))
        try:
            answered_in_time = await answered
        finally:
            if timer.active():
                timer.cancel()
            kazoo.remove_listener(connected)
        return answered_in_time and kazoo.connected

    async def _ensure_root(self, timeout):
        # kazoo's chroot must exist before the chrooted session can use it.
        plain = KazooClient(
            hosts=self.servers, timeout=self.session_timeout, logger=logging.getLogger("ensemble.kazoo"),
            auth_data=self._auth_data(),
        )
        try:
            if not await self._started(plain, timeout):
                raise ZooKeeperUnreachable(self.servers, timeout)
            await self._bridge(plain.ensure_path_async(self.root, acl=self._acl(None)))
        except BaseException:
            await self._stop_kazoo()
            raise
        finally:
            await threads.deferToThreadPool(self._reactor, self._reactor.getThreadPool(), _stop_and_close, plain)

    async def _stop_kazoo(self):
        kazoo, self._kazoo = self._kazoo, None
        if kazoo is not None:
            await threads.deferToThreadPool(self._reactor, self._reactor.getThreadPool(), _stop_and_close, kazoo)

    async def close(self):
        self._closing = True
        self.connected = False
        self._session_listeners = []
        outside, self._outside = self._outside, None
        if outside is not None:
            await outside.close()
        await self._stop_kazoo()

    async def outside(self):
        """A session on the whole server as the same credential, for the few nodes
        outside the root (the server's `/` and `/zookeeper`, which hold quotas); opened
        on first use, closed with this client. Its nodes get the default ACL given."""
        # One session however many callers ask at once.
        await self._outside_lock.acquire()
        try:
            if self._outside is None:
                other = ZKClient(self.servers, "", self.session_timeout, self._reactor, self.credential, self.readers)
                other.default_acl = self.default_acl
                self._outside = await other.connect()
            return self._outside
        finally:
            self._outside_lock.release()

    async def add_credential(self, credential):
        """Authenticate this session as `credential` too (ZooKeeper then grants it what
        either identity may do); kazoo sends it again on every reconnection."""
        await self._bridge(self._kz().add_auth_async("digest", str(credential)))
        self.readers.append(credential)

    @property
    def session_id(self):
        return self._session_id

    @property
    def session_credentials(self):
        """(session id, password): lets tests force this session to expire."""
        return self._kazoo.client_id

    def on_session_event(self, callback):
        """Call `callback(event)` on the reactor thread for each connection change.

        Events: "suspended" (connection lost, session may survive), "connected"
        (same session back), "expired" (session and its ephemeral nodes gone),
        "new-session" (connected again after expiry: re-register ephemerals).
        Returns a function that unsubscribes.
        """
        self._session_listeners.append(callback)
        return lambda: self._session_listeners.remove(callback) if callback in self._session_listeners else None

    def _on_kazoo_state(self, state):
        # kazoo thread: decide nothing here, hop to the reactor.
        session_id = self._kazoo.client_id[0] if self._kazoo and self._kazoo.client_id else None
        self._reactor.callFromThread(self._dispatch_state, state, session_id)

    def _dispatch_state(self, state, session_id):
        if state == KazooState.SUSPENDED:
            self.connected = False
            event = "suspended"
        elif state == KazooState.LOST:
            self.connected = False
            event = "closed" if self._closing else "expired"
        else:
            self.connected = True
            previous, self._session_id = self._session_id, session_id
            event = "connected" if previous in (None, session_id) else "new-session"
        log.info("zookeeper %s: %s", self.servers, event)
        for callback in list(self._session_listeners):
            try:
                callback(event)
            except Exception:
                log.exception("session listener failed")

    # -- operations -------------------------------------------------------------

    def _bridge(self, async_result):
        self.requests += 1
        counted = _COUNTED.get()
        if counted is not None:
            counted[0] += 1
        d = defer.Deferred()

        def done(result):
            # kazoo thread
            try:
                value = result.get_nowait()
            except Exception as e:
                self._reactor.callFromThread(d.errback, Failure(_translate(e)))
            else:
                self._reactor.callFromThread(d.callback, value)

        async_result.rawlink(done)
        return d

    def _watcher(self, callback):
        if callback is None:
            return None

        def watch(event):
            # kazoo thread
            ours = WatchEvent(WatchEvent._TYPES.get(event.type, WatchEvent.SESSION), event.path)
            self._reactor.callFromThread(callback, ours)

        return watch

    def _kz(self):
        if self._kazoo is None:
            raise ConnectionLost("not connected")
        return self._kazoo

    def _auth_data(self):
        given = [c for c in (self.credential, *self.readers) if c is not None]
        return [("digest", str(c)) for c in given] or None

    def _acl(self, grants):
        grants = grants if grants is not None else self.default_acl
        if grants is None:
            return None  # kazoo's default: open to all
        return [ACL(perms, Id(scheme, identity)) for perms, scheme, identity in grants]

    def create(self, path, data=b"", ephemeral=False, sequence=False, makepath=False, acl=None):
        """`acl`: auth grants; default: this client's default_acl."""
        return self._bridge(
            self._kz().create_async(
                path, data, acl=self._acl(acl), ephemeral=ephemeral, sequence=sequence, makepath=makepath
            )
        )

    def get_acl(self, path):
        """Fires with ([(perms, scheme, id)], acl version)."""

        def issue():
            d = self._bridge(self._kz().get_acls_async(path))
            d.addCallback(lambda r: ([(a.perms, a.id.scheme, a.id.id) for a in r[0]], r[1].aversion))
            return d

        return self._retried(issue)

    def set_acl(self, path, grants, version=-1):
        """Replace `path`'s ACL; `version` is the ACL's version (BadVersion if it moved)."""
        return self._retried(lambda: self._bridge(self._kz().set_acls_async(path, self._acl(grants), version)))

    def _retried(self, issue):
        """Run `issue()` (a Deferred-returning call), and again after a reconnection if
        the connection dropped before the answer. Only for calls that are safe to
        repeat: reads, and sets (a versioned one that did happen fails as BadVersion,
        which callers already handle; an unversioned one just bumps the version)."""

        async def attempt():
            deadline = None
            while True:
                try:
                    return await issue()
                except ConnectionLost:
                    if self._closing or self._kazoo is None:
                        raise
                    now = self._reactor.seconds()
                    if deadline is None:
                        # A failover or a brief drop; longer than this, the session
                        # is as good as gone and the caller should hear about it.
                        deadline = now + max(2 * self.session_timeout, 5.0)
                    if now >= deadline:
                        raise
                    # The state change may not have reached the reactor yet.
                    await task.deferLater(self._reactor, 0.05, lambda: None)
                    while not self.connected and self._reactor.seconds() < deadline and not self._closing:
                        await task.deferLater(self._reactor, 0.05, lambda: None)

        return defer.ensureDeferred(attempt())

    def get(self, path, watch=None):
        """Fires with (data, Stat)."""

        def issue():
            d = self._bridge(self._kz().get_async(path, watch=self._watcher(watch)))
            d.addCallback(lambda r: (r[0], Stat(r[1])))
            return d

        return self._retried(issue)

    def set(self, path, data, version=-1):
        """Fires with the node's new Stat."""

        def issue():
            d = self._bridge(self._kz().set_async(path, data, version))
            d.addCallback(Stat)
            return d

        return self._retried(issue)

    def delete(self, path, version=-1):
        return self._bridge(self._kz().delete_async(path, version))

    def delete_tree(self, path):
        """Delete `path` and everything under it; a missing node is not an error."""

        def delete():
            try:
                self._kz().delete(path, recursive=True)
            except kz.NoNodeError:
                pass
            except kz.KazooException as e:
                raise _translate(e)

        return threads.deferToThreadPool(self._reactor, self._reactor.getThreadPool(), delete)

    def exists(self, path, watch=None):
        """Fires with a Stat, or None if there is no such node."""

        def issue():
            d = self._bridge(self._kz().exists_async(path, watch=self._watcher(watch)))
            d.addCallback(lambda s: Stat(s) if s is not None else None)
            return d

        return self._retried(issue)

    def get_children(self, path, watch=None, stat=False):
        """Fires with the children's names; with `stat`, (names, the node's Stat) of one
        read, so that its cversion is that of those names."""

        def issue():
            d = self._bridge(self._kz().get_children_async(path, watch=self._watcher(watch), include_data=stat))
            if stat:
                d.addCallback(lambda r: (r[0], Stat(r[1])))
            return d

        return self._retried(issue)

    def ensure_path(self, path):
        return self._bridge(self._kz().ensure_path_async(path, acl=self._acl(None)))

    def transaction(self):
        return Transaction(self)


async def expire_session(client, timeout=5.0):
    """Make the server expire `client`'s session, as a long network partition would.

    A second connection takes over the session with its credentials and closes it.
    For tests and fault drills; the owner sees "expired", then "new-session".
    """
    session_id, password = client.session_credentials
    thief = KazooClient(
        hosts=client.servers + client.root,
        client_id=(session_id, password),
        timeout=client.session_timeout,
        logger=logging.getLogger("ensemble.kazoo"),
    )

    def take_and_close():
        thief.start(timeout)
        thief.stop()
        thief.close()

    await threads.deferToThreadPool(client._reactor, client._reactor.getThreadPool(), take_and_close)
