"""The per-relation hook scheduler on a Clock with a fake executor: order, coalescing,
relation-list snapshots, removal, failures and resolved, and its state file across
agent restarts (a restart is a new scheduler on the same state directory; the old one
is abandoned with its clock, as a dead agent would be)."""

import json
import os
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import defer, task

from ensemble.errors import EnsembleError, InvalidName
from ensemble.unit.scheduler import (
    BROKEN,
    CHANGED,
    DEPARTED,
    ERROR,
    FINISHED,
    JOINED,
    RUNNING,
    HookScheduler,
    RelationNotInError,
)

A, B, C, D, E = "mysql/0", "mysql/1", "mysql/2", "mysql/3", "mysql/4"


class FakeExecutor:
    """Runs each hook for one second of `clock`. Fails the hooks listed in `fail` (once
    each, by (name, remote unit)) and raises for those in `explode`; complains if a
    hook is handed out while another runs."""

    def __init__(self, clock):
        self.clock = clock
        self.started = []
        self.completed = []  # hooks that succeeded, in order
        self.fail = []
        self.explode = []
        self.running = None

    def run(self, hook):
        assert self.running is None, f"{hook.name} handed out while {self.running.name} runs"
        self.running = hook
        self.started.append(hook)
        key = (hook.name, hook.remote_unit)
        if key in self.explode:
            self.explode.remove(key)
            self.running = None
            raise RuntimeError("executor broke")
        return task.deferLater(self.clock, 1.0, self._done, hook)

    def _done(self, hook):
        self.running = None
        key = (hook.name, hook.remote_unit)
        if key in self.fail:
            self.fail.remove(key)
            return False
        self.completed.append(hook)
        return True


class Agent:
    """One incarnation of a unit agent as far as one relation goes."""

    def __init__(self, state_dir):
        self.clock = task.Clock()
        self.executor = FakeExecutor(self.clock)
        self.scheduler = HookScheduler("db", "db:0", self.executor, str(state_dir))

    def ran(self):
        return [_label(h) for h in self.executor.completed]

    def drain(self):
        for _ in range(1000):
            if not self.clock.getDelayedCalls():
                return
            self.clock.advance(1)
        raise AssertionError("hooks never stop coming")


def _label(hook):
    return f"{hook.kind} {hook.remote_unit}".rstrip()


def stop(scheduler):
    d = defer.ensureDeferred(scheduler.stop())
    assert d.called  # nothing in progress in the tests that use this
    return d


@pytest.fixture
def agent(tmp_path):
    return Agent(tmp_path)


def joined_and_stopped(agent, members):
    """`members` joined and their -changed run; the scheduler then hands out nothing,
    so that a test can queue changes and look at the queue."""
    agent.scheduler.start()
    agent.scheduler.members_changed(members)
    agent.drain()
    stop(agent.scheduler)
    agent.executor.completed.clear()
    agent.executor.started.clear()


# -- order and relation-list ------------------------------------------------------------


def test_each_new_unit_gets_joined_then_its_changed_right_after(agent):
    agent.scheduler.start()
    agent.scheduler.members_changed({B: 0, A: 0})
    agent.drain()
    assert agent.ran() == [f"joined {A}", f"changed {A}", f"joined {B}", f"changed {B}"]
    # B is not listed until its -joined runs.
    assert [h.members for h in agent.executor.completed] == [(A,), (A,), (A, B), (A, B)]
    hook = agent.executor.completed[0]
    assert (hook.name, hook.relation_name, hook.relation_id) == ("db-relation-joined", "db", "db:0")
    assert agent.scheduler.members == (A, B)
    assert agent.scheduler.state == RUNNING


def test_changed_only_when_a_settings_version_changes(agent):
    joined_and_stopped(agent, {A: 0})
    agent.scheduler.start()
    agent.scheduler.members_changed({A: 0})
    agent.drain()
    assert agent.ran() == []
    agent.scheduler.members_changed({A: 3})
    agent.drain()
    assert agent.ran() == [f"changed {A}"]


def test_departed_no_longer_lists_the_departing_unit(agent):
    joined_and_stopped(agent, {A: 0, B: 0})
    agent.scheduler.start()
    agent.scheduler.members_changed({B: 0})
    agent.drain()
    assert agent.ran() == [f"departed {A}"]
    assert agent.executor.completed[0].members == (B,)
    assert agent.scheduler.members == (B,)


