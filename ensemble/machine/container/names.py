"""Container and interface names, derived from validated user names.

A container is `ens-<environment>-<service>-<n>` for unit `<service>/<n>`: unique per
environment (hence per host), at most 64 characters of `[a-z0-9-]`. Its host-side veth
is `ve-` + 12 hex digits of a hash of the container name (15 characters, the kernel's
limit); `ve-` is the prefix `ensemble.network.bridge.remove_stale_veths` treats as ours.
"""

import hashlib
import re

from ensemble.errors import InvalidName
from ensemble.names import parse_unit_name, validate_environment_name
from ensemble.network.bridge import IFNAME_MAX, VETH_PREFIX

PREFIX = "ens-"
NAME_MAX = 64
HOSTNAME_MAX = 63
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]*\Z")
_HOSTNAME_RE = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?\Z")


def _digest(text, length):
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def container_name(environment, unit_name):
    """('prod', 'web/0') -> 'ens-prod-web-0'. A service name too long to fit is cut and
    given a hash of the whole name, so the result stays unique and at most 64 long."""
    validate_environment_name(environment)
    service, number = parse_unit_name(unit_name)
    name = f"{PREFIX}{environment}-{service}-{number}"
    if len(name) > NAME_MAX:
        tag = _digest(f"{environment}/{service}", 8)
        room = NAME_MAX - len(f"{PREFIX}{environment}--{tag}-{number}")
        name = f"{PREFIX}{environment}-{service[:room].rstrip('-')}-{tag}-{number}"
    return validate_container_name(name)


def validate_container_name(name):
    """A name that is safe as a directory, a cgroup and an LXC container name."""
    if not isinstance(name, str) or len(name) > NAME_MAX or not _NAME_RE.match(name):
        shown = repr(name) if len(str(name)) <= 60 else repr(str(name)[:57] + "...")
        raise InvalidName(
            f"invalid container name {shown}: use [a-z0-9-], starting with a letter or digit, "
            f"at most {NAME_MAX} characters"
        )
    return name


def hostname(unit_name):
    """The hostname of a unit's container: 'web/0' -> 'web-0'."""
    service, number = parse_unit_name(unit_name)
    return validate_hostname(f"{service}-{number}")


def validate_hostname(name):
    if not isinstance(name, str) or len(name) > HOSTNAME_MAX or not _HOSTNAME_RE.match(name):
        raise InvalidName(
            f"invalid hostname {str(name)[:60]!r}: use [a-z0-9-], not starting or ending with '-', "
            f"at most {HOSTNAME_MAX} characters"
        )
    return name


def veth_name(container):
    """The host-side veth of a container: 've-' + 12 hex digits (15 characters)."""
    validate_container_name(container)
    name = VETH_PREFIX + _digest(container, IFNAME_MAX - len(VETH_PREFIX))
    assert len(name) <= IFNAME_MAX
    return name
