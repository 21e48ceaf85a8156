"""Commands that change services, their units and relations."""

import math

from twisted.internet import defer

from ensemble.charm import Charm, bundle_id, typed_values
from ensemble.cli.common import environment
from ensemble.errors import InvalidValue, UnitsNotStarted, UsageError
from ensemble.limits import parse_cpu_weight, parse_disk, parse_memory, parse_pids
from ensemble.names import parse_machine_id, parse_unit_name, validate_service_name
from ensemble.state.machine import MachineStateManager
from ensemble.state.service import ServiceStateManager
from ensemble.state.unit import ERROR, STARTED, UnitState, UnitStateManager

MAX_UNITS_PER_COMMAND = 1000
DEFAULT_WAIT_TIMEOUT = 600.0


def _parse_config(pairs):
    config = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InvalidValue(f"invalid --config {pair!r}: use KEY=VALUE")
        config[key] = value
    return config


def _parse_limits(args):
    limits = {}
    if args.memory is not None:
        limits["memory"] = parse_memory(args.memory)
    if args.cpu_weight is not None:
        limits["cpu-weight"] = parse_cpu_weight(args.cpu_weight)
    if args.pids is not None:
        limits["pids"] = parse_pids(args.pids)
    if args.disk is not None:
        limits["disk"] = parse_disk(args.disk)
    return limits


def _parse_count(n):
    if not 1 <= n <= MAX_UNITS_PER_COMMAND:
        raise InvalidValue(f"-n must be from 1 to {MAX_UNITS_PER_COMMAND}, not {n}")
    return n


def _parse_wait(args):
    """The --timeout of --wait, in seconds (None: not waiting)."""
    if not args.wait:
        if args.timeout is not None:
            raise UsageError(f"--timeout goes with --wait (see 'ensemble {args.command} --help')")
        return None
    timeout = DEFAULT_WAIT_TIMEOUT if args.timeout is None else args.timeout
    if not 0 < timeout < math.inf:
        raise InvalidValue(f"--timeout must be a number of seconds above 0, not {args.timeout:g}")
    return timeout


def _one_line(text):
    return " ".join(str(text).split())


async def wait_for_units(reactor, client, names, timeout):
    """Wait until each of units `names` is started or in error (or removed), or
    `timeout` seconds have passed; print one line of how each ended. Driven by watches
    on the unit nodes. UnitsNotStarted if any did not start."""
    seen = {}      # unit -> its node's data (None: removed)
    done = defer.Deferred()

    def ended(data):
        return data is None or "malformed" in data or data.get("state") in (STARTED, ERROR)

    def changed(name, data):
        seen[name] = data
        if not done.called and len(seen) == len(names) and all(ended(d) for d in seen.values()):
            done.callback(False)

    watches = []
    deadline = reactor.callLater(timeout, lambda: done.called or done.callback(True))
    try:
        for name in names:
            unit = UnitState(client, name, {})
            watches.append(await unit.watch(lambda data, name=name: changed(name, data)))
        timed_out = await done
    finally:
        if deadline.active():
            deadline.cancel()
        for watch in watches:
            watch.stop()

    failed, waiting, summary = [], [], []
    for name in names:
        data = seen.get(name, {})
        if data is None:
            summary.append(f"{name} removed")
            failed.append(f"{name}: removed")
        elif "malformed" in data or data.get("state") == ERROR:
            why = _one_line(data.get("malformed") or data.get("error") or "no reason given")
            summary.append(f"{name} error ({why})")
            failed.append(f"{name}: {why}")
        elif data.get("state") == STARTED:
            summary.append(f"{name} started")
        else:
            state = data.get("state", "pending")
            summary.append(f"{name} {state}")
            waiting.append((name, state))
    print(", ".join(summary), flush=True)
    problems = list(failed)
    if timed_out and waiting:
        problems.append(f"{', '.join(n for n, _ in waiting)} not started after {timeout:g}s "
                        f"({', '.join(f'{n}: {s}' for n, s in waiting)})")
    if problems:
        raise UnitsNotStarted("; ".join(problems))


