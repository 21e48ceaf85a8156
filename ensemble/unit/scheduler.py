"""The hook scheduler of one relation of a unit.

It turns what the unit agent's watch sees of the remote side of a relation (its units
and their settings versions) into relation hooks, handed one at a time to the unit's
hook executor, and keeps what it still owes in a state file so that an agent restart
neither loses a hook nor runs a completed one again. The rules are those of pyjuju's
scheduler (../shared/CHARM-RUNTIME.md section 3), with issue 14's order on removal
(-departed for each remote unit, then -broken) and -changed run right after its
-joined.

The executor is a seam: anything with `run(hook) -> bool` (or an awaitable of it).
"""

import dataclasses
import json
import logging
import os
from typing import Awaitable, Protocol, Union

from twisted.internet import defer

from ensemble.errors import EnsembleError, InvalidName

log = logging.getLogger("ensemble.unit.scheduler")

JOINED, CHANGED, DEPARTED, BROKEN = "joined", "changed", "departed", "broken"
RUNNING, ERROR, FINISHED = "running", "error", "finished"
STATE_FORMAT = 1

# How a new change folds into the one already queued for the same remote unit (there is
# never more than one). _KEEP: the queued change stays where it is and the new one is
# dropped. Otherwise the queued one goes, and the result (None: nothing) is queued at
# the end, where the new change would have gone.
_KEEP = "keep"
_COALESCE = {
    (JOINED, CHANGED): _KEEP,  # a -changed follows every -joined anyway
    (CHANGED, CHANGED): _KEEP,  # a hook reads the settings as they are when it runs
    (CHANGED, DEPARTED): DEPARTED,
    (JOINED, DEPARTED): None,  # the local unit never hears of it
    (DEPARTED, JOINED): CHANGED,  # for hooks it never left (e.g. its session bounced)
}


class RelationNotInError(EnsembleError):
    def __init__(self, relation_id):
        super().__init__(f"relation {relation_id} is not in error: nothing to resolve")


@dataclasses.dataclass(frozen=True)
class RelationHook:
    """One hook to run, with what the executor needs for its environment."""

    relation_name: str  # JUJU_RELATION
    relation_id: str  # JUJU_RELATION_ID, e.g. "db:0"
    kind: str  # joined | changed | departed | broken
    remote_unit: str  # JUJU_REMOTE_UNIT; "" in -broken, as in pyjuju
    members: tuple  # what relation-list shows in this hook, sorted

    @property
    def name(self):
        return f"{self.relation_name}-relation-{self.kind}"


class HookExecutor(Protocol):
    """Runs hooks for the whole unit, one at a time, in the order they are handed to it
    (FIFO across relations)."""

    def run(self, hook: RelationHook) -> Union[bool, Awaitable[bool]]:
        """True if the hook succeeded (or the charm has no such hook), False if it
        failed. Raising counts as failing."""


