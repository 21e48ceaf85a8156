"""The charm author's loop: a service's config (set, get), its charm (upgrade-charm),
and moving a unit past a failed hook (resolved)."""

import json
import os

import yaml

from ensemble.charm import (Charm, bundle_id, bundle_options, config_values, mismatched_values, require_options,
                            typed_values)
from ensemble.cli.common import environment
from ensemble.errors import InvalidCharm, InvalidValue, NotInError, UpgradeRefused
from ensemble.names import parse_unit_name, validate_service_name
from ensemble.state.relation import RelationStateManager
from ensemble.state.service import CHARM_DIR, ServiceStateManager
from ensemble.state.unit import ERROR, RELATION_ERRORS, RELATION_RESOLVED, RESOLVED, UnitStateManager


def _parse_assignments(pairs):
    """KEY=VALUE words: ({key: text} to set, [keys] to reset with `KEY=`)."""
    values, reset = {}, []
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise InvalidValue(f"invalid {pair!r}: use KEY=VALUE (KEY= to go back to the default)")
        if key in values or key in reset:
            raise InvalidValue(f"option {key!r} is given twice")
        if text == "":
            reset.append(key)
        else:
            values[key] = text
    return values, reset


async def _service_options(manager, name):
    service = await manager.get_service(name)
    charm_name = (service.charm_id or "").rpartition("-")[0]
    return service, charm_name, bundle_options(await service.charm_bundle(), charm_name)


async def cmd_set(reactor, args):
    name = validate_service_name(args.service)
    texts, reset = _parse_assignments(args.options)
    async with environment(args) as client:
        manager = ServiceStateManager(client)
        _, charm_name, options = await _service_options(manager, name)
        values = typed_values(charm_name, options, texts)
        require_options(charm_name, options, reset)
        before, after = await manager.update_config(name, values, reset)
    changed = sorted(k for k in set(before) | set(after) if before.get(k, _UNSET) != after.get(k, _UNSET))
    if changed:
        print(f"{name}: set {', '.join(_describe(k, after, options) for k in changed)}")
    else:
        print(f"{name}: no change")


_UNSET = object()


def _describe(key, values, options):
    if key in values:
        return f"{key}={_text(values[key])}"
    default = options.get(key, {}).get("default")
    return f"{key} back to its default" + (f" ({_text(default)})" if default is not None else "")