async def cmd_deploy(reactor, args):
    # Everything is validated before the one transaction that writes it.
    wait = _parse_wait(args)
    charm = Charm.load(args.charm_dir)
    service = validate_service_name(args.service or charm.name)
    # Only what was set: the defaults are the charm's, and move with it on upgrade-charm.
    config = typed_values(charm.name, charm.options, _parse_config(args.config))
    limits = _parse_limits(args)
    n = _parse_count(args.n)
    to = parse_machine_id(args.to) if args.to is not None else None
    bundle = charm.bundle()
    async with environment(args) as client:
        if to is not None:
            await MachineStateManager(client).get_machine(to)
        _, units = await ServiceStateManager(client).deploy(
            service, bundle_id(charm.name, bundle), bundle, config, limits, n=n, to=to, endpoints=charm.endpoints,
            charm_dir=charm.directory,
        )
        print(f"deployed service {service} ({charm.name}): {', '.join(units)}", flush=True)
        if wait is not None:
            await wait_for_units(reactor, client, units, wait)


async def cmd_add_unit(reactor, args):
    wait = _parse_wait(args)
    service = validate_service_name(args.service)
    n = _parse_count(args.n)
    to = parse_machine_id(args.to) if args.to is not None else None
    async with environment(args) as client:
        manager = ServiceStateManager(client)
        await manager.get_service(service)
        if to is not None:
            await MachineStateManager(client).get_machine(to)
        units = await manager.add_units(service, n=n, to=to)
        print(f"added {', '.join(units)}", flush=True)
        if wait is not None:
            await wait_for_units(reactor, client, units, wait)


async def cmd_remove_unit(reactor, args):
    for name in args.units:
        parse_unit_name(name)
    async with environment(args) as client:
        manager = UnitStateManager(client)
        # All must exist before any is touched.
        for name in args.units:
            await manager.get_unit(name)
        for name in args.units:
            await manager.remove_unit(name)
    print(f"removing {', '.join(args.units)}")


async def cmd_destroy_service(reactor, args):
    service = validate_service_name(args.service)
    async with environment(args) as client:
        units = await ServiceStateManager(client).destroy_service(service)
    if units:
        print(f"destroying service {service}: removing {', '.join(units)}")
    else:
        print(f"destroyed service {service}")


async def cmd_add_relation(reactor, args):
    from ensemble.relations import parse_descriptor
    from ensemble.state.relation import RelationStateManager

    parse_descriptor(args.a), parse_descriptor(args.b)
    async with environment(args) as client:
        relation, a, b = await RelationStateManager(client).add_relation(args.a, args.b)
    print(f"added relation {relation.relation_id(a[0])} between {a[0]}:{a[1]} and {b[0]}:{b[1]} "
          f"(interface {relation.interface})")


async def cmd_remove_relation(reactor, args):
    from ensemble.relations import parse_descriptor
    from ensemble.state.relation import RelationStateManager

    parse_descriptor(args.a), parse_descriptor(args.b)
    async with environment(args) as client:
        relation = await RelationStateManager(client).remove_relation(args.a, args.b)
    first = relation.endpoints[0]["service"]
    print(f"removed relation {relation.relation_id(first)} between {' and '.join(relation.describe().split())}")


async def cmd_expose(reactor, args):
    service = validate_service_name(args.service)
    async with environment(args) as client:
        before = await ServiceStateManager(client).set_exposed(service, True)
    print(f"service {service} is already exposed" if before else f"exposed service {service}")


async def cmd_unexpose(reactor, args):
    service = validate_service_name(args.service)
    async with environment(args) as client:
        before = await ServiceStateManager(client).set_exposed(service, False)
    print(f"unexposed service {service}" if before else f"service {service} is not exposed")


