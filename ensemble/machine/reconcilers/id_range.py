"""The host ids units run as: LXC maps them with newuidmap and newgidmap, which allow
only the ranges /etc/subuid and /etc/subgid grant root (scripts/install adds it). Checked
on every pass, since an edit of those files or a package's maintainer script can take
the range away; until it is back no unit starts, and the machine says why."""

from ensemble.machine import safeguards
from ensemble.machine.container.driver import ContainerError, _require_granted
from ensemble.machine.reconciler import Reconciler


class IdRangeReconciler(Reconciler):
    name = "id-range"
    files = ("/etc/subuid", "/etc/subgid")

    def __init__(self, host, first, count):
        super().__init__(host)
        self.first, self.count = first, count
        host.safeguards.require(safeguards.ID_RANGE)

    async def converge(self):
        try:
            # Two small local files and a PATH lookup: read on the reactor's thread, as
            # the agent reads its units' logs.
            _require_granted(self.first, self.count, self.files)
        except ContainerError as e:
            self.host.safeguards.report(safeguards.ID_RANGE, str(e))
        else:
            self.host.safeguards.report(safeguards.ID_RANGE, None)
