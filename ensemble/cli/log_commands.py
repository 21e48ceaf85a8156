"""`ensemble debug-log`: this host's unit and agent logs, merged in time order
(the reading is ensemble.unit_logs; ZooKeeper only says where other units run)."""

import sys

from ensemble import hostfs, log_layout, unit_logs
from ensemble.cli.common import environment
from ensemble.errors import EnsembleError, InvalidValue, UnitNotFound
from ensemble.home import EnsembleHome
from ensemble.names import parse_unit_name, unit_key

FOLLOW_INTERVAL = 0.5  # seconds between two looks at the files with -f


def _note(text):
    print(f"({text})", file=sys.stderr, flush=True)


async def _environment_units(args):
    """{unit name: its machine id or None} from ZooKeeper; None if the environment
    cannot be reached (said on stderr: the files alone are shown)."""
    from ensemble.state.client import ConnectionLost, NoAuth, SessionExpired
    from ensemble.state.unit import UnitStateManager

    try:
        async with environment(args) as client:
            units = await UnitStateManager(client).get_all_units()
    except (EnsembleError, ConnectionLost, SessionExpired, NoAuth) as e:
        reason = str(e) or type(e).__name__
        _note(f"cannot reach the environment ({reason}): showing this host's files only, "
              f"without where other units run")
        return None
    return {u.name: u.machine_id for u in units if "malformed" not in u.data}


def _where(name, machine, local_machines):
    """Where a unit without a log on this host has it, in one line."""
    if machine is None:
        return f"{name} is not on a machine yet: no log anywhere"
    if machine in local_machines:
        return f"{name} runs on machine {machine}, on this host: no log yet"
    return (f"{name} runs on machine {machine}: its log is on that machine's host, in "
            f"$ENSEMBLE_HOME/logs/{log_layout.UNITS}/{unit_key(name)}/{log_layout.hook_log(unit_key(name))} there")


def _report_elsewhere(names, units, logs, show_removed):
    """A line on stderr for each unit (of `names`, or every unit in the environment)
    whose log is not on this host; UnitNotFound for a name known nowhere."""
    live = unit_logs.live_units(logs)
    removed = {name for name, _, _ in unit_logs.removed_units(logs)}
    local_machines = {int(label.partition("-")[2]) for label, _ in unit_logs.machine_logs(logs)}
    for name in names or sorted(units or {}, key=lambda n: parse_unit_name(n)):
        if name in live:
            continue
        if units is not None and name in units:
            _note(_where(name, units[name], local_machines))
        elif name in removed:
            if not show_removed:
                _note(f"{name} was removed: --removed shows its logs")
        elif units is not None:
            raise UnitNotFound(name)
        else:
            _note(f"no log for {name} on this host")


async def cmd_debug_log(reactor, args):
    names = []
    for name in args.units:
        parse_unit_name(name)  # before it becomes a path
        if name not in names:
            names.append(name)
    if args.lines < 0:
        raise InvalidValue(f"invalid -n {args.lines}: give a number of lines, or 0 for all")
    logs = EnsembleHome().logs_dir
    units = await _environment_units(args)
    _report_elsewhere(names, units, logs, args.removed)

    def discover():
        return unit_logs.sources(logs, names or None, args.removed)

    def emit(label, line):
        sys.stdout.write(unit_logs.format_line(label, line))

    # Without --removed, nothing of an earlier unit of a name: not even the machine
    # agent's lines about it.
    since = {} if args.removed else unit_logs.removal_keys(logs, names)
    wanted = unit_logs.mentions(names, since) if names else None
    reading = unit_logs.read(discover(), emit, args.lines, wanted, whole_lines=args.follow)
    sys.stdout.flush()
    for source in reading.cut:
        _note(f"earlier output of {source.path} left out: showing its last {hostfs.TAIL_LIMIT >> 20} MiB")
    if args.follow:
        for refusal in reading.refused:
            _note(f"{refusal}; following the others")
        await _follow(reactor, discover, reading, wanted)
    elif reading.refused:
        first, more = reading.refused[0], reading.refused[1:]
        if more:
            raise EnsembleError(f"{first} (and {', '.join(e.path for e in more)}, the same)")
        raise first


async def _follow(reactor, discover, reading, wanted):
    from twisted.internet import task

    follower = unit_logs.Follower(discover, reading.offsets, wanted, refused=[e.path for e in reading.refused])
    while True:
        await task.deferLater(reactor, FOLLOW_INTERVAL, lambda: None)
        lines = follower.poll()
        for label, line in lines:
            sys.stdout.write(unit_logs.format_line(label, line))
        if lines:
            sys.stdout.flush()


HELP = "show this host's unit hook output and agent logs, merged in time order"


def register(command):
    sub = command(
        "debug-log", cmd_debug_log, HELP,
        examples=(
            "ensemble debug-log                       the last 100 lines of every log on this host",
            "ensemble debug-log db/0 web/0 -n 20      the last 20 lines of db/0's and web/0's",
            "ensemble debug-log -f                    then keep printing new lines (Ctrl-C ends)",
            "ensemble debug-log hello/0 --removed     also the logs of earlier, removed hello/0s",
            "ensemble debug-log -n 0 | grep ERROR     everything this host still has",
        ),
    )
    sub.description = (
        f"{HELP}.\n\n"
        "What it reads, in $ENSEMBLE_HOME/logs on this host: each unit's hook output (every line\n"
        "timed, with its hook's name) and its unit agent's log, and the machine agents' logs.\n"
        "Each line is prefixed with where it is from ('db/0 | ', 'machine-0 | ').\n"
        "Units whose logs are on another machine's host are named on stderr, with where.\n"
        "ZooKeeper is asked only that; without it the files alone are shown."
    )
    sub.add_argument(
        "units", metavar="UNIT", nargs="*",
        help="only these units (e.g. db/0): their hook output, their unit agents' logs, and the "
             "machine agents' lines that name them. None: everything on this host",
    )
    sub.add_argument("-n", "--lines", type=int, default=100, metavar="N",
                     help="the last N lines of the merged output (0: all; default 100)")
    sub.add_argument("-f", "--follow", action="store_true",
                     help="keep printing new lines of every log, also of units that appear meanwhile, "
                          "until interrupted")
    sub.add_argument("--removed", action="store_true",
                     help="also the logs of removed units (an earlier unit of a name now re-used "
                          "included), labelled 'NAME (removed DATE TIME)'")
