"""What a hook may read and write through the hook tools.

- `HookContext`: the interface the hook-tool server calls, one instance per running
  hook.
- `HookState`: what the unit agent supplies: fresh reads of the unit's state and the
  immediate port changes (on ZooKeeper in the agent; `memory.MemoryState` in tests).
- `CachedHookContext`: the HookContext over a HookState that gives a hook a
  consistent view: each thing it reads is read once and kept for the hook's life, its
  own relation writes are visible to its own reads, and those writes are only buffered
  (`changes`) for the agent to commit if the hook exits 0. Ports take effect at once.
"""

import logging
from typing import Any, Protocol

from ensemble.errors import EnsembleError
from ensemble.network.ports import PROTOCOLS

UNIT_ADDRESSES = ("private-address", "public-address")


class HookToolError(EnsembleError):
    """A hook tool's request that cannot be answered; the tool prints the message."""


class NotInRelationHook(HookToolError):
    def __init__(self):
        super().__init__("not in a relation hook: give -r RELATION_ID")


class RelationNotFound(HookToolError):
    def __init__(self, relation_id):
        super().__init__(f"relation {relation_id!r} not found (relation-ids lists this unit's relations)")


class UnitNotInRelation(HookToolError):
    def __init__(self, relation_id, unit):
        super().__init__(f"unit {unit!r} is not in relation {relation_id!r}")


class NoUnitGiven(HookToolError):
    def __init__(self):
        super().__init__("no unit given, and JUJU_REMOTE_UNIT is not set: give UNIT")


class RelationBroken(HookToolError):
    pass


class RelationNameRequired(HookToolError):
    def __init__(self):
        super().__init__("relation name must be specified (JUJU_RELATION is not set)")


class NoSuchUnitSetting(HookToolError):
    def __init__(self, key):
        super().__init__(f"Unit has no setting: {key!r}")  # pyjuju's words


class InvalidSetting(HookToolError):
    pass


class InvalidPort(HookToolError):
    pass


class HookContext(Protocol):
    """One running hook's view, as the hook tools use it. Relation arguments that are
    None mean "not given": the hook's own relation, its remote unit, all keys."""

    async def relation_get(self, relation_id: str | None, unit: str | None, key: str | None) -> str | dict[str, str]:
        """`key`'s value ("" when unset), or all settings when `key` is None."""

    async def relation_set(self, relation_id: str | None, settings: dict[str, str]) -> None:
        """Buffer these settings of the local unit; a blank value deletes its key."""

    async def relation_ids(self, relation_name: str | None) -> list[str]:
        """The ids ("db:0") of the local service's relations named `relation_name`."""

    async def relation_list(self, relation_id: str | None) -> list[str]:
        """The remote units of the relation."""

    async def config_get(self, option: str | None) -> Any:
        """An option's value, default applied (None if none); every option that has a
        value when `option` is None."""

    async def unit_get(self, key: str) -> str:
        """'private-address' or 'public-address' of the local unit."""

    async def open_port(self, port: int, protocol: str) -> None:
        """Open the port now (not at the hook's end)."""

    async def close_port(self, port: int, protocol: str) -> None:
        """Close the port now."""

    def log(self, level: int, message: str) -> None:
        """Log a message of the hook's at a `logging` level."""


class HookState(Protocol):
    """The unit's state as the agent reads it, fresh on every call."""

    unit_name: str

    async def relations(self) -> dict[str, str]:
        """{relation id: relation name} for every relation of the local service."""

    async def relation_settings(self, relation_id: str, unit: str) -> dict[str, str]:
        """A unit's settings in a relation; UnitNotInRelation if it has none."""

    async def relation_members(self, relation_id: str) -> list[str]:
        """The remote units present in the relation (the local unit left out)."""

    async def config(self) -> dict[str, Any]:
        """Every option of the charm: its value, else its default, else None."""

    async def addresses(self) -> dict[str, str | None]:
        """{'private-address': …, 'public-address': … or None when unknown}."""

    async def open_port(self, port: int, protocol: str) -> None:
        ...

    async def close_port(self, port: int, protocol: str) -> None:
        ...


