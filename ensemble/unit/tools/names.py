"""The hook tools' console scripts: tool name -> its function in ensemble.unit.tools.cli,
as pyjuju's charms call them. No imports: setup.py reads this file before the package
is installed."""

TOOLS = {
    "relation-get": "relation_get",
    "relation-set": "relation_set",
    "relation-list": "relation_list",
    "relation-ids": "relation_ids",
    "config-get": "config_get",
    "unit-get": "unit_get",
    "open-port": "open_port",
    "close-port": "close_port",
    "juju-log": "juju_log",
    "ensemble-log": "ensemble_log",  # the 2011 name; same tool
}