def test_one_observation_queues_departures_then_joins_then_modifications(agent):
    joined_and_stopped(agent, {A: 0, B: 0})
    agent.scheduler.members_changed({A: 1, C: 0})
    assert agent.scheduler.pending == ((DEPARTED, B), (JOINED, C), (CHANGED, A))


def test_one_hook_at_a_time(agent):
    agent.scheduler.start()
    agent.scheduler.members_changed({A: 0})
    agent.scheduler.members_changed({A: 0, B: 0})
    agent.scheduler.members_changed({A: 0, B: 0, C: 0})
    assert [_label(h) for h in agent.executor.started] == [f"joined {A}"]
    agent.scheduler.start()  # again: still one at a time
    assert len(agent.executor.started) == 1
    agent.clock.advance(1)
    assert [_label(h) for h in agent.executor.started] == [f"joined {A}", f"changed {A}"]


# -- coalescing within the queue ----------------------------------------------------------


def test_joined_then_modified_is_one_joined_and_its_changed(agent):
    agent.scheduler.members_changed({A: 0})
    agent.scheduler.members_changed({A: 1})
    assert agent.scheduler.pending == ((JOINED, A),)
    agent.scheduler.start()
    agent.drain()
    assert agent.ran() == [f"joined {A}", f"changed {A}"]


def test_modified_twice_is_one_changed(agent):
    joined_and_stopped(agent, {A: 0})
    agent.scheduler.members_changed({A: 1})
    agent.scheduler.members_changed({A: 1, B: 0})
    agent.scheduler.members_changed({A: 2, B: 0})
    assert agent.scheduler.pending == ((CHANGED, A), (JOINED, B))  # where it was
    agent.scheduler.start()
    agent.drain()
    assert agent.ran() == [f"changed {A}", f"joined {B}", f"changed {B}"]


def test_modified_then_departed_is_departed(agent):
    joined_and_stopped(agent, {A: 0, B: 0})
    agent.scheduler.members_changed({A: 1, B: 0})
    agent.scheduler.members_changed({B: 0})
    assert agent.scheduler.pending == ((DEPARTED, A),)
    agent.scheduler.start()
    agent.drain()
    assert agent.ran() == [f"departed {A}"]


def test_joined_then_departed_is_nothing_and_never_listed(agent):
    joined_and_stopped(agent, {A: 0})
    agent.scheduler.members_changed({A: 0, B: 0})
    agent.scheduler.members_changed({A: 1, B: 0})
    assert agent.scheduler.pending == ((JOINED, B), (CHANGED, A))
    agent.scheduler.members_changed({A: 1})
    assert agent.scheduler.pending == ((CHANGED, A),)
    agent.scheduler.start()
    agent.drain()
    assert agent.ran() == [f"changed {A}"]
    assert agent.executor.completed[0].members == (A,)


def test_departed_then_joined_is_one_changed_and_the_unit_stays_listed(agent):
    joined_and_stopped(agent, {A: 0, B: 0})
    agent.scheduler.members_changed({B: 0})
    agent.scheduler.members_changed({B: 1})
    assert agent.scheduler.pending == ((DEPARTED, A), (CHANGED, B))
    agent.scheduler.members_changed({A: 0, B: 1})  # e.g. A's session bounced
    assert agent.scheduler.pending == ((CHANGED, B), (CHANGED, A))
    agent.scheduler.start()
    agent.drain()
    assert agent.ran() == [f"changed {B}", f"changed {A}"]
    # Hooks never saw A leave, so B's -changed lists it.
    assert [h.members for h in agent.executor.completed] == [(A, B), (A, B)]


def test_a_modification_during_joined_becomes_the_changed_right_after_it(agent):
    agent.scheduler.start()
    agent.scheduler.members_changed({A: 0})  # A's -joined is running
    agent.scheduler.members_changed({A: 0, B: 0})
    agent.scheduler.members_changed({A: 1, B: 0})
    assert agent.scheduler.pending == ((JOINED, B), (CHANGED, A))
    agent.drain()
    assert agent.ran() == [f"joined {A}", f"changed {A}", f"joined {B}", f"changed {B}"]


def test_a_unit_departing_during_its_joined_gets_departed_and_no_changed(agent):
    agent.scheduler.start()
    agent.scheduler.members_changed({A: 0})
    agent.scheduler.members_changed({})
    agent.drain()
    assert agent.ran() == [f"joined {A}", f"departed {A}"]
    assert agent.executor.completed[1].members == ()


