"""`ensemble`: argument parsing, then one function per command.

Every failure a user can cause ends as `error: <one line>` on stderr and exit status 1;
an unexpected one too, with the traceback in the log rather than on the screen.
"""

import argparse
import contextlib
import logging
import os
import sys
import tempfile
import traceback

from twisted.internet import defer

from ensemble import __version__, connection
from ensemble.charm import Charm, bundle_id
from ensemble.errors import EnsembleError, InvalidValue
from ensemble.home import EnsembleHome
from ensemble.limits import parse_cpu_weight, parse_disk, parse_memory, parse_pids
from ensemble.names import parse_machine_id, parse_unit_name, validate_service_name
from ensemble.state import auth
from ensemble.state.environment import DEFAULT_NETWORK, get_environment
from ensemble.state.machine import MachineStateManager
from ensemble.state.service import ServiceStateManager
from ensemble.state.unit import STARTED, UnitStateManager
from ensemble.status import collect, render

MAX_UNITS_PER_COMMAND = 1000


class UsageError(EnsembleError):
    pass


class Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(f"{message} (see '{self.prog} --help')")


# -- commands ------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _environment(args):
    """A session with the environment the command talks to; an error if there is none."""
    client = await connection.connect(args.zookeeper)
    try:
        await get_environment(client)
        yield client
    finally:
        await client.close()


async def cmd_bootstrap(reactor, args):
    from ensemble import local  # pyroute2 and friends: only these two commands need them

    home = EnsembleHome()
    config, resumed = await local.bootstrap(
        reactor, home, network=args.network, name=args.name, address=args.address, host_prefix=args.host_prefix,
        mode=args.network_mode, zookeeper_servers=args.zookeeper_servers,
        package_cache=_package_cache_settings(args),
    )
    verb = "restarted" if resumed else "bootstrapped"
    print(f"{verb} environment {config['name']} in {home.path}")
    print(f"zookeeper: {config['zookeeper']}")
    print(f"machine 0 agent log: {home.agent_log_path('machine-0')}")
    print(f"machine 0 containers (lxc path): {os.path.join(home.lxc_dir, 'machine-0')}")


async def cmd_create_environment(reactor, args):
    from ensemble import local
    from ensemble.names import validate_environment_name
    from ensemble.state.environment import initialize

    name = validate_environment_name(args.name)
    cidr = local.validate_network(args.network or DEFAULT_NETWORK["cidr"], args.host_prefix)
    network = {"cidr": cidr, "host-prefix": args.host_prefix, "mode": args.network_mode}
    units_zookeeper = None
    if args.units_zookeeper:
        if "/" in args.units_zookeeper:
            raise InvalidValue("--units-zookeeper takes HOST:PORT[,HOST:PORT...]; the root is the environment's")
        units_zookeeper, _ = connection.parse_zookeeper(args.units_zookeeper)
    if args.zookeeper is None and not os.environ.get("ENSEMBLE_ZOOKEEPER"):
        raise InvalidValue("create-environment needs --zookeeper HOST:PORT[/ROOT] (or $ENSEMBLE_ZOOKEEPER)")
    admin = connection.session_credential(args.zookeeper) or auth.new_admin()
    if admin.user != auth.ADMIN_USER:
        raise InvalidValue(f"create-environment needs the admin's credential in ${connection.AUTH_VARIABLE}, not {admin.user}'s")
    client = await connection.connect(args.zookeeper, create_root=True, credential=admin)
    try:
        await initialize(client, name, network, units_zookeeper=units_zookeeper,
                         package_cache=_package_cache_settings(args))
    finally:
        await client.close()
    print(f"created environment {name} at {client.servers}{client.root} ({cidr}, {args.network_mode})")
    if not os.environ.get(connection.AUTH_VARIABLE):
        print(f"admin credential (keep it secret; commands need it): {connection.AUTH_VARIABLE}={admin}")


async def cmd_machine_credential(reactor, args):
    machine_id = parse_machine_id(args.machine_id)
    admin = connection.session_credential(args.zookeeper)
    if admin is None or admin.user != auth.ADMIN_USER:
        raise InvalidValue(f"machine-credential needs the admin's credential (${connection.AUTH_VARIABLE} or ENSEMBLE_HOME)")
    async with _environment(args) as client:
        await MachineStateManager(client).get_machine(machine_id)  # it must exist
    print(auth.machine_credential(admin, machine_id))


