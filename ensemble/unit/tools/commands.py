"""The hook tools' AMP commands, as Twisted declares them (the server's side; the
tools speak the same wire format through `wire`).

Values that are not plain strings (settings, config, lists) travel as JSON in `Text`
fields, as in pyjuju. An absent optional field means "not given" (no -r, no KEY…).
Every failure meant for the hook is an EnsembleError and reaches the tool as error
code `wire.ERROR_CODE` with the error's message.
"""

from twisted.protocols import amp

from ensemble.errors import EnsembleError
from ensemble.unit.tools.wire import ERROR_CODE, chunks


class Text(amp.Argument):
    """UTF-8 text of any length: longer than an AMP value, it is split over `name`,
    `name.1` … as `wire.chunks` does."""

    def fromBox(self, name, strings, objects, proto):
        parts = []
        key = name
        while key in strings:
            parts.append(strings.pop(key))
            key = b"%s.%d" % (name, len(parts))
        identifier = name.decode("ascii").replace("-", "_")
        if not parts and not self.optional:
            raise KeyError(name)
        objects[identifier] = b"".join(parts).decode("utf-8") if parts else None

    def toBox(self, name, strings, objects, proto):
        value = self.retrieve(objects, name.decode("ascii").replace("-", "_"), proto)
        if value is not None:
            strings.update(chunks(name, value.encode("utf-8")))


class HookCommand(amp.Command):
    errors = {EnsembleError: ERROR_CODE}


class RelationGet(HookCommand):
    commandName = b"relation_get"
    arguments = [
        (b"client_id", Text()),
        (b"relation_id", Text(optional=True)),
        (b"unit_name", Text(optional=True)),
        (b"setting_name", Text(optional=True)),
    ]
    response = [(b"data", Text())]  # JSON: the value, or all settings


class RelationSet(HookCommand):
    commandName = b"relation_set"
    arguments = [
        (b"client_id", Text()),
        (b"relation_id", Text(optional=True)),
        (b"json_blob", Text()),  # JSON object {key: value}; a blank value deletes
    ]
    response = []


class RelationIds(HookCommand):
    commandName = b"relation_ids"
    arguments = [(b"client_id", Text()), (b"relation_name", Text(optional=True))]
    response = [(b"ids", Text())]  # JSON list


class RelationList(HookCommand):
    commandName = b"relation_list"
    arguments = [(b"client_id", Text()), (b"relation_id", Text(optional=True))]
    response = [(b"members", Text())]  # JSON list


class ConfigGet(HookCommand):
    commandName = b"config_get"
    arguments = [(b"client_id", Text()), (b"option_name", Text(optional=True))]
    response = [(b"data", Text())]  # JSON: the value (null: none), or all options


class UnitGet(HookCommand):
    commandName = b"unit_get"
    arguments = [(b"client_id", Text()), (b"setting_name", Text())]
    response = [(b"data", Text())]  # JSON string


class OpenPort(HookCommand):
    commandName = b"open_port"
    arguments = [(b"client_id", Text()), (b"port", amp.Integer()), (b"proto", Text())]
    response = []


class ClosePort(HookCommand):
    commandName = b"close_port"
    arguments = [(b"client_id", Text()), (b"port", amp.Integer()), (b"proto", Text())]
    response = []


class Log(HookCommand):
    commandName = b"log"
    # No client id needed: a daemon started by a hook may still log (as in pyjuju).
    arguments = [(b"client_id", Text(optional=True)), (b"level", amp.Integer()), (b"message", Text())]
    response = []