class HookScheduler:
    """The hooks owed for one relation of the unit, run in order through `executor`.

    Feed it with `members_changed` (every observation of the remote side) and
    `relation_broken`; `start` lets it hand out hooks. It never hands out a hook before
    its previous one has completed.

    State file (JSON, replaced atomically): the settings versions last observed, the
    remote units as hooks have seen them, the queue, and the hook handed out but not
    completed. It is written after each observation that changes something, before a
    hook is handed out (not handed out if that fails) and after it completes, and removed
    once -broken has completed. A hook that was running when the agent died is therefore
    run again after the restart (as in pyjuju); a completed one is not, unless saving
    failed (logged) in between. An unreadable file is kept aside as `<file>.corrupt` and the
    scheduler starts empty: current remote units then get -joined again.
    """

    def __init__(self, relation_name, relation_id, executor: HookExecutor, state_dir):
        if not relation_id or "/" in relation_id or "\0" in relation_id or relation_id.startswith("."):
            # It becomes a file name in the state directory.
            raise InvalidName(f"invalid relation id {relation_id!r}")
        self.relation_name = relation_name
        self.relation_id = relation_id
        self.state_path = os.path.join(state_dir, f"{relation_id}.schedule")
        self._executor = executor
        self._versions = {}  # remote unit -> settings version, as last observed
        self._seen = set()  # remote units whose -joined has completed and -departed has not
        self._queue = []  # (kind, unit) still to hand out, at most one per unit
        self._current = None  # (kind, unit) handed out (or failed) and not completed
        self._error = None  # why nothing is handed out until resolved()
        self._broken = False
        self._finished = False
        self._started = False
        self._driving = False
        self._idle_waiters = []
        self._load()

    # -- what the unit agent sees and asks -----------------------------------------------

    def members_changed(self, members):
        """The remote side as the watch sees it now: {remote unit name: settings version
        (int)}, remote units only.

        A new name is joined, a missing one departed, a different version modified (a
        settings node created again starts over at version 0, so any change counts).
        Within one observation: departures first, then joins, then modifications, each in
        name order. Ignored once the relation is broken."""
        if self._broken:
            log.debug("%s: membership after removal ignored", self.relation_id)
            return
        old = self._versions
        changes = (
            [(DEPARTED, u) for u in sorted(set(old) - set(members))]
            + [(JOINED, u) for u in sorted(set(members) - set(old))]
            + [(CHANGED, u) for u in sorted(members) if u in old and members[u] != old[u]]
        )
        self._versions = dict(members)
        for kind, unit in changes:
            self._enqueue(kind, unit)
        if changes:
            self._save_quietly()
            self._kick()

    def relation_broken(self):
        """The relation was removed: -departed for every remote unit hooks have seen, then
        -broken. Queued hooks of the relation are dropped; a hook in progress or in error
        is not (an error still needs `resolved`)."""
        if self._broken:
            return
        self._broken = True
        # The departures are derived from _seen when handed out, so a -joined running now
        # is followed by its -departed too.
        self._queue.clear()
        self._versions.clear()
        self._save_quietly()
        self._kick()

    def resolved(self, retry=False):
        """Clear an error. retry: run the failed hook again; otherwise it counts as done
        (as if it had succeeded) and the scheduler goes on."""
        if self._error is None:
            raise RelationNotInError(self.relation_id)
        self._error = None
        if not retry:
            self._completed(self._current)
        self._save_quietly()
        self._kick()

    def start(self):
        """Hand out hooks from now on."""
        self._started = True
        self._kick()

    async def stop(self):
        """Hand out no more hooks; returns once the one in progress, if any, completed."""
        self._started = False
        if self._driving:
            waiter = defer.Deferred()
            self._idle_waiters.append(waiter)
            await waiter

    @property
    def state(self):
        """running, error (see `error` and `failed_hook`), or finished (-broken done)."""
        if self._error is not None:
            return ERROR
        return FINISHED if self._finished else RUNNING

    @property
    def error(self):
        return self._error

    @property
    def failed_hook(self):
        """The hook `resolved` would retry or skip."""
        return self._hook(self._current) if self._error is not None else None

    @property
    def members(self):
        """The remote units as hooks have seen them (relation-list outside its hooks)."""
        return tuple(sorted(self._seen))

    @property
    def pending(self):
        """Queued (kind, remote unit), in order, not counting the hook in progress."""
        return tuple(self._queue)

    # -- queue ------------------------------------------------------------------------------

    def _enqueue(self, kind, unit):
        index = next((i for i, (_, u) in enumerate(self._queue) if u == unit), None)
        if index is None:
            self._queue.append((kind, unit))
            return
        # Other pairs cannot come from one ordered watch (e.g. modified after departed).
        result = _COALESCE.get((self._queue[index][0], kind), _KEEP)
        if result == _KEEP:
            return
        del self._queue[index]
        if result is not None:
            self._queue.append((result, unit))

    def _next(self):
        if self._current is not None:
            return self._current  # retried, or running when the agent died
        if self._queue:
            return self._queue.pop(0)
        if self._broken and not self._finished:
            return (DEPARTED, min(self._seen)) if self._seen else (BROKEN, "")
        return None

    def _hook(self, change):
        kind, unit = change
        # relation-list: the units hooks have seen, so a unit whose -joined has not run
        # is not listed and a departing one already is not. Derived here rather than
        # stored per change, so that coalescing cannot leave a stale list behind.
        members = set(self._seen)
        if kind == JOINED:
            members.add(unit)
        elif kind == DEPARTED:
            members.discard(unit)
        return RelationHook(self.relation_name, self.relation_id, kind, unit, tuple(sorted(members)))

    def _completed(self, change):
        kind, unit = change
        self._current = None
        if kind == JOINED:
            self._seen.add(unit)
            queued = next((k for k, u in self._queue if u == unit), None)
            if not self._broken and queued != DEPARTED:
                # -changed right after its -joined, absorbing any modification queued
                # while the -joined ran.
                self._queue = [(k, u) for k, u in self._queue if u != unit]
                self._queue.insert(0, (CHANGED, unit))
        elif kind == DEPARTED:
            self._seen.discard(unit)
        elif kind == BROKEN:
            self._finished = True

    # -- running ------------------------------------------------------------------------

    def _kick(self):
        if self._started and not self._driving:
            self._driving = True
            defer.ensureDeferred(self._drive()).addErrback(
                lambda f: log.error("%s: scheduler stopped by a bug: %s", self.relation_id, f.getTraceback())
            )

    async def _drive(self):
        # A loop rather than one call per hook: an executor that answers at once must
        # not grow the stack.
        try:
            while self._started and self._error is None:
                change = self._next()
                if change is None:
                    break
                self._current = change
                hook = self._hook(change)
                try:
                    self._save()
                except OSError as e:
                    # Handing it out unsaved could lose it (or run it twice) on a restart.
                    self._error = f"cannot save {self.state_path}: {e.strerror or e}"
                    log.error("%s: %s; %s not run", self.relation_id, self._error, hook.name)
                    break
                log.debug("%s: running %s for %r", self.relation_id, hook.name, hook.remote_unit)
                if await self._execute(hook):
                    self._completed(change)
                else:
                    unit = f" (remote unit {hook.remote_unit})" if hook.remote_unit else ""
                    self._error = f"{hook.name} failed{unit}"
                    log.error("%s: %s; waiting for resolved", self.relation_id, self._error)
                self._save_quietly()
        finally:
            self._driving = False
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    async def _execute(self, hook):
        try:
            return bool(await defer.maybeDeferred(self._executor.run, hook))
        except Exception:
            log.exception("%s: running %s", self.relation_id, hook.name)
            return False

    # -- state file -----------------------------------------------------------------------

    def _save(self):
        if self._finished:
            # Nothing is owed any more; the relation id is never used again.
            try:
                os.unlink(self.state_path)
            except FileNotFoundError:
                pass
            return
        state = {
            "format": STATE_FORMAT,
            "versions": self._versions,
            "seen": sorted(self._seen),
            "queue": [{"kind": k, "unit": u} for k, u in self._queue],
            "current": None if self._current is None else {"kind": self._current[0], "unit": self._current[1]},
            "error": self._error,
            "broken": self._broken,
        }
        # No fsync: this guards against the agent dying, which cannot tear a rename; a
        # file torn by a power cut is read as unreadable (see the class docstring).
        tmp = self.state_path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(state, f, sort_keys=True)
        os.replace(tmp, self.state_path)

    def _save_quietly(self):
        try:
            self._save()
        except OSError as e:
            # Kept in memory; handing out the next hook saves again (and stops if it cannot).
            log.warning("%s: cannot save %s: %s", self.relation_id, self.state_path, e.strerror or e)

    def _load(self):
        try:
            with open(self.state_path, encoding="utf-8") as f:
                state = _parse_state(json.load(f))
        except FileNotFoundError:
            return
        except (OSError, ValueError) as e:
            log.warning(
                "%s: unreadable scheduler state %s (%s): starting empty, so current remote units get "
                "-joined again; the file is kept as %s.corrupt",
                self.relation_id, self.state_path, e, self.state_path,
            )
            try:
                os.replace(self.state_path, self.state_path + ".corrupt")
            except OSError:
                pass
            return
        self._versions, self._seen, self._queue, self._current, self._error, self._broken = state


