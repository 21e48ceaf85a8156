"""Validation of names that come from users, before they become paths, node names,
container names or interface names."""

import re

from ensemble.errors import InvalidName

SERVICE_MAX = 40
_SERVICE_RE = re.compile(r"[a-z][a-z0-9-]*\Z")
_ENV_RE = re.compile(r"[a-z][a-z0-9-]*\Z")
ENV_MAX = 16


def _printable(value):
    return repr(value) if len(value) <= 60 else repr(value[:57] + "...")


def validate_service_name(name):
    if not isinstance(name, str) or not _SERVICE_RE.match(name) or len(name) > SERVICE_MAX:
        raise InvalidName(
            f"invalid service name {_printable(str(name))}: "
            f"use [a-z][a-z0-9-]*, at most {SERVICE_MAX} characters"
        )
    return name


def validate_environment_name(name):
    if not isinstance(name, str) or not _ENV_RE.match(name) or len(name) > ENV_MAX:
        raise InvalidName(
            f"invalid environment name {_printable(str(name))}: "
            f"use [a-z][a-z0-9-]*, at most {ENV_MAX} characters"
        )
    return name


# Unit numbers become node, container and host names: bounded like the service part.
UNIT_NUMBER_DIGITS = 9


def parse_unit_name(name):
    """'web/0' -> ('web', 0)."""
    service, sep, number = str(name).partition("/")
    if (
        not sep or not number.isdigit() or not number.isascii() or (len(number) > 1 and number[0] == "0")
        or len(number) > UNIT_NUMBER_DIGITS
    ):
        raise InvalidName(
            f"invalid unit name {_printable(str(name))}: use SERVICE/N, e.g. web/0 "
            f"(N at most {UNIT_NUMBER_DIGITS} digits)"
        )
    try:
        validate_service_name(service)
    except InvalidName:
        raise InvalidName(
            f"invalid unit name {_printable(str(name))}: the service part must be [a-z][a-z0-9-]*, "
            f"at most {SERVICE_MAX} characters"
        )
    return service, int(number)


def unit_name(service, number):
    return f"{service}/{number}"


def unit_key(name):
    """The node name of a unit: 'web/0' -> 'web-0' (a '/' cannot be in a node name)."""
    service, number = parse_unit_name(name)
    return f"{service}-{number}"


def unit_name_from_key(key):
    service, sep, number = key.rpartition("-")
    if not sep:
        raise InvalidName(f"invalid unit key {key!r}")
    name = f"{service}/{number}"
    parse_unit_name(name)
    return name


def parse_machine_id(value):
    text = str(value).strip()
    if not text.isdigit() or not text.isascii() or len(text) > 10:
        raise InvalidName(f"invalid machine id {_printable(str(value))}: use a number, e.g. 0")
    return int(text)


def machine_key(machine_id):
    return f"machine-{int(machine_id):010d}"


def machine_id_from_key(key):
    prefix, sep, number = key.partition("-")
    if prefix != "machine" or not number.isdigit():
        raise InvalidName(f"invalid machine key {key!r}")
    return int(number)
