"""The unit's side of its service's relations.

For each relation of its service (ensemble/state/relation.py holds the layout) the unit
agent:
1. joins: writes `private-address` into its settings node, then creates its ephemeral
   member node in its role's container, so a remote unit that sees it as a member can
   already read its address;
2. watches the remote side (the members of the other role's container, or of its own
   for a peer relation, and each member's settings version) and feeds that to the
   relation's HookScheduler, which runs -joined/-changed/-departed through the unit's
   one HookExecutor;
3. when the relation goes (its node is deleted), has the scheduler run -departed for
   every remote unit it had joined, then -broken.

A relation hook that fails puts that relation in error on the unit node
(`relation-errors: {relation id: why}`); the unit and its other relations go on.
"""

import logging
import os

from twisted.internet import defer

from ensemble.errors import MalformedState
from ensemble.names import unit_key, unit_name_from_key
from ensemble.state import nodes
from ensemble.state.client import NoAuth, NodeExists, NoNode
from ensemble.state.relation import RelationState, join_reader, relation_path, role_path, settings_path
from ensemble.state.unit import RELATION_ERRORS
from ensemble.state.watch import ChildrenWatch, DataWatch
from ensemble.unit.hooks import HookFailed
from ensemble.unit.scheduler import BROKEN, HookScheduler, RelationNotInError

log = logging.getLogger("ensemble.unit")

SCHEDULE_SUFFIX = ".schedule"
REMOTE_ROLES = {"server": "client", "client": "server", "peer": "peer"}


class JoinedRelation:
    """One relation of the unit: its membership, the watch of its remote side, and
    its scheduler."""

    def __init__(self, client, unit_name, relation: RelationState, scheduler_for):
        service = unit_name.rpartition("/")[0]
        endpoint = relation.endpoint(service)
        self.client = client
        self.unit_name = unit_name
        self.key = relation.key
        self.name = endpoint["relation-name"]
        self.relation_id = relation.relation_id(service)
        self.services = relation.services
        self.role = endpoint["role"]
        self.remote_role = REMOTE_ROLES[self.role]
        self.scheduler = scheduler_for(self.name, self.relation_id)
        self._member_watch = None
        self._settings_watches = {}  # remote unit -> DataWatch of its settings
        self._members = []           # remote units whose member node exists
        self._versions = {}          # remote unit -> settings version
        self._stopped = False

    @property
    def member_path(self):
        return f"{role_path(self.key, self.role)}/{unit_key(self.unit_name)}"

    async def join(self, address):
        """Become the reader of the relation's settings; publish the unit's address in
        its own, then become a member."""
        await join_reader(self.client, self.key)
        path = settings_path(self.key, self.unit_name)
        await nodes.update(self.client, path, nodes.merge({"private-address": address}))
        await self.become_member()

    async def become_member(self):
        """The member node of this session. One left by the agent's previous session
        is not ours to delete (a unit may only create members) and says the same to
        remote units: it goes when that session expires, and this one is made then,
        in the background."""
        while not self._stopped:
            try:
                await self.client.create(self.member_path, b"", ephemeral=True)
                return
            except NodeExists:
                pass
            gone = defer.Deferred()
            stat = await self.client.exists(self.member_path, watch=lambda event: gone.called or gone.callback(None))
            if stat is None:
                continue
            if stat.ephemeral_owner != self.client.session_id:
                log.info("%s: %s: the previous session's member node stands in until it expires",
                         self.unit_name, self.relation_id)
                gone.addCallback(lambda _: defer.ensureDeferred(self.become_member()))
                gone.addErrback(lambda f: log.warning("%s: %s: becoming a member again: %s", self.unit_name,
                                                      self.relation_id, f.getErrorMessage()))
            return

    async def watch(self):
        self._member_watch = await ChildrenWatch(
            self.client, role_path(self.key, self.remote_role), self._members_changed).start()

    async def present_members(self):
        """The remote units whose member node exists now (relation-list for -r)."""
        try:
            keys = await self.client.get_children(role_path(self.key, self.remote_role))
        except NoNode:
            return []
        return self._remote_units(keys)

    def _remote_units(self, keys):
        units = []
        for key in keys:
            try:
                name = unit_name_from_key(key)
            except Exception:
                continue  # not a unit's: nothing runs a hook for it
            if name != self.unit_name:
                units.append(name)
        return units

    async def _members_changed(self, keys):
        if keys is None or self._stopped:
            return  # the relation is going: its removal is seen on /relations
        self._members = self._remote_units(keys)
        for unit in [u for u in self._settings_watches if u not in self._members]:
            self._settings_watches.pop(unit).stop()
            self._versions.pop(unit, None)
        new = [u for u in self._members if u not in self._settings_watches]
        for unit in new:
            self._settings_watches[unit] = None  # claimed: one watch per member
        # Read in parallel: a burst of joins (a service of 50 units related at once) must
        # not wait on 50 round trips in a row before the first hook.
        watches = await defer.gatherResults([defer.ensureDeferred(DataWatch(
            self.client, settings_path(self.key, unit),
            lambda value, unit=unit: self._settings_changed(unit, value)).start()) for unit in new],
            consumeErrors=True)
        for unit, watch in zip(new, watches):
            if self._stopped or self._settings_watches.get(unit, 0) is not None:
                watch.stop()  # left meanwhile, or the relation is going
            else:
                self._settings_watches[unit] = watch
        self._feed()

    def _settings_changed(self, unit, value):
        if value is None:
            self._versions.pop(unit, None)
        else:
            self._versions[unit] = value[1].version
        self._feed()

    def _feed(self):
        if self._stopped:
            return
        # A member counts once its settings are seen: its -changed must see them.
        self.scheduler.members_changed({u: self._versions[u] for u in self._members if u in self._versions})

    def stop_watching(self):
        self._stopped = True
        if self._member_watch is not None:
            self._member_watch.stop()
        for watch in self._settings_watches.values():
            if watch is not None:
                watch.stop()
        self._settings_watches.clear()


