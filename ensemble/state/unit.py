"""Units: /units/<service>-<n> holds the unit's service, machine, life and what its
agents report (state, error, container, private-address); `agent` is present while
its unit agent runs."""

from twisted.internet import defer

from ensemble.errors import MalformedState, UnitNotFound
from ensemble.names import machine_key, unit_key, unit_name_from_key
from ensemble.state import nodes, presence
from ensemble.state.client import BadVersion, NoNode
from ensemble.state.watch import DataWatch

# What a unit's `state` field may say.
PENDING, INSTALLING, STARTED, STOPPING, ERROR = "pending", "installing", "started", "stopping", "error"
ALIVE, DYING = "alive", "dying"
# Fields the unit agent writes besides its state: the ports its hooks opened ("PORT/proto",
# which the machine agent's firewall follows) and {relation id: why its hook failed}.
OPEN_PORTS, RELATION_ERRORS = "open-ports", "relation-errors"
# The charm the unit's hooks run from (its service's, once an upgrade reached it).
CHARM = "charm"
# The last hook the unit ran: {hook, status (its exit status), at (UTC time)}.
WORKLOAD = "workload"
# Asked by `ensemble resolved`, cleared by the unit agent once acted on: {retry: bool}
# for the unit's own failed hook, {relation id: retry} for failed relation hooks.
RESOLVED, RELATION_RESOLVED = "resolved", "relation-resolved"


def unit_path(name):
    return f"{nodes.UNITS}/{unit_key(name)}"


def assignment_path(machine_id, name):
    return f"{nodes.MACHINES}/{machine_key(machine_id)}/units/{unit_key(name)}"


class UnitState:
    def __init__(self, client, name, data):
        self.client = client
        self.name = name
        self.data = data

    def __repr__(self):
        return f"<Unit {self.name}>"

    @property
    def path(self):
        return unit_path(self.name)

    @property
    def agent_path(self):
        return f"{self.path}/agent"

    @property
    def service_name(self):
        return self.name.rpartition("/")[0]

    @property
    def machine_id(self):
        return self.data.get("machine")

    @property
    def state(self):
        return self.data.get("state", PENDING)

    @property
    def life(self):
        return self.data.get("life", ALIVE)

    async def update(self, **fields):
        """Set fields on the unit node (None removes a field)."""

        try:
            self.data = await nodes.update(self.client, self.path, nodes.merge(fields))
        except NoNode:
            raise UnitNotFound(self.name)
        return self.data

    async def update_with(self, change):
        """Set the unit node to `change(data)`, re-read and retried on a concurrent write."""
        try:
            self.data = await nodes.update(self.client, self.path, change)
        except NoNode:
            raise UnitNotFound(self.name)
        return self.data

    async def set_state(self, state, error=None):
        return await self.update(state=state, error=error)

    async def watch(self, callback):
        """Call `callback(data)` now and on every change of the unit node (None: removed)."""

        def translate(value):
            if value is None:
                return callback(None)
            try:
                data = nodes.load(value[0], self.path)
            except MalformedState as e:
                data = {"malformed": str(e)}
            return callback(data)

        return await DataWatch(self.client, self.path, translate).start()

    async def register_agent(self, info):
        await presence.register(self.client, self.agent_path, info, f"unit {self.name}")

    async def agent_alive(self):
        return await presence.alive(self.client, self.agent_path)


class UnitStateManager:
    def __init__(self, client):
        self.client = client

    async def get_unit(self, name):
        path = unit_path(name)
        try:
            data, _ = await nodes.read(self.client, path)
        except NoNode:
            raise UnitNotFound(name)
        return UnitState(self.client, name, data)

    async def unit_names(self):
        """Every unit's name, by service then number; unreadable node names are skipped."""
        names = []
        for key in await self.client.get_children(nodes.UNITS):
            try:
                names.append(unit_name_from_key(key))
            except Exception:
                continue
        return sorted(names, key=lambda n: (n.rpartition("/")[0], int(n.rpartition("/")[2])))

    async def get_all_units(self):
        """Every unit; a malformed one comes back with `data = {'malformed': reason}`."""
        names = await self.unit_names()
        results = await defer.DeferredList(
            [defer.ensureDeferred(self.get_unit(n)) for n in names], consumeErrors=True
        )
        units = []
        for name, (ok, value) in zip(names, results):
            if ok:
                units.append(value)
            elif value.check(MalformedState):
                units.append(UnitState(self.client, name, {"malformed": str(value.value)}))
        return units

    async def remove_unit(self, name):
        """Unassign the unit and mark it dying, in one transaction. Its machine agent
        tears the unit down and removes its node."""
        while True:
            try:
                data, version = await nodes.read(self.client, unit_path(name))
            except NoNode:
                raise UnitNotFound(name)
            if data.get("life") == DYING:
                return
            tx = self.client.transaction()
            tx.set(unit_path(name), nodes.dump({**data, "life": DYING}), version)
            if data.get("machine") is not None:
                assignment = assignment_path(data["machine"], name)
                if await self.client.exists(assignment) is not None:
                    tx.delete(assignment)
            try:
                await tx.commit()
                return
            except (BadVersion, NoNode):
                # Changed under us (an agent wrote, or the assignment went): read again.
                continue
