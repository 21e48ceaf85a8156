"""The unit's own hooks and its state: pending -> installing -> started (install,
config-changed, start), or error with the failed hook's reason; stopping -> stopped on
removal (stop).

A marker in the unit directory records what ran, so that a restarted agent in the
same container run runs no hook again, and one in a restarted container (its services
are gone) runs config-changed and start again, not install. Whether the container
restarted is told by its PID 1's start time.
"""

import logging
import os

from ensemble.state.client import ConnectionLost, SessionExpired
from ensemble.state.unit import ERROR, INSTALLING, STARTED, STOPPING
from ensemble.unit.hooks import HookFailed

log = logging.getLogger("ensemble.unit")

STOPPED = "stopped"
MARKER = ".ensemble-state"


def container_run_id():
    """Changes whenever the container (its PID 1) starts again."""
    try:
        with open("/proc/1/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return "unknown"


class Lifecycle:
    def __init__(self, unit, executor, unit_dir):
        self.unit = unit
        self.executor = executor
        self.marker_path = os.path.join(unit_dir, MARKER)

    def _read_marker(self):
        try:
            with open(self.marker_path) as f:
                return dict(line.strip().split("=", 1) for line in f if "=" in line)
        except OSError:
            return {}

    def _write_marker(self, **fields):
        state = {**self._read_marker(), **fields}
        tmp = self.marker_path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(f"{k}={v}\n" for k, v in sorted(state.items()))
        os.replace(tmp, self.marker_path)

    async def start(self):
        """Bring the unit to `started`; True once it is (now or in this container run
        before), False if a hook failed (the unit shows `error`)."""
        marker = self._read_marker()
        run_id = container_run_id()
        if marker.get("started-in") == run_id:
            # The hooks ran in this container run; at most the report is missing (the
            # connection dropped before it was written).
            if self.unit.state != STARTED:
                await self.unit.update(state=STARTED, error=None)
            log.info("%s: charm already started in this container run", self.unit.name)
            return True
        if marker.get("failed-in") == run_id:
            return False  # a failure stays until the unit is removed or the container restarts
        try:
            if marker.get("installed") != "yes":
                await self.unit.update(state=INSTALLING, error=None)
                await self.executor.run("install")
                self._write_marker(installed="yes")
            await self.executor.run("config-changed")
            await self.executor.run("start")
        except HookFailed as e:
            log.error("%s: %s", self.unit.name, e)
            self._write_marker(**{"failed-in": run_id})
            await self.unit.update(state=ERROR, error=str(e))
            return False
        except (ConnectionLost, SessionExpired):
            raise  # not the charm's fault: resumed once ZooKeeper is back
        except Exception as e:
            log.exception("%s: running hooks failed", self.unit.name)
            self._write_marker(**{"failed-in": run_id})
            await self.unit.update(state=ERROR, error=f"unit agent: {e}")
            return False
        self._write_marker(**{"started-in": run_id})
        await self.unit.update(state=STARTED, error=None)
        log.info("%s: started", self.unit.name)
        return True

    async def stop(self):
        if self.unit.state == STOPPED:
            return
        await self.unit.update(state=STOPPING)
        try:
            await self.executor.run("stop")
        except Exception as e:
            # Removal goes on regardless: the container is destroyed next.
            log.error("%s: %s", self.unit.name, e)
        await self.unit.update(state=STOPPED)
        log.info("%s: stopped", self.unit.name)
