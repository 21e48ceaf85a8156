"""A HookState held in memory, for tests and benchmarks of the hook tools: the unit's
relations, settings, members, config and addresses as plain data, changed by the
caller at will (as other units and `ensemble set` would), with a count of reads."""

from collections import Counter

from ensemble.unit.tools.context import UnitNotInRelation


class MemoryState:
    def __init__(self, unit_name, relations=None, settings=None, members=None, config=None, addresses=None):
        self.unit_name = unit_name
        self.relations_by_id = dict(relations or {})  # relation id -> relation name
        self.settings = {key: dict(value) for key, value in (settings or {}).items()}  # (rid, unit) -> {}
        self.members = {rid: list(units) for rid, units in (members or {}).items()}
        self.config_values = dict(config or {})
        self.unit_addresses = dict(addresses or {})
        self.ports = set()  # {(port, protocol)}
        self.reads = Counter()  # what was read, how often: ("settings", rid, unit), ("config",)…

    async def relations(self):
        self.reads["relations",] += 1
        return dict(self.relations_by_id)

    async def relation_settings(self, relation_id, unit):
        self.reads["settings", relation_id, unit] += 1
        if (relation_id, unit) not in self.settings:
            raise UnitNotInRelation(relation_id, unit)
        return dict(self.settings[relation_id, unit])

    async def relation_members(self, relation_id):
        self.reads["members", relation_id] += 1
        return list(self.members.get(relation_id, []))

    async def config(self):
        self.reads["config",] += 1
        return dict(self.config_values)

    async def addresses(self):
        self.reads["addresses",] += 1
        return dict(self.unit_addresses)

    async def open_port(self, port, protocol):
        self.ports.add((port, protocol))

    async def close_port(self, port, protocol):
        self.ports.discard((port, protocol))