async def cmd_add_machine(reactor, args):
    address = _validate_address(args.address) if args.address else None
    async with _environment(args) as client:
        machine = await MachineStateManager(client).add_machine(address=address)
    print(machine.id)


async def cmd_remove_machine(reactor, args):
    machine_id = parse_machine_id(args.machine_id)
    async with _environment(args) as client:
        await MachineStateManager(client).remove_machine(machine_id)
    print(f"removed machine {machine_id}")


def _validate_address(text):
    import netaddr

    if not netaddr.valid_ipv4(text, flags=netaddr.INET_PTON):
        raise InvalidValue(f"invalid address {text!r}: use an IPv4 address")
    return text


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


async def cmd_deploy(reactor, args):
    # Everything is validated before the one transaction that writes it.
    charm = Charm.load(args.charm_dir)
    service = validate_service_name(args.service or charm.name)
    config = charm.config(_parse_config(args.config))
    limits = _parse_limits(args)
    n = _parse_count(args.n)
    to = parse_machine_id(args.to) if args.to is not None else None
    bundle = charm.bundle()
    async with _environment(args) as client:
        if to is not None:
            await MachineStateManager(client).get_machine(to)
        _, units = await ServiceStateManager(client).deploy(
            service, bundle_id(charm.name, bundle), bundle, config, limits, n=n, to=to, endpoints=charm.endpoints
        )
    print(f"deployed service {service} ({charm.name}): {', '.join(units)}")


async def cmd_add_unit(reactor, args):
    service = validate_service_name(args.service)
    n = _parse_count(args.n)
    to = parse_machine_id(args.to) if args.to is not None else None
    async with _environment(args) as client:
        manager = ServiceStateManager(client)
        await manager.get_service(service)
        if to is not None:
            await MachineStateManager(client).get_machine(to)
        units = await manager.add_units(service, n=n, to=to)
    print(f"added {', '.join(units)}")


async def cmd_remove_unit(reactor, args):
    for name in args.units:
        parse_unit_name(name)
    async with _environment(args) as client:
        manager = UnitStateManager(client)
        # All must exist before any is touched.
        for name in args.units:
            await manager.get_unit(name)
        for name in args.units:
            await manager.remove_unit(name)
    print(f"removing {', '.join(args.units)}")


async def cmd_destroy_service(reactor, args):
    service = validate_service_name(args.service)
    async with _environment(args) as client:
        units = await ServiceStateManager(client).destroy_service(service)
    if units:
        print(f"destroying service {service}: removing {', '.join(units)}")
    else:
        print(f"destroyed service {service}")


async def cmd_add_relation(reactor, args):
    from ensemble.relations import parse_descriptor
    from ensemble.state.relation import RelationStateManager

    parse_descriptor(args.a), parse_descriptor(args.b)
    async with _environment(args) as client:
        relation, a, b = await RelationStateManager(client).add_relation(args.a, args.b)
    print(f"added relation {relation.relation_id(a[0])} between {a[0]}:{a[1]} and {b[0]}:{b[1]} "
          f"(interface {relation.interface})")


async def cmd_remove_relation(reactor, args):
    from ensemble.relations import parse_descriptor
    from ensemble.state.relation import RelationStateManager

    parse_descriptor(args.a), parse_descriptor(args.b)
    async with _environment(args) as client:
        relation = await RelationStateManager(client).remove_relation(args.a, args.b)
    first = relation.endpoints[0]["service"]
    print(f"removed relation {relation.relation_id(first)} between {' and '.join(relation.describe().split())}")


async def cmd_expose(reactor, args):
    service = validate_service_name(args.service)
    async with _environment(args) as client:
        before = await ServiceStateManager(client).set_exposed(service, True)
    print(f"service {service} is already exposed" if before else f"exposed service {service}")


async def cmd_unexpose(reactor, args):
    service = validate_service_name(args.service)
    async with _environment(args) as client:
        before = await ServiceStateManager(client).set_exposed(service, False)
    print(f"unexposed service {service}" if before else f"service {service} is not exposed")


async def cmd_status(reactor, args):
    from twisted.internet import threads

    from ensemble.zookeeper import server_modes

    async with _environment(args) as client:
        status = await collect(client)
        # Each server's own view: a lost member shows as down while the others serve.
        modes = await threads.deferToThread(server_modes, client.servers)
    head = {k: status.pop(k) for k in ("environment", "network")}
    print(render({**head, "zookeeper": modes, **status}, args.format))