def test_a_unit_departing_and_rejoining_during_its_joined_gets_its_changed(agent):
    agent.scheduler.start()
    agent.scheduler.members_changed({A: 0})
    agent.scheduler.members_changed({})
    agent.scheduler.members_changed({A: 1})
    agent.drain()
    assert agent.ran() == [f"joined {A}", f"changed {A}"]


# -- removal ----------------------------------------------------------------------------


def test_removal_departs_each_joined_unit_then_breaks(agent):
    joined_and_stopped(agent, {A: 0, B: 0})
    agent.scheduler.members_changed({A: 1, B: 0, C: 0})
    agent.scheduler.relation_broken()
    agent.scheduler.relation_broken()
    assert agent.scheduler.pending == ()  # C never joined; A's -changed is moot
    agent.scheduler.start()
    agent.drain()
    assert agent.ran() == [f"departed {A}", f"departed {B}", "broken"]
    assert [h.members for h in agent.executor.completed] == [(B,), (), ()]
    broken = agent.executor.completed[-1]
    assert broken.remote_unit == "" and broken.name == "db-relation-broken"
    assert agent.scheduler.state == FINISHED
    assert not os.path.exists(agent.scheduler.state_path)
    agent.scheduler.members_changed({D: 0})
    agent.scheduler.relation_broken()
    agent.drain()
    assert len(agent.executor.started) == 3


def test_removal_while_a_joined_runs_departs_that_unit_too(agent):
    agent.scheduler.start()
    agent.scheduler.members_changed({A: 0})
    agent.scheduler.relation_broken()
    agent.drain()
    assert agent.ran() == [f"joined {A}", f"departed {A}", "broken"]


def test_removal_of_a_relation_without_members_runs_only_broken(agent):
    agent.scheduler.start()
    agent.scheduler.relation_broken()
    agent.drain()
    assert agent.ran() == ["broken"]


# -- failures -----------------------------------------------------------------------------


def failed_changed(agent):
    """A joined; its next -changed failed while B joined and changed (queued)."""
    joined_and_stopped(agent, {A: 0})
    agent.executor.fail.append(("db-relation-changed", A))
    agent.scheduler.start()
    agent.scheduler.members_changed({A: 1})
    agent.drain()
    assert agent.scheduler.state == ERROR
    assert agent.scheduler.error == f"db-relation-changed failed (remote unit {A})"
    assert _label(agent.scheduler.failed_hook) == f"changed {A}"
    agent.scheduler.members_changed({A: 1, B: 0})
    agent.scheduler.members_changed({A: 1, B: 1})
    assert agent.scheduler.pending == ((JOINED, B),)  # still queuing, and coalescing
    agent.drain()
    assert len(agent.executor.started) == 1  # nothing handed out since the failure


def test_resolved_with_retry_runs_the_failed_hook_again(agent):
    failed_changed(agent)
    agent.scheduler.resolved(retry=True)
    agent.drain()
    assert agent.ran() == [f"changed {A}", f"joined {B}", f"changed {B}"]
    assert agent.scheduler.state == RUNNING and agent.scheduler.error is None


def test_resolved_without_retry_skips_the_failed_hook(agent):
    failed_changed(agent)
    agent.scheduler.resolved(retry=False)
    agent.drain()
    assert agent.ran() == [f"joined {B}", f"changed {B}"]
    assert [_label(h) for h in agent.executor.started].count(f"changed {A}") == 1


def test_a_skipped_joined_counts_as_joined(agent):
    agent.executor.fail.append(("db-relation-joined", A))
    agent.scheduler.start()
    agent.scheduler.members_changed({A: 0})
    agent.drain()
    assert agent.scheduler.state == ERROR
    agent.scheduler.resolved()
    agent.scheduler.members_changed({})
    agent.drain()
    assert agent.ran() == [f"changed {A}", f"departed {A}"]
    assert agent.executor.completed[0].members == (A,)


def test_resolved_when_not_in_error_is_a_user_error(agent):
    with pytest.raises(RelationNotInError) as e:
        agent.scheduler.resolved()
    assert isinstance(e.value, EnsembleError)
    assert str(e.value) == "relation db:0 is not in error: nothing to resolve"


