"""The unit's hook queue (ensemble.unit.lifecycle) on fakes and a Clock: the order of
hooks, coalesced config changes, upgrades behind a failure, resolved, and what a
restarted agent or container takes up."""

import pytest
import pytest_twisted
from twisted.internet import defer, task

from ensemble.unit.hooks import HookFailed
from ensemble.unit.lifecycle import SETTLE, SETTLE_MAX, Lifecycle, NotInError


class FakeUnit:
    name = "probe/0"

    def __init__(self):
        self.data = {"state": "pending"}
        self.states = []

    @property
    def state(self):
        return self.data.get("state")

    async def update(self, **fields):
        self.data = {k: v for k, v in {**self.data, **fields}.items() if v is not None}
        if "state" in fields:
            self.states.append(fields["state"])
        return self.data


class FakeExecutor:
    """Runs hooks by name; `fail` holds the hooks that fail; `hold` makes the next hook
    wait for `release()`."""

    def __init__(self, charm):
        self.charm = charm
        self.ran = []
        self.fail = set()
        self._held = None
        self.hold = False

    async def exclusive(self, action):
        return await action()

    async def run(self, hook):
        if self.hold:
            self._held = defer.Deferred()
            await self._held
        self.ran.append(f"{hook}@{self.charm.current}")
        if hook in self.fail:
            raise HookFailed(hook, 1, [f"{hook} broke"])

    def release(self):
        self.hold = False
        held, self._held = self._held, None
        held.callback(None)


class FakeCharm:
    def __init__(self, current="c1"):
        self.current = current
        self.service = current

    async def ensure(self, charm_id=None):
        self.current = charm_id or self.service
        return self.current


def lifecycle(tmp_path, run_id="run-1", charm=None):
    clock = task.Clock()
    charm = charm or FakeCharm()
    executor = FakeExecutor(charm)
    unit = FakeUnit()
    started = []

    async def on_started():
        started.append(True)

    life = Lifecycle(unit, executor, str(tmp_path), charm, clock, on_started=on_started, run_id=run_id)
    return life, unit, executor, clock, started


async def settle(clock, seconds=SETTLE):
    clock.advance(seconds)
    await defer.succeed(None)


@pytest_twisted.ensureDeferred
async def test_a_new_unit_installs_configures_starts_then_reports_and_starts_relations(tmp_path):
    life, unit, executor, clock, started = lifecycle(tmp_path)
    life.config_changed(3)
    await life.start()
    assert executor.ran == ["install@c1", "config-changed@c1", "start@c1"]
    assert unit.states == ["installing", "started"] and started == [True]
    # The config it started with runs nothing more, as does its own version again.
    life.config_changed(3)
    await settle(clock)
    assert executor.ran[3:] == []


@pytest_twisted.ensureDeferred
async def test_config_changes_in_quick_succession_run_config_changed_once(tmp_path):
    life, unit, executor, clock, _ = lifecycle(tmp_path)
    life.config_changed(1)
    await life.start()
    # Each before the last one settled, all within SETTLE_MAX.
    for version in range(2, 2 + int(SETTLE_MAX / SETTLE)):
        life.config_changed(version)
        clock.advance(SETTLE / 2)
    assert executor.ran[3:] == []
    await settle(clock)
    assert executor.ran[3:] == ["config-changed@c1"]


@pytest_twisted.ensureDeferred
async def test_a_stream_of_config_changes_is_held_back_at_most_settle_max(tmp_path):
    life, unit, executor, clock, _ = lifecycle(tmp_path)
    life.config_changed(1)
    await life.start()
    version = 1
    elapsed = 0.0
    while elapsed < SETTLE_MAX + SETTLE:
        version += 1
        life.config_changed(version)
        clock.advance(SETTLE / 2)
        elapsed += SETTLE / 2
    assert executor.ran[3:] == ["config-changed@c1"]  # ran once the cap was reached


@pytest_twisted.ensureDeferred
async def test_changes_during_a_running_config_changed_fold_into_one_more(tmp_path):
    life, unit, executor, clock, _ = lifecycle(tmp_path)
    life.config_changed(1)
    await life.start()
    life.config_changed(2)
    executor.hold = True
    await settle(clock)          # config-changed for 2 is running, held
    for version in range(3, 8):
        life.config_changed(version)
        await settle(clock)
    executor.release()
    await defer.succeed(None)
    assert executor.ran[3:] == ["config-changed@c1", "config-changed@c1"]


@pytest_twisted.ensureDeferred
async def test_an_upgrade_runs_upgrade_charm_then_config_changed_from_the_new_charm(tmp_path):
    charm = FakeCharm()
    life, unit, executor, clock, _ = lifecycle(tmp_path, charm=charm)
    life.config_changed(1)
    life.charm_changed("c1")
    await life.start()
    life.config_changed(2)       # queued, not yet settled, when the upgrade comes
    life.charm_changed("c2")
    await settle(clock)
    assert executor.ran[3:] == ["upgrade-charm@c2", "config-changed@c2"]
    life.charm_changed("c2")     # seen again: nothing more
    assert executor.ran[5:] == []


