"""The pieces of libnftables' JSON rule expressions that the firewall and the port
filter both write (see libnftables-json(5))."""


def match(left, right, op="=="):
    return {"match": {"op": op, "left": left, "right": right}}


def meta(key):
    return {"meta": {"key": key}}


def payload(protocol, field):
    return {"payload": {"protocol": protocol, "field": field}}
