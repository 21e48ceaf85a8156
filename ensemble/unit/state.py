"""The unit's state in ZooKeeper as its hooks see it through the hook tools: the
`HookState` of ensemble.unit.tools.context, read fresh on every call (the hook's
CachedHookContext keeps what a hook read), and the commit of a hook's relation
settings once it exited 0.

The relations it knows are those the unit agent follows (`RelationIndex`): a hook
cannot name a relation its unit has not joined, nor read a unit outside it.
"""

import logging
from typing import Protocol

from ensemble.charm import config_values, read_options
from ensemble.errors import EnsembleError, MalformedState, SettingsTooLarge
from ensemble.network.ports import parse_port
from ensemble.state import nodes
from ensemble.state.client import NoNode, QuotaExceeded
from ensemble.state.quota import SETTINGS_BYTES
from ensemble.state.relation import settings_path
from ensemble.state.service import ServiceStateManager
from ensemble.state.unit import OPEN_PORTS
from ensemble.unit.tools.context import UnitNotInRelation

log = logging.getLogger("ensemble.unit")


class RelationIndex(Protocol):
    """The relations a unit agent follows, by hook id ('db:0')."""

    def joined(self) -> dict:
        """{relation id: its JoinedRelation} (see ensemble.unit.relations)."""


class ZooKeeperHookState:
    """A HookState over `client` for `unit` (a UnitState), whose charm is unpacked in
    `charm_dir` (its config.yaml gives the options and defaults)."""

    def __init__(self, client, unit, charm_dir, relations: RelationIndex):
        self.client = client
        self.unit = unit
        self.unit_name = unit.name
        self.charm_dir = charm_dir
        self.index = relations

    def _relation(self, relation_id, unit=None):
        relation = self.index.joined().get(relation_id)
        if relation is None or (unit is not None and unit.rpartition("/")[0] not in relation.services):
            raise UnitNotInRelation(relation_id, unit)
        return relation

    async def relations(self):
        return {rid: relation.name for rid, relation in self.index.joined().items()}

    async def relation_settings(self, relation_id, unit):
        relation = self._relation(relation_id, unit)
        try:
            data, _ = await nodes.read(self.client, settings_path(relation.key, unit))
        except NoNode:
            raise UnitNotInRelation(relation_id, unit)
        return {str(k): "" if v is None else str(v) for k, v in data.items()}

    async def relation_members(self, relation_id):
        relation = self._relation(relation_id)
        return await relation.present_members()

    async def config(self):
        service = await ServiceStateManager(self.client).get_service(self.unit.service_name)
        options = read_options(self.charm_dir, service.name)
        return config_values(options, await service.get_config())

    async def addresses(self):
        data, _ = await nodes.read(self.client, self.unit.path)
        return {"private-address": data.get("private-address"), "public-address": data.get("public-address")}

    async def open_port(self, port, protocol):
        await self._ports(lambda ports: ports | {(port, protocol)})

    async def close_port(self, port, protocol):
        await self._ports(lambda ports: ports - {(port, protocol)})

    async def _ports(self, change):
        """Change the unit's opened ports now: the firewall follows them at once,
        whatever the hook's exit status (as in pyjuju)."""

        def update(data):
            ports = set()
            for text in data.get(OPEN_PORTS) or []:
                try:
                    ports.add(parse_port(text))
                except ValueError:
                    continue  # not ours to keep
            return {**data, OPEN_PORTS: [f"{p}/{proto}" for p, proto in sorted(change(ports))]}

        self.unit.data = await nodes.update(self.client, self.unit.path, update)

    async def commit(self, changes):
        """Merge a hook's relation settings ({relation id: {key: value or None}}) into
        this unit's settings nodes. Keys set meanwhile by nobody else are ours alone
        (only this unit writes its node), so a plain version-checked merge suffices.
        A relation that went meanwhile is skipped: nobody will read it."""
        for relation_id, settings in sorted(changes.items()):
            relation = self.index.joined().get(relation_id)
            if relation is None:
                log.info("%s: relation %s went before its settings were committed", self.unit_name, relation_id)
                continue
            try:
                await nodes.update(self.client, settings_path(relation.key, self.unit_name), nodes.merge(settings))
            except NoNode:
                log.info("%s: relation %s went before its settings were committed", self.unit_name, relation_id)
            except QuotaExceeded as e:
                raise SettingsTooLarge(relation_id, SETTINGS_BYTES) from e
            except MalformedState as e:
                raise SettingsUnreadable(relation_id, e) from e


class SettingsUnreadable(EnsembleError):
    def __init__(self, relation_id, reason):
        super().__init__(f"relation {relation_id}: this unit's settings node is unreadable: {reason}")