def test_an_executor_that_raises_fails_the_hook_without_crashing(agent, caplog):
    agent.executor.explode.append(("db-relation-joined", A))
    agent.scheduler.start()
    agent.scheduler.members_changed({A: 0})
    agent.drain()
    assert agent.scheduler.state == ERROR
    assert "executor broke" in caplog.text
    agent.scheduler.resolved(retry=True)
    agent.drain()
    assert agent.ran() == [f"joined {A}", f"changed {A}"]


def test_a_failed_broken_waits_for_resolved_too(agent):
    agent.executor.fail.append(("db-relation-broken", ""))
    agent.scheduler.start()
    agent.scheduler.relation_broken()
    agent.drain()
    assert agent.scheduler.state == ERROR and agent.scheduler.error == "db-relation-broken failed"
    assert os.path.exists(agent.scheduler.state_path)
    agent.scheduler.resolved()
    assert agent.scheduler.state == FINISHED
    assert not os.path.exists(agent.scheduler.state_path)


# -- start and stop -----------------------------------------------------------------------


def test_nothing_is_handed_out_before_start_or_after_stop(agent):
    agent.scheduler.members_changed({A: 0})
    agent.clock.advance(5)
    assert agent.executor.started == []
    agent.scheduler.start()
    stopped = defer.ensureDeferred(agent.scheduler.stop())
    assert not stopped.called  # A's -joined is still running
    agent.clock.advance(1)
    assert stopped.called
    agent.drain()
    assert agent.ran() == [f"joined {A}"]
    assert agent.scheduler.pending == ((CHANGED, A),)
    agent.scheduler.start()
    agent.drain()
    assert agent.ran() == [f"joined {A}", f"changed {A}"]


def test_a_relation_id_that_is_not_a_file_name_is_refused(tmp_path):
    for bad in ("", "../db:0", ".db:0", "db/x:0"):
        with pytest.raises(InvalidName):
            HookScheduler("db", bad, FakeExecutor(task.Clock()), str(tmp_path))


# -- the state file and restarts -------------------------------------------------------------


def saved(agent):
    with open(agent.scheduler.state_path) as f:
        return json.load(f)


def test_the_state_is_saved_before_a_hook_is_handed_out_and_after_it_completes(agent, tmp_path):
    agent.scheduler.start()
    agent.scheduler.members_changed({A: 0})
    state = saved(agent)  # A's -joined is running
    assert state["current"] == {"kind": JOINED, "unit": A}
    assert state["versions"] == {A: 0} and state["seen"] == [] and state["queue"] == []
    agent.clock.advance(1)
    state = saved(agent)  # A's -changed is running
    assert state["current"] == {"kind": CHANGED, "unit": A} and state["seen"] == [A]
    agent.drain()
    assert saved(agent)["current"] is None
    assert sorted(os.listdir(tmp_path)) == ["db:0.schedule"]  # no temporary file left


def settled(tmp_path, members):
    agent = Agent(tmp_path)
    agent.scheduler.start()
    agent.scheduler.members_changed(members)
    agent.drain()
    return agent


def test_changes_made_while_the_agent_was_down_give_the_right_hooks(tmp_path):
    settled(tmp_path, {A: 0, B: 0, C: 0, D: 0})
    # Down: A departed, B modified, D departed and joined again (writing its settings),
    # E joined, C unchanged.
    agent = Agent(tmp_path)
    assert agent.scheduler.members == (A, B, C, D)
    agent.scheduler.members_changed({B: 1, C: 0, D: 1, E: 0})
    agent.scheduler.start()
    agent.drain()
    assert agent.ran() == [f"departed {A}", f"joined {E}", f"changed {E}", f"changed {B}", f"changed {D}"]
    assert agent.executor.completed[0].members == (B, C, D)
    assert agent.executor.completed[1].members == (B, C, D, E)


def test_a_restart_without_changes_runs_nothing(tmp_path):
    settled(tmp_path, {A: 0, B: 0})
    agent = Agent(tmp_path)
    agent.scheduler.start()
    agent.scheduler.members_changed({A: 0, B: 0})
    agent.drain()
    assert agent.executor.started == []


def test_a_restart_reruns_the_hook_that_was_running_and_no_completed_one(tmp_path):
    before = Agent(tmp_path)
    before.scheduler.start()
    before.scheduler.members_changed({A: 0, B: 0})
    before.clock.advance(1)  # A's -joined done, its -changed running: the agent dies
    assert before.ran() == [f"joined {A}"]
    agent = Agent(tmp_path)
    agent.scheduler.members_changed({A: 0, B: 0})
    agent.scheduler.start()
    agent.drain()
    assert agent.ran() == [f"changed {A}", f"joined {B}", f"changed {B}"]


