"""Commands that show the environment: status, service addresses, a unit's log."""

import os
import sys

from ensemble.cli.common import environment
from ensemble.errors import EnsembleError, InvalidValue
from ensemble.home import EnsembleHome
from ensemble.names import parse_unit_name, validate_service_name
from ensemble.state.service import ServiceStateManager
from ensemble.state.unit import STARTED, UnitStateManager
from ensemble.status import collect, render


async def cmd_status(reactor, args):
    from twisted.internet import threads

    from ensemble.zookeeper import server_modes

    async with environment(args) as client:
        status = await collect(client)
        # Each server's own view: a lost member shows as down while the others serve.
        modes = await threads.deferToThread(server_modes, client.servers)
    head = {k: status.pop(k) for k in ("environment", "network")}
    print(render({**head, "zookeeper": modes, **status}, args.format))


async def cmd_service_addresses(reactor, args):
    service = validate_service_name(args.service)
    async with environment(args) as client:
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
    async with environment(args) as client:
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


def register(command):
    sub = command("status", cmd_status, "show machines, services and units")
    sub.add_argument("--format", choices=("yaml", "json"), default="yaml")


    sub = command("service-addresses", cmd_service_addresses, "print the addresses of a service's started units")
    sub.add_argument("service", metavar="SERVICE")


    sub = command("debug-log", cmd_debug_log, "show a unit's hook output (from this host)")
    sub.add_argument("unit", metavar="UNIT")
    sub.add_argument("-n", "--lines", type=int, default=100, help="last N lines (0: all; default 100)")
    sub.add_argument("-f", "--follow", action="store_true", help="keep printing new output")
