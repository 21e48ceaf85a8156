"""`open-port` and `close-port`, for hooks: the ports this unit accepts connections on
from other units. The hook records them in the unit directory; the unit agent
publishes them on the unit's node when the hook is done, and the machine agent opens
them in the firewall (ensemble/network/firewall.py)."""

import os
import sys

from ensemble.network.firewall import parse_port

PORTS_FILE = ".ensemble-ports"


def read_ports(unit_dir):
    """The unit's opened ports, sorted, as 'PORT/PROTO' strings."""
    try:
        with open(os.path.join(unit_dir, PORTS_FILE)) as f:
            lines = [line.strip() for line in f if line.strip()]
    except FileNotFoundError:
        return []
    ports = set()
    for line in lines:
        try:
            ports.add(parse_port(line))
        except ValueError:
            continue  # written by hand: the valid ones still count
    return [f"{port}/{proto}" for port, proto in sorted(ports)]


def _change(argv, opening):
    name = "open-port" if opening else "close-port"
    unit_dir = os.environ.get("ENSEMBLE_UNIT_DIR")
    if not unit_dir or len(argv) != 1:
        print(f"usage: {name} PORT[/tcp|/udp]  (in a hook)", file=sys.stderr)
        return 2
    try:
        port, proto = parse_port(argv[0])
    except ValueError as e:
        print(f"{name}: {e}", file=sys.stderr)
        return 1
    ports = set(read_ports(unit_dir))
    (ports.add if opening else ports.discard)(f"{port}/{proto}")
    path = os.path.join(unit_dir, PORTS_FILE)
    with open(path + ".tmp", "w") as f:
        f.writelines(f"{p}\n" for p in sorted(ports, key=lambda p: parse_port(p)))
    os.replace(path + ".tmp", path)
    return 0


def open_port():
    sys.exit(_change(sys.argv[1:], True))


def close_port():
    sys.exit(_change(sys.argv[1:], False))
