"""Commands that show the environment: status, service addresses (logs: log_commands)."""

import errno
import math
import os
import sys

from ensemble.cli.common import environment, output_closed
from ensemble.errors import InvalidValue
from ensemble.names import validate_service_name
from ensemble.state.service import ServiceStateManager
from ensemble.state.unit import STARTED, UnitStateManager
from ensemble.status import collect, render


# Before each new status on a terminal: cursor home, clear the screen.
CLEAR_SCREEN = "\033[H\033[2J"
# Between statuses written elsewhere (a YAML document separator: the stream stays YAML).
SEPARATOR = "---"


async def _status_text(client, fmt):
    from twisted.internet import threads

    from ensemble.zookeeper import server_modes

    status = await collect(client)
    # Each server's own view: a lost member shows as down while the others serve.
    modes = await threads.deferToThread(server_modes, client.servers)
    head = {k: status.pop(k) for k in ("environment", "network")}
    return render({**head, "zookeeper": modes, **status}, fmt)


async def cmd_status(reactor, args):
    if args.watch is None:
        async with environment(args) as client:
            text = await _status_text(client, args.format)
        print(text)
        return
    if not 0 < args.watch < math.inf:
        raise InvalidValue(f"--watch takes a number of seconds above 0, not {args.watch:g}")
    await _watch_status(reactor, args)


async def _watch_status(reactor, args):
    """Print the status, then again whenever it changed, until interrupted (the
    reactor stops on Ctrl-C) or nobody reads the output any more."""
    from twisted.internet import task


    terminal = sys.stdout.isatty()
    async with environment(args) as client:
        shown = None
        while True:
            text = await _status_text(client, args.format)
            if text != shown:
                if shown is not None or terminal:
                    sys.stdout.write(CLEAR_SCREEN if terminal else SEPARATOR + "\n")
                print(text, flush=True)
                shown = text
            elif output_closed():
                # Unchanged, so nothing was written that would have found out.
                raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))
            await task.deferLater(reactor, args.watch, lambda: None)


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


def register(command):
    sub = command("status", cmd_status, "show machines, services and units", examples=[
        "ensemble status",
        "ensemble status --format json",
        "ensemble status --watch 5",
    ])
    sub.add_argument("--format", choices=("yaml", "json"), default="yaml", help="output format (default yaml)")
    sub.add_argument("--watch", nargs="?", type=float, const=2.0, metavar="SECONDS",
                     help="look again every SECONDS (default 2) and print the status again whenever it changed, "
                          "until Ctrl-C")


    sub = command("service-addresses", cmd_service_addresses, "print the addresses of a service's started units",
                  examples=["ensemble service-addresses db"])
    sub.add_argument("service", metavar="SERVICE", help="the service whose units' private addresses to print")

