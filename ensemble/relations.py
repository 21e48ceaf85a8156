"""Relation endpoints: what a charm's metadata.yaml declares, and matching two services'
endpoints for `add-relation`. Pure functions: no ZooKeeper here.

An endpoint is `{"interface", "role", "scope"}` under its relation name. Roles follow
pyjuju: provides -> server, requires -> client, peers -> peer. Every service also
provides `juju-info` (interface juju-info), which no charm may declare itself.
"""

import re

from ensemble.errors import InvalidCharm, InvalidRelation

SECTIONS = {"provides": "server", "requires": "client", "peers": "peer"}
SCOPES = ("global", "container")
LONG_KEYS = ("interface", "limit", "optional", "scope")
_NAME_RE = re.compile(r"[a-z][a-z0-9-]*\Z")
RESERVED_PREFIX = "juju-"
IMPLICIT = {"juju-info": {"interface": "juju-info", "role": "server", "scope": "global"}}
COMPATIBLE = {("server", "client"), ("client", "server")}


def _valid_name(value):
    return isinstance(value, str) and bool(_NAME_RE.match(value)) and len(value) <= 64


def parse_endpoints(charm, metadata):
    """{relation name: {interface, role, scope, limit, optional}} from a metadata mapping,
    with the implicit juju-info; InvalidCharm (one line) naming what is wrong."""
    endpoints = {}
    for section, role in SECTIONS.items():
        entries = metadata.get(section)
        if entries is None:
            continue
        if not isinstance(entries, dict):
            raise InvalidCharm(f"charm {charm}: '{section}' must be a mapping of relation name to interface")
        for name, spec in entries.items():
            where = f"charm {charm}: {section} relation {name!r}"
            if not _valid_name(name):
                raise InvalidCharm(f"{where}: relation names must be [a-z][a-z0-9-]*")
            if isinstance(spec, str):
                spec = {"interface": spec}
            elif not isinstance(spec, dict):
                raise InvalidCharm(f"{where}: expected an interface name or a mapping with 'interface'")
            unknown = sorted(str(k) for k in spec if k not in LONG_KEYS)
            if unknown:
                raise InvalidCharm(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(LONG_KEYS)})")
            if "interface" not in spec:
                raise InvalidCharm(f"{where}: interface missing")
            interface = spec["interface"]
            if not _valid_name(interface):
                raise InvalidCharm(f"{where}: interface {interface!r} is not a name ([a-z][a-z0-9-]*)")
            scope = spec.get("scope", "global")
            if scope not in SCOPES:
                raise InvalidCharm(f"{where}: scope must be global or container, not {scope!r}")
            limit = spec.get("limit", None if role == "server" else 1)
            if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
                raise InvalidCharm(f"{where}: limit must be a positive integer, not {limit!r}")
            optional = spec.get("optional", False)
            if not isinstance(optional, bool):
                raise InvalidCharm(f"{where}: optional must be true or false, not {optional!r}")
            if role == "server" and (name.startswith(RESERVED_PREFIX) or interface.startswith(RESERVED_PREFIX)):
                raise InvalidCharm(f"{where}: relations and interfaces starting with 'juju-' may not be provided")
            if name in endpoints:
                raise InvalidCharm(f"{where}: the relation name is used twice (provides, requires and peers share names)")
            endpoints[name] = {"interface": interface, "role": role, "scope": scope, "limit": limit,
                               "optional": optional}
    for name, endpoint in IMPLICIT.items():
        # A subordinate may *require* a relation named juju-info; it keeps that name.
        endpoints.setdefault(name, dict(endpoint, limit=None, optional=False))
    return endpoints


def stored(endpoints):
    """What the service node keeps of each endpoint (limit/optional are not enforced)."""
    return {n: {k: e[k] for k in ("interface", "role", "scope")} for n, e in endpoints.items()}


def parse_descriptor(text):
    """'wordpress' -> ('wordpress', None); 'wordpress:db' -> ('wordpress', 'db')."""
    from ensemble.names import validate_service_name

    service, colon, relation = str(text).partition(":")
    validate_service_name(service)
    if colon and not _valid_name(relation):
        raise InvalidRelation(f"invalid relation name {relation!r} in {text!r}: use SERVICE or SERVICE:RELATION")
    return service, (relation if colon else None)


def _candidates(service, relation, endpoints):
    if relation is None:
        return sorted(endpoints.items())
    if relation not in endpoints:
        known = ", ".join(sorted(endpoints)) or "none"
        raise InvalidRelation(f"service {service} has no relation {relation!r} (relations: {known})")
    return [(relation, endpoints[relation])]


def _label(service, relation):
    return f"{service}:{relation}" if relation else service


def match(a, a_endpoints, b, b_endpoints):
    """The one endpoint pair for relating descriptor `a` to `b` (each (service, relation
    or None)), as ((service, name, endpoint), (service, name, endpoint)).

    Pairs have equal interfaces and server<->client roles. If several match and some use
    the implicit juju-info, those are dropped (as later Juju does)."""
    (sa, ra), (sb, rb) = a, b
    if sa == sb:
        raise InvalidRelation(
            f"a service cannot be related to itself ({sa}); relations between its own units are peers in its charm"
        )
    pairs = []
    for na, ea in _candidates(sa, ra, a_endpoints):
        for nb, eb in _candidates(sb, rb, b_endpoints):
            if ea["interface"] == eb["interface"] and (ea["role"], eb["role"]) in COMPATIBLE:
                pairs.append(((sa, na, ea), (sb, nb, eb)))
    if len(pairs) > 1:
        explicit = [p for p in pairs if p[0][1] not in IMPLICIT and p[1][1] not in IMPLICIT]
        pairs = explicit or pairs
    if not pairs:
        raise InvalidRelation(
            f"no relation between {_label(sa, ra)} and {_label(sb, rb)}: "
            f"{_describe(sa, ra, a_endpoints)}; {_describe(sb, rb, b_endpoints)}"
        )
    if len(pairs) > 1:
        options = ", ".join(f"{x[0]}:{x[1]} {y[0]}:{y[1]}" for x, y in pairs)
        raise InvalidRelation(
            f"ambiguous relation between {_label(sa, ra)} and {_label(sb, rb)}: {options} "
            f"(name one as SERVICE:RELATION)"
        )
    return pairs[0]


def _describe(service, relation, endpoints):
    shown = _candidates(service, relation, endpoints)
    parts = [f"{n} ({ROLE_WORDS[e['role']]} {e['interface']})" for n, e in shown if e["role"] != "peer"]
    return f"{service} has {', '.join(parts) if parts else 'no provides/requires relations'}"


ROLE_WORDS = {"server": "provides", "client": "requires", "peer": "peer"}
