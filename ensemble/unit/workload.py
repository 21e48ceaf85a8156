"""What the unit shows of its workload: the last hook it ran and its result (`workload`
on its node), published in the background, one write at a time, folding hooks that
ended meanwhile into the latest: a hook never waits on the write, so the unit's hooks
run back to back."""

import logging
import time

from twisted.internet import defer

from ensemble.state.unit import WORKLOAD

log = logging.getLogger("ensemble.unit")


class WorkloadReport:
    def __init__(self, unit):
        self.unit = unit
        self.latest = None    # {hook, status, at} of the last hook that ended
        self._written = None
        self._writing = False

    def hook_ended(self, hook, status):
        self.latest = {"hook": hook, "status": status, "at": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
        if not self._writing:
            self._writing = True
            defer.ensureDeferred(self._write())

    def fields(self):
        """The latest as fields for a write the unit makes anyway (its state), which
        then publishes it."""
        if self.latest is None or self.latest == self._written:
            return {}
        self._written = self.latest
        return {WORKLOAD: self.latest}

    async def _write(self):
        try:
            while self.latest is not None and self.latest != self._written:
                latest = self.latest
                await self.unit.update(**{WORKLOAD: latest})
                self._written = latest
        except Exception as e:
            # What the unit shows of its workload is not worth failing anything for;
            # the next hook or state change publishes it again.
            log.warning("%s: cannot publish its last hook: %s", self.unit.name, e)
        finally:
            self._writing = False
