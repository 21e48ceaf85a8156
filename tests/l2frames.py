"""Raw Ethernet frames for layer 2 tests: build, send and sniff them with AF_PACKET.

Standard library only, so that the same file runs inside a unit's container (its own
/usr/bin/python3: `python3 -c SOURCE send|sniff ...`) and in the tests' process (in a
namespace, through ensemble.network.netns.inside). Every frame carries a marker (in its
payload, or in an ARP frame's padding), so a sniffer can tell exactly which arrived.
"""

import json
import select
import socket
import struct
import sys
import time

ETH_P_ALL = 0x0003
ETH_P_IP, ETH_P_ARP, ETH_P_IPV6 = 0x0800, 0x0806, 0x86DD
BROADCAST = "ff:ff:ff:ff:ff:ff"


def _mac(text):
    return bytes.fromhex(text.replace(":", ""))


def _ip(text):
    return socket.inet_aton(text)


def _checksum(data):
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ether(dst, src, ethertype, payload):
    return (_mac(dst) + _mac(src) + struct.pack("!H", ethertype) + payload).ljust(60, b"\0")


def build(spec):
    """One frame from a dict: kind 'arp' (op, sha, spa, tha, tpa), 'udp' (saddr, daddr,
    sport, dport) or 'raw' (ethertype); every kind has dst, src (Ethernet) and marker."""
    marker = spec["marker"].encode()
    kind = spec["kind"]
    if kind == "arp":
        body = struct.pack("!HHBBH", 1, ETH_P_IP, 6, 4, spec["op"]) + _mac(spec["sha"]) + _ip(spec["spa"])
        body += _mac(spec.get("tha", "00:00:00:00:00:00")) + _ip(spec["tpa"])
        return ether(spec["dst"], spec["src"], ETH_P_ARP, body + marker)
    if kind == "udp":
        data = marker
        udp = struct.pack("!HHHH", spec.get("sport", 40000), spec.get("dport", 40000), 8 + len(data), 0) + data
        header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0,
                             _ip(spec["saddr"]), _ip(spec["daddr"]))
        header = header[:10] + struct.pack("!H", _checksum(header)) + header[12:]
        return ether(spec["dst"], spec["src"], ETH_P_IP, header + udp)
    if kind == "raw":
        return ether(spec["dst"], spec["src"], spec["ethertype"], b"\0" * 8 + marker)
    raise ValueError(kind)


def send(ifname, specs, repeat=3):
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as s:
        s.bind((ifname, 0))
        for _ in range(repeat):
            for spec in specs:
                s.send(build(spec))
            time.sleep(0.05)


def sniff(ifname, seconds, markers, ready=None):
    """{marker: [ethertype, source MAC]} of the frames seen on `ifname` within `seconds`
    that carry one of `markers`; `ready()` is called once it listens."""
    seen = {}
    wanted = [m.encode() for m in markers]
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL)) as s:
        s.bind((ifname, 0))
        if ready is not None:
            ready()
        deadline = time.monotonic() + seconds
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            if not select.select([s], [], [], left)[0]:
                continue
            frame, address = s.recvfrom(65535)
            if address[2] == socket.PACKET_OUTGOING:
                continue
            for marker in wanted:
                if marker in frame:
                    seen[marker.decode()] = [struct.unpack("!H", frame[12:14])[0], frame[6:12].hex(":")]
    return seen


if __name__ == "__main__":
    command, ifname = sys.argv[1], sys.argv[2]
    if command == "send":
        send(ifname, json.loads(sys.argv[3]))
        print("sent")
    elif command == "sniff":
        print(json.dumps(sniff(ifname, float(sys.argv[3]), sys.argv[4].split(","))))
