"""A machine whose agent will never run again (`remove-machine --force`): what its
agent's teardown of each of its units would have done in ZooKeeper, done here instead.
Above machine, service, unit, network and relation state, which it uses alike."""

from ensemble.errors import MachineBusy
from ensemble.names import unit_key
from ensemble.state import auth, quota
from ensemble.state.client import NoNode
from ensemble.state.machine import MachineStateManager
from ensemble.state.network import ZooKeeperAddressStore
from ensemble.state.relation import ROLES, RelationStateManager, role_path, settings_path
from ensemble.state.service import ServiceStateManager
from ensemble.state.unit import UnitStateManager


async def force_remove_machine(client, machine_id):
    """Remove the machine's units as its agent would have, then the machine; returns
    the units removed."""
    machines = MachineStateManager(client)
    removed = await remove_units_of_dead_machine(client, await machines.get_machine(machine_id))
    await machines.remove_machine(machine_id)
    return removed


async def remove_units_of_dead_machine(client, machine):
    """Do for each unit of `machine` (assigned, or unassigned and not yet torn down)
    what its agent's teardown does in ZooKeeper (ensemble/machine/reconcilers/
    units.py), as no agent will: unassign it, free its address, remove its nodes,
    and its service if it was a dying one's last unit. Returns their names. Refused
    while the machine's agent, or one of its units' agents, is alive: their
    containers still run. Each step is safe to repeat."""
    if await machine.agent_alive():
        raise MachineBusy(
            f"machine {machine.id}'s agent is running: remove its units with remove-unit and let it tear "
            f"them down, then remove the machine without --force"
        )
    units = UnitStateManager(client)
    mine = [u for u in await units.get_all_units() if u.machine_id == machine.id]
    for unit in mine:
        if await unit.agent_alive():
            raise MachineBusy(
                f"unit {unit.name} on machine {machine.id} still has a running agent; "
                f"--force is for a machine whose agents are gone"
            )
    # Assignments whose unit node is gone or unreadable: nothing else to remove for them.
    known = {unit_key(u.name) for u in mine}
    for key in await client.get_children(machine.units_path):
        if key not in known:
            try:
                await client.delete(f"{machine.units_path}/{key}")
            except NoNode:
                pass
    addresses = ZooKeeperAddressStore(client, machine.id)
    services = ServiceStateManager(client)
    for unit in mine:
        await units.remove_unit(unit.name)
        await addresses.free(unit.name)
        await _remove_relation_nodes(client, unit.name)
        await client.delete_tree(unit.path)
        if auth.admin_policy(client) is not None:
            await quota.forget(client, unit.path)
        await services.remove_service_if_done(unit.service_name)
    return [u.name for u in mine]


async def _remove_relation_nodes(client, unit_name):
    """A removed unit's settings node in each relation of its service, and its member
    node if its (dead) agent's session left one; with their quotas."""
    settings, members = [], []
    for relation in await RelationStateManager(client).relations_of(unit_name.rpartition("/")[0]):
        settings.append(settings_path(relation.key, unit_name))
        members += [f"{role_path(relation.key, role)}/{unit_key(unit_name)}" for role in ROLES]
    for path in members + settings:
        try:
            await client.delete(path)
        except NoNode:
            pass
    if auth.admin_policy(client) is not None:
        for path in settings:
            await quota.forget(client, path)
