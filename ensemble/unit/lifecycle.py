"""The unit's own hooks, run in order from one queue: install, config-changed, start
when the unit starts; config-changed when the service's config changes; upgrade-charm
then config-changed when the service moves to another charm; stop on removal.

A hook that fails stops the queue: the unit shows `error` (which hook, its exit status,
its last lines) until `resolved` skips that hook or, with retry, runs it again. Every
other hook waits behind it; a config change or upgrade meanwhile is queued, not lost.

The queue is kept in a marker file in the unit directory, so that a restarted agent in
the same container run goes on where the last one stopped (a hook cut short runs again)
and one in a restarted container (its services are gone) starts over with
config-changed and start, not install. Whether the container restarted is told by its
PID 1's start time.

Config changes are coalesced: one arriving while config-changed is queued adds
nothing, and a config-changed is queued only once the config has been still for
SETTLE seconds (a script's quick series of `ensemble set` runs it once or twice).
"""

import logging
import os

from twisted.internet import defer

from ensemble.state.client import ConnectionLost, SessionExpired
from ensemble.state.unit import CHARM, ERROR, INSTALLING, STARTED, STOPPING
from ensemble.unit.hooks import HookFailed

log = logging.getLogger("ensemble.unit")

STOPPED = "stopped"
MARKER = ".ensemble-state"
INSTALL, CONFIG_CHANGED, START, UPGRADE_CHARM, STOP = "install", "config-changed", "start", "upgrade-charm", "stop"
# How long the config must be still before config-changed is queued, and the most a
# stream of changes can hold it back. One `ensemble set` takes about 0.5 s here (a new
# interpreter, a session): a shell loop of them comes well inside SETTLE.
SETTLE, SETTLE_MAX = 1.0, 5.0


