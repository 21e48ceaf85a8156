"""In-memory fakes for fast tests of reconcile logic on a `twisted.internet.task.Clock`.

In the spirit of twisted.internet.testing (MemoryReactor, Clock): small, faithful where
the project's code can tell the difference, and explicit about what they leave out.
Real ZooKeeper and LXC stay in the integration tests; tests/test_fakes.py runs the same
scenarios on these fakes and on a real ZooKeeper so that any divergence shows.

- FakeZooKeeper / MemoryClient: ensemble.state.client.ZKClient, in memory.
- InMemoryAddressStore: the store ensemble.network.ipam.Allocator reserves addresses in.
- FakeContainerDriver: ensemble.machine.container.driver.LXCDriver, as a dict.
- FakeTemplate: the container template the machine agent ensures before deploying.
- FakeNftables: Debian's python3-nftables binding, as a module to put in sys.modules.
- InlineThreadsClock: a Clock with the thread pool Host.in_thread asks the reactor for.

Timing model (a decision, see MemoryClient): every call of the fakes does its work at
once and returns a Deferred that has already fired. Nothing waits on a reactor unless
the code under test asks a clock to wait, so a test advances the Clock only for real
timers (deferLater, LoopingCall, session timeouts).
"""

import collections
import dataclasses
import logging
import os
import types
from typing import Optional

from kazoo.exceptions import BadArgumentsError, NoChildrenForEphemeralsError
from twisted.internet import defer, task
from twisted.python.failure import Failure

from ensemble.machine.container.driver import (
    OWN_RANGE, ContainerError, ContainerExists, ContainerNotFound, ContainerSpec,
)
from ensemble.machine.container.names import validate_container_name
from ensemble.names import unit_key
from ensemble.network.ipam import AddressTaken, UnitHasAddress
from ensemble.state.client import (
    DEFAULT_ROOT,
    BadVersion,
    ConnectionLost,
    NodeExists,
    NoNode,
    NotEmpty,
    Stat,
    WatchEvent,
)

log = logging.getLogger("ensemble.tests.fakes")

OPEN_ACL = [(31, "world", "anyone")]  # what a node gets when its creator names no grants


# -- the reactor's threads ---------------------------------------------------------------


class _InlineThreadPool:
    """What twisted.internet.threads.deferToThreadPool uses of a pool: the call runs
    at once on the caller's thread (the fakes' timing model), its outcome handed back."""

    def callInThreadWithCallback(self, on_result, f, *args, **kwargs):
        try:
            result = f(*args, **kwargs)
        except BaseException:
            on_result(False, Failure())
        else:
            on_result(True, result)


class InlineThreadsClock(task.Clock):
    """A Clock that also answers for the reactor's threads (getThreadPool,
    callFromThread), running blocking work inline: code that moves work off the reactor
    thread (Host.in_thread) runs on the fakes unchanged.

    Does not model: concurrency (the work has finished when the call returns)."""

    _pool = _InlineThreadPool()

    def getThreadPool(self):
        return self._pool

    def callFromThread(self, f, *args, **kwargs):
        f(*args, **kwargs)


# -- ZooKeeper ---------------------------------------------------------------------------


class _Node:
    __slots__ = ("data", "version", "cversion", "aversion", "acl", "owner", "ctime", "mtime", "children", "creates")

    def __init__(self, data, owner, now, acl):
        self.data = data
        self.version = self.cversion = self.aversion = 0
        self.acl = list(acl)
        self.owner = owner            # the session of an ephemeral node; 0: persistent
        self.ctime = self.mtime = now  # milliseconds, as ZooKeeper keeps them
        self.children = {}            # name -> None: a set that keeps creation order
        self.creates = 0              # children ever created: the next sequence number

    def copy(self):
        new = _Node.__new__(_Node)
        for slot in _Node.__slots__:
            setattr(new, slot, getattr(self, slot))
        new.children = dict(self.children)
        return new

    def stat(self):
        # The project's own Stat class, so nothing can rely on a field the real one lacks.
        return Stat(types.SimpleNamespace(
            version=self.version, cversion=self.cversion, ephemeralOwner=self.owner,
            ctime=self.ctime, mtime=self.mtime, numChildren=len(self.children),
        ))


