#!/usr/bin/env python3
"""HTTP front end: `GET /` renders the db's pairs, `GET /health` says ok."""

import argparse
import html
import http.server
import json
import signal
import socket
import subprocess
import sys
import threading
import time

CACHE_SECONDS = 10


class Unavailable(Exception):
    """The db cannot be read right now; the message is shown to the client."""


class DbClient:
    """Finds a started db unit through `ensemble service-addresses` and reads it."""

    def __init__(self, service, port):
        self.service = service
        self.port = port
        self.lock = threading.Lock()
        self.cached = None
        self.expires = 0.0

    def address(self, refresh=False):
        with self.lock:
            if self.cached and not refresh and time.monotonic() < self.expires:
                return self.cached
            self.cached = None
        try:
            result = subprocess.run(
                ["ensemble", "service-addresses", self.service],
                capture_output=True, text=True, timeout=20, stdin=subprocess.DEVNULL,
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            raise Unavailable(f"cannot look up service {self.service!r}: {e}")
        if result.returncode != 0:
            detail = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise Unavailable(f"cannot look up service {self.service!r}: {detail}")
        addresses = result.stdout.split()
        if not addresses:
            # Not cached: the next request looks again, so a db that starts shows up at once.
            raise Unavailable(f"no unit of service {self.service!r} is started yet")
        with self.lock:
            self.cached, self.expires = addresses[0], time.monotonic() + CACHE_SECONDS
        return addresses[0]

    def dump(self):
        """(address, pairs); re-resolves once if the cached address stopped answering."""
        address = self.address()
        try:
            return address, self._dump(address)
        except OSError:
            pass
        fresh = self.address(refresh=True)
        try:
            return fresh, self._dump(fresh)
        except OSError as e:
            raise Unavailable(f"db at {fresh}:{self.port} is unreachable: {e.strerror or e}")

    def _dump(self, address):
        with socket.create_connection((address, self.port), timeout=5) as s:
            s.sendall(b"DUMP\n")
            line = s.makefile("rb").readline()
        if not line.endswith(b"\n"):
            raise ConnectionError("db closed the connection without answering")
        try:
            pairs = json.loads(line.decode("utf-8"))
        except ValueError:
            raise Unavailable(f"db at {address}:{self.port} gave a bad answer: {line[:200]!r}")
        if not isinstance(pairs, dict):
            raise Unavailable(f"db at {address}:{self.port} gave a bad answer: {line[:200]!r}")
        return pairs


def render(unit, address, port, pairs):
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
<p>Served by web unit {html.escape(unit)}, reading from db at {html.escape(address)}:{port}.</p>
</body></html>
"""


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        path = self.path.split("?", 1)[0]
        if path == "/health":
            return self.send(200, "text/plain; charset=utf-8", "ok\n")
        if path != "/":
            return self.send(404, "text/plain; charset=utf-8", "not found\n")
        server = self.server
        try:
            address, pairs = server.db.dump()
        except Unavailable as e:
            return self.send(503, "text/plain; charset=utf-8", f"db unavailable: {e}\n")
        self.send(200, "text/html; charset=utf-8", render(server.unit, address, server.db.port, pairs))

    def send(self, status, content_type, body):
        data = body.encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True, help="the unit's web directory")
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--unit", required=True)
    parser.add_argument("--db", required=True, help="db service name")
    parser.add_argument("--db-port", type=int, required=True)
    args = parser.parse_args()
    server = http.server.ThreadingHTTPServer((args.host, args.port), Handler)
    server.unit = args.unit
    server.db = DbClient(args.db, args.db_port)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"web listening on {args.host}:{args.port}, db service {args.db!r} port {args.db_port}", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
        print("web stopped", flush=True)


if __name__ == "__main__":
    main()
