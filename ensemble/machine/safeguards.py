"""The gate every unit's container passes before it is created or started: each layer
the unit's isolation rests on is in place on this host, or the container waits.

Layers report into it with `report(layer, problem, unit=None)` (`problem` None: in
place). A machine-wide layer (the firewall, the bridge, the units' id range) holds
every unit here; a unit's own layer holds that unit: its ZooKeeper credentials and its
limits (`unit_checks`, asked by `clear_to_create` and `clear_to_start` just before its
container is made or started), and its port's firewall entry and layer 2 binding
(`start_checks`, asked by `clear_to_start` only: a stopped container has no port, and
its entry loads while it is made).
A layer the agent manages is required from the start (`require`) and holds the gate
until its first report: nothing starts on a layer nobody has looked at yet. What is not
in place shows on the machine node as `security-error` ({layer: why}), and the log says
each change once.

The gate holds starts; it stops nothing. Units already running keep running on what was
put in place for them (nftables keeps the tables it loaded last): stopping them would
turn a broken control plane into an outage. A container that stops meanwhile is not
started again until every layer is back. Once the cause is fixed, the next pass of the
layer's reconciler (the agent's resync tick at the latest) reports it in place and the
waiting units start: the agent need not restart.
"""

import collections
import logging

from twisted.internet import defer

from ensemble import limits as unit_limits
from ensemble.machine.container.config import limit_lines
from ensemble.machine.reconciler import Reconciler
from ensemble.state import auth
from ensemble.state.client import NoAuth

log = logging.getLogger("ensemble.machine")

FIELD = "security-error"
# The layers; each module that reports one names it from here.
FIREWALL, BRIDGE, ID_RANGE, CREDENTIALS, LIMITS = "firewall", "bridge", "id-range", "credentials", "limits"
# A unit's own: its port held to its MAC and address (reconcilers/layer2.py).
LAYER2 = "layer2"
NOT_CHECKED = "not checked yet"

# What each credential needs on a unit's node: the machine agent writes the unit's
# address, container and state (it reads the node by whatever grant: it just did); the
# unit agent reads and writes its own state and ports, and makes its presence node.
MACHINE_NEEDS = auth.WRITE
UNIT_NEEDS = auth.READ | auth.WRITE | auth.CREATE
REFUSED = "ZooKeeper refuses this machine's credential on their nodes"


def _perms(grants, credential):
    """What `grants` ([(perms, scheme, id)]) let a session with `credential` do.
    ZooKeeper shows a digest only to sessions with ADMIN on the node ('user:x' to the
    others): there the user must do. A wrong secret for the right user is refused at
    the first write instead, and a machine's is refused on its own node already."""
    ids = {credential.id, f"{credential.user}:x"}
    perms = 0
    for granted, scheme, identity in grants:
        if (scheme, identity) == ("world", "anyone") or (scheme == "digest" and identity in ids):
            perms |= granted
    return perms


def _names(perms):
    return "/".join(n for n, p in (("read", auth.READ), ("write", auth.WRITE), ("create", auth.CREATE)) if perms & p)


async def credentials_problem(client, unit, limits=None):
    """Why the credentials `unit` needs are not in place (None: they are): this machine's
    must be able to write the unit's node, and the one it hands the unit (derived from
    its own) to write it and make its presence node."""
    credential = client.credential
    if credential is None:
        # An environment without credentials (the agent refuses to run without one
        # in an environment that has them): nothing to put in place.
        return None
    try:
        grants, _ = await client.get_acl(unit.path)
    except NoAuth:
        return REFUSED
    for whose, holder, needs in (
        ("this machine's credential", credential, MACHINE_NEEDS),
        ("their own credentials", auth.unit_credential(credential, unit.name), UNIT_NEEDS),
    ):
        missing = needs & ~_perms(grants, holder)
        if missing:
            return f"their nodes do not let {whose} {_names(missing)} them"
    return None


async def limits_problem(client, unit, limits=None):
    """Why the limits `unit` runs with (its service's, and the defaults for what that
    sets none of) cannot be enforced here (None: they can)."""
    limits = unit_limits.effective(limits)
    _, unenforced = limit_lines(limits.get("memory"), limits.get("cpu-weight"), limits.get("pids"))
    return "; ".join(unenforced) or None


