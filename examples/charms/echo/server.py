#!/usr/bin/env python3
"""Answer each TCP connection with one line, the unit's name: server.py HOST PORT NAME."""
import socketserver
import sys

host, port, name = sys.argv[1], int(sys.argv[2]), sys.argv[3]


class Answer(socketserver.BaseRequestHandler):
    def handle(self):
        self.request.sendall(f"{name}\n".encode())


socketserver.ThreadingTCPServer.allow_reuse_address = True
socketserver.ThreadingTCPServer.daemon_threads = True
socketserver.ThreadingTCPServer((host, port), Answer).serve_forever()
