"""Machines: /machines/machine-NNNNNNNNNN holds the host's details; its `units` children
are the units assigned to it (the only thing its agent watches); `agent` is present
while its machine agent runs; `reader` (where the environment has credentials) holds
the machines' reader credential, for this machine's agent alone (auth.join)."""

from twisted.internet import defer

from ensemble.errors import MachineBusy, MachineNotFound, MalformedState
from ensemble.names import machine_id_from_key, machine_key, unit_name_from_key
from ensemble.state import auth, nodes, presence
from ensemble.state.client import BadVersion, NoNode, NotEmpty
from ensemble.state.watch import ChildrenWatch


class MachineState:
    def __init__(self, client, machine_id, data):
        self.client = client
        self.id = machine_id
        self.data = data

    def __repr__(self):
        return f"<Machine {self.id}>"

    @property
    def key(self):
        return machine_key(self.id)

    @property
    def path(self):
        return f"{nodes.MACHINES}/{self.key}"

    @property
    def units_path(self):
        return f"{self.path}/units"

    @property
    def agent_path(self):
        return f"{self.path}/agent"

    @property
    def address(self):
        return self.data.get("address")

    async def assigned_units(self):
        """Names ('web/0') of the units assigned to this machine, sorted."""
        try:
            keys = await self.client.get_children(self.units_path)
        except NoNode:
            raise MachineNotFound(self.id)
        return sorted(_unit_names(keys), key=_unit_sort_key)

    async def watch_assigned_units(self, callback):
        """Call `callback(names)` now and whenever the assignments change (None: machine gone)."""

        def translate(keys):
            return callback(None if keys is None else sorted(_unit_names(keys), key=_unit_sort_key))

        return await ChildrenWatch(self.client, self.units_path, translate).start()

    async def update(self, **fields):
        """Set fields on the machine node (None removes a field)."""
        self.data = await nodes.update(self.client, self.path, nodes.merge(fields))
        return self.data

    async def register_agent(self, info):
        await presence.register(self.client, self.agent_path, info, f"machine {self.id}")

    async def agent_alive(self):
        return await presence.alive(self.client, self.agent_path)

    async def agent_owner(self):
        """What the present agent says of itself ({pid, host, ...}), or None."""
        return await presence.owner(self.client, self.agent_path)


def reader_data(policy):
    """A reader node's data: the machines' reader credential."""
    return nodes.dump({"credential": str(auth.machines_reader(policy.admin))})


def _unit_names(keys):
    names = []
    for key in keys:
        try:
            names.append(unit_name_from_key(key))
        except Exception:
            # A malformed assignment must not hide the others; agents report it.
            names.append(key)
    return names


def _unit_sort_key(name):
    service, _, number = name.rpartition("/")
    return (service, int(number) if number.isdigit() else -1, name)


class MachineStateManager:
    def __init__(self, client):
        self.client = client

    async def add_machine(self, address=None, **fields):
        """Register a machine; ids count up from 0 and are never reused."""
        data = {"address": address, **fields}
        while True:
            counter, version = await nodes.read(self.client, nodes.MACHINES)
            machine_id = int(counter.get("next-id", 0))
            machine = MachineState(self.client, machine_id, data)
            policy = auth.admin_policy(self.client)
            if policy is not None:
                # Before the machine exists, so its agent never meets a parent it may
                # not use. A lost race grants the same id, which the winner then has.
                for path, perms in auth.MACHINE_PARENT_GRANTS.items():
                    await auth.change_grants(self.client, path, add=[auth.digest(perms, policy.machine(machine_id))])
            tx = self.client.transaction()
            tx.set(nodes.MACHINES, nodes.dump({**counter, "next-id": machine_id + 1}), version)
            tx.create(machine.path, nodes.dump(data), acl=policy and policy.machine_node(machine_id))
            tx.create(machine.units_path, b"", acl=policy and policy.public())
            if policy is not None:
                # Its address reservations: made here so no other machine can make them.
                tx.create(f"{nodes.ADDRESSES}/{machine_key(machine_id)}", b"", acl=policy.machine_node(machine_id))
                tx.create(auth.reader_path(machine_id), reader_data(policy), acl=policy.machine_reader(machine_id))
            try:
                await tx.commit()
            except BadVersion:
                continue
            return machine

    async def remove_machine(self, machine_id):
        """Deregister a machine with no units and no running agent; its subnet lease and
        address reservations go in the same transaction (dead_machine.py removes the
        units of a machine whose agent will never run again first)."""
        from ensemble.state.network import release_ops

        from ensemble.state.unit import UnitStateManager

        machine = await self.get_machine(machine_id)
        units = await machine.assigned_units()
        if units:
            raise MachineBusy(f"machine {machine_id} still has units: {', '.join(units)}; remove them first "
                              f"(or, if its agent will never run again, remove-machine --force)")
        # Unassigned but not yet torn down: only this machine's agent can finish them.
        leaving = [u.name for u in await UnitStateManager(self.client).get_all_units() if u.machine_id == machine_id]
        if leaving:
            raise MachineBusy(
                f"machine {machine_id} is still removing units: {', '.join(leaving)}; "
                f"start its agent to finish, then remove the machine (or, if its agent will never run "
                f"again, remove-machine --force)"
            )
        if await machine.agent_alive():
            raise MachineBusy(f"machine {machine_id}'s agent is running; stop it first")
        tx = self.client.transaction()
        await release_ops(self.client, machine_id, tx)
        if await self.client.exists(auth.reader_path(machine_id)) is not None:
            tx.delete(auth.reader_path(machine_id))
        tx.delete(machine.units_path)
        tx.delete(machine.path)
        try:
            await tx.commit()
        except (NoNode, NotEmpty, BadVersion):
            raise MachineBusy(f"machine {machine_id} changed while being removed; try again")
        policy = auth.admin_policy(self.client)
        if policy is not None:
            for path in auth.MACHINE_PARENT_GRANTS:
                await auth.change_grants(self.client, path, remove_ids={policy.machine(machine_id).id})

    async def get_machine(self, machine_id):
        path = f"{nodes.MACHINES}/{machine_key(machine_id)}"
        try:
            data, _ = await nodes.read(self.client, path)
        except NoNode:
            raise MachineNotFound(machine_id)
        return MachineState(self.client, int(machine_id), data)

    async def machine_ids(self):
        ids = []
        for key in await self.client.get_children(nodes.MACHINES):
            try:
                ids.append(machine_id_from_key(key))
            except Exception:
                continue
        return sorted(ids)

    async def get_all_machines(self):
        """Every readable machine; a malformed one comes back with `data = {'error': ...}`."""
        ids = await self.machine_ids()
        results = await defer.DeferredList(
            [defer.ensureDeferred(self.get_machine(i)) for i in ids], consumeErrors=True
        )
        machines = []
        for machine_id, (ok, value) in zip(ids, results):
            if ok:
                machines.append(value)
            elif value.check(MalformedState):
                machines.append(MachineState(self.client, machine_id, {"error": str(value.value)}))
        return machines

    async def unit_counts(self):
        """{machine id: number of assigned units}, for placement."""
        ids = await self.machine_ids()
        counts = await defer.gatherResults(
            [self.client.get_children(f"{nodes.MACHINES}/{machine_key(i)}/units") for i in ids],
            consumeErrors=True,
        )
        return {i: len(children) for i, children in zip(ids, counts)}
