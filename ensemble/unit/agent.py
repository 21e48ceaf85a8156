"""The unit agent: presence for its unit and a watch on the unit's node."""

import logging

from ensemble.agent import BaseAgent
from ensemble.state.unit import UnitStateManager

log = logging.getLogger("ensemble.unit")


class UnitAgent(BaseAgent):
    def __init__(self, client, unit_name, reactor=None):
        super().__init__(client, reactor)
        self.unit_name = unit_name
        self.name = f"unit-{unit_name.replace('/', '-')}"
        self.unit = None
        self._watch = None

    async def register_presence(self, info):
        if self.unit is None:
            self.unit = await UnitStateManager(self.client).get_unit(self.unit_name)
        await self.unit.register_agent(info)

    async def started(self):
        self._watch = await self.unit.watch(self.unit_changed)

    def unit_changed(self, data):
        if data is None:
            log.info("%s: unit removed", self.name)
            return
        self.unit.data = data
        log.info("%s: life %s, state %s", self.name, data.get("life"), data.get("state"))

    async def stopping(self):
        if self._watch:
            self._watch.stop()
