"""The host ids units run as: each unit a range of its own from the host's pool
(container/id_ranges.py), which LXC maps with newuidmap and newgidmap: they allow only
the ranges /etc/subuid and /etc/subgid grant root (scripts/install adds the pool).
Checked on every pass, since an edit of those files or a package's maintainer script
can take the pool away; until it is back no unit starts, and the machine says why."""

from ensemble.machine import safeguards
from ensemble.machine.container.id_ranges import IdRangeError, require_granted
from ensemble.machine.reconciler import Reconciler


class IdRangeReconciler(Reconciler):
    name = "id-range"
    files = ("/etc/subuid", "/etc/subgid")

    def __init__(self, host, store):
        """`store`: where this host's units claim their ranges (its pool is checked)."""
        super().__init__(host)
        self.pool = store.pool
        host.safeguards.require(safeguards.ID_RANGE)

    async def converge(self):
        try:
            # Two small local files and a PATH lookup: read on the reactor's thread, as
            # the agent reads its units' logs.
            require_granted(self.pool.first, self.pool.size, self.files)
        except IdRangeError as e:
            self.host.safeguards.report(safeguards.ID_RANGE, str(e))
        else:
            self.host.safeguards.report(safeguards.ID_RANGE, None)
