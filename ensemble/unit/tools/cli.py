"""The hook tools, as charms call them: same arguments, defaults and output as pyjuju's
(CHARM-RUNTIME.md 1.2-1.4), except that a failure is one line on stderr
(`relation-get: error: …`) and exit status 1, where pyjuju printed a traceback and
exited 0. Argument errors are argparse's (usage, one line, exit 2).

Each tool makes one call to the unit agent (`wire`), found by JUJU_AGENT_SOCKET (or
-s) with the hook's JUJU_CLIENT_ID (or --client-id); the ENSEMBLE_* names of both
are read too. Nothing here imports Twisted: a tool is started for every call a hook
makes, so it must start fast.
"""

import argparse
import json
import os
import sys

from ensemble.errors import EnsembleError
from ensemble.unit.tools import output, wire


FORMATS = {"smart": output.smart, "json": output.as_json}
LEVELS = {"CRITICAL": 50, "FATAL": 50, "ERROR": 40, "WARNING": 30, "WARN": 30, "INFO": 20, "DEBUG": 10, "NOTSET": 0}


class ToolError(EnsembleError):
    """A tool's own failure (bad input, unreadable file)."""


def _env(name):
    return os.environ.get(f"JUJU_{name}") or os.environ.get(f"ENSEMBLE_{name}")


def _run(prog, arguments, call, formats=None, needs_client_id=True, argv=None):
    """Parse argv for tool `prog` (its own arguments added by `arguments(parser)`),
    make its call (`call(options, agent)` -> result) and print the result in the
    chosen format; the exit status."""
    formats = {**FORMATS, **(formats or {})}
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("-o", "--output", metavar="FILE", help="write the output to FILE")
    parser.add_argument("-s", "--socket", help="the unit agent's socket (default: $JUJU_AGENT_SOCKET)")
    parser.add_argument("--client-id", help="the hook's context (default: $JUJU_CLIENT_ID)")
    parser.add_argument("--format", default="smart", choices=list(formats))
    # pyjuju's options for the tool's own log: accepted so that charms passing them
    # still run; the tools log nothing of their own.
    parser.add_argument("--log-file", metavar="FILE", help=argparse.SUPPRESS)
    parser.add_argument("--log-level", metavar="LEVEL", help=argparse.SUPPRESS)
    arguments(parser)
    options = parser.parse_args(argv)

    options.socket = options.socket or _env("AGENT_SOCKET")
    if not options.socket:
        return _usage(parser, "No JUJU_AGENT_SOCKET/-s option found")
    options.client_id = options.client_id or _env("CLIENT_ID")
    if not options.client_id and needs_client_id:
        return _usage(parser, "No JUJU_CLIENT_ID/--client_id option found")

    def agent(command, **fields):
        return wire.call(options.socket, command, client_id=options.client_id, **fields)

    try:
        result = call(options, agent)
        out, err = formats[options.format](result, options)
        if options.output:
            with open(options.output, "wb") as stream:
                stream.write(out.encode("utf-8", "replace"))
        elif out:
            sys.stdout.buffer.write(out.encode("utf-8", "replace"))
            sys.stdout.flush()
        if err:
            sys.stderr.write(err)
    except EnsembleError as e:
        return _fail(prog, e)
    except OSError as e:
        return _fail(prog, f"{e.filename + ': ' if e.filename else ''}{e.strerror or e}")
    except Exception as e:  # a bug: still one line, as any other failure
        return _fail(prog, f"internal error: {type(e).__name__}: {e}")
    return 0


def _usage(parser, message):
    parser.print_usage(sys.stderr)
    print(message, file=sys.stderr)
    return 2


def _fail(prog, message):
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 1


def _relation_id(parser):
    parser.add_argument("-r", dest="relation_id", default="", metavar="RELATION_ID",
                        help="a relation of this unit's service, as relation-ids prints it")


# -- relations -----------------------------------------------------------------------


def relation_get(argv=None):
    """relation-get [-r RELATION_ID] [KEY|-] [UNIT]: one setting of UNIT (default
    $JUJU_REMOTE_UNIT) in the relation, or all of them."""

    def arguments(parser):
        _relation_id(parser)
        parser.add_argument("key", nargs="?", default="", metavar="KEY|-",
                            help="the setting; '-' or none: all settings")
        parser.add_argument("unit", nargs="?", default=_env("REMOTE_UNIT") or "", metavar="UNIT")

    def call(options, agent):
        if options.key == "-":
            options.key = ""  # '-' is there so that a UNIT can follow: all keys
        answer = agent("relation_get", relation_id=options.relation_id or None,
                       unit_name=options.unit or None, setting_name=options.key or None)
        return json.loads(answer["data"])

    return _run("relation-get", arguments, call, {"shell": output.shell}, argv=argv)


def relation_set(argv=None):
    """relation-set [-r RELATION_ID] KEY=VALUE…: set the unit's settings in the
    relation when the hook succeeds; KEY=@FILE reads FILE, KEY= deletes KEY."""

    def arguments(parser):
        _relation_id(parser)
        parser.add_argument("settings", nargs="*", metavar="KEY=VALUE")

    def call(options, agent):
        settings = _settings(options.settings)
        agent("relation_set", relation_id=options.relation_id or None, json_blob=json.dumps(settings))

    return _run("relation-set", arguments, call, argv=argv)