def test_a_restart_keeps_an_error(tmp_path):
    before = Agent(tmp_path)
    before.executor.fail.append(("db-relation-joined", A))
    before.scheduler.start()
    before.scheduler.members_changed({A: 0})
    before.drain()
    agent = Agent(tmp_path)
    agent.scheduler.start()
    agent.scheduler.members_changed({A: 0})
    agent.drain()
    assert agent.executor.started == []
    assert agent.scheduler.state == ERROR
    assert agent.scheduler.error == f"db-relation-joined failed (remote unit {A})"
    assert _label(agent.scheduler.failed_hook) == f"joined {A}"
    agent.scheduler.resolved(retry=True)
    agent.drain()
    assert agent.ran() == [f"joined {A}", f"changed {A}"]


def test_a_restart_during_removal_finishes_it(tmp_path):
    before = settled(tmp_path, {A: 0, B: 0})
    before.scheduler.relation_broken()
    before.clock.advance(1)  # A departed; B's -departed running: the agent dies
    agent = Agent(tmp_path)
    agent.scheduler.start()
    agent.drain()
    assert agent.ran() == [f"departed {B}", "broken"]
    assert not os.path.exists(agent.scheduler.state_path)
    agent.scheduler.relation_broken()  # the restarted agent finds the relation gone too
    agent.drain()
    assert len(agent.executor.started) == 2


BAD_STATES = [
    b"",
    b"{not json",
    b"\xff\xfe\x00",
    b"[]",
    json.dumps({"format": 2}).encode(),
    json.dumps({"format": 1, "versions": {A: "1"}, "seen": [], "queue": [], "current": None,
                "error": None, "broken": False}).encode(),
    json.dumps({"format": 1, "versions": {}, "seen": [], "queue": [{"kind": "exploded", "unit": A}],
                "current": None, "error": None, "broken": False}).encode(),
    json.dumps({"format": 1, "versions": {}, "seen": [], "queue": [{"kind": JOINED, "unit": A}] * 2,
                "current": None, "error": None, "broken": False}).encode(),
    json.dumps({"format": 1, "versions": {}, "seen": [], "queue": [], "current": None,
                "error": "x failed", "broken": False}).encode(),
]


@pytest.mark.parametrize("content", BAD_STATES)
def test_an_unreadable_state_file_is_kept_aside_and_the_scheduler_starts_empty(tmp_path, caplog, content):
    (tmp_path / "db:0.schedule").write_bytes(content)
    agent = Agent(tmp_path)
    assert "unreadable scheduler state" in caplog.text
    assert (tmp_path / "db:0.schedule.corrupt").read_bytes() == content
    assert agent.scheduler.members == () and agent.scheduler.pending == ()
    assert agent.scheduler.state == RUNNING
    agent.scheduler.start()
    agent.scheduler.members_changed({A: 0})
    agent.drain()
    assert agent.ran() == [f"joined {A}", f"changed {A}"]
    assert saved(agent)["seen"] == [A]


def test_a_state_file_that_cannot_be_written_stops_before_the_hook(tmp_path, caplog):
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    agent = Agent(state_dir)
    state_dir.rmdir()
    agent.scheduler.start()
    agent.scheduler.members_changed({A: 0})
    agent.drain()
    assert agent.executor.started == []  # not handed out unsaved
    assert agent.scheduler.state == ERROR
    assert agent.scheduler.error.startswith(f"cannot save {state_dir}/db:0.schedule")
    assert _label(agent.scheduler.failed_hook) == f"joined {A}"
    state_dir.mkdir()
    agent.scheduler.resolved(retry=True)
    agent.drain()
    assert agent.ran() == [f"joined {A}", f"changed {A}"]


# -- any history ------------------------------------------------------------------------------

UNITS = [A, B, C, D]
steps = st.lists(
    st.tuples(
        st.sampled_from(["join", "depart", "modify", "observe", "observe", "hook", "hook", "fail", "resolve", "crash"]),
        st.sampled_from(UNITS),
        st.booleans(),
    ),
    max_size=60,
)


