#!/usr/bin/env python3
"""HTTP front end: `GET /` renders the pairs of the db it is related to, `GET /health`
says ok.

The db units come from the backends file that the charm's relation hooks write,
{relation id: {db unit: {"host": …, "port": …}}}. The server reads the file again
whenever it has been replaced, so a hook only has to write it.
"""

import argparse
import html
import http.server
import json
import os
import signal
import socket
import sys
import threading

NO_RELATION = "no db relation: relate this service to a db service (ensemble add-relation web db)"


class Unavailable(Exception):
    """The db cannot be read right now; the message is shown to the client."""


class Backends:
    """The backends file, read again only when it has changed."""

    def __init__(self, path):
        self.path = path
        self.lock = threading.Lock()
        self.stamp = None
        self.units = []

    def current(self):
        """[(unit, host, port)], in a fixed order."""
        try:
            info = os.stat(self.path)
        except FileNotFoundError:
            return []
        stamp = (info.st_ino, info.st_mtime_ns, info.st_size)
        with self.lock:
            if stamp != self.stamp:
                self.units = self._read()
                self.stamp = stamp
            return self.units

    def _read(self):
        try:
            with open(self.path, encoding="utf-8") as f:
                relations = json.load(f)
            return [
                (unit, backend["host"], int(backend["port"]))
                for _, units in sorted(relations.items())
                for unit, backend in sorted(units.items())
            ]
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
            raise Unavailable(f"cannot read the backends file {self.path}: {e}")


def dump(backends):
    """(unit, host, port, pairs) of the first db unit that answers."""
    units = backends.current()
    if not units:
        raise Unavailable(NO_RELATION)
    failures = []
    for unit, host, port in units:
        try:
            return unit, host, port, _dump(host, port)
        except OSError as e:
            failures.append(f"{unit} at {host}:{port}: {e.strerror or e}")
    raise Unavailable("no db unit answers: " + "; ".join(failures))


def _dump(host, port):
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(b"DUMP\n")
        line = s.makefile("rb").readline()
    if not line.endswith(b"\n"):
        raise ConnectionError("the db closed the connection without answering")
    try:
        pairs = json.loads(line.decode("utf-8"))
    except ValueError:
        pairs = None
    if not isinstance(pairs, dict):
        raise Unavailable(f"db at {host}:{port} gave a bad answer: {line[:200]!r}")
    return pairs


def render(unit, db_unit, host, port, pairs):
    rows = "\n".join(
        f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>"
        for k, v in sorted(pairs.items())
    )
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{html.escape(unit)}</title></head>
<body>
<h1>Contents of the db</h1>
<table>
<tr><th>key</th><th>value</th></tr>
{rows}
</table>
<p>Served by web unit {html.escape(unit)}, reading from {html.escape(db_unit)} at {html.escape(host)}:{port}.</p>
</body></html>
"""


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        path = self.path.split("?", 1)[0]
        if path == "/health":
            return self.send(200, "text/plain; charset=utf-8", "ok\n")
        if path != "/":
            return self.send(404, "text/plain; charset=utf-8", "not found\n")
        try:
            db_unit, host, port, pairs = dump(self.server.backends)
        except Unavailable as e:
            return self.send(503, "text/plain; charset=utf-8", f"db unavailable: {e}\n")
        self.send(200, "text/html; charset=utf-8", render(self.server.unit, db_unit, host, port, pairs))

    def send(self, status, content_type, body):
        data = body.encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--unit", required=True)
    parser.add_argument("--backends", required=True, help="the JSON file of db units the relation hooks write")
    args = parser.parse_args()
    server = http.server.ThreadingHTTPServer((args.host, args.port), Handler)
    server.unit = args.unit
    server.backends = Backends(args.backends)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"web listening on {args.host}:{args.port}, db units from {args.backends}", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
        print("web stopped", flush=True)


if __name__ == "__main__":
    main()
