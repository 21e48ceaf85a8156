"""Where a host keeps its agents' and units' logs, below ENSEMBLE_HOME's logs
directory: one vocabulary for the agents that write them and `ensemble debug-log`,
which reads them.

    <logs>/machine-<N>.log                                a machine agent's log
    <logs>/units/<unit key>/<unit key>.log                a live unit's hook output
    <logs>/units/<unit key>/agent.log                     its unit agent's log
    <logs>/units/removed/<key>.<YYYYMMDD-HHMMSS>[.<n>]/   a removed unit's, as its teardown left it

A unit's directory is its container's INSIDE, so a unit's own directory only ever
holds its live incarnation (a name can come back: destroy-service, then deploy).
"""

UNITS = "units"
REMOVED = "removed"
REMOVED_TIME = "%Y%m%d-%H%M%S"
AGENT_LOG = "agent.log"
INSIDE = "/var/log/ensemble"  # the unit's log directory, as its container sees it


def hook_log(unit_key):
    """The file name of a unit's hook output in its log directory."""
    return f"{unit_key}.log"
