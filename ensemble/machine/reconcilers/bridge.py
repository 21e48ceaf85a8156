"""This host's bridge, which every unit's veth joins: made at start and again on every
pass (what was changed by hand is put back; a bridge deleted by hand is made again,
though the veths of units running then left with it). Until it is in place no unit
starts and the machine says why (safeguards.py); the agent goes on and tries again."""

from ensemble.machine import host as hosts, safeguards
from ensemble.machine.reconciler import Reconciler


class BridgeReconciler(Reconciler):
    name = "bridge"

    def __init__(self, host):
        super().__init__(host)
        host.safeguards.require(safeguards.BRIDGE)

    async def converge(self):
        host = self.host
        try:
            await hosts.ensure_bridge(host)
        except Exception as e:  # BridgeError, and netlink's own for what it did not foresee
            host.safeguards.report(safeguards.BRIDGE, str(e) or type(e).__name__)
        else:
            host.safeguards.report(safeguards.BRIDGE, None)