class CachedHookContext:
    """A HookContext for one hook of `state`'s unit.

    `relation_id`: the relation of a relation hook (None for the others); `members`:
    its remote units as of the change the hook runs for (relation-list prints that
    snapshot; read from `state` when None); `broken`: the hook is -relation-broken (the
    relation is gone: no members, no writes, only the local unit's settings)."""

    def __init__(self, state, hook, relation_id=None, members=None, broken=False, logger=None):
        self.state = state
        self.hook = hook
        self.unit_name = state.unit_name
        self.relation_id = relation_id
        self.broken = broken
        self.logger = logger or logging.getLogger("ensemble.unit.hook")
        self._settings = {}  # (relation id, unit) -> settings as first read
        self._members = {} if members is None or relation_id is None else {relation_id: list(members)}
        self._writes = {}  # relation id -> {key: value, or None to delete}
        self._relations = None
        self._config = None
        self._addresses = None

    @property
    def changes(self):
        """{relation id: {key: value, or None to delete}}: the relation settings this
        hook set, for the agent to merge into each node if the hook exits 0."""
        return {rid: dict(writes) for rid, writes in self._writes.items() if writes}

    # -- relations ---------------------------------------------------------------------

    async def relation_get(self, relation_id, unit, key):
        relation_id = await self._relation(relation_id)
        broken = self._is_broken(relation_id)
        if unit is None:
            if not broken:
                raise NoUnitGiven()
            unit = self.unit_name  # -broken has no remote unit: its own settings, as pyjuju
        if broken and unit != self.unit_name:
            raise RelationBroken(f"cannot read other units' settings in broken relation {relation_id!r}")
        try:
            settings = dict(await self._read_settings(relation_id, unit))
        except UnitNotInRelation:
            if not broken:
                raise
            settings = {}
        if unit == self.unit_name:
            for name, value in self._writes.get(relation_id, {}).items():
                if value is None:
                    settings.pop(name, None)
                else:
                    settings[name] = value
        if key is None:
            return settings
        return settings.get(key, "")

    async def relation_set(self, relation_id, settings):
        relation_id = await self._relation(relation_id)
        if self._is_broken(relation_id):
            raise RelationBroken(f"cannot change settings in broken relation {relation_id!r}")
        for name, value in settings.items():
            if not isinstance(name, str) or not name.strip():
                raise InvalidSetting(f"invalid setting name {name!r}")
            if not isinstance(value, str):
                raise InvalidSetting(f"setting {name!r}: the value must be a string, not {value!r}")
        writes = self._writes.setdefault(relation_id, {})
        for name, value in settings.items():
            writes[name] = value if value.strip() else None

    async def relation_ids(self, relation_name):
        if not relation_name:
            raise RelationNameRequired()
        relations = await self._read_relations()
        return sorted((rid for rid, name in relations.items() if name == relation_name), key=_relation_order)

    async def relation_list(self, relation_id):
        relation_id = await self._relation(relation_id)
        if self._is_broken(relation_id):
            return []
        if relation_id not in self._members:
            members = await self.state.relation_members(relation_id)
            self._members.setdefault(relation_id, list(members))
        return sorted(self._members[relation_id], key=_unit_order)

    async def _relation(self, relation_id):
        """The relation a relation tool acts on: -r's, else the hook's own."""
        if relation_id is None:
            if self.relation_id is None:
                raise NotInRelationHook()
            return self.relation_id
        if relation_id != self.relation_id and relation_id not in await self._read_relations():
            raise RelationNotFound(relation_id)
        return relation_id

    def _is_broken(self, relation_id):
        return self.broken and relation_id == self.relation_id

    # -- reads, each once per hook -------------------------------------------------------
    # Two tools of one hook may read the same thing at once: the first read to finish
    # is kept (setdefault), so both, and every later read, see the same value.

    async def _read_settings(self, relation_id, unit):
        if (relation_id, unit) not in self._settings:
            settings = await self.state.relation_settings(relation_id, unit)
            self._settings.setdefault((relation_id, unit), dict(settings))
        return self._settings[(relation_id, unit)]

    async def _read_relations(self):
        if self._relations is None:
            relations = dict(await self.state.relations())
            if self._relations is None:
                self._relations = relations
        return self._relations

    async def _read_config(self):
        if self._config is None:
            config = dict(await self.state.config())
            if self._config is None:
                self._config = config
        return self._config

    # -- the unit ----------------------------------------------------------------------

    async def config_get(self, option):
        config = await self._read_config()
        if option is not None:
            return config.get(option)
        return {name: value for name, value in config.items() if value is not None}

    async def unit_get(self, key):
        if key not in UNIT_ADDRESSES:
            raise NoSuchUnitSetting(key)
        if self._addresses is None:
            addresses = dict(await self.state.addresses())
            if self._addresses is None:
                self._addresses = addresses
        if key == "public-address":
            # Where the machine has no public address, the unit's own is its best.
            return self._addresses.get("public-address") or self._addresses.get("private-address") or ""
        return self._addresses.get(key) or ""

    async def open_port(self, port, protocol):
        await self.state.open_port(*_check_port(port, protocol))

    async def close_port(self, port, protocol):
        await self.state.close_port(*_check_port(port, protocol))

    def log(self, level, message):
        self.logger.log(level, "%s %s: %s", self.unit_name, self.hook, message)


def _check_port(port, protocol):
    protocol = (protocol or "").lower()
    if not isinstance(port, int) or not 1 <= port <= 65535:
        raise InvalidPort(f"Invalid port, must be from 1 to 65535, got {port!r}")
    if protocol not in PROTOCOLS:
        raise InvalidPort(f"Invalid protocol, must be 'tcp' or 'udp', got {protocol!r}")
    return port, protocol


def _relation_order(relation_id):
    name, _, number = relation_id.rpartition(":")
    return (name, int(number)) if number.isdigit() else (relation_id, -1)


def _unit_order(unit):
    service, _, number = unit.rpartition("/")
    return (service, int(number)) if number.isdigit() else (unit, -1)
