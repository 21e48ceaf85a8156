"""`ensemble ssh`: a root shell, or a command, inside a unit's container on this host."""

import os
import signal
import sys

from ensemble.cli.common import environment
from ensemble.errors import EnsembleError, UnitUnreachable
from ensemble.home import EnsembleHome
from ensemble.names import parse_unit_name
from ensemble.state.environment import get_environment
from ensemble.state.machine import MachineStateManager
from ensemble.state.unit import UnitStateManager

# The unit agent's directory (ensemble.unit.agent.DEFAULT_UNIT_DIR, where hooks run);
# not imported, which would load the whole unit agent for a shell.
UNIT_DIR = "/var/lib/ensemble/unit"
INSIDE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# $1: the directory to start in; the rest: what to run there. A login shell reads
# /etc/profile and root's ~/.profile, as sshd's would.
_SHELL = 'cd -- "$1" 2>/dev/null || cd; unset OLDPWD; shift; if [ -x /bin/bash ]; then exec /bin/bash -l; fi; exec /bin/sh -l'
_COMMAND = 'cd -- "$1" 2>/dev/null || cd; unset OLDPWD; shift; exec "$@"'
_COMMAND_LINE = 'cd -- "$1" 2>/dev/null || cd; unset OLDPWD; shift; exec /bin/sh -c "$1"'


def inside_argv(command):
    """What runs in the container: a login shell, one word as a shell command line,
    several words as they are."""
    if not command:
        return ["/bin/sh", "-c", _SHELL, "sh", UNIT_DIR]
    if len(command) == 1:
        return ["/bin/sh", "-c", _COMMAND_LINE, "sh", UNIT_DIR, command[0]]
    return ["/bin/sh", "-c", _COMMAND, "sh", UNIT_DIR, *command]


def inside_environment():
    """Root's own environment inside; of the caller's only TERM, for the terminal."""
    env = {"PATH": INSIDE_PATH, "HOME": "/root", "USER": "root", "LOGNAME": "root", "LANG": "C.UTF-8"}
    term = os.environ.get("TERM")
    if term and term.isprintable():
        env["TERM"] = term
    return env


async def cmd_ssh(reactor, args):
    from ensemble.machine.container.driver import LXCDriver
    from ensemble.machine.container.names import container_name

    parse_unit_name(args.unit)
    async with environment(args) as client:
        name = (await get_environment(client))["name"]
        unit = await UnitStateManager(client).get_unit(args.unit)
        machine_id = unit.machine_id
        if machine_id is None:
            raise UnitUnreachable(f"unit {args.unit} is not assigned to a machine (it is {unit.state})")
        # A machine's containers are where its agent's lxc path is: the machine-N
        # directories of this ENSEMBLE_HOME's storage are the machines this host holds.
        lxc_path = os.path.join(EnsembleHome().lxc_dir, f"machine-{machine_id}")
        if not os.path.isdir(lxc_path):
            machine = await MachineStateManager(client).get_machine(machine_id)
            where = f" at {machine.address}" if machine.address else ""
            raise UnitUnreachable(
                f"unit {args.unit} runs on machine {machine_id}{where}, whose containers are not on this host: "
                f"run 'ensemble ssh {args.unit}' there"
            )
    # Named as the machine agent names it, not read from the unit node: the unit's own
    # agent may write that node, and must not send an admin into another unit.
    container = container_name(name, args.unit)
    # No template: attaching never clones one. Not closed: it has no namespace helper,
    # and close() would tidy the machine's cgroup, which is the agent's business.
    driver = LXCDriver(lxc_path, None, reactor=reactor)
    state = await driver.state(container)
    if state is None:
        raise UnitUnreachable(
            f"unit {args.unit} has no container on this host (it is {unit.state}; "
            f"see 'ensemble status')"
        )
    if state != "RUNNING":
        raise UnitUnreachable(f"the container of unit {args.unit} ({container}) is {state.lower()}, not running")
    argv = await driver.attach_argv(container, inside_argv(args.command), env=inside_environment())
    return lambda: _attach(argv)


def _attach(argv):
    """Become lxc-attach, with this process's stdio, signals and exit status (run once
    the reactor has stopped)."""
    from ensemble.machine.container.driver import PATH

    sys.stdout.flush()
    sys.stderr.flush()
    # Python ignores these; exec keeps what is ignored, and the command inside would
    # inherit it (`ensemble ssh db/0 yes | head` would fail on EPIPE instead of ending
    # quietly, as on the host).
    for number in (signal.SIGPIPE, signal.SIGXFSZ):
        signal.signal(number, signal.SIG_DFL)
    try:
        os.execvpe(argv[0], argv, {"PATH": PATH})  # as the driver runs lxc tools
    except OSError as e:
        raise EnsembleError(f"cannot run {argv[0]}: {e.strerror}")


def register(command):
    sub = command(
        "ssh", cmd_ssh,
        "a root shell, or a command, inside a unit's container (on the host that holds it)",
        examples=(
            "ensemble ssh db/0                     a root login shell in db/0, on this terminal",
            "ensemble ssh db/0 -- ps aux           ps aux inside db/0; exits with its exit status",
            "ensemble ssh db/0 cat /etc/hostname   (-- is optional: every word after UNIT is the command's)",
            "ensemble ssh db/0 'ls /tmp | wc -l'   one word: a command line for /bin/sh inside",
            "echo hi | ensemble ssh db/0 cat       stdin, stdout and stderr are the command's",
        ),
    )
    # argparse shows a remainder as "..." alone.
    sub.usage = "%(prog)s [-h] [--zookeeper HOST:PORT[,HOST:PORT...][/ROOT]] UNIT [[--] COMMAND ...]"
    sub.add_argument("unit", metavar="UNIT", help="the unit, e.g. db/0; its container must run on this host")
    sub.add_argument(
        "command", metavar="COMMAND", nargs="...",
        help="what to run inside, as root, in the unit directory (else root's home): several words are "
             "run as they are (no shell), one word is a command line for /bin/sh; none: a login shell. "
             "Options of ssh itself go before UNIT",
    )