def container_run_id():
    """Changes whenever the container (its PID 1) starts again."""
    try:
        with open("/proc/1/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return "unknown"


class NotInError(Exception):
    """`resolved` for a unit whose hooks are not stopped by a failure."""


class Lifecycle:
    """`charm`: the unit's CharmDirectory, brought to the service's charm before each
    hook; `on_started`: called once the start hook has run (or was resolved) in this
    container run, e.g. to begin the relation hooks; `workload`: the unit's
    WorkloadReport, whose latest hook goes with the state the unit reports."""

    def __init__(self, unit, executor, unit_dir, charm, reactor, on_started=None, run_id=None, workload=None):
        self.unit = unit
        self.executor = executor
        self.charm = charm
        self.reactor = reactor
        self.on_started = on_started
        self.workload = workload
        self.marker_path = os.path.join(unit_dir, MARKER)
        self.run_id = run_id or container_run_id()
        self._state = {}
        self._running = None       # the hook being run now
        self._driving = None       # Deferred of the drive in progress
        self._stopping = False
        self._latest_charm = None  # the charm the service names, as last seen
        self._config_version = None  # the config's version, as last seen
        self._settle = None        # DelayedCall queueing config-changed
        self._settle_started = None
        self._announced = False

    # -- the marker ----------------------------------------------------------------------

    def _load(self):
        try:
            with open(self.marker_path) as f:
                state = dict(line.rstrip("\n").split("=", 1) for line in f if "=" in line)
        except OSError:
            state = {}
        if state.get("run") != self.run_id:
            # A new container run: its services are gone, so start them again.
            installed = state.get("installed") == "yes"
            state = {
                "run": self.run_id,
                "installed": "yes" if installed else "no",
                "todo": ",".join(([] if installed else [INSTALL]) + [CONFIG_CHANGED, START]),
                **({"config-version": state["config-version"]} if "config-version" in state else {}),
            }
        return state

    def _save(self):
        tmp = self.marker_path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(f"{k}={v}\n" for k, v in sorted(self._state.items()) if v is not None)
        os.replace(tmp, self.marker_path)

    @property
    def todo(self):
        """The hooks owed, in order (the first is running or failed)."""
        text = self._state.get("todo") or ""
        return [h for h in text.split(",") if h]

    def _set_todo(self, hooks):
        self._state["todo"] = ",".join(hooks)

    @property
    def failed(self):
        """The hook that failed and waits for `resolved`, or None."""
        return self._state.get("failed") or None

    @property
    def started(self):
        """Whether the start hook ran (or was resolved) in this container run."""
        return self._state.get("started") == "yes"

    def _pending(self):
        """The owed hooks not running now."""
        todo = self.todo
        return todo[1:] if self._running is not None and todo and todo[0] == self._running else todo

    # -- what drives it ----------------------------------------------------------------

    async def start(self):
        """Take up the queue where it was left; its hooks run in the background."""
        self._state = self._load()
        self._save()
        # What the watches said before the queue was loaded.
        if self._config_version is not None:
            self.config_changed(self._config_version)
        if self._latest_charm is not None:
            self.charm_changed(self._latest_charm)
        if self.failed:
            log.info("%s: %s hook failed earlier; waiting for resolved", self.unit.name, self.failed)
            if self.unit.state != ERROR:
                await self.unit.update(state=ERROR)
            return
        self._kick_later()

    def resume(self):
        """Run what is owed, if nothing runs now (after ZooKeeper came back, say)."""
        if self._state and self._owed():
            self._kick_later()

    def config_changed(self, version):
        """The service's config node is at `version` (the first call: as it is now)."""
        self._config_version = version
        if not self._state or self._stopping:
            return
        seen = self._state.get("config-version")
        if seen is not None and int(seen) >= version:
            return
        if CONFIG_CHANGED in self._pending():
            return
        now = self.reactor.seconds()
        if self._settle is not None and self._settle.active():
            self._settle.cancel()
        if self._settle_started is None:
            self._settle_started = now
        delay = max(0.0, min(SETTLE, self._settle_started + SETTLE_MAX - now))
        self._settle = self.reactor.callLater(delay, self._queue_config_changed)

    def _queue_config_changed(self):
        self._settle = self._settle_started = None
        if self._stopping or CONFIG_CHANGED in self._pending():
            return
        self._set_todo(self.todo + [CONFIG_CHANGED])
        self._save()
        self._kick_later()

    def charm_changed(self, charm_id):
        """The service names charm `charm_id` (the first call: as it is now). A started
        unit runs upgrade-charm then config-changed for it; one still starting just
        runs its next hook from it."""
        self._latest_charm = charm_id
        if not self._state or self._stopping or not self.started:
            return
        if charm_id == self._state.get("charm") or UPGRADE_CHARM in self._pending():
            return
        todo = self.todo
        keep = todo[:1] if self._running is not None and todo and todo[0] == self._running else []
        if self.failed and todo:
            keep = todo[:1]
        rest = [h for h in todo[len(keep):] if h not in (UPGRADE_CHARM, CONFIG_CHANGED)]
        self._set_todo(keep + rest + [UPGRADE_CHARM, CONFIG_CHANGED])
        self._save()
        self._kick_later()

    def resolve(self, retry=False):
        """Go on past the failed hook: skip it, or with `retry` run it again."""
        failed = self.failed
        if failed is None:
            raise NotInError(self.unit.name)
        todo = self.todo
        if not retry and todo and todo[0] == failed:
            self._done(failed)
            self._set_todo(todo[1:])
        self._state.pop("failed", None)
        self._save()
        log.info("%s: resolved %s (%s)", self.unit.name, failed, "retrying it" if retry else "skipping it")
        self._kick_later()

    def _kick_later(self):
        defer.ensureDeferred(self._kick()).addErrback(
            lambda f: log.error("%s: hooks stopped by a bug: %s", self.unit.name, f.getTraceback()))

    async def _kick(self):
        if self._driving is not None:
            return
        self._driving = defer.Deferred()
        try:
            # Again if more was queued while the last hook's outcome was being reported.
            while self._owed():
                await self._drive()
        except (ConnectionLost, SessionExpired) as e:
            # Not the charm's fault: the next change (or the agent's next session) drives again.
            log.warning("%s: lost ZooKeeper while running hooks (%s); will resume", self.unit.name, e)
        finally:
            driving, self._driving = self._driving, None
            driving.callback(None)

    def _owed(self):
        """Whether a drive has something to do: hooks, or reporting the unit started."""
        if self._stopping or self.failed:
            return False
        reported = self.unit.state == STARTED and not self.unit.data.get("error") and self._announced
        return bool(self.todo) or (self.started and not reported)

    async def _drive(self):
        while not self._stopping and not self.failed and self.todo:
            hook = self.todo[0]
            if hook == CONFIG_CHANGED:
                # It reads the config as it is now: changes waiting to settle are in it.
                if self._settle is not None and self._settle.active():
                    self._settle.cancel()
                self._settle = self._settle_started = None
                if self._config_version is not None:
                    self._state["config-version"] = str(self._config_version)
                    self._save()
            self._running = hook
            try:
                # Not under a relation hook running from the charm directory it replaces.
                charm_id = await self.executor.exclusive(lambda: self.charm.ensure(self._latest_charm))
                self._state["charm"] = charm_id
                # One write for both, where both changed (a new unit's first hook).
                report = {}
                if hook == INSTALL and self.unit.state != INSTALLING:
                    report.update(state=INSTALLING, error=None)
                if self.unit.data.get(CHARM) != charm_id:
                    report[CHARM] = charm_id
                if report:
                    await self.unit.update(**report)
                await self.executor.run(hook)
            except HookFailed as e:
                await self._fail(hook, str(e))
                return
            except (ConnectionLost, SessionExpired):
                raise
            except Exception as e:
                log.exception("%s: running %s failed", self.unit.name, hook)
                await self._fail(hook, f"unit agent: {hook}: {e}")
                return
            finally:
                self._running = None
            self._done(hook)
            self._set_todo(self.todo[1:])
            self._save()
        if not self._stopping and not self.failed and self.started:
            if self.unit.state != STARTED or self.unit.data.get("error"):
                await self.unit.update(state=STARTED, error=None, **self._workload())
                log.info("%s: started", self.unit.name)
            if not self._announced:
                if self.on_started is not None:
                    await self.on_started()
                self._announced = True

    def _done(self, hook):
        if hook == INSTALL:
            self._state["installed"] = "yes"
        elif hook == START:
            self._state["started"] = "yes"

    def _workload(self):
        return self.workload.fields() if self.workload is not None else {}

    async def _fail(self, hook, error):
        log.error("%s: %s", self.unit.name, error)
        self._state["failed"] = hook
        self._save()
        await self.unit.update(state=ERROR, error=error, **self._workload())

    async def halt(self):
        """No more hooks (the agent is stopping, or the unit is going); returns once the
        one running is done. What is owed stays in the queue for the next agent."""
        self._stopping = True
        if self._settle is not None and self._settle.active():
            self._settle.cancel()
        if self._driving is not None:
            await self._driving

    async def stop(self):
        """No more queued hooks; once the one running is done, run stop."""
        await self.halt()
        if self.unit.state == STOPPED:
            return
        await self.unit.update(state=STOPPING)
        try:
            await self.executor.run(STOP)
        except Exception as e:
            # Removal goes on regardless: the container is destroyed next.
            log.error("%s: %s", self.unit.name, e)
        await self.unit.update(state=STOPPED)
        log.info("%s: stopped", self.unit.name)