def _normalize(path, sequence=False):
    """What kazoo does to a path under a chroot: leading, doubled and trailing slashes
    go; '.' and '..' are refused."""
    if not isinstance(path, str):
        raise TypeError("Invalid type for 'path' (string expected)")
    parts = [p for p in path.split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise ValueError("relative paths not allowed")
    normal = "/" + "/".join(parts)
    if sequence and path.endswith("/") and normal != "/":
        normal += "/"
    return normal


def _parent(path):
    head, _, name = path.rpartition("/")
    return head or "/", name


def _check_data(data):
    if not isinstance(data, bytes):
        raise TypeError("Invalid type for 'value' (must be a byte string)")


class _Batch:
    """Operations applied to a copy-on-write view of the tree: `apply` makes them real
    all at once (one ZooKeeper request, or one multi), or the batch is dropped."""

    def __init__(self, tree, session):
        self.tree = tree
        self.session = session
        self.now = int(tree.clock.seconds() * 1000)
        self.staged = {}   # path -> _Node, or None once deleted
        self.events = []   # (WatchEvent type, path), in the order ZooKeeper sends them

    def node(self, path):
        if path in self.staged:
            return self.staged[path]
        return self.tree._nodes.get(path)

    def _writable(self, path):
        node = self.node(path)
        if node is not None and path not in self.staged:
            node = self.staged[path] = node.copy()
        return node

    def _existing(self, path, version=-1):
        node = self.node(path)
        if node is None:
            raise NoNode(path)
        if version != -1 and version != node.version:
            raise BadVersion(path)
        return node

    def create(self, path, data, ephemeral=False, sequence=False, acl=None):
        _check_data(data)
        if path == "/":
            raise NodeExists(path)
        if path.endswith("/"):  # a sequence node named by its number only
            parent_path, name = path.rstrip("/") or "/", ""
        else:
            parent_path, name = _parent(path)
        parent = self.node(parent_path)
        if parent is None:
            raise NoNode(path)
        if sequence:
            name = f"{name}{parent.creates:010d}"
            path = f"{parent_path.rstrip('/')}/{name}"
        if self.node(path) is not None:
            raise NodeExists(path)
        if parent.owner:
            raise NoChildrenForEphemeralsError(path)
        parent = self._writable(parent_path)
        parent.children[name] = None
        parent.cversion += 1
        parent.creates += 1
        self.staged[path] = _Node(data, self.session if ephemeral else 0, self.now, acl or OPEN_ACL)
        self.events += [(WatchEvent.CREATED, path), (WatchEvent.CHILD, parent_path)]
        return path

    def set(self, path, data, version=-1):
        _check_data(data)
        self._existing(path, version)
        node = self._writable(path)
        node.data = data
        node.version += 1
        node.mtime = self.now
        self.events.append((WatchEvent.CHANGED, path))
        return node.stat()

    def delete(self, path, version=-1):
        if path == "/":
            raise BadArgumentsError(path)
        node = self._existing(path, version)
        if node.children:
            raise NotEmpty(path)
        parent_path, name = _parent(path)
        parent = self._writable(parent_path)
        del parent.children[name]
        parent.cversion += 1
        self.staged[path] = None
        self.events += [(WatchEvent.DELETED, path), (WatchEvent.CHILD, parent_path)]
        return True

    def check(self, path, version=-1):
        self._existing(path, version)
        return True

    def apply(self):
        for path, node in self.staged.items():
            if node is None:
                self.tree._nodes.pop(path, None)
            else:
                self.tree._nodes[path] = node
        self.tree._trigger(self.events)


class FakeZooKeeper:
    """One in-memory ZooKeeper tree shared by any number of sessions (`client()`), so a
    test can be the operator and an agent at once.

    Models: znodes with data, versions (BadVersion), cversion, num_children, ctime and
    mtime from `clock`; NoNode / NodeExists / NotEmpty (and kazoo's own
    NoChildrenForEphemeralsError, which the real bridge does not translate either);
    parents must exist; atomic multi-operation transactions; sequence nodes (numbered
    by children ever created, as ZooKeeper does); ephemeral nodes owned by a session;
    one-shot data, exists and children watches fired as ZooKeeper fires them; session
    expiry (`expire`), a clean close, and a crashed process (`kill`: its session ends a
    session timeout later on the clock).

    Does not model: chroots (the tree is the client's root; `root` is only a label),
    ACL enforcement (grants are stored and versioned, NoAuth never happens), connection
    loss that the session survives ("suspended" then "connected") and the bridge's
    retries of reads, request size limits (~1 MB in ZooKeeper), any order of
    get_children (ZooKeeper promises none; here it is creation order), latency, and
    interleaving of concurrent operations (each one is atomic and immediate, so races
    happen only where a test interleaves the steps itself).

    Exceptions raised by watch callbacks and session listeners are logged and kept in
    `errors` (the real bridge only logs them): a test can assert that it is empty.
    """

    def __init__(self, clock=None):
        self.clock = clock if clock is not None else task.Clock()
        self._nodes = {"/": _Node(b"", 0, int(self.clock.seconds() * 1000), OPEN_ACL)}
        self._data_watches = collections.defaultdict(list)   # path -> [(client, callback)]
        self._child_watches = collections.defaultdict(list)
        self._sessions = 0
        self._queue = collections.deque()
        self._delivering = False
        self.errors = []

    def client(self, root=DEFAULT_ROOT, servers="zookeeper.invalid:2181", session_timeout=10.0, credential=None):
        """A new session on this tree, connected."""
        return MemoryClient(self, root=root, servers=servers, session_timeout=session_timeout, credential=credential)

    def _new_session(self):
        self._sessions += 1
        return 0x5E550000 + self._sessions

    # -- what tests do to sessions ------------------------------------------------------

    def expire(self, client):
        """The server expires `client`'s session, as after a long partition: the
        client sees "suspended" (and each of its watches a session event), its
        ephemeral nodes vanish, then it sees "expired" and "new-session" with a new
        session id. Call it from the test, not from inside a callback."""
        client._require_open()
        client.connected = False
        client._notify("suspended")
        for callback in self._drop_watches(client):
            self._post(callback, WatchEvent(WatchEvent.SESSION, None))
        self._deliver()
        self._end_session(client.session_id)
        client._notify("expired")
        self._deliver()
        client._session_id = self._new_session()
        client.connected = True
        client._notify("new-session")
        self._deliver()

    def kill(self, client):
        """The process holding `client` dies: it hears nothing more and can do nothing,
        and its ephemeral nodes vanish once its session times out on the clock."""
        client._require_open()
        client._closed = True
        client.connected = False
        client._listeners = []
        self._drop_watches(client)
        session = client.session_id
        return self.clock.callLater(client.session_timeout, self._end_session, session)

    def _close(self, client):
        client._closed = True
        client.connected = False
        client._listeners = []
        self._drop_watches(client)
        self._end_session(client.session_id)

    def _end_session(self, session):
        batch = _Batch(self, session)
        for path in sorted(p for p, n in self._nodes.items() if n.owner == session):
            batch.delete(path)
        batch.apply()
        self._deliver()

    def _drop_watches(self, client):
        dropped = []
        for table in (self._data_watches, self._child_watches):
            for path in list(table):
                mine = [cb for c, cb in table[path] if c is client]
                if mine:
                    dropped += mine
                    table[path] = [(c, cb) for c, cb in table[path] if c is not client]
                    if not table[path]:
                        del table[path]
        return dropped

    # -- watches ------------------------------------------------------------------------

    def _watch(self, table, client, path, callback):
        if callback is not None:
            table[path].append((client, callback))

    def _trigger(self, events):
        """Pop and queue the watches `events` fire, as ZooKeeper and kazoo do: created and
        changed fire data (and exists) watches, child fires children watches, deleted
        fires both kinds on the node itself."""
        for kind, path in events:
            fired = []
            if kind in (WatchEvent.CREATED, WatchEvent.CHANGED, WatchEvent.DELETED):
                fired += self._data_watches.pop(path, [])
            if kind in (WatchEvent.CHILD, WatchEvent.DELETED):
                fired += self._child_watches.pop(path, [])
            for _, callback in fired:
                self._post(callback, WatchEvent(kind, path))

    def _post(self, callback, *args):
        self._queue.append((callback, args))

    def _deliver(self):
        """Run queued callbacks in order, one at a time: one posted while another runs
        waits for it to return, as callbacks hopped onto a reactor do."""
        if self._delivering:
            return
        self._delivering = True
        try:
            while self._queue:
                callback, args = self._queue.popleft()
                try:
                    callback(*args)
                except Exception:
                    log.exception("fake ZooKeeper: callback %r failed", callback)
                    self.errors.append(Failure())
        finally:
            self._delivering = False


class MemoryClient:
    """A session on a FakeZooKeeper with ZKClient's interface: create (ephemeral,
    sequence, makepath), get, set, delete, delete_tree, exists, get_children,
    ensure_path, transaction (create/delete/set/check/commit), get_acl/set_acl,
    on_session_event, close; and servers, root, session_timeout, credential, readers,
    default_acl, connected, session_id, session_credentials.

    Every call does its work at once and returns a Deferred that has already fired
    (with the same values and exceptions as ZKClient), rather than firing from
    clock.callLater(0, ...): with a Clock nothing runs until the test advances it, so
    every `await` in the code under test would need the test to pump the clock, while
    already-fired Deferreds let a whole reconcile pass run to completion inside one
    call. Watch callbacks keep the real bridge's order: for a change made at top level
    they all run before the call that made it returns (kazoo delivers a session's
    watch event before the reply to the request that caused it); a change made by a
    callback queues its events until that callback returns, so callbacks never nest.
    The price: two coroutines never interleave unless one waits on the clock.

    Programming errors (a str for data, a relative path) raise at once; a closed,
    killed or expiring session fails calls with ConnectionLost.
    """

    def __init__(self, tree, root=DEFAULT_ROOT, servers="zookeeper.invalid:2181", session_timeout=10.0,
                 credential=None, readers=()):
        self.tree = tree
        self.servers = servers
        self.root = root.rstrip("/") or ""
        self.session_timeout = session_timeout
        self.credential = credential
        self.readers = list(readers)
        self.default_acl = None
        self.connected = True
        self._session_id = tree._new_session()
        self._listeners = []
        self._closed = False

    def __repr__(self):
        return f"<MemoryClient session 0x{self._session_id:x}>"

    @property
    def session_id(self):
        return self._session_id

    @property
    def session_credentials(self):
        return (self._session_id, b"\0" * 16)

    def on_session_event(self, callback):
        self._listeners.append(callback)
        return lambda: self._listeners.remove(callback) if callback in self._listeners else None

    def _notify(self, event):
        for callback in list(self._listeners):
            self.tree._post(callback, event)

    def close(self):
        if not self._closed:
            self.tree._close(self)
        return defer.succeed(None)

    def expire(self):
        """See FakeZooKeeper.expire."""
        self.tree.expire(self)

    def kill(self):
        """See FakeZooKeeper.kill."""
        return self.tree.kill(self)

    # -- operations -------------------------------------------------------------------

    def _require_open(self):
        if self._closed or not self.connected:
            raise ConnectionLost("not connected")

    def _call(self, operation):
        """Run `operation(batch)` as one request; a Deferred with its result."""
        try:
            self._require_open()
            batch = _Batch(self.tree, self._session_id)
            result = operation(batch)
            batch.apply()
        except (TypeError, ValueError):
            raise
        except Exception as e:
            return defer.fail(e)
        self.tree._deliver()
        return defer.succeed(result)

    def _read(self, read):
        try:
            self._require_open()
            result = read()
        except Exception as e:
            return defer.fail(e)
        return defer.succeed(result)

    def _node(self, path):
        node = self.tree._nodes.get(path)
        if node is None:
            raise NoNode(path)
        return node

    def create(self, path, data=b"", ephemeral=False, sequence=False, makepath=False, acl=None):
        path = _normalize(path, sequence)
        grants = acl if acl is not None else self.default_acl

        def create(batch):
            if makepath:
                parent, _ = _parent(path.rstrip("/") or "/")
                missing = []
                while batch.node(parent) is None:
                    missing.append(parent)
                    parent, _ = _parent(parent)
                for p in reversed(missing):
                    batch.create(p, b"", acl=grants)
            return batch.create(path, data, ephemeral, sequence, grants)

        return self._call(create)

    def ensure_path(self, path):
        """Fires with True if it existed, else with the path (as kazoo's does)."""
        path = _normalize(path)
        if path in self.tree._nodes:
            return self._read(lambda: True)
        return self.create(path, makepath=True)

    def get(self, path, watch=None):
        """Fires with (data, Stat); a watch is left only if the node exists."""
        path = _normalize(path)

        def read():
            node = self._node(path)
            self.tree._watch(self.tree._data_watches, self, path, watch)
            return node.data, node.stat()

        return self._read(read)

    def exists(self, path, watch=None):
        """Fires with a Stat or None; the watch is left either way (it fires on create)."""
        path = _normalize(path)

        def read():
            node = self.tree._nodes.get(path)
            self.tree._watch(self.tree._data_watches, self, path, watch)
            return None if node is None else node.stat()

        return self._read(read)

    def get_children(self, path, watch=None, stat=False):
        path = _normalize(path)

        def read():
            node = self._node(path)
            self.tree._watch(self.tree._child_watches, self, path, watch)
            return (list(node.children), node.stat()) if stat else list(node.children)

        return self._read(read)

    def set(self, path, data, version=-1):
        path = _normalize(path)
        _check_data(data)
        return self._call(lambda batch: batch.set(path, data, version))

    def delete(self, path, version=-1):
        path = _normalize(path)
        return self._call(lambda batch: batch.delete(path, version))

    def delete_tree(self, path):
        """Delete `path` and everything under it, children first, one request each (as
        kazoo's recursive delete does); a missing node is not an error."""
        path = _normalize(path)
        try:
            self._require_open()
        except ConnectionLost as e:
            return defer.fail(e)
        below = sorted((p for p in self.tree._nodes if p == path or p.startswith(path.rstrip("/") + "/")),
                       key=lambda p: -p.count("/"))
        for p in below:
            batch = _Batch(self.tree, self._session_id)
            batch.delete(p)
            batch.apply()
            self.tree._deliver()
        return defer.succeed(None)

    def transaction(self):
        if self._closed:
            raise ConnectionLost("not connected")
        return MemoryTransaction(self)

    def get_acl(self, path):
        """Fires with ([(perms, scheme, id)], acl version). Stored, never enforced."""
        path = _normalize(path)
        return self._read(lambda: (list(self._node(path).acl), self._node(path).aversion))

    def set_acl(self, path, grants, version=-1):
        path = _normalize(path)

        def set_acl():
            node = self._node(path)
            if version != -1 and version != node.aversion:
                raise BadVersion(path)
            node.acl = list(grants)
            node.aversion += 1
            return node.stat()

        return self._read(set_acl)


class MemoryTransaction:
    """ensemble.state.client.Transaction on a MemoryClient: all or nothing, the error
    of the first operation that fails, results [path | Stat | True, ...]."""

    def __init__(self, client):
        self._client = client
        self._ops = []
        self.committed = False

    def _add(self, op):
        if self.committed:
            raise ValueError("Transaction already committed")
        self._ops.append(op)
        return self

    def create(self, path, data=b"", ephemeral=False, acl=None):
        path = _normalize(path)
        _check_data(data)
        grants = acl if acl is not None else self._client.default_acl
        return self._add(lambda batch: batch.create(path, data, ephemeral, False, grants))

    def delete(self, path, version=-1):
        path = _normalize(path)
        return self._add(lambda batch: batch.delete(path, version))

    def set(self, path, data, version=-1):
        path = _normalize(path)
        _check_data(data)
        return self._add(lambda batch: batch.set(path, data, version))

    def check(self, path, version=-1):
        path = _normalize(path)
        return self._add(lambda batch: batch.check(path, version))

    def commit(self):
        if self.committed:
            raise ValueError("Transaction already committed")
        self.committed = True
        return self._client._call(lambda batch: [op(batch) for op in self._ops])


# -- addresses ------------------------------------------------------------------------------


class InMemoryAddressStore:
    """The reservations of one machine's addresses, for ipam.Allocator, in dicts.

    Models ZooKeeperAddressStore (ensemble/state/network.py): nothing exists before
    `ensure` (take and ticket fail with NoNode, reads find nothing); `take` is atomic
    and refuses with UnitHasAddress (the unit has one: checked first) or AddressTaken;
    the ticket counter moves by one on every `ticket` and every successful `take`,
    which returns the new value, as the version of the real store's tickets node does;
    unit names are validated as the real store's node names are.

    Does not model: anything shared with a ZooKeeper tree (it is its own world; use
    ZooKeeperAddressStore over a MemoryClient for that), `delete_ops`, ACLs.
    """

    def __init__(self):
        self.subnet = None
        self.units = {}       # unit -> address
        self.addresses = {}   # address -> unit
        self.hwaddrs = {}     # unit -> MAC
        self.tickets = None   # None until ensure()

    async def ensure(self, subnet):
        self.subnet = subnet
        if self.tickets is None:
            self.tickets = 0

    def _require(self):
        if self.tickets is None:
            raise NoNode("address store not ensured")

    async def reservation(self, unit):
        unit_key(unit)
        return self.units.get(unit)

    async def reservations(self):
        return dict(self.units)

    async def taken(self):
        return list(self.addresses)

    async def ticket(self):
        self._require()
        self.tickets += 1
        return self.tickets

    async def macs(self):
        return dict(self.hwaddrs)

    async def record_mac(self, unit, mac):
        unit_key(unit)
        self.hwaddrs[unit] = mac

    async def take(self, unit, address, mac=None):
        unit_key(unit)
        self._require()
        if unit in self.units:
            raise UnitHasAddress(self.units[unit])
        if address in self.addresses:
            raise AddressTaken(address)
        self.units[unit] = address
        self.addresses[address] = unit
        if mac is not None:
            self.hwaddrs[unit] = mac
        self.tickets += 1
        return self.tickets

    async def free(self, unit):
        unit_key(unit)
        address = self.units.pop(unit, None)
        self.hwaddrs.pop(unit, None)
        if address is not None:
            del self.addresses[address]
        return address


# -- containers ----------------------------------------------------------------------------


@dataclasses.dataclass
class FakeContainer:
    spec: ContainerSpec
    state: str = "STOPPED"
    starts: int = 0
    agent_waiting: bool = False  # started with agent=False, start_agent() not called yet


class FakeIdRangeStore:
    """HostIdRangeStore's claims in a dict: {index: owner}, the same pool policy."""

    def __init__(self, pool=None):
        from ensemble.machine.container.id_ranges import POOL
        self.pool = pool or POOL
        self.held = {}

    def claims(self):
        return dict(self.held)

    def owned_by(self, owner):
        return next((self.pool.range(i) for i, o in self.held.items() if o == owner), None)

    def claim(self, owner):
        found = self.owned_by(owner)
        if found is None:
            index = self.pool.choose(self.held)
            self.held[index] = owner
            found = self.pool.range(index)
        return found

    def release(self, owner):
        doomed = [i for i, o in self.held.items() if o == owner]
        for i in doomed:
            del self.held[i]
        return bool(doomed)


class FakeMachineCgroup:
    """MachineCgroup's ensure/problem/remove: the caps last put in place, no files."""

    def __init__(self):
        self.caps = None

    def ensure(self, memory=None, pids=None):
        self.caps = {"memory": memory, "pids": pids}

    def problem(self, memory=None, pids=None):
        return None if self.caps == {"memory": memory, "pids": pids} else "the caps are not in place"

    def remove(self):
        self.caps = None


class FakeContainerDriver:
    """LXCDriver's operations on a dict of FakeContainers: create(spec), start,
    start_agent, stop, destroy, list, running, state, exec, close, and the paths container_dir and
    log_path (nothing is written there).

    Models: ContainerSpec required (TypeError) and validated on construction, as the
    real one is; a spec with OWN_RANGE claims a range from `id_ranges` (a
    FakeIdRangeStore) at create, freed at destroy; ContainerExists, ContainerNotFound,
    invalid names refused; start of a
    running and stop of a stopped container are no-ops; destroy is idempotent; exec
    fails on a stopped container. Switches for tests: `fail(operation, name)` makes an
    operation raise ContainerError (for one name or all, a number of times or until
    `heal`); `crash(name)` stops a container behind the agent's back; `delays`
    ({operation: seconds}) makes operations take time on `clock`. `calls` lists
    (operation, name) in order; `exec_handler(name, argv, env, input)` answers execs
    (default: exit 0, no output).

    Does not model: the template (see FakeTemplate), files, networking, cgroups (but
    the machine parent cgroup's caps, FakeMachineCgroup) and
    limits, states other than RUNNING and STOPPED, a unit agent inside, a container
    that stops by itself (use `crash`).
    """

    def __init__(self, lxc_path="/var/lib/ensemble-fake/lxc", clock=None):
        self.lxc_path = lxc_path
        self.clock = clock
        self.containers = {}
        self.calls = []
        self.delays = {}
        self.exec_handler = None
        self.id_ranges = FakeIdRangeStore()
        self.cgroup = FakeMachineCgroup()
        self._failures = {}   # (operation, name or None) -> [error, times left or None]

    def __repr__(self):
        return f"FakeContainerDriver({self.lxc_path!r})"

    # -- switches -----------------------------------------------------------------------

    def fail(self, operation, name=None, error=None, times=None):
        """Make `operation` raise `error` (default ContainerError) for container `name`
        (None: any), `times` times (None: until heal)."""
        error = error or ContainerError(f"injected failure: {operation} {name or '*'}")
        self._failures[(operation, name)] = [error, times]

    def heal(self, operation=None, name=None):
        for key in list(self._failures):
            if operation in (None, key[0]) and name in (None, key[1]):
                del self._failures[key]

    def crash(self, name):
        """The container stops behind the agent's back (OOM, an admin, a reboot)."""
        self.containers[name].state = "STOPPED"

    async def _enter(self, operation, name=None):
        self.calls.append((operation, name))
        if name is not None:
            validate_container_name(name)
        delay = self.delays.get(operation)
        if delay:
            await task.deferLater(self.clock, delay, lambda: None)
        for key in ((operation, name), (operation, None)):
            failure = self._failures.get(key)
            if failure is not None:
                error, times = failure
                if times is not None:
                    failure[1] -= 1
                    if failure[1] <= 0:
                        del self._failures[key]
                raise error

    def _require(self, name):
        container = self.containers.get(name)
        if container is None:
            raise ContainerNotFound(name)
        return container

    # -- LXCDriver's interface ------------------------------------------------------------

    def container_dir(self, name):
        return os.path.join(self.lxc_path, validate_container_name(name))

    def log_path(self, name):
        return os.path.join(self.container_dir(name), "lxc.log")

    async def create(self, spec):
        if not isinstance(spec, ContainerSpec):
            raise TypeError("create() takes a ContainerSpec")
        await self._enter("create", spec.name)
        if spec.name in self.containers:
            raise ContainerExists(spec.name)
        if spec.idmap == OWN_RANGE:
            spec = dataclasses.replace(spec, idmap=self.id_ranges.claim(self.container_dir(spec.name)))
        self.containers[spec.name] = FakeContainer(spec)
        return self.container_dir(spec.name)

    async def id_range(self, name):
        return self.id_ranges.owned_by(self.container_dir(name))

    async def start(self, name, timeout=10, agent=True):
        await self._enter("start", name)
        container = self._require(name)
        if container.state != "RUNNING":
            container.state = "RUNNING"
            container.starts += 1
            if not agent:
                container.agent_waiting = True

    async def prepare_agents(self):
        await self._enter("prepare_agents", None)

    async def start_agent(self, name):
        await self._enter("start_agent", name)
        container = self.containers.get(name)
        if container is not None:
            container.agent_waiting = False

    async def stop(self, name, timeout=10):
        await self._enter("stop", name)
        self._require(name).state = "STOPPED"

    async def destroy(self, name, timeout=10):
        await self._enter("destroy", name)
        self.containers.pop(name, None)
        self.id_ranges.release(self.container_dir(name))

    async def list(self):
        await self._enter("list")
        return sorted(self.containers)

    async def running(self):
        await self._enter("running")
        return {n for n, c in self.containers.items() if c.state == "RUNNING"}

    async def state(self, name):
        await self._enter("state", name)
        container = self.containers.get(name)
        return None if container is None else container.state

    async def exec(self, name, argv, env=None, timeout=None, input=None):
        await self._enter("exec", name)
        container = self._require(name)
        if isinstance(argv, str) or not argv:
            raise ValueError("exec() takes a non-empty list of arguments")
        if container.state != "RUNNING":
            raise ContainerError(f"cannot run {argv[0]} in container {name}: it is not running")
        if self.exec_handler is None:
            return 0, b"", b""
        return self.exec_handler(name, list(argv), dict(env or {}), input)

    async def close(self):
        pass


class FakeTemplate:
    """The container template: `ensure(progress)` succeeds, or raises `error` (set it
    to a TemplateError to test the agent's retries). Builds nothing: its `rootfs` is
    a directory that exists already, by default the host's own root, so that the
    agent's check that units can run its python inside passes (give an empty
    directory to see the agent refuse)."""

    name = "fake"
    cache_dir = "/var/cache/ensemble-fake"

    def __init__(self, rootfs="/"):
        self.rootfs = rootfs
        self.error: Optional[Exception] = None
        self.ensured = 0

    def exists(self):
        return self.ensured > 0

    async def ensure(self, progress=None):
        if self.error is not None:
            raise self.error
        self.ensured += 1


# -- nftables ---------------------------------------------------------------------------------


class FakeNftables:
    """Debian's python3-nftables binding as ensemble.network.firewall uses it:
    `module` goes into sys.modules['nftables'] (None there makes the import fail, as a
    missing binding does). `Nftables().json_cmd(batch)` answers (0, {'nftables': []},
    '') and keeps the batch in `batches`, or, while `refusal` is set, (1, '', refusal)
    as nftables does for a batch it rejects (and then changes nothing).

    Does not model: the kernel's tables (listing them answers nothing), netns."""

    def __init__(self):
        self.refusal = None
        self.batches = []
        self.module = types.ModuleType("nftables")
        binding = self

        class Nftables:
            def set_json_output(self, flag):
                pass

            def json_cmd(self, batch):
                if binding.refusal is not None:
                    return 1, "", binding.refusal
                binding.batches.append(batch)
                return 0, {"nftables": []}, ""

        self.module.Nftables = Nftables
