"""The kazoo -> Twisted bridge: Deferreds and watches on the reactor thread, errors
translated, transactions atomic, connection problems surfaced."""

import threading

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task

from ensemble.errors import ZooKeeperUnreachable
from ensemble.state.client import (
    BadVersion,
    NodeExists,
    NoNode,
    NotEmpty,
    WatchEvent,
    ZKClient,
    count_requests,
    expire_session,
)
from ensemble.state.watch import ChildrenWatch, DataWatch
from ensemble.zookeeper import free_port

from conftest import SESSION_TIMEOUT


async def wait_for(predicate, timeout=10.0, interval=0.05):
    deadline = reactor.seconds() + timeout
    while not predicate():
        if reactor.seconds() > deadline:
            raise AssertionError("condition not reached in time")
        await task.deferLater(reactor, interval, lambda: None)


@pytest_twisted.ensureDeferred
async def test_operations_fire_on_the_reactor_thread(client):
    threads = []
    d = client.create("/a", b"1")
    d.addCallback(lambda r: threads.append(threading.current_thread()) or r)
    assert await d == "/a"
    data, stat = await client.get("/a")
    assert (data, stat.version) == (b"1", 0)
    await client.set("/a", b"2", version=0)
    assert (await client.get("/a"))[0] == b"2"
    assert await client.get_children("/") == ["a"]
    assert threads == [threading.main_thread()]


@pytest_twisted.ensureDeferred
async def test_errors_are_translated(client):
    with pytest.raises(NoNode):
        await client.get("/missing")
    await client.create("/a", b"")
    with pytest.raises(NodeExists):
        await client.create("/a", b"")
    with pytest.raises(BadVersion):
        await client.set("/a", b"x", version=7)
    await client.create("/a/b", b"")
    with pytest.raises(NotEmpty):
        await client.delete("/a")
    assert await client.exists("/nope") is None


@pytest_twisted.ensureDeferred
async def test_failed_transaction_writes_nothing(client):
    await client.create("/taken", b"")
    tx = client.transaction().create("/new", b"x").create("/taken", b"")
    with pytest.raises(NodeExists):
        await tx.commit()
    assert await client.exists("/new") is None
    await client.transaction().create("/new", b"x").check("/taken").commit()
    assert (await client.get("/new"))[0] == b"x"


@pytest_twisted.ensureDeferred
async def test_the_session_counts_the_requests_it_issues(client):
    before = client.requests
    await client.create("/counted", b"1")
    await client.get("/counted")
    await client.transaction().set("/counted", b"2").check("/counted").commit()
    assert client.requests - before == 3  # a transaction is one request

    async def counted(n):
        counter = count_requests()
        for i in range(n):
            await defer.ensureDeferred(read())  # what it starts is its too
        return counter[0]

    async def read():
        await client.get("/counted")

    elsewhere = defer.ensureDeferred(counted(5))
    await client.get("/counted")  # not its: another context
    assert await elsewhere == 5


@pytest_twisted.ensureDeferred
async def test_watches_fire_on_the_reactor_thread(client):
    seen = defer.Deferred()
    await client.create("/w", b"")
    await client.get_children("/w", watch=lambda e: seen.callback((e, threading.current_thread())))
    await client.create("/w/child", b"")
    event, thread = await seen
    assert event.type == WatchEvent.CHILD and event.path == "/w"
    assert thread is threading.main_thread()


@pytest_twisted.ensureDeferred
async def test_children_watch_follows_changes_and_node_creation(client):
    values = []
    watch = await ChildrenWatch(client, "/later", values.append).start()
    try:
        assert values == [None]
        await client.create("/later", b"")
        await wait_for(lambda: values[-1] == [])
        await client.create("/later/x", b"")
        await client.create("/later/y", b"")
        await wait_for(lambda: values[-1] == ["x", "y"])
    finally:
        watch.stop()
    count = len(values)
    await client.create("/later/z", b"")
    await task.deferLater(reactor, 0.3, lambda: None)
    assert len(values) == count, "a stopped watch still called back"


@pytest_twisted.ensureDeferred
async def test_slow_callback_sees_changes_folded_not_lost(client):
    await client.create("/fold", b"0")
    seen = []
    release = defer.Deferred()

    async def slow(value):
        seen.append(value[0] if value else None)
        if len(seen) == 2:
            await release

    watch = await DataWatch(client, "/fold", slow).start()
    try:
        await client.set("/fold", b"1")
        await wait_for(lambda: len(seen) == 2)
        for i in range(2, 7):
            await client.set("/fold", str(i).encode())
        await task.deferLater(reactor, 0.3, lambda: None)
        release.callback(None)
        await wait_for(lambda: seen[-1] == b"6")
        assert seen[:2] == [b"0", b"1"]
        assert len(seen) == 3, f"changes during a running callback should fold into one call: {seen}"
    finally:
        watch.stop()


@pytest_twisted.ensureDeferred
async def test_unreachable_zookeeper_is_a_bounded_error_naming_the_address():
    port = free_port()
    start = reactor.seconds()
    with pytest.raises(ZooKeeperUnreachable, match=f"127.0.0.1:{port}"):
        await ZKClient(f"127.0.0.1:{port}", "/x").connect(timeout=1.0)
    assert reactor.seconds() - start < 5


@pytest_twisted.ensureDeferred
async def test_session_expiry_is_surfaced_and_watches_rearm(client):
    events = []
    client.on_session_event(events.append)
    await client.create("/presence", b"", ephemeral=True)
    await client.create("/watched", b"")
    children = []
    watch = await ChildrenWatch(client, "/watched", children.append).start()
    old_session = client.session_id
    try:
        await expire_session(client)
        await wait_for(lambda: "new-session" in events, timeout=SESSION_TIMEOUT * 5)
        assert "expired" in events
        assert client.session_id != old_session
        assert await client.exists("/presence") is None, "ephemeral node outlived its session"
        # The watch re-armed itself on the new session.
        await client.create("/watched/after", b"")
        await wait_for(lambda: children and children[-1] == ["after"])
    finally:
        watch.stop()


@pytest_twisted.ensureDeferred
async def test_reads_and_sets_in_flight_ride_out_a_dropped_connection(tmp_path):
    """A read or set whose connection drops before the answer (here: the server
    freezes until the client gives the connection up) is sent again once the client
    is back on its session, instead of failing the caller."""
    import os
    import signal

    from twisted.internet import threads

    from ensemble.zookeeper import ZooKeeperServer

    server = ZooKeeperServer(str(tmp_path / "zk"), tick_time=500)
    await threads.deferToThread(server.start)
    client = None
    events = []
    try:
        client = await ZKClient(server.address, "/r", session_timeout=8).connect(create_root=True)
        client.on_session_event(events.append)
        await client.create("/n", b"before")
        os.kill(server.pid(), signal.SIGSTOP)
        try:
            pending = client.get("/n")
            updating = client.set("/n", b"after")
            deadline = reactor.seconds() + 10
            while "suspended" not in events and reactor.seconds() < deadline:
                await task.deferLater(reactor, 0.1, lambda: None)
            assert "suspended" in events  # the connection was given up with both in flight
            assert not pending.called and not updating.called
        finally:
            os.kill(server.pid(), signal.SIGCONT)
        assert (await pending)[0] in (b"before", b"after")
        await updating
        assert (await client.get("/n"))[0] == b"after"
        assert "expired" not in events
    finally:
        if client is not None:
            await client.close()
        await threads.deferToThread(server.stop)