def _placement_arguments(sub):
    sub.add_argument("--to", metavar="MACHINE", help="place the units on this existing machine")
    sub.add_argument("-n", type=int, default=1, metavar="N", help="number of units (default 1)")


def _wait_arguments(sub):
    sub.add_argument("--wait", action="store_true",
                     help="then wait until every new unit is started or in error; exit 1 unless all started")
    sub.add_argument("--timeout", type=float, metavar="SECONDS",
                     help=f"how long --wait waits (default {DEFAULT_WAIT_TIMEOUT:g})")


def register(command):
    sub = command("deploy", cmd_deploy, "create a service from a charm directory and add units", examples=[
        "ensemble deploy examples/charms/db",
        "ensemble deploy examples/charms/web front -n 2 --config port=8080 --memory 512M",
        "ensemble deploy examples/charms/db --to 1 --wait --timeout 300",
    ])
    sub.add_argument("charm_dir", metavar="CHARM_DIR",
                     help="the charm: a directory with metadata.yaml, hooks/ and optionally config.yaml")
    sub.add_argument("service", metavar="SERVICE", nargs="?", help="service name (default: the charm's)")
    _placement_arguments(sub)
    _wait_arguments(sub)
    sub.add_argument("--config", action="append", metavar="KEY=VALUE", help="set a charm option")
    sub.add_argument("--memory", metavar="SIZE", help="memory (and swap) limit per unit, e.g. 512M (default 1G)")
    sub.add_argument("--cpu-weight", metavar="N", help="relative CPU weight per unit, 1-10000 (100 is the norm; unset: no weight)")
    sub.add_argument("--pids", metavar="N", help="process limit per unit (default 1024)")
    sub.add_argument("--disk", metavar="SIZE",
                     help="disk per unit: its writable layer and its logs, e.g. 10G (default 4G)")


    sub = command("add-unit", cmd_add_unit, "add units to a service", examples=[
        "ensemble add-unit web",
        "ensemble add-unit db -n 2 --to 1 --wait",
    ])
    sub.add_argument("service", metavar="SERVICE", help="the service to add units to")
    _placement_arguments(sub)
    _wait_arguments(sub)


    sub = command("remove-unit", cmd_remove_unit, "remove units; their containers are destroyed", examples=[
        "ensemble remove-unit web/1",
        "ensemble remove-unit db/0 db/2",
    ])
    sub.add_argument("units", metavar="UNIT", nargs="+", help="a unit to remove, as SERVICE/N")


    sub = command("destroy-service", cmd_destroy_service, "remove a service and all its units",
                  examples=["ensemble destroy-service web"])
    sub.add_argument("service", metavar="SERVICE", help="the service to remove")


    sub = command("add-relation", cmd_add_relation,
                  "relate two services by a matching provides/requires pair of their charms",
                  examples=["ensemble add-relation web db", "ensemble add-relation web:db db:db"])
    sub.add_argument("a", metavar="SERVICE[:RELATION]",
                     help="one side: a service, and the relation name of its charm where it has several that match")
    sub.add_argument("b", metavar="SERVICE[:RELATION]", help="the other side, likewise")


    sub = command("remove-relation", cmd_remove_relation, "remove the relation between two services",
                  examples=["ensemble remove-relation web db"])
    sub.add_argument("a", metavar="SERVICE[:RELATION]",
                     help="one side: a service, and its relation name where the two are related more than once")
    sub.add_argument("b", metavar="SERVICE[:RELATION]", help="the other side, likewise")


    sub = command("expose", cmd_expose,
                  "let anything reach the ports the service's units opened (other units, hosts, beyond)",
                  examples=["ensemble expose web"])
    sub.add_argument("service", metavar="SERVICE", help="the service whose opened ports to open to all")


    sub = command("unexpose", cmd_unexpose,
                  "close the service's opened ports again to all but the units of related services",
                  examples=["ensemble unexpose web"])
    sub.add_argument("service", metavar="SERVICE", help="the service whose opened ports to close again")
