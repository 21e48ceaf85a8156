"""A unit's port as charms name it ('PORT/PROTOCOL', `open-port 80/tcp`): one
vocabulary for the hook tools, the unit node and the firewall. Kept apart from the
firewall so that a unit agent, which only records ports, does not import it."""

import re

PROTOCOLS = ("tcp", "udp")
PORT_RE = re.compile(r"(\d{1,5})/(tcp|udp)\Z")


def parse_port(text):
    """'7070/tcp' -> (7070, 'tcp'); a bare number is TCP."""
    text = str(text).strip().lower()
    if text.isdigit():
        text += "/tcp"
    match = PORT_RE.match(text)
    if not match or not 1 <= int(match.group(1)) <= 65535:
        raise ValueError(f"invalid port {text!r}: use PORT/tcp or PORT/udp, PORT from 1 to 65535")
    return int(match.group(1)), match.group(2)
