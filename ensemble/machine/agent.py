"""The machine agent: presence for its machine and a watch on the units assigned to it."""

import logging

from ensemble.agent import BaseAgent
from ensemble.state.machine import MachineStateManager

log = logging.getLogger("ensemble.machine")


class MachineAgent(BaseAgent):
    def __init__(self, client, machine_id, reactor=None):
        super().__init__(client, reactor)
        self.machine_id = machine_id
        self.name = f"machine-{machine_id}"
        self.machine = None
        self.assigned = []
        self._watch = None

    async def register_presence(self, info):
        if self.machine is None:
            self.machine = await MachineStateManager(self.client).get_machine(self.machine_id)
        await self.machine.register_agent(info)

    async def started(self):
        self._watch = await self.machine.watch_assigned_units(self.assignments_changed)

    def assignments_changed(self, names):
        if names is None:
            log.warning("%s: machine removed from the environment", self.name)
            names = []
        added = [n for n in names if n not in self.assigned]
        removed = [n for n in self.assigned if n not in names]
        self.assigned = list(names)
        log.info(
            "%s: assigned units: %s (added: %s; removed: %s)",
            self.name,
            ", ".join(names) or "none",
            ", ".join(added) or "none",
            ", ".join(removed) or "none",
        )

    async def stopping(self):
        if self._watch:
            self._watch.stop()