def _parse_state(data):
    """The fields of a saved state, checked; ValueError if they are not what _save wrote."""

    def change(value, kinds):
        if not (isinstance(value, dict) and value.get("kind") in kinds and isinstance(value.get("unit"), str)):
            raise ValueError(f"bad change {value!r}")
        return value["kind"], value["unit"]

    if not isinstance(data, dict) or data.get("format") != STATE_FORMAT:
        raise ValueError(f"not a scheduler state of format {STATE_FORMAT}")
    versions, seen, queue = data.get("versions"), data.get("seen"), data.get("queue")
    if not isinstance(versions, dict) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in versions.values()
    ):
        raise ValueError("bad versions")
    if not isinstance(seen, list) or not all(isinstance(u, str) for u in seen):
        raise ValueError("bad seen members")
    if not isinstance(queue, list):
        raise ValueError("bad queue")
    queue = [change(c, (JOINED, CHANGED, DEPARTED)) for c in queue]
    if len({u for _, u in queue}) != len(queue):
        raise ValueError("two queued changes for one unit")
    current = data.get("current")
    if current is not None:
        current = change(current, (JOINED, CHANGED, DEPARTED, BROKEN))
    error, broken = data.get("error"), data.get("broken")
    if not (error is None or isinstance(error, str)) or not isinstance(broken, bool):
        raise ValueError("bad error or broken flag")
    if error is not None and current is None:
        raise ValueError("an error without its hook")
    return dict(versions), set(seen), queue, current, error, broken
