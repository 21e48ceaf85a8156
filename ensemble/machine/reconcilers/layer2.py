"""Layer 2 bound to each unit's identity: every unit here has a fixed MAC, recorded with
its address (ipam.unit_mac), which its container's interface is given; the bridge holds
each unit's port to that MAC and address.

Two parts, one policy:
- the port filter (nftables, loaded by the firewall with its tables: port_filter.py) is
  keyed by the unit's port name, so it is in place before the container exists;
  a unit's container is not created or started until its entry is loaded;
- the bridge's tables (netlink: bridge_ports.py): learning and unknown-unicast flooding
  off on the unit's port, a static forwarding entry for its MAC there, a permanent
  neighbour entry for its address. The port exists only once the container runs, so
  this is done right after each start, for that port alone and before the unit's agent
  may run, and again on every pass (what a host admin or a restart changed is put
  back); a removed unit's entries go after its teardown.

A unit whose port cannot be held to its identity shows it (`security-error`, layer
`layer2`) and is not started again until it can; its port filter, which does not
depend on netlink, stays loaded meanwhile (safeguards.py)."""

from ensemble.machine import safeguards
from ensemble.machine.container.names import container_name, veth_name
from ensemble.machine.reconciler import Reconciler
from ensemble.network import bridge_ports

NOT_LOADED = "its port filter is not loaded yet"


def unit_ports(environment, hardware):
    """{unit: UnitPort} for `hardware` ({unit: (address, MAC)}): each unit's host-side
    veth (from its container's name), MAC and address. A unit whose name makes no
    container name is left out (it gets no container either)."""
    found = {}
    for unit, (address, mac) in sorted(hardware.items()):
        try:
            port = veth_name(container_name(environment, unit))
        except Exception:
            continue
        found[unit] = bridge_ports.UnitPort(port, mac, address)
    return found


class Layer2Reconciler(Reconciler):
    """With `firewall` (the FirewallReconciler), a unit also waits for its port filter."""

    name = "layer2"

    def __init__(self, host, firewall=None):
        super().__init__(host)
        self.firewall = firewall
        self.problems = {}      # unit -> why its running port is not held to its identity
        host.safeguards.start_checks.append((safeguards.LAYER2, self.problem))

    async def problem(self, client, unit, limits=None):
        """The gate's check, right before `unit`'s container is started."""
        return self._problem(unit.name)

    def _problem(self, name):
        if self.firewall is not None and not self.firewall.port_loaded(name):
            return NOT_LOADED
        return self.problems.get(name)

    async def converge(self):
        host = self.host
        ports = unit_ports(host.environment["name"], await host.allocator.hardware())
        try:
            problems = await host.in_thread(
                bridge_ports.secure, host.bridge, list(ports.values()), host.subnet, host.netns
            )
        except Exception as e:  # netlink's own: no port is known to be held, so none may start
            host.report_once(f"layer 2: cannot hold the units' ports on {host.bridge}: {e}")
            problems = {p.port: str(e) or type(e).__name__ for p in ports.values()}
        by_port = {p.port: unit for unit, p in ports.items()}
        found = {by_port[port]: why for port, why in problems.items() if port in by_port}
        for unit in sorted(set(self.problems) | set(found)):
            if unit in ports:
                self._note(unit, found.get(unit))
            else:
                self.problems.pop(unit, None)

    def _note(self, unit, problem):
        """Record why `unit`'s port is not held (None: it is), and show a change."""
        if problem == self.problems.get(unit):
            return
        if problem is None:
            del self.problems[unit]
        else:
            self.problems[unit] = problem
        self.host.safeguards.report(safeguards.LAYER2, self._problem(unit), unit=unit)

    # What the units reconciler tells its listeners.

    async def unit_addressed(self, unit):
        pass

    async def unit_started(self, unit):
        """`unit`'s container has just started: its port exists now. Held at once, that
        port alone, before the unit's agent may run: a whole pass, or one under way to
        wait for, costs every deploy tens of ms more."""
        host = self.host
        port = unit_ports(host.environment["name"], await host.allocator.hardware(only=unit.name)).get(unit.name)
        if port is None:
            return
        try:
            problem = await host.in_thread(bridge_ports.secure_unit, host.bridge, port, host.netns)
        except Exception as e:  # netlink's own
            problem = str(e) or type(e).__name__
        self._note(unit.name, problem)

    async def unit_leaving(self, name):
        pass

    async def unit_released(self, name, address):
        """`name`'s container is gone and its address freed: a pass removes its
        neighbour entry (its port's forwarding entries went with its veth)."""
        self.problems.pop(name, None)
        await self.sync()