class History:
    """A remote side that changes, an agent that observes it, runs hooks, fails some, is
    resolved and dies; it records what completed (a skipped hook counts as completed)."""

    def __init__(self, state_dir):
        self.state_dir = state_dir
        self.world = {}  # the remote side now: unit -> settings version
        self.observations = 0
        self.dirty = {}  # unit -> observation since which a -changed is owed
        self.observed = {}
        self.completed = []
        self.started_at = 0
        self.agent = None
        self.boot()

    def boot(self):
        self.agent = Agent(self.state_dir)
        executor = self.agent.executor
        run = executor.run

        def stamped(hook):
            # The observation a hook started after: what settings it can have read.
            self.started_at = self.observations
            return run(hook)

        executor.run = stamped
        self.agent.scheduler.start()
        self.observe()

    def observe(self):
        self.observations += 1
        for unit, version in self.world.items():
            if self.observed.get(unit) != version:
                self.dirty[unit] = self.observations
        for unit in set(self.dirty) - set(self.world):
            del self.dirty[unit]
        self.observed = dict(self.world)
        self.agent.scheduler.members_changed(dict(self.world))

    def complete(self, hook, started_at):
        self.completed.append(hook)
        if hook.kind == CHANGED and self.dirty.get(hook.remote_unit, started_at + 1) <= started_at:
            del self.dirty[hook.remote_unit]

    def hook(self):
        executor = self.agent.executor
        running, started_at, done = executor.running, self.started_at, len(executor.completed)
        self.agent.clock.advance(1)
        if len(executor.completed) > done:
            self.complete(running, started_at)

    def step(self, op, unit, flag):
        scheduler, executor = self.agent.scheduler, self.agent.executor
        if op == "join" and unit not in self.world:
            self.world[unit] = self.observed.get(unit, 0) + flag  # joining writes settings, or not
        elif op == "depart":
            self.world.pop(unit, None)
        elif op == "modify" and unit in self.world:
            self.world[unit] += 1
        elif op == "observe":
            self.observe()
        elif op == "hook":
            self.hook()
        elif op == "fail" and executor.running is not None:
            executor.fail.append((executor.running.name, executor.running.remote_unit))
        elif op == "resolve" and scheduler.state == ERROR:
            if not flag:
                # Nothing started since the failed hook did, in this agent or a dead one.
                self.complete(scheduler.failed_hook, self.started_at)
            scheduler.resolved(retry=flag)
        elif op == "crash":
            self.boot()

    def settle(self):
        self.agent.executor.fail.clear()
        for _ in range(200):
            if self.agent.scheduler.state == ERROR:
                self.agent.scheduler.resolved(retry=True)
            if not self.agent.clock.getDelayedCalls():
                return
            self.hook()
        raise AssertionError("never settles")


def check_hooks(completed):
    """Each completed hook makes sense given the ones before it, relation-list included,
    and a -joined is followed at once by its -changed unless the unit departs first."""
    joined = set()
    for i, hook in enumerate(completed):
        unit = hook.remote_unit
        if hook.kind == JOINED:
            assert unit not in joined, f"{i}: joined twice"
            joined.add(unit)
            later = [(h.kind, h.remote_unit) for h in completed[i + 1:]]
            departs = later.index((DEPARTED, unit)) if (DEPARTED, unit) in later else len(later)
            if (CHANGED, unit) in later[:departs]:
                assert later[0] == (CHANGED, unit), f"{i}: -changed not right after -joined"
        elif hook.kind == CHANGED:
            assert unit in joined, f"{i}: changed before joined"
        elif hook.kind == DEPARTED:
            assert unit in joined, f"{i}: departed before joined"
            joined.discard(unit)
        else:
            assert hook.kind == BROKEN and not joined and i == len(completed) - 1
        assert hook.members == tuple(sorted(joined)), f"{i}: relation-list"
    return joined


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(history=steps, remove=st.booleans())
def test_any_history_runs_each_owed_hook_in_order_and_none_twice(history, remove):
    with tempfile.TemporaryDirectory() as state_dir:
        run = History(state_dir)
        for step in history:
            run.step(*step)
        run.observe()
        run.settle()
        # What the relation is now, every unit's last settings seen by a -changed.
        assert check_hooks(run.completed) == set(run.world)
        assert run.agent.scheduler.members == tuple(sorted(run.world))
        assert not run.dirty
        if remove:
            done = len(run.completed)
            run.agent.scheduler.relation_broken()
            run.settle()
            departures = [f"departed {u}" for u in sorted(run.world)]
            assert [_label(h) for h in run.completed[done:]] == departures + ["broken"]
            check_hooks(run.completed)
            assert os.listdir(state_dir) == []
