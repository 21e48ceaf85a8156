#!/usr/bin/env python3
"""Key-value server: one request per line, one response line each (UTF-8).

    GET key          -> value | ERR no such key
    SET key value... -> OK     (value is the rest of the line, spaces kept)
    DEL key          -> OK
    KEYS             -> keys, space-separated, sorted
    DUMP             -> all pairs as one line of JSON
"""

import argparse
import json
import os
import signal
import socketserver
import sys
import threading

MAX_LINE = 1 << 20


def load_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return {str(k): str(v) for k, v in data.items()}


def save_json(path, data):
    """Write via a temp file and rename, so a crash never leaves a torn file."""
    tmp = f"{path}.tmp.{os.getpid()}.{threading.get_ident()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Store:
    def __init__(self, path):
        self.path = path
        self.lock = threading.Lock()
        self.data = load_json(path)

    def execute(self, line):
        command, _, rest = line.strip().partition(" ")
        command = command.upper()
        rest = rest.lstrip(" ")
        with self.lock:
            if command == "GET" and _is_key(rest):
                return self.data[rest] if rest in self.data else "ERR no such key"
            if command == "SET":
                key, _, value = rest.partition(" ")
                if _is_key(key):
                    self.data[key] = value
                    save_json(self.path, self.data)
                    return "OK"
            if command == "DEL" and _is_key(rest):
                if self.data.pop(rest, None) is not None:
                    save_json(self.path, self.data)
                return "OK"
            if command == "KEYS" and not rest:
                return " ".join(sorted(self.data))
            if command == "DUMP" and not rest:
                return json.dumps(self.data, sort_keys=True)
        if command in ("GET", "SET", "DEL", "KEYS", "DUMP"):
            return f"ERR usage: {USAGE[command]}"
        return "ERR unknown command (GET, SET, DEL, KEYS, DUMP)"


USAGE = {"GET": "GET key", "SET": "SET key value", "DEL": "DEL key", "KEYS": "KEYS", "DUMP": "DUMP"}


def _is_key(text):
    return bool(text) and not any(c.isspace() for c in text)


class Handler(socketserver.StreamRequestHandler):
    timeout = 300  # drop idle clients rather than hold a thread forever

    def handle(self):
        while True:
            try:
                raw = self.rfile.readline(MAX_LINE)
            except OSError:
                return
            if not raw:
                return
            if not raw.endswith(b"\n") and len(raw) >= MAX_LINE:
                self.reply("ERR line too long")
                return
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError:
                self.reply("ERR request is not UTF-8")
                continue
            self.reply(self.server.store.execute(line))

    def reply(self, text):
        # Values cannot hold newlines (SET takes one line), so this is always one line.
        self.wfile.write(text.encode("utf-8") + b"\n")
        self.wfile.flush()


class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True, help="directory holding data.json")
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    store = Store(os.path.join(args.data, "data.json"))
    server = Server((args.host, args.port), Handler)
    server.store = store
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"db listening on {args.host}:{args.port} with {len(store.data)} keys", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
        print("db stopped", flush=True)


if __name__ == "__main__":
    main()