class Safeguards(Reconciler):
    """The layers' state and the gate over it; a pass publishes the state on the
    machine node (`security-error`), writing only a change."""

    name = "safeguards"

    def __init__(self, host):
        super().__init__(host)
        self.layers = {}        # machine-wide layer -> None (in place) or why not
        self.units = {}         # unit -> {its own layer: why not}
        # Checked for a unit right before its container is created or started:
        # (layer, check(client, unit, limits) -> why not, or None).
        self.unit_checks = [(CREDENTIALS, credentials_problem), (LIMITS, limits_problem)]
        # The same, right before it is started only.
        self.start_checks = []
        self.opened = []        # called when the machine-wide layers are all in place again

    def require(self, layer):
        """`layer` holds every unit here until a report says it is in place."""
        self.layers.setdefault(layer, NOT_CHECKED)

    def report(self, layer, problem, unit=None):
        """`layer` is in place (`problem` None) or why not: for the machine (`unit`
        None) or for one unit."""
        if unit is None:
            before = self.layers.get(layer)
            self.layers[layer] = problem
        else:
            own = self.units.setdefault(unit, {})
            before = own.get(layer)
            if problem is None:
                own.pop(layer, None)
            else:
                own[layer] = problem
            if not own:
                del self.units[unit]
        if before == problem:
            return
        where = self.host.name if unit is None else f"{self.host.name}: {unit}"
        if problem is not None:
            whom = "no unit starts here" if unit is None else "it does not start"
            log.error("%s: %s not in place: %s; %s until it is", where, layer, problem, whom)
        elif before != NOT_CHECKED:
            log.info("%s: %s in place again", where, layer)
        defer.ensureDeferred(self.sync_quietly())
        if unit is None and problem is None and self.refusal() is None:
            for callback in self.opened:
                callback()

    def forget(self, unit):
        """`unit` left this machine: its own layers no longer matter."""
        if self.units.pop(unit, None):
            defer.ensureDeferred(self.sync_quietly())

    def refusal(self, unit=None, own=None):
        """Why nothing (or `unit`) may start now, as 'layer: why'; None: all in place.
        `own`: of the unit's own layers, only these count (a creation's)."""
        for layer, problem in sorted(self.layers.items()):
            if problem is not None:
                return f"{layer}: {problem}"
        for layer, problem in sorted(self.units.get(unit, {}).items()):
            if own is None or layer in own:
                return f"{layer}: {problem}"
        return None

    def held(self, unit):
        """Whether `unit`'s own layers are known not to be in place."""
        return unit in self.units

    async def clear_to_create(self, unit, limits=None):
        """The gate, asked right before `unit`'s container is made: its own layers a
        creation needs checked now; None if every layer is in place, else why not."""
        return await self._clear(unit, limits, self.unit_checks, own={layer for layer, _ in self.unit_checks})

    async def clear_to_start(self, unit, limits=None, creation_cleared=False):
        """The gate, asked right before `unit`'s container is started: all its own
        layers checked now (`creation_cleared`: clear_to_create's were, just before)."""
        checks = self.start_checks if creation_cleared else self.unit_checks + self.start_checks
        return await self._clear(unit, limits, checks)

    async def _clear(self, unit, limits, checks, own=None):
        for layer, check in checks:
            self.report(layer, await check(self.host.client, unit, limits), unit=unit.name)
        return self.refusal(unit.name, own)

    def problems(self):
        """{layer: why} as the machine node shows it: a unit's own layers name their
        units, those with the same reason together."""
        shown = {layer: p for layer, p in sorted(self.layers.items()) if p not in (None, NOT_CHECKED)}
        grouped = collections.defaultdict(lambda: collections.defaultdict(list))
        for unit, own in sorted(self.units.items()):
            for layer, problem in own.items():
                grouped[layer][problem].append(unit)
        for layer, reasons in sorted(grouped.items()):
            text = "; ".join(f"{', '.join(units)}: {problem}" for problem, units in reasons.items())
            shown[layer] = f"{shown[layer]}; {text}" if layer in shown else text
        return shown

    async def converge(self):
        await self.host.publish(FIELD, self.problems() or None)
