"""`ensemble`: argument parsing, then one function per command (in the modules named
in COMMAND_MODULES, each registering its own commands).

Every failure a user can cause ends as `error: <one line>` on stderr and exit status 1;
an unexpected one too, with the traceback in the log rather than on the screen. A wrong
command line exits 2; an interrupt 130 (143 for SIGTERM); a closed output pipe ends the
command quietly with 141, as shells report a process SIGPIPE killed.
"""

import argparse
import logging
import os
import signal
import sys
import tempfile
import traceback

from twisted.internet import defer

from ensemble import __version__, connection
from ensemble.cli.common import output_closed, pipe_closed
from ensemble.cli import (agent_commands, charm_commands, environment_commands, log_commands, service_commands,
                          ssh_command, status_commands)
from ensemble.errors import EnsembleError, InvalidValue, UsageError
from ensemble.state import auth

COMMAND_MODULES = (environment_commands, service_commands, charm_commands, status_commands, log_commands,
                   ssh_command, agent_commands)


# What shells report for a process killed by that signal (128 + its number), and
# argparse's status for a wrong command line.
USAGE_STATUS = 2
LOG_LEVEL_VARIABLE = "ENSEMBLE_LOG_LEVEL"  # agents': INFO unless it says otherwise
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
INTERRUPTED_STATUS = 128 + signal.SIGINT
CLOSED_PIPE_STATUS = 128 + signal.SIGPIPE


class Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(f"{message} (see '{self.prog} --help')")

    def parse_args(self, args=None, namespace=None):
        # argparse reports a subcommand's unknown options from the top parser: name the
        # subcommand's help instead, where those options are listed.
        known, extras = self.parse_known_args(args, namespace)
        if extras:
            chosen = self
            for action in self._actions:
                if isinstance(action, argparse._SubParsersAction):
                    chosen = action.choices.get(getattr(known, "command", None), self)
            chosen.error(f"unrecognized arguments: {' '.join(extras)}")
        return known


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
    asked = _log_level(os.environ[LOG_LEVEL_VARIABLE]) if agent and os.environ.get(LOG_LEVEL_VARIABLE) else None
    logging.basicConfig(
        level=level if asked is None else max(asked, logging.INFO),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if asked is not None:
        # The level asked for is ours; other libraries log no lower than INFO: at DEBUG,
        # pyroute2 formats every netlink message it reads, and a machine agent's pass
        # over a host's thousands of entries spent more time logging than working.
        logging.getLogger("ensemble").setLevel(asked)
    # kazoo narrates every reconnect attempt; agents keep the warnings.
    logging.getLogger("ensemble.kazoo").setLevel(logging.WARNING if agent else logging.CRITICAL)


def _log_level(name):
    """An agent's log level from $ENSEMBLE_LOG_LEVEL (DEBUG shows every reconciler pass
    and what it asked of ZooKeeper)."""
    level = logging.getLevelName(name.strip().upper())
    if name.strip().upper() not in LOG_LEVELS:
        raise InvalidValue(f"${LOG_LEVEL_VARIABLE} must be one of {', '.join(LOG_LEVELS)}, not {name!r}")
    return level


def _crash_log(exc):
    path = os.path.join(tempfile.gettempdir(), f"ensemble-crash-{os.getpid()}.log")
    try:
        with open(path, "w") as f:
            traceback.print_exception(type(exc), exc, exc.__traceback__, file=f)
    except OSError:
        return None
    return path


def _end_quietly():
    # What is still buffered goes to /dev/null: the interpreter's last flush at exit
    # would otherwise fail again and print "Exception ignored ...".
    devnull = os.open(os.devnull, os.O_WRONLY)
    for stream in (sys.stdout, sys.stderr):
        if pipe_closed(stream):
            os.dup2(devnull, stream.fileno())
    os.close(devnull)
    return CLOSED_PIPE_STATUS


def _report(exc, status=None):
    """Print `exc` as one line; returns the exit status it calls for."""
    from ensemble.state.client import ConnectionLost, NoAuth, SessionExpired

    if isinstance(exc, BrokenPipeError) and output_closed():
        return _end_quietly()
    if isinstance(exc, UsageError):
        message, status = str(exc), USAGE_STATUS
    elif isinstance(exc, EnsembleError):
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
        message, status = "interrupted", status or INTERRUPTED_STATUS
    else:
        where = _crash_log(exc)
        message = f"unexpected {type(exc).__name__}: {exc}" + (f" (details in {where})" if where else "")
    try:
        print(f"error: {message}", file=sys.stderr)
    except BrokenPipeError:
        return _end_quietly()
    return status or 1


def _note_signals(outcome):
    """Remember which signal stopped the reactor: Twisted's handlers stop it alike on
    SIGINT and SIGTERM, and the exit status tells them apart."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(signum)
        if callable(handler):
            def noted(number, frame, handler=handler):
                outcome.setdefault("signal", number)
                handler(number, frame)

            signal.signal(signum, noted)


def run(argv=None, parser=None, ready=None):
    """Run one command; returns the exit status. `parser`: build_parser()'s, if made
    already; `ready()`: called once the command is parsed and logging is set up,
    before anything of it runs (the agent starter's forked agents wait there)."""
    try:
        return _run(argv, parser, ready)
    except (KeyboardInterrupt, BrokenPipeError, EnsembleError) as e:
        # Outside the reactor: parsing (--help into a closed pipe, say), or after it stopped.
        return _report(e)


def _run(argv, parser, ready):
    args = (parser or build_parser()).parse_args(argv)
    _configure_logging(args)
    from twisted.internet import reactor

    if ready is not None:
        ready()

    outcome = {"status": 0, "done": False, "shutting down": False}

    def shutting_down():
        outcome["shutting down"] = True

    async def body():
        try:
            outcome["then"] = await args.function(reactor, args)
        except (Exception, KeyboardInterrupt) as e:  # everything ends as one line
            outcome["status"] = _report(e)
        finally:
            outcome["done"] = True
            if not outcome["shutting down"]:
                reactor.stop()

    def begin():
        _note_signals(outcome)  # Twisted has installed its handlers by now
        # Held here: a coroutine nothing refers to can be collected mid-await.
        outcome["running"] = defer.ensureDeferred(body())

    reactor.addSystemEventTrigger("before", "shutdown", shutting_down)
    reactor.callWhenRunning(begin)
    reactor.run()
    if not outcome["done"]:
        agent = getattr(args, "agent", None)
        if agent is not None and getattr(agent, "stopped_cleanly", False):
            return 0  # stopped on request while still starting (a hook was running, say)
        return _report(KeyboardInterrupt(), 128 + outcome.get("signal", signal.SIGINT))
    if outcome["status"] == 0 and callable(outcome.get("then")):
        # A command may return its last step, run with the reactor and the session gone
        # and the terminal its own (ssh becomes lxc-attach); it returns the exit status.
        return outcome["then"]()
    return outcome["status"]


def main():
    try:
        status = run()
    except SystemExit as e:  # argparse's --help and --version: their output is flushed below
        status = e.code
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        status = _end_quietly()
    sys.exit(status)