async def cmd_service_addresses(reactor, args):
    service = validate_service_name(args.service)
    async with _environment(args) as client:
        await ServiceStateManager(client).get_service(service)
        addresses = []
        units = UnitStateManager(client)
        for unit in await units.get_all_units():
            if unit.service_name == service and unit.state == STARTED and unit.data.get("private-address"):
                addresses.append(unit.data["private-address"])
    for address in addresses:
        print(address)


async def cmd_debug_log(reactor, args):
    from ensemble import hostfs
    from ensemble.names import unit_key

    parse_unit_name(args.unit)
    if args.lines < 0:
        raise InvalidValue(f"invalid -n {args.lines}: give a number of lines, or 0 for all")
    async with _environment(args) as client:
        unit = await UnitStateManager(client).get_unit(args.unit)
    # The unit's root writes in this directory: read through hostfs (no links, regular
    # files only, a bounded tail), or it could print any host file, or never end.
    root = os.path.join(EnsembleHome().logs_dir, "units")
    relative = os.path.join(unit_key(args.unit), f"{unit_key(args.unit)}.log")
    try:
        text, end, cut = hostfs.tail_lines(root, relative, args.lines)
    except FileNotFoundError:
        raise EnsembleError(
            f"no log for {args.unit} on this host (it runs on machine {unit.machine_id}; "
            f"its hooks have not run yet, or its log is on that machine's host)"
        )
    if cut:
        print(f"(earlier output left out: showing the last {hostfs.TAIL_LIMIT >> 20} MiB of the log)",
              file=sys.stderr)
    sys.stdout.write(text)
    sys.stdout.flush()
    if args.follow:
        await _follow(reactor, root, relative, end)


async def _follow(reactor, root, relative, offset):
    from twisted.internet import task

    from ensemble import hostfs

    while True:
        await task.deferLater(reactor, 0.5, lambda: None)
        try:
            data, begin = hostfs.read_tail(root, relative, hostfs.TAIL_LIMIT, start=offset)
        except FileNotFoundError:
            return  # the unit was removed
        if begin > offset:
            print(f"({begin - offset} bytes left out)", file=sys.stderr)
        offset = begin + len(data)
        if data:
            sys.stdout.write(data.decode(errors="replace"))
            sys.stdout.flush()