class UnitRelations:
    """Every relation of the unit's service, joined and followed. `state_dir`: where
    each relation's scheduler keeps what it owes (`<relation id>.schedule`), so hooks
    survive an agent restart. `executor` (the unit's HookExecutor) is set before
    `start`: the executor's HookState reads relations from here."""

    def __init__(self, client, unit, state_dir):
        self.client = client
        self.unit = unit
        self.executor = None
        self.state_dir = state_dir
        self._joined = {}    # relation key -> JoinedRelation
        self._others = set()  # relation keys of other services' relations
        self._leaving = {}   # relation id -> HookScheduler running -departed/-broken
        self._errors = {}    # relation id -> why its hook failed
        self._watch = None
        self._unsubscribe = None
        self._stopped = False

    def joined(self):
        """{relation id: JoinedRelation} of the relations the unit is in now."""
        return {r.relation_id: r for r in self._joined.values()}

    @property
    def schedulers(self):
        """{relation id: HookScheduler}, leaving relations included."""
        return {**self._leaving, **{r.relation_id: r.scheduler for r in self._joined.values()}}

    async def start(self):
        """Join and follow the relations; again after a start cut short (ZooKeeper
        lost), a no-op once started."""
        if self._watch is not None:
            return
        os.makedirs(self.state_dir, exist_ok=True)
        self._errors = dict(self.unit.data.get(RELATION_ERRORS) or {})
        watch = await ChildrenWatch(self.client, nodes.RELATIONS, self._relations_changed).start()
        self._watch = watch
        self._unsubscribe = self.client.on_session_event(self._on_session)
        self._break_forgotten()

    async def stop(self):
        """No more relation hooks; returns once the one running (if any) is done."""
        self._stopped = True
        if self._unsubscribe:
            self._unsubscribe()
        if self._watch is not None:
            self._watch.stop()
        for relation in self._joined.values():
            relation.stop_watching()
        for scheduler in self.schedulers.values():
            await scheduler.stop()

    # -- which relations ---------------------------------------------------------------

    async def _relations_changed(self, keys):
        if self._stopped or keys is None:
            return
        keys = set(keys)
        for key in sorted(set(self._joined) - keys):
            self._break(self._joined.pop(key))
        self._others &= keys
        for key in sorted(keys - set(self._joined) - self._others):
            try:
                data, _ = await nodes.read(self.client, relation_path(key))
            except NoNode:
                continue  # created and removed meanwhile
            except NoAuth:
                # Only the units of a relation's services may read it: not ours.
                self._others.add(key)
                continue
            except MalformedState as e:
                log.error("%s: %s", self.unit.name, e)
                self._others.add(key)
                continue
            relation = RelationState(key, data)
            if self.unit.service_name not in relation.services:
                self._others.add(key)
                continue
            await self._join(relation)

    async def _join(self, relation):
        joined = JoinedRelation(self.client, self.unit.name, relation, self._scheduler)
        self._joined[relation.key] = joined
        address = self.unit.data.get("private-address")
        try:
            await joined.join(address)
            # Hooks run as remote units are seen, not once all of them are.
            joined.scheduler.start()
            await joined.watch()
        except NoNode:
            # Removed while joining; the /relations watch says so next.
            log.info("%s: relation %s went while joining", self.unit.name, joined.relation_id)
            return
        except Exception:
            # ZooKeeper lost, say: forget it, so that the watch's next delivery (the
            # re-read after reconnecting) joins it again from the start.
            joined.stop_watching()
            await joined.scheduler.stop()
            del self._joined[relation.key]
            raise
        log.info("%s: joined relation %s (%s)", self.unit.name, joined.relation_id, relation.describe())

    def _scheduler(self, relation_name, relation_id):
        return HookScheduler(relation_name, relation_id, _RelationHooks(self, relation_id), self.state_dir)

    def _break(self, joined):
        joined.stop_watching()
        self._leaving[joined.relation_id] = joined.scheduler
        joined.scheduler.relation_broken()
        log.info("%s: relation %s removed", self.unit.name, joined.relation_id)

    def _break_forgotten(self):
        """Relations removed while the agent was down: their schedules are all that is
        left of them, and still owe -departed and -broken."""
        current = set(self.joined())
        for filename in sorted(os.listdir(self.state_dir)):
            if not filename.endswith(SCHEDULE_SUFFIX):
                continue
            relation_id = filename[: -len(SCHEDULE_SUFFIX)]
            if relation_id in current or relation_id in self._leaving:
                continue
            scheduler = self._scheduler(relation_id.rpartition(":")[0], relation_id)
            self._leaving[relation_id] = scheduler
            scheduler.relation_broken()
            scheduler.start()

    def _on_session(self, event):
        if event == "new-session" and not self._stopped:
            # Member nodes went with the old session.
            for joined in list(self._joined.values()):
                defer.ensureDeferred(joined.become_member()).addErrback(
                    lambda f, rid=joined.relation_id: log.warning("%s: rejoining %s: %s", self.unit.name, rid,
                                                                 f.getErrorMessage()))

    # -- what hooks did ----------------------------------------------------------------

    async def resolve(self, relation_id, retry=False):
        """Go on past the relation's failed hook (`ensemble resolved UNIT RELATION`):
        skip it, or with `retry` run it again."""
        scheduler = self.schedulers.get(relation_id)
        if scheduler is None:
            raise RelationNotInError(relation_id)
        scheduler.resolved(retry)
        if relation_id in self._errors:
            # A retry that fails again puts it back.
            del self._errors[relation_id]
            await self.unit.update(**{RELATION_ERRORS: dict(self._errors) or None})

    async def hook_done(self, hook, error):
        """Record a relation hook's outcome: `error` (why it failed) or None."""
        if hook.kind == BROKEN and error is None:
            self._leaving.pop(hook.relation_id, None)
        if self._errors.get(hook.relation_id) == error:
            return
        if error is None:
            self._errors.pop(hook.relation_id, None)
        else:
            self._errors[hook.relation_id] = error
        errors = dict(self._errors)
        await self.unit.update(**{RELATION_ERRORS: errors or None})


class _RelationHooks:
    """A relation's scheduler's HookExecutor: the unit's executor, reporting each
    outcome."""

    def __init__(self, relations, relation_id):
        self.relations = relations
        self.relation_id = relation_id

    async def run(self, hook):
        error = None
        try:
            await self.relations.executor.run(None, hook)
        except HookFailed as e:
            error = str(e)
        except Exception as e:
            log.exception("%s: %s", self.relations.unit.name, hook.name)
            error = f"{hook.name}: the unit agent failed: {e}"
        try:
            await self.relations.hook_done(hook, error)
        except Exception as e:
            log.warning("%s: cannot report %s: %s", self.relations.unit.name, hook.name, e)
        return error is None
