"""The units assigned to this machine: each has its address reserved and published
and its container running; units leaving are torn down (container, address, nodes);
containers nobody owns are destroyed. A container is created or started only through
the host's safeguards: while a layer of the units' isolation is not in place, the unit
waits (`pending`) and the machine says why (safeguards.py)."""

import ipaddress
import logging

from twisted.internet import defer

from ensemble.errors import EnsembleError, MalformedState, UnitNotFound
from ensemble.machine import safeguards
from ensemble.machine.reconciler import Reconciler
from ensemble.network.ipam import AddressesExhausted
from ensemble.state.client import NoAuth, NoNode
from ensemble.state.service import ServiceStateManager
from ensemble.state.unit import DYING, ERROR, PENDING, UnitStateManager

log = logging.getLogger("ensemble.machine")

ADDRESS_ERROR_PREFIX = "no free address"
# A unit agent reports within seconds of its container's start; one that has not after
# this long never will by itself (an interpreter containers lack, say): say so.
AGENT_REPORT_TIMEOUT = 60.0
SILENT_AGENT_PREFIX = "unit agent did not report"


def public_address(machine_address):
    """The machine's address as its units' public address: where other hosts reach
    the machine. A loopback address (a local environment's machine 0) reaches nothing
    from elsewhere, so it is none."""
    if not machine_address:
        return None
    try:
        return None if ipaddress.ip_address(machine_address).is_loopback else machine_address
    except ValueError:
        return machine_address  # a host name: as the operator gave it


