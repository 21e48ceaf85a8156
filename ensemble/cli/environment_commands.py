"""Commands that make, join and remove an environment and its machines."""

import os
import sys

from ensemble import connection
from ensemble.cli.common import environment
from ensemble.errors import EnsembleError, InvalidValue
from ensemble.home import EnsembleHome
from ensemble.names import parse_machine_id
from ensemble.state import auth
from ensemble.state.environment import DEFAULT_NETWORK
from ensemble.state.machine import MachineStateManager


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
    async with environment(args) as client:
        await MachineStateManager(client).get_machine(machine_id)  # it must exist
    print(auth.machine_credential(admin, machine_id))


async def cmd_add_machine(reactor, args):
    address = _validate_address(args.address) if args.address else None
    async with environment(args) as client:
        machine = await MachineStateManager(client).add_machine(address=address)
    print(machine.id)


async def cmd_remove_machine(reactor, args):
    machine_id = parse_machine_id(args.machine_id)
    removed = []
    async with environment(args) as client:
        if args.force:
            from ensemble.state.dead_machine import force_remove_machine

            removed = await force_remove_machine(client, machine_id)
        else:
            await MachineStateManager(client).remove_machine(machine_id)
    if removed:
        print(f"removed units {', '.join(removed)} (in place of machine {machine_id}'s agent)")
    print(f"removed machine {machine_id}")


def _validate_address(text):
    import netaddr

    if not netaddr.valid_ipv4(text, flags=netaddr.INET_PTON):
        raise InvalidValue(f"invalid address {text!r}: use an IPv4 address")
    return text


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


def register(command):
    sub = command("bootstrap", cmd_bootstrap, "start a local environment on this host", zookeeper=False, examples=[
        "ensemble bootstrap",
        "ENSEMBLE_HOME=~/lab ensemble bootstrap --network 10.199.0.0/16 --name lab",
        "ensemble bootstrap --zookeeper-servers 3 --network-mode vxlan",
    ])
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
        examples=["ensemble create-environment --zookeeper 192.0.2.1:2181/prod --name prod --network 10.80.0.0/16"],
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


    sub = command("add-machine", cmd_add_machine, "register a machine that will run its own agent",
                  examples=["ensemble add-machine --address 192.0.2.10"])
    sub.add_argument("--address", metavar="IP", help="the machine's address")


    sub = command("machine-credential", cmd_machine_credential,
                  "print the ZooKeeper credential machine MACHINE's agent runs with (as $ENSEMBLE_AUTH)",
                  examples=["ENSEMBLE_AUTH=$(ensemble machine-credential 1) ensemble machine-agent --machine-id 1 "
                            "--zookeeper 192.0.2.1:2181"])
    sub.add_argument("machine_id", metavar="MACHINE", help="the machine's id, as add-machine printed it")


    sub = command("remove-machine", cmd_remove_machine, "deregister a machine without units; frees its subnet",
                  examples=["ensemble remove-machine 2", "ensemble remove-machine --force 2"])
    sub.add_argument("machine_id", metavar="MACHINE", help="the machine's id")
    sub.add_argument("--force", action="store_true",
                     help="for a machine whose agent will never run again: first remove its units from the "
                          "environment, as its agent would have (refused while its agent runs)")


    sub = command(
        "destroy-environment", cmd_destroy_environment, "stop and remove the local environment", zookeeper=False,
        examples=["ensemble destroy-environment", "ENSEMBLE_HOME=~/lab ensemble destroy-environment -y"],
    )
    sub.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