def _settings(pairs):
    settings = {}
    for pair in pairs:
        if "=" not in pair:
            raise ToolError(f"Expected `option=value`. Found `{pair}`")  # pyjuju's words
        key, value = pair.split("=", 1)
        if value.startswith("@"):
            path = value[1:]
            try:
                with open(path, "rb") as f:
                    value = f.read().decode("utf-8")
            except FileNotFoundError:
                raise ToolError(f"No such file or directory: {path} (argument:{key})")
            except OSError as e:
                raise ToolError(f"cannot read {path}: {e.strerror} (argument:{key})")
            except UnicodeDecodeError:
                raise ToolError(f"{path} is not UTF-8 text (argument:{key})")
        settings[key] = value
    return settings


def relation_list(argv=None):
    """relation-list [-r RELATION_ID]: the remote units of the relation."""

    def call(options, agent):
        return json.loads(agent("relation_list", relation_id=options.relation_id or None)["members"])

    return _run("relation-list", _relation_id, call, {"eval": output.members_eval}, argv=argv)


def relation_ids(argv=None):
    """relation-ids [RELATION_NAME]: the ids of the service's relations of that name
    (default $JUJU_RELATION)."""

    def arguments(parser):
        parser.add_argument("relation_name", nargs="?", default=_env("RELATION") or "", metavar="RELATION_NAME")

    def call(options, agent):
        return json.loads(agent("relation_ids", relation_name=options.relation_name or None)["ids"])

    return _run("relation-ids", arguments, call, argv=argv)


# -- the unit ------------------------------------------------------------------------


def config_get(argv=None):
    """config-get [OPTION]: an option of the service (its default when not set), or
    all of them."""

    def arguments(parser):
        parser.add_argument("option", nargs="?", default="", metavar="OPTION")

    def call(options, agent):
        return json.loads(agent("config_get", option_name=options.option or None)["data"])

    return _run("config-get", arguments, call, argv=argv)


def unit_get(argv=None):
    """unit-get private-address|public-address"""

    def arguments(parser):
        parser.add_argument("setting", metavar="private-address|public-address")

    def call(options, agent):
        return json.loads(agent("unit_get", setting_name=options.setting)["data"])

    return _run("unit-get", arguments, call, argv=argv)


def _port(text):
    """'80', '80/tcp', '53/udp' -> (port, protocol), in pyjuju's words when wrong."""
    parts = text.split("/")
    if len(parts) > 2:
        raise argparse.ArgumentTypeError(f"Invalid format for port/protocol, got {text!r}")
    port, protocol = parts if len(parts) == 2 else (parts[0], "tcp")
    try:
        port = int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"Invalid port, must be an integer, got {port!r}")
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"Invalid port, must be from 1 to 65535, got {port!r}")
    if protocol.lower() not in ("tcp", "udp"):
        raise argparse.ArgumentTypeError(f"Invalid protocol, must be 'tcp' or 'udp', got {protocol!r}")
    return port, protocol.lower()


def _port_tool(prog, command, argv):
    def arguments(parser):
        parser.add_argument("port", metavar="PORT[/PROTOCOL]", type=_port,
                            help="the port; the protocol is tcp unless given")

    def call(options, agent):
        port, protocol = options.port
        agent(command, port=port, proto=protocol)

    return _run(prog, arguments, call, argv=argv)


def open_port(argv=None):
    """open-port PORT[/PROTOCOL]: accept connections on the port (at once)."""
    return _port_tool("open-port", "open_port", argv)


def close_port(argv=None):
    """close-port PORT[/PROTOCOL]: stop accepting connections on the port (at once)."""
    return _port_tool("close-port", "close_port", argv)


# -- the log -------------------------------------------------------------------------


def _log_tool(prog, argv):
    def arguments(parser):
        parser.add_argument("-l", dest="level", default="INFO", metavar="CRITICAL|ERROR|WARNING|INFO|DEBUG",
                            help="the message's level, a name or a number (default INFO)")
        parser.add_argument("message", nargs="+")

    def call(options, agent):
        level = options.level.upper()
        if level.isdigit():
            level = int(level)
        elif level in LEVELS:
            level = LEVELS[level]
        else:
            # pyjuju logged such a message at INFO; refusing it would fail the hook.
            print(f"{prog}: warning: unknown level {options.level!r}, logged at INFO", file=sys.stderr)
            level = LEVELS["INFO"]
        agent("log", level=level, message=" ".join(options.message))

    return _run(prog, arguments, call, needs_client_id=False, argv=argv)


def juju_log(argv=None):
    """juju-log [-l LEVEL] MESSAGE…: a line in the unit agent's log."""
    return _log_tool("juju-log", argv)


def ensemble_log(argv=None):
    """ensemble-log [-l LEVEL] MESSAGE…: juju-log by its 2011 name."""
    return _log_tool("ensemble-log", argv)