async def cmd_destroy_environment(reactor, args):
    home = EnsembleHome()
    if not home.exists():
        from ensemble.errors import NoEnvironment

        raise NoEnvironment(home.path)
    if not args.yes and sys.stdin.isatty():
        answer = input(f"destroy environment in {home.path} and everything in it? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            raise EnsembleError("not destroyed")
    from ensemble import local

    config = await local.destroy_environment(reactor, home)
    print(f"destroyed environment {config.get('name')}")


async def cmd_machine_agent(reactor, args):
    from ensemble.machine.agent import MachineAgent

    machine_id = parse_machine_id(args.machine_id)
    units_memory = parse_memory(args.units_memory) if args.units_memory is not None else None
    units_pids = parse_pids(args.units_pids) if args.units_pids is not None else None
    driver = template = None
    home = EnsembleHome()
    if not args.no_containers:
        from ensemble.machine.container.driver import LXCDriver
        from ensemble.machine.container.template import Template

        template = Template()
        driver = LXCDriver(os.path.join(home.lxc_dir, f"machine-{machine_id}"), template, reactor=reactor)
    credential = connection.session_credential(args.zookeeper)
    if credential is not None and credential.user == auth.ADMIN_USER:
        credential = auth.machine_credential(credential, machine_id)  # never more than it needs
    if credential is not None and credential.user != f"machine-{machine_id}":
        raise InvalidValue(f"${connection.AUTH_VARIABLE} is {credential.user}'s credential, not machine-{machine_id}'s")
    client = await connection.connect(args.zookeeper, credential=credential)
    if credential is None and (await _environment_settings(client)).get("admin-id"):
        await client.close()
        raise InvalidValue(
            f"this environment has credentials: run the agent with ${connection.AUTH_VARIABLE} set to "
            f"what 'ensemble machine-credential {machine_id}' prints"
        )
    if driver is not None:
        try:
            await MachineStateManager(client).get_machine(machine_id)  # before making storage for it
        except BaseException:
            await client.close()
            raise
        home.ensure_storage()
        logging.getLogger("ensemble.machine").info("machine-%s: containers in %s", machine_id, driver.lxc_path)
    args.agent = MachineAgent(
        client, machine_id, reactor, manage_bridge=not args.no_bridge, driver=driver, template=template,
        unit_log_dir=os.path.join(home.logs_dir, "units"), overlay=not (args.no_bridge or args.no_overlay),
        firewall=not (args.no_bridge or args.no_firewall), names=not args.no_bridge,
        package_cache_dir=None if args.no_bridge or driver is None else os.path.join(home.storage_dir, "packages", f"machine-{machine_id}"),
        units_memory=units_memory, units_pids=units_pids,
    )
    await _run_agent(reactor, args.agent)


async def _environment_settings(client):
    from ensemble.state.client import NoAuth

    try:
        return await get_environment(client)
    except NoAuth:
        return {"admin-id": True}  # closed to this session: an environment with credentials
    except EnsembleError:
        return {}  # no environment there: the agent says so itself


async def cmd_unit_agent(reactor, args):
    from ensemble.unit.agent import UnitAgent

    parse_unit_name(args.unit)
    client = await connection.connect(args.zookeeper)
    args.agent = UnitAgent(client, args.unit, reactor)
    await _run_agent(reactor, args.agent)


async def _run_agent(reactor, agent):
    """Run until SIGTERM/SIGINT; then leave cleanly (the reactor turns both into shutdown)."""
    stopped = defer.Deferred()

    async def stop():
        await agent.stop()
        agent.stopped_cleanly = True
        stopped.callback(None)

    # Registered first: start-up may wait (for a subnet, say) and must stay stoppable.
    reactor.addSystemEventTrigger("before", "shutdown", lambda: defer.ensureDeferred(stop()))
    try:
        await agent.start()
    except BaseException:
        if agent.stop_requested:
            # Asked to stop while starting: what failed was cut short on purpose.
            await stopped
            return
        await agent.stop()
        raise
    await stopped


# -- parsing ---------------------------------------------------------------------------


def build_parser():
    parser = Parser(prog="ensemble", description="Deploy services, each unit in its own LXC container.")
    parser.add_argument("--version", action="version", version=f"ensemble {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens to stderr")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    commands.required = True

    def command(name, function, help, zookeeper=True):
        sub = commands.add_parser(name, help=help, description=help)
        sub.set_defaults(function=function)
        if zookeeper:
            sub.add_argument(
                "--zookeeper",
                metavar="HOST:PORT[,HOST:PORT...][/ROOT]",
                help="talk to this ZooKeeper instead of the environment in ENSEMBLE_HOME",
            )
        return sub

    sub = command("bootstrap", cmd_bootstrap, "start a local environment on this host", zookeeper=False)
    sub.add_argument("--network", metavar="CIDR", help="address range for containers (default 10.77.0.0/16)")
    sub.add_argument(
        "--host-prefix", type=int, default=24, metavar="N", help="each machine's subnet is a /N of it (default 24)"
    )
    sub.add_argument("--name", help="environment name (default: derived from ENSEMBLE_HOME)")
    sub.add_argument("--address", default="127.0.0.1", help="this host's address as machine 0")
    _network_mode_argument(sub)
    sub.add_argument(
        "--zookeeper-servers", type=int, default=1, metavar="N",
        help="run an ensemble of N ZooKeeper servers (1, 3, 5 or 7; default 1) that survives losing a minority",
    )
    _package_cache_arguments(sub)

    sub = command(
        "create-environment", cmd_create_environment,
        "create an environment in a running ZooKeeper, for machines that each run 'ensemble machine-agent'",
    )
    sub.add_argument("--name", required=True, help="environment name (used in container and bridge names)")
    sub.add_argument("--network", metavar="CIDR", help="address range for containers (default 10.77.0.0/16)")
    sub.add_argument(
        "--host-prefix", type=int, default=24, metavar="N", help="each machine's subnet is a /N of it (default 24)"
    )
    _network_mode_argument(sub)
    sub.add_argument(
        "--units-zookeeper", metavar="HOST:PORT[,HOST:PORT...]",
        help="where units reach ZooKeeper, if not where the agents do (e.g. an address inside the container network)",
    )
    _package_cache_arguments(sub)

    sub = command("add-machine", cmd_add_machine, "register a machine that will run its own agent")
    sub.add_argument("--address", metavar="IP", help="the machine's address")

    sub = command("machine-credential", cmd_machine_credential,
                  "print the ZooKeeper credential machine MACHINE's agent runs with (as $ENSEMBLE_AUTH)")
    sub.add_argument("machine_id", metavar="MACHINE")

    sub = command("remove-machine", cmd_remove_machine, "deregister a machine without units; frees its subnet")
    sub.add_argument("machine_id", metavar="MACHINE")

    sub = command("deploy", cmd_deploy, "create a service from a charm directory and add units")
    sub.add_argument("charm_dir", metavar="CHARM_DIR")
    sub.add_argument("service", metavar="SERVICE", nargs="?", help="service name (default: the charm's)")
    _placement_arguments(sub)
    sub.add_argument("--config", action="append", metavar="KEY=VALUE", help="set a charm option")
    sub.add_argument("--memory", metavar="SIZE", help="memory (and swap) limit per unit, e.g. 512M (default 1G)")
    sub.add_argument("--cpu-weight", metavar="N", help="relative CPU weight per unit, 1-10000 (100 is the norm; unset: no weight)")
    sub.add_argument("--pids", metavar="N", help="process limit per unit (default 1024)")
    sub.add_argument("--disk", metavar="SIZE",
                     help="disk per unit: its writable layer and its logs, e.g. 10G (default 4G)")

    sub = command("add-unit", cmd_add_unit, "add units to a service")
    sub.add_argument("service", metavar="SERVICE")
    _placement_arguments(sub)

    sub = command("remove-unit", cmd_remove_unit, "remove units; their containers are destroyed")
    sub.add_argument("units", metavar="UNIT", nargs="+")

    sub = command("destroy-service", cmd_destroy_service, "remove a service and all its units")
    sub.add_argument("service", metavar="SERVICE")

    sub = command("add-relation", cmd_add_relation,
                  "relate two services by a matching provides/requires pair of their charms")
    sub.add_argument("a", metavar="SERVICE[:RELATION]")
    sub.add_argument("b", metavar="SERVICE[:RELATION]")

    sub = command("remove-relation", cmd_remove_relation, "remove the relation between two services")
    sub.add_argument("a", metavar="SERVICE[:RELATION]")
    sub.add_argument("b", metavar="SERVICE[:RELATION]")

    sub = command("expose", cmd_expose,
                  "let anything reach the ports the service's units opened (other units, hosts, beyond)")
    sub.add_argument("service", metavar="SERVICE")

    sub = command("unexpose", cmd_unexpose,
                  "close the service's opened ports again to all but the units of related services")
    sub.add_argument("service", metavar="SERVICE")

    sub = command("status", cmd_status, "show machines, services and units")
    sub.add_argument("--format", choices=("yaml", "json"), default="yaml")

    sub = command("service-addresses", cmd_service_addresses, "print the addresses of a service's started units")
    sub.add_argument("service", metavar="SERVICE")

    sub = command("debug-log", cmd_debug_log, "show a unit's hook output (from this host)")
    sub.add_argument("unit", metavar="UNIT")
    sub.add_argument("-n", "--lines", type=int, default=100, help="last N lines (0: all; default 100)")
    sub.add_argument("-f", "--follow", action="store_true", help="keep printing new output")

    sub = command(
        "destroy-environment", cmd_destroy_environment, "stop and remove the local environment", zookeeper=False
    )
    sub.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")

    sub = command("machine-agent", cmd_machine_agent, "run a machine agent in the foreground")
    sub.add_argument("--machine-id", required=True, metavar="N")
    sub.add_argument(
        "--no-bridge", action="store_true", help="do not create the host bridge (the network is managed elsewhere)"
    )
    sub.add_argument(
        "--no-containers", action="store_true",
        help="give units addresses but no containers (for testing the control plane alone)",
    )
    sub.add_argument(
        "--no-overlay", action="store_true",
        help="do not program routes or VXLAN entries to other machines' subnets (implied by --no-bridge)",
    )
    sub.add_argument(
        "--no-firewall", action="store_true",
        help="let units reach every port of each other and of this host (implied by --no-bridge)",
    )
    sub.add_argument(
        "--units-memory", metavar="SIZE",
        help="memory (and swap) all units of this machine may use together (default: 80%% of the host's)",
    )
    sub.add_argument(
        "--units-pids", metavar="N",
        help="processes all units of this machine may run together (default: 80%% of the host's pid space)",
    )

    sub = command("unit-agent", cmd_unit_agent, "run a unit agent in the foreground")
    sub.add_argument("--unit", required=True, metavar="NAME")
    return parser


def _package_cache_arguments(sub):
    sub.add_argument("--package-mirror", metavar="URL",
                     help="the Debian mirror machines' package caches fetch from (default: each host's own apt "
                          "sources), e.g. http://mirror.example/debian")
    sub.add_argument("--package-proxy", metavar="URL",
                     help="an HTTP proxy the package caches fetch through (default: each host's apt proxy, if any)")
    sub.add_argument("--no-package-cache", action="store_true",
                     help="run no package cache: units cannot install packages (they have no route off their host)")


def _package_cache_settings(args):
    from ensemble.machine.package_cache import validate_upstream_url

    if args.no_package_cache and (args.package_mirror or args.package_proxy):
        raise InvalidValue("--no-package-cache cannot be given with --package-mirror or --package-proxy")
    return {
        "enabled": not args.no_package_cache,
        "mirror": args.package_mirror and validate_upstream_url(args.package_mirror, "--package-mirror"),
        "proxy": args.package_proxy and validate_upstream_url(args.package_proxy, "--package-proxy"),
    }


def _network_mode_argument(sub):
    sub.add_argument(
        "--network-mode", choices=("host-gw", "vxlan"), default="host-gw",
        help="how containers on different machines reach each other: host-gw (routes; hosts on one L2 "
             "network) or vxlan (an overlay; works across L3 networks). Default host-gw",
    )


def _placement_arguments(sub):
    sub.add_argument("--to", metavar="MACHINE", help="place the units on this existing machine")
    sub.add_argument("-n", type=int, default=1, metavar="N", help="number of units (default 1)")


# -- running ------------------------------------------------------------------------------


def _configure_logging(args):
    agent = args.command in ("machine-agent", "unit-agent")
    level = logging.INFO if (agent or args.verbose) else logging.CRITICAL
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # kazoo narrates every reconnect attempt; agents keep the warnings.
    logging.getLogger("ensemble.kazoo").setLevel(logging.WARNING if agent else logging.CRITICAL)


def _crash_log(exc):
    path = os.path.join(tempfile.gettempdir(), f"ensemble-crash-{os.getpid()}.log")
    try:
        with open(path, "w") as f:
            traceback.print_exception(type(exc), exc, exc.__traceback__, file=f)
    except OSError:
        return None
    return path


def _report(exc):
    from ensemble.state.client import ConnectionLost, NoAuth, SessionExpired

    if isinstance(exc, EnsembleError):
        message = str(exc)
    elif isinstance(exc, NoAuth):
        user = os.environ.get(connection.AUTH_VARIABLE, "").partition(":")[0]
        need = f"commands need the admin's credential (from ENSEMBLE_HOME, or ${connection.AUTH_VARIABLE})"
        if user == auth.ADMIN_USER:
            message = f"ZooKeeper refused: the admin credential in ${connection.AUTH_VARIABLE} is not this environment's"
        elif user:
            message = f"ZooKeeper refused: {user} may not do that; {need}"
        else:
            message = f"ZooKeeper refused: this session has no credential, or not this environment's; {need}"
    elif isinstance(exc, (ConnectionLost, SessionExpired)):
        message = (
            "lost the connection to ZooKeeper before it answered; the command may or may not have "
            "taken effect: check 'ensemble status'"
        )
    elif isinstance(exc, KeyboardInterrupt):
        message = "interrupted"
    else:
        where = _crash_log(exc)
        message = f"unexpected {type(exc).__name__}: {exc}" + (f" (details in {where})" if where else "")
    print(f"error: {message}", file=sys.stderr)
    return 1


def run(argv=None):
    """Run one command; returns the exit status."""
    try:
        args = build_parser().parse_args(argv)
    except EnsembleError as e:
        return _report(e)
    _configure_logging(args)
    from twisted.internet import reactor

    outcome = {"status": 0, "done": False, "shutting down": False}

    def shutting_down():
        outcome["shutting down"] = True

    async def body():
        try:
            await args.function(reactor, args)
        except (Exception, KeyboardInterrupt) as e:  # everything ends as one line
            outcome["status"] = _report(e)
        finally:
            outcome["done"] = True
            if not outcome["shutting down"]:
                reactor.stop()

    def begin():
        # Held here: a coroutine nothing refers to can be collected mid-await.
        outcome["running"] = defer.ensureDeferred(body())

    reactor.addSystemEventTrigger("before", "shutdown", shutting_down)
    reactor.callWhenRunning(begin)
    reactor.run()
    if not outcome["done"]:
        agent = getattr(args, "agent", None)
        if agent is not None and getattr(agent, "stopped_cleanly", False):
            return 0  # stopped on request while still starting (a hook was running, say)
        return _report(KeyboardInterrupt())
    return outcome["status"]


def main():
    sys.exit(run())
