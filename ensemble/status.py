"""`ensemble status`: one read of the environment, shaped for people and scripts."""

import json

import yaml
from twisted.internet import defer

from ensemble.limits import format_memory
from ensemble.state.client import NoAuth
from ensemble.state.environment import get_environment
from ensemble.state.machine import MachineStateManager
from ensemble.state.relation import RelationStateManager
from ensemble.state.service import ServiceStateManager
from ensemble.state.unit import CHARM, DYING, OPEN_PORTS, RELATION_ERRORS, WORKLOAD, UnitStateManager


async def collect(client):
    environment = await get_environment(client)
    machines, services, units, relations = await defer.gatherResults(
        [
            defer.ensureDeferred(MachineStateManager(client).get_all_machines()),
            defer.ensureDeferred(ServiceStateManager(client).get_all_services()),
            defer.ensureDeferred(UnitStateManager(client).get_all_units()),
            defer.ensureDeferred(RelationStateManager(client).get_all_relations()),
        ],
        consumeErrors=True,
    )
    machine_alive = await defer.gatherResults(
        [defer.ensureDeferred(m.agent_alive()) for m in machines], consumeErrors=True
    )
    unit_alive = await defer.gatherResults(
        [defer.ensureDeferred(u.agent_alive()) for u in units], consumeErrors=True
    )
    result = {
        "environment": environment.get("name"),
        "network": environment.get("network"),
        "machines": {},
        "services": {},
    }
    for machine, alive in zip(machines, machine_alive):
        entry = {
            "address": machine.address,
            "subnet": machine.data.get("subnet"),
            "agent": "alive" if alive else "down",
        }
        for field in ("package-cache", "name-server", "template", "error", "network-error", "security-error"):
            if field in machine.data:
                entry[field] = machine.data[field]
        if not alive:
            # Both live in (or die with) the agent: what it last wrote no longer holds.
            for field in ("package-cache", "name-server"):
                if isinstance(entry.get(field), dict) and entry[field].get("state") == "running":
                    entry[field] = {**entry[field], "state": "down"}
        result["machines"][machine.id] = entry
    for service in services:
        entry = {}
        if "malformed" in service.data:
            entry["error"] = service.data["malformed"]
        else:
            entry["charm"] = service.charm_id
            try:
                entry["config"] = await service.get_config()
            except NoAuth:
                pass  # not the admin: config may hold secrets, so only its own units read it
            entry["limits"] = _limits(service.limits)
            if service.exposed:
                entry["exposed"] = True
            if service.life == DYING:
                entry["life"] = DYING
        shown = _relations(service.name, relations)
        if shown:
            entry["relations"] = shown  # {relation name: [related services]}, as pyjuju's status
        entry["units"] = {}
        result["services"][service.name] = entry
    for unit, alive in zip(units, unit_alive):
        entry = _unit_entry(unit, alive)
        service = result["services"].setdefault(unit.service_name, {"units": {}})
        if unit.data.get(CHARM) and service.get("charm") and unit.data[CHARM] != service["charm"]:
            entry["upgrading-from"] = unit.data[CHARM]  # an upgrade-charm has not reached it yet
        service["units"][unit.name] = entry
    return result


def _relations(service, relations):
    shown = {}
    for relation in relations:
        endpoint = relation.endpoint(service)
        if endpoint is None:
            continue
        remote = shown.setdefault(endpoint["relation-name"], [])
        remote.extend(s for s in relation.remote_services(service) if s not in remote)
    return {name: sorted(remote) for name, remote in sorted(shown.items())}


def _limits(limits):
    shown = dict(limits)
    if "memory" in shown:
        shown["memory"] = format_memory(shown["memory"])
    return shown


def _unit_entry(unit, alive):
    data = unit.data
    if "malformed" in data:
        return {"agent-state": "error", "error": data["malformed"]}
    entry = {
        "machine": data.get("machine"),
        "container": data.get("container"),
        "private-address": data.get("private-address"),
        "agent-state": unit.state,
        "agent": "alive" if alive else "down",
    }
    workload = data.get(WORKLOAD)
    if isinstance(workload, dict) and workload.get("hook"):
        # What the charm last did, beside what the agent is doing.
        status = workload.get("status")
        entry["workload"] = {"hook": workload["hook"], "result": "ok" if status == 0 else f"exit {status}",
                             "at": workload.get("at")}
    if data.get(OPEN_PORTS):
        entry[OPEN_PORTS] = list(data[OPEN_PORTS])
    if data.get("error"):
        entry["error"] = data["error"]
    if data.get(RELATION_ERRORS):
        # {relation id: the failed hook, its status and last lines}: the unit goes on.
        entry[RELATION_ERRORS] = dict(data[RELATION_ERRORS])
    if unit.life == DYING:
        entry["life"] = DYING
    return entry


def render(status, fmt="yaml"):
    if fmt == "json":
        return json.dumps(status, indent=2, sort_keys=True)
    return yaml.safe_dump(status, default_flow_style=False, sort_keys=False).rstrip()
