"""`ensemble`: argument parsing, then one function per command (in the modules named
in COMMAND_MODULES, each registering its own commands).

Every failure a user can cause ends as `error: <one line>` on stderr and exit status 1;
an unexpected one too, with the traceback in the log rather than on the screen.
"""

import argparse
import logging
import os
import sys
import tempfile
import traceback

from twisted.internet import defer

from ensemble import __version__, connection
from ensemble.cli import agent_commands, environment_commands, service_commands, status_commands
from ensemble.errors import EnsembleError
from ensemble.state import auth

COMMAND_MODULES = (environment_commands, service_commands, status_commands, agent_commands)


class UsageError(EnsembleError):
    pass


class Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(f"{message} (see '{self.prog} --help')")


def build_parser():
    parser = Parser(prog="ensemble", description="Deploy services, each unit in its own LXC container.")
    parser.add_argument("--version", action="version", version=f"ensemble {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens to stderr")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    commands.required = True

    def command(name, function, help, zookeeper=True, examples=()):
        """A subcommand; `examples`: command lines shown at the end of its --help."""
        epilog = "examples:\n" + "\n".join(f"  {line}" for line in examples) if examples else None
        sub = commands.add_parser(name, help=help, description=help, epilog=epilog,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        sub.set_defaults(function=function)
        if zookeeper:
            sub.add_argument(
                "--zookeeper",
                metavar="HOST:PORT[,HOST:PORT...][/ROOT]",
                help="talk to this ZooKeeper instead of the environment in ENSEMBLE_HOME",
            )
        return sub

    for module in COMMAND_MODULES:
        module.register(command)
    return parser


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