def _text(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


async def cmd_get(reactor, args):
    name = validate_service_name(args.service)
    async with environment(args) as client:
        service, _, options = await _service_options(ServiceStateManager(client), name)
        values = await service.get_config()
    current = config_values(options, values)
    settings = {}
    for key, option in sorted(options.items()):
        entry = {"value": current.get(key), "type": option["type"]}
        if "default" in option:
            entry["default"] = option["default"]
        entry["set"] = key in values
        if option.get("description"):
            entry["description"] = str(option["description"]).strip()
        settings[key] = entry
    result = {"service": name, "charm": service.charm_id, "settings": settings}
    if args.format == "json":
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        print(yaml.safe_dump(result, default_flow_style=False, sort_keys=False).rstrip())


async def cmd_upgrade_charm(reactor, args):
    name = validate_service_name(args.service)
    async with environment(args) as client:
        manager = ServiceStateManager(client)
        service = await manager.get_service(name)
        directory = args.path or service.data.get(CHARM_DIR)
        if not directory:
            raise InvalidValue(f"service {name} does not say where its charm came from: give --path DIR")
        if not os.path.isdir(directory):
            raise InvalidCharm(f"charm directory {directory} does not exist (give --path DIR)")
        charm = Charm.load(directory)
        current_name = (service.charm_id or "").rpartition("-")[0]
        if charm.name != current_name:
            raise UpgradeRefused(f"{directory} holds charm {charm.name}, not {current_name} (service {name}'s)")
        bundle = charm.bundle()
        new_id = bundle_id(charm.name, bundle)
        if new_id == service.charm_id:
            print(f"{name}: already at {new_id} (nothing in {directory} changed)")
            return
        await _check_relations_kept(client, name, charm)
        stale = mismatched_values(charm.options, await service.get_config())
        if stale:
            raise UpgradeRefused(
                f"option {stale[0]!r} of {name} is set to a value that is not a {charm.options[stale[0]]['type']} "
                f"in the new charm: reset it first (ensemble set {name} {stale[0]}=)")
        old = await manager.upgrade_charm(name, new_id, bundle, charm.endpoints,
                                          charm_dir=os.path.abspath(directory) if args.path else None)
        units = await service.unit_names()
    # A started unit runs upgrade-charm; one in error takes the new charm for its retry.
    print(f"{name}: upgraded {old} -> {new_id}" + (f" for {', '.join(units)}" if units else ""))


async def _check_relations_kept(client, service, charm):
    for relation in await RelationStateManager(client).get_all_relations():
        endpoint = relation.endpoint(service)
        if endpoint is None:
            continue
        wanted = charm.endpoints.get(endpoint["relation-name"])
        if wanted is None or wanted["interface"] != relation.interface or wanted["role"] != endpoint["role"]:
            what = "drops" if wanted is None else "changes"
            raise UpgradeRefused(
                f"the new charm {what} relation {endpoint['relation-name']!r} ({relation.interface}), which "
                f"service {service} is in ({relation.describe()}): remove that relation first")


async def cmd_resolved(reactor, args):
    parse_unit_name(args.unit)
    unit_name = args.unit
    async with environment(args) as client:
        unit = await UnitStateManager(client).get_unit(unit_name)
        if args.relation is None:
            if unit.state != ERROR:
                raise NotInError(f"unit {unit_name} is {unit.state}, not in error: nothing to resolve")
            await unit.update(**{RESOLVED: {"retry": args.retry}})
            what = unit.data.get("error") or "its failed hook"
        else:
            errors = unit.data.get(RELATION_ERRORS) or {}
            relation_id = _relation_in_error(unit_name, args.relation, errors)
            await unit.update_with(lambda data: {
                **data, RELATION_RESOLVED: {**(data.get(RELATION_RESOLVED) or {}), relation_id: args.retry}})
            what = f"relation {relation_id}: {errors[relation_id]}"
    print(f"{unit_name}: {'retrying' if args.retry else 'moving on past'} {what}")


def _relation_in_error(unit_name, given, errors):
    """The relation id in `errors` that `given` (a relation name, or an id like db:0)
    names; NotInError if none."""
    if ":" in given:
        matches = [given] if given in errors else []
    else:
        matches = [rid for rid in errors if rid.rpartition(":")[0] == given]
    if len(matches) > 1:
        raise InvalidValue(f"{unit_name} has {len(matches)} relations named {given} in error "
                           f"({', '.join(sorted(matches))}): give the relation id")
    if not matches:
        failing = ", ".join(sorted(errors)) or "none"
        raise NotInError(f"relation {given} of {unit_name} is not in error (relations in error: {failing})")
    return matches[0]


def register(command):
    sub = command("set", cmd_set, "set options of a service's charm; its units run config-changed", examples=[
        "ensemble set db port=7070", "ensemble set web title='My site' debug=true",
        "ensemble set db port=          # back to the default"])
    sub.add_argument("service", metavar="SERVICE", help="the service whose options to set")
    sub.add_argument("options", metavar="KEY=VALUE", nargs="+",
                     help="an option and its value, checked against the charm's config.yaml; KEY= resets it")

    sub = command("get", cmd_get, "show a service's options: value, default, type, description",
                  examples=["ensemble get db", "ensemble get db --format json"])
    sub.add_argument("service", metavar="SERVICE", help="the service whose options to show")
    sub.add_argument("--format", choices=("yaml", "json"), default="yaml", help="output format (default yaml)")

    sub = command("upgrade-charm", cmd_upgrade_charm,
                  "give a service's units a new revision of its charm; each runs upgrade-charm, then config-changed",
                  examples=["ensemble upgrade-charm db                 # again from the directory it was deployed from",
                            "ensemble upgrade-charm db --path ~/charms/db"])
    sub.add_argument("service", metavar="SERVICE", help="the service to upgrade")
    sub.add_argument("--path", metavar="DIR",
                     help="the charm directory to read (default: the one the service was deployed or last upgraded from)")

    sub = command("resolved", cmd_resolved,
                  "move a unit (or one relation of it) on past a failed hook; --retry runs the hook again",
                  examples=["ensemble resolved db/0", "ensemble resolved --retry db/0",
                            "ensemble resolved web/0 db        # the web unit's relation named db"])
    sub.add_argument("unit", metavar="UNIT", help="the unit in error, e.g. db/0")
    sub.add_argument("relation", metavar="RELATION", nargs="?",
                     help="a relation of the unit in error: its name (db) or id (db:0)")
    sub.add_argument("--retry", action="store_true", help="run the failed hook again instead of skipping it")