@pytest_twisted.ensureDeferred
async def test_an_upgrade_while_installing_only_changes_the_charm_the_next_hook_runs(tmp_path):
    charm = FakeCharm()
    life, unit, executor, clock, _ = lifecycle(tmp_path, charm=charm)
    executor.hold = True
    await life.start()           # install held
    life.charm_changed("c2")
    executor.release()
    await defer.succeed(None)
    assert executor.ran == ["install@c1", "config-changed@c2", "start@c2"]


@pytest_twisted.ensureDeferred
async def test_a_failure_holds_the_queue_until_resolved_skip_or_retry(tmp_path):
    life, unit, executor, clock, _ = lifecycle(tmp_path)
    executor.fail = {"install"}
    await life.start()
    assert unit.data["state"] == "error" and unit.data["error"] == "install hook exited with status 1: install broke"
    assert life.failed == "install" and executor.ran == ["install@c1"]
    life.resolve(retry=True)
    await defer.succeed(None)
    assert executor.ran == ["install@c1", "install@c1"] and life.failed == "install"
    executor.fail = set()
    life.resolve()               # skipped: counts as installed
    await defer.succeed(None)
    assert executor.ran[2:] == ["config-changed@c1", "start@c1"]
    assert unit.data["state"] == "started" and "error" not in unit.data
    with pytest.raises(NotInError):
        life.resolve()


@pytest_twisted.ensureDeferred
async def test_an_upgrade_behind_a_failed_config_changed_waits_for_it(tmp_path):
    life, unit, executor, clock, _ = lifecycle(tmp_path)
    life.config_changed(1)
    life.charm_changed("c1")
    await life.start()
    executor.fail = {"config-changed"}
    life.config_changed(2)
    await settle(clock)
    assert life.failed == "config-changed"
    life.charm_changed("c2")
    await defer.succeed(None)
    assert executor.ran[3:] == ["config-changed@c1"]
    assert life.todo == ["config-changed", "upgrade-charm", "config-changed"]
    executor.fail = set()
    life.resolve(retry=True)
    await defer.succeed(None)
    # The retry runs from the newest charm (a fix shipped by upgrade-charm is what it retries).
    assert executor.ran[4:] == ["config-changed@c2", "upgrade-charm@c2", "config-changed@c2"]


@pytest_twisted.ensureDeferred
async def test_a_restarted_agent_goes_on_and_a_restarted_container_starts_again(tmp_path):
    life, unit, executor, clock, _ = lifecycle(tmp_path)
    executor.fail = {"start"}
    life.config_changed(1)
    await life.start()
    assert life.failed == "start"

    # The same container run: the failure stands; nothing runs again.
    life, unit, executor, clock, _ = lifecycle(tmp_path)
    life.config_changed(1)
    await life.start()
    assert executor.ran == [] and unit.data["state"] == "error" and life.failed == "start"

    # A new container run: services are gone; config-changed and start, not install.
    life, unit, executor, clock, _ = lifecycle(tmp_path, run_id="run-2")
    life.config_changed(1)
    await life.start()
    assert executor.ran == ["config-changed@c1", "start@c1"] and unit.data["state"] == "started"


@pytest_twisted.ensureDeferred
async def test_the_last_hook_is_published_in_the_background_folding_what_ended_meanwhile():
    from ensemble.unit.workload import WorkloadReport

    class SlowUnit(FakeUnit):
        def __init__(self):
            super().__init__()
            self.writes, self.pending = [], []

        async def update(self, **fields):
            self.writes.append(fields["workload"]["hook"])
            waiting = defer.Deferred()
            self.pending.append(waiting)
            await waiting
            return await super().update(**fields)

    unit = SlowUnit()
    report = WorkloadReport(unit)
    report.hook_ended("install", 0)          # its write is in flight: the hooks go on
    report.hook_ended("config-changed", 0)
    report.hook_ended("start", 3)
    unit.pending.pop(0).callback(None)
    unit.pending.pop(0).callback(None)
    assert unit.writes == ["install", "start"] and unit.data["workload"]["status"] == 3
    report.hook_ended("stop", 0)
    assert report.fields()["workload"]["hook"] == "stop"  # goes with a state write instead
    unit.pending.pop(0).callback(None)
    assert report.fields() == {} and not unit.pending


@pytest_twisted.ensureDeferred
async def test_a_halted_queue_runs_nothing_more_and_the_next_agent_owes_the_change(tmp_path):
    life, unit, executor, clock, _ = lifecycle(tmp_path)
    life.config_changed(1)
    await life.start()
    life.config_changed(2)       # settling when the agent stops
    await life.halt()
    await settle(clock, SETTLE_MAX)
    assert executor.ran[3:] == []
    life, unit, executor, clock, _ = lifecycle(tmp_path)
    life.config_changed(2)
    await life.start()
    await settle(clock)
    assert executor.ran == ["config-changed@c1"]