class UnitsReconciler(Reconciler):
    """With a `deployer` (and so a container driver), every assigned unit gets its own
    running container; without one, units get addresses only. `listeners` hear
    `unit_addressed(unit)` and `unit_leaving(name)` (the firewall, say), and those that
    have them `unit_started(unit)` (its container just started) and
    `unit_released(name, address)` (its container gone, its address freed). With a
    `refusal` (why this host cannot run units), units get it as their error instead."""

    name = "units"
    # Reservations are re-read from ZooKeeper this often (and at start): between
    # reads the allocator's own view serves, which misses what others wrote.
    audit_interval = 30.0
    max_concurrent_deploys = 8

    def __init__(self, host, deployer=None, listeners=(), refusal=None):
        super().__init__(host)
        self.deployer = deployer
        self.refusal = refusal
        self.listeners = list(listeners)
        self.assigned = []
        self._removed = set()     # unassigned since the last pass
        self._first_assignments = True
        self._audited = None
        self._running_containers = None
        self._listed = set()      # this pass: containers of units here, as listed at its start
        self._asking_lxc = defer.DeferredLock()
        self._limits = {}
        self._watch = None
        self._started_at = {}     # unit -> when this agent saw its container start
        self._deploys = defer.DeferredSemaphore(self.max_concurrent_deploys)
        # Units deployed at once while a pass runs: as many again, not queued behind it.
        self._deploys_now = defer.DeferredSemaphore(self.max_concurrent_deploys)
        self._deploying_now = set()  # units deployed at once, under way or queued
        self._unit_locks = {}     # unit -> DeferredLock: one operation on a unit at a time
        # Units that waited start as soon as the last missing layer is back.
        host.safeguards.opened.append(self._gate_opened)

    def _gate_opened(self):
        if self.deployer is not None:
            defer.ensureDeferred(self.sync_quietly())

    async def start(self):
        await self.finish_orphaned_removals()
        self._watch = await self.host.machine.watch_assigned_units(self.assignments_changed)

    async def assignments_changed(self, names):
        if names is None:
            log.warning("%s: machine removed from the environment", self.host.name)
            names = []
        previous = self.assigned
        added = [n for n in names if n not in previous]
        removed = [n for n in previous if n not in names]
        self.assigned = list(names)
        self._removed.update(removed)
        log.info(
            "%s: assigned units: %s (added: %s; removed: %s)", self.host.name,
            ", ".join(names) or "none", ", ".join(added) or "none", ", ".join(removed) or "none",
        )
        first, self._first_assignments = self._first_assignments, False
        if added and self.deployer is not None and not first:
            # Someone is waiting for them: deployed now, each alone. Not in a pass over
            # every unit here, whose checks of the others slow theirs, nor after one
            # under way (a tick's takes ~0.2 s with 40 units). The ticks' passes look
            # at the others.
            for name in added:
                defer.ensureDeferred(self._deploy_now(name))
            if not removed:
                return
        # Not awaited: the watch would hold the next change until this pass is done.
        defer.ensureDeferred(self.sync_quietly())

    async def _deploy_now(self, name):
        self._deploying_now.add(name)
        try:
            await self._deploys_now.acquire()
            try:
                limits = await self._service_limits({name.rpartition("/")[0]})
                await self._guard(name, self.ensure_unit(name, limits))
            finally:
                self._deploys_now.release()
        finally:
            self._deploying_now.discard(name)

    def tick(self):
        # Containers stop behind our back (OOM, a host admin, a reboot): look again
        # regularly, not only when ZooKeeper changes. Without containers there is
        # nothing on the host to drift.
        if self.deployer is None:
            return None
        return super().tick()

    async def converge(self):
        now = self.host.reactor.seconds()
        if self._audited is None or now - self._audited >= self.audit_interval:
            if self._audited is not None:
                await self.host.allocator.refresh()
            self._audited = now
        assigned, removed, self._removed = list(self.assigned), self._removed, set()
        wanted = set(assigned)
        # The allocator's view, read from ZooKeeper once per agent start (so it holds
        # leaks from before a crash) and kept current by its own takes and releases.
        # Less what is assigned by now: a unit added meanwhile may be deploying already.
        leaving = (removed | set(await self.host.allocator.reserved())) - wanted - set(self.assigned)
        # Removals first: what they free may be what a waiting unit needs.
        await self._bounded(sorted(leaving), self.finish_removal)
        self._running_containers = None
        self._listed = set()
        if self.deployer is not None:
            driver = self.deployer.driver
            expected = {self.deployer.container_for(u) for u in wanted | leaving}
            listed = set(await driver.list())
            expected |= {self.deployer.container_for(u) for u in self.assigned}  # as for `leaving`
            for orphan in sorted(listed - expected):
                log.warning("%s: destroying %s, which no unit here owns", self.host.name, orphan)
                await driver.destroy(orphan)
            self._listed = listed & expected
            self._limits = await self._service_limits({u.rpartition("/")[0] for u in wanted})
        # A unit deployed at once (under way or queued) is that deploy's to finish:
        # waiting for it, or deploying it too, held this pass, and every other unit's
        # next look, as long as a burst of deploys lasted (29.6 and 38.5 s for 234
        # units added at once). The next pass looks at it.
        wanted -= self._deploying_now
        # Units without a container first: someone is waiting for them, and they need
        # not wait for LXC to say which containers run (`_running`).
        await self._bounded(sorted(wanted, key=lambda n: (self._has_container(n), n)), self.ensure_unit)

    def _has_container(self, name):
        return self.deployer is not None and self.deployer.container_for(name) in self._listed

    async def _containers_running(self, name):
        """The containers running now if `name` has one (asked of LXC once per pass, by
        the first unit that needs it); none if it has none yet."""
        if not self._has_container(name):
            return frozenset()
        async with self._asking_lxc:
            if self._running_containers is None:
                self._running_containers = await self.deployer.driver.running()
        return self._running_containers

    async def _bounded(self, names, work):
        """`work(name)` for each of `names`, in that order, at most
        max_concurrent_deploys at a time."""
        await defer.gatherResults(
            [self._deploys.run(lambda n=n: defer.ensureDeferred(self._guard(n, work(n)))) for n in names],
            consumeErrors=True,
        )

    async def _guard(self, name, work):
        # One operation on a unit at a time (a pass's, one deploying it at once); and
        # one unit's trouble must never stop the others.
        lock = self._unit_locks.setdefault(name, defer.DeferredLock())
        await lock.acquire()
        try:
            await work
        except NoAuth:
            # Nothing can be written to the unit: not even its error. The machine says it.
            self.host.safeguards.report(safeguards.CREDENTIALS, safeguards.REFUSED, unit=name)
        except Exception as e:
            log.exception("%s: unit %s failed", self.host.name, name)
            await self._mark_error(name, f"machine agent: {e}")
        finally:
            lock.release()
            if not lock.locked and not lock.waiting:
                self._unit_locks.pop(name, None)

    async def _mark_error(self, name, reason):
        try:
            unit = await UnitStateManager(self.host.client).get_unit(name)
            await unit.update(state=ERROR, error=reason)
        except (EnsembleError, NoNode):
            pass

    async def ensure_unit(self, name, limits=None):
        """The unit's address reserved and published, and its container running.
        `limits`: {service: its limits}, if not this pass's."""
        limits = self._limits if limits is None else limits
        try:
            unit = await UnitStateManager(self.host.client).get_unit(name)
        except UnitNotFound:
            log.warning("%s: assignment of %s, which does not exist; ignored", self.host.name, name)
            return
        except MalformedState as e:
            # Once per distinct problem, not on every 5 s pass; status shows it all along.
            self.host.report_once(f"{e}; leaving it alone")
            return
        if unit.life == DYING:
            return
        address = await self.ensure_address(unit)
        if address is None:
            return
        if self.refusal is not None or self.deployer is None:
            await self._tell_addressed(unit)
            if self.refusal is not None and unit.data.get("error") != self.refusal:
                await unit.update(state=ERROR, error=self.refusal)
            return
        safeguards, limits = self.host.safeguards, limits.get(unit.service_name)
        running_now = await self._containers_running(name)
        state = "RUNNING" if self.deployer.container_for(name) in running_now else None
        cleared = state is None
        if cleared:
            # Made while its listeners take it in (the firewall loads its port's entry,
            # ~12 ms): only its start needs that, and the gate asks for it then.
            addressed = defer.ensureDeferred(self._tell_addressed(unit))
            try:
                if await safeguards.clear_to_create(unit, limits) is None:
                    state = await self.deployer.make(unit, address, limits, running_now)
            except BaseException:
                await addressed.addErrback(lambda _: None)  # its own failure: the next pass's
                raise
            await addressed
            if state is None:
                return  # it waits, with the gate's reason
        else:
            await self._tell_addressed(unit)
        if state != "RUNNING" or safeguards.held(name):
            # About to start it (or it waits already): the gate. What runs keeps
            # running; only a start waits.
            waiting = await safeguards.clear_to_start(unit, limits, creation_cleared=cleared)
            if waiting is not None and state != "RUNNING":
                return
        started = await self.deployer.run(unit, state)
        if started:
            # Its agent runs once its port is held to its identity (layer 2): before
            # that the host cannot answer it (no neighbour entry yet), and a forked
            # agent, quick to connect, lost its first SYN and waited 1 s to retry.
            try:
                for listener in self.listeners:
                    if hasattr(listener, "unit_started"):
                        await listener.unit_started(unit)
            finally:
                await self.deployer.start_agent(name)
        now = self.host.reactor.seconds()
        if started or name not in self._started_at:
            self._started_at[name] = now
        if unit.state == PENDING and now - self._started_at[name] >= AGENT_REPORT_TIMEOUT:
            await self._silent_agent(unit)

    async def _tell_addressed(self, unit):
        for listener in self.listeners:
            await listener.unit_addressed(unit)

    async def _silent_agent(self, unit):
        if await unit.agent_alive():
            return
        tail = self.deployer.agent_log_tail(unit.name)
        reason = f"{SILENT_AGENT_PREFIX} within {AGENT_REPORT_TIMEOUT:g}s of its container's start: {tail}"
        log.error("%s: %s: %s", self.host.name, unit.name, reason)
        await unit.update(state=ERROR, error=reason)

    async def _service_limits(self, names):
        """{service: limits}, one read per service per pass rather than one per unit."""
        services = ServiceStateManager(self.host.client)
        results = await defer.DeferredList(
            [defer.ensureDeferred(services.get_service(n)) for n in sorted(names)], consumeErrors=True
        )
        return {n: value.limits for n, (ok, value) in zip(sorted(names), results) if ok}

    async def ensure_address(self, unit):
        name = unit.name
        try:
            address = await self.host.allocator.allocate(name)
        except AddressesExhausted as e:
            log.error("%s: %s: %s", self.host.name, name, e)
            await unit.update(state=ERROR, error=str(e))
            return None
        changes = {}
        if unit.data.get("private-address") != address:
            changes["private-address"] = address
            log.info("%s: %s has address %s", self.host.name, name, address)
        public = public_address(self.host.machine.address)
        if unit.data.get("public-address") != public:
            changes["public-address"] = public  # None removes it: `unit-get` falls back to the private one
        if unit.state == ERROR and str(unit.data.get("error", "")).startswith(ADDRESS_ERROR_PREFIX):
            changes.update(state=PENDING, error=None)
        if changes:
            await unit.update(**changes)
        return address

    async def finish_removal(self, name):
        """The unit is no longer assigned here: destroy its container (after its stop
        hook), free its address, and if it is dying remove its nodes (and its
        service's, if that was the last unit). Each step is safe to repeat."""
        await self._finish_removal(name)
        # Done with it here: what held it no longer matters.
        self.host.safeguards.forget(name)

    async def _finish_removal(self, name):
        self._started_at.pop(name, None)
        for listener in self.listeners:
            await listener.unit_leaving(name)
        if self.deployer is not None:
            await self.deployer.teardown(name)
        address = await self.host.allocator.release(name)
        if address:
            log.info("%s: released %s of %s", self.host.name, address, name)
        for listener in self.listeners:
            if hasattr(listener, "unit_released"):
                await listener.unit_released(name, address)
        try:
            unit = await UnitStateManager(self.host.client).get_unit(name)
        except (UnitNotFound, MalformedState):
            return
        if unit.life != DYING or unit.machine_id != self.host.machine_id:
            return
        await self.host.client.delete_tree(unit.path)
        log.info("%s: removed %s", self.host.name, name)
        await ServiceStateManager(self.host.client).remove_service_if_done(unit.service_name)

    async def finish_orphaned_removals(self):
        """Units of this machine left dying by a crash between their steps."""
        assigned = set(await self.host.machine.assigned_units())
        for unit in await UnitStateManager(self.host.client).get_all_units():
            if unit.machine_id == self.host.machine_id and unit.life == DYING and unit.name not in assigned:
                await self._guard(unit.name, self.finish_removal(unit.name))

    async def stop(self):
        await super().stop()
        if self._watch:
            self._watch.stop()
