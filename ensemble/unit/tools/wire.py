"""One AMP call over a unix socket, with only the standard library: the hook tools'
side of the protocol (importing Twisted's AMP costs a process ~110 ms; everything a
tool imports here, ~8 ms).

AMP (twisted.protocols.amp) sends boxes: key/value pairs, each key and each value
preceded by its length as 2 bytes big-endian, a box ended by an empty key. A call is
a box with `_command` and `_ask`; the answer holds `_answer` and the response values,
or `_error`, `_error_code` and `_error_description`.

A value longer than AMP's 65535 bytes is split over the keys `name`, `name.1`,
`name.2` … (`commands.Text` does the same on the server's side), so that a setting read
from a file (`KEY=@FILE`) is not limited to 64 KiB.
"""

import re
import socket
import struct

from ensemble.errors import EnsembleError

MAX_VALUE = 0xFFFF
# The error code of every failure meant for the hook: its description is the message.
ERROR_CODE = b"ERROR"
UNHANDLED_CODE = b"UNHANDLED"  # AMP's code for a command the server does not know

_CONTINUATION = re.compile(rb"(.+)\.([0-9]+)\Z")
_ASK = b"1"  # one call per connection: any tag will do


class CallFailed(EnsembleError):
    """The call did not get an answer from the unit agent."""


class RemoteError(CallFailed):
    """The unit agent answered with an error."""

    def __init__(self, command, code, description):
        if code == ERROR_CODE:
            message = description
        elif code == UNHANDLED_CODE:
            message = f"the unit agent does not know the command {command!r} (is it older than this tool?)"
        else:
            message = f"the unit agent failed: {description}"
        super().__init__(message)
        self.code = code
        self.description = description


def chunks(key, value):
    """(key, value) pairs for one value: `key` alone when it fits, else its chunks."""
    if len(value) <= MAX_VALUE:
        return [(key, value)]
    return [
        (key if n == 0 else b"%s.%d" % (key, n), value[start:start + MAX_VALUE])
        for n, start in enumerate(range(0, len(value), MAX_VALUE))
    ]


def encode_box(fields):
    """The bytes of a box of `fields` ({str: str | bytes | int}; None values left out)."""
    out = bytearray()
    for name, value in fields.items():
        if value is None:
            continue
        if isinstance(value, int):
            value = b"%d" % value  # AMP's Integer: decimal digits
        elif isinstance(value, str):
            value = value.encode("utf-8")
        for key, chunk in chunks(name.encode("ascii"), value):
            out += struct.pack("!H", len(key)) + key + struct.pack("!H", len(chunk)) + chunk
    out += b"\0\0"
    return bytes(out)


def read_box(stream):
    """The next box from a binary file object, as {bytes: bytes}, chunks joined."""
    box = {}
    while True:
        key = _read(stream, _length(stream))
        if not key:
            return _join(box)
        box[key] = _read(stream, _length(stream))


def _length(stream):
    return struct.unpack("!H", _read(stream, 2))[0]


def _read(stream, size):
    data = stream.read(size)
    if len(data) != size:
        raise CallFailed("the unit agent closed the connection without answering")
    return data


def _join(box):
    continued = {}
    for key in list(box):
        match = _CONTINUATION.match(key)
        if match and match.group(1) in box:
            continued.setdefault(match.group(1), []).append((int(match.group(2)), box.pop(key)))
    for key, parts in continued.items():
        box[key] += b"".join(part for _, part in sorted(parts))
    return box


def call(path, command, **arguments):
    """Send `command` with `arguments` to the AMP server on the unix socket `path`;
    the answer's values as {str: bytes}. Raises CallFailed (RemoteError for an error
    answer)."""
    request = encode_box({"_command": command, "_ask": _ASK, **arguments})
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(path)
        except OSError as e:
            raise CallFailed(f"cannot reach the unit agent at {path}: {e.strerror or e}")
        try:
            sock.sendall(request)
            with sock.makefile("rb") as stream:
                box = read_box(stream)
        except OSError as e:
            raise CallFailed(f"lost the connection to the unit agent: {e.strerror or e}")
    if b"_error" in box:
        raise RemoteError(
            command,
            box.get(b"_error_code", b""),
            box.get(b"_error_description", b"").decode("utf-8", "replace"),
        )
    if box.get(b"_answer") != _ASK:
        raise CallFailed("the unit agent's answer is not an AMP answer")
    return {key.decode("ascii", "replace"): value for key, value in box.items() if not key.startswith(b"_")}
