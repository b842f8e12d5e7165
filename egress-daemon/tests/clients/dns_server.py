#!/usr/bin/env python3
"""A tiny authoritative DNS server for the tests (UDP and TCP, standard library only).

usage: dns_server.py ADDR PORT ZONE_JSON LOG_FILE

ZONE_JSON maps a name (lower case, no trailing dot) to
  {"ttl": 1, "A": ["10.0.0.1"], "AAAA": ["fd00::1"], "CNAME": "target.name",
   "fresh": "10.214.7"}  # "fresh": a new A address PREFIX.1..254 on every answer
  {"count": 1000, "from": "10.216.0.1"}  # COUNT A addresses on every answer, each answer
                                         # the next COUNT after FROM (never one twice)
  {"silent": true}        # never answered
  {"spoof": "case"}       # answered with the question's letters in the other case
  {"spoof": "id", "inject": "10.0.0.9"}  # first an answer with another id carrying the
                                         # injected address, then the right answer
A name "*.PARENT" answers for every name one label below PARENT that is not listed.
Every query is logged as "NAME TYPE" (one line, flushed). Unknown names get NXDOMAIN.
"""
import ipaddress
import json
import socket
import struct
import sys
import threading

ADDR, PORT, ZONE, LOG = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4]
TYPES = {1: "A", 28: "AAAA", 5: "CNAME"}
lock = threading.Lock()
counter = [0]
block = [0]
log = open(LOG, "a", buffering=1)


def read_name(data, offset):
    labels = []
    while True:
        length = data[offset]
        if length == 0:
            return ".".join(labels).lower(), offset + 1
        labels.append(data[offset + 1 : offset + 1 + length].decode("ascii", "replace"))
        offset += 1 + length


def encode_name(name):
    out = b""
    for label in name.split("."):
        out += bytes([len(label)]) + label.encode()
    return out + b"\0"


def record(name, rtype, ttl, rdata):
    return encode_name(name) + struct.pack("!HHIH", rtype, 1, ttl, len(rdata)) + rdata


def fresh_a(prefix):
    with lock:
        counter[0] = counter[0] % 254 + 1
        return f"{prefix}.{counter[0]}"


def lookup(name):
    if name in ZONE:
        return ZONE[name]
    parent = name.split(".", 1)[1] if "." in name else ""
    return ZONE.get("*." + parent)


def block_a(entry):
    with lock:
        start = block[0]
        block[0] += entry["count"]
    first = ipaddress.IPv4Address(entry["from"]) + start
    return [str(first + i) for i in range(entry["count"])]


def answers(query):
    """The replies to send, in order (none for a silent name)."""
    (qid, flags, qd) = struct.unpack("!HHH", query[:6])
    name, end = read_name(query, 12)
    entry = lookup(name) or {}
    if entry.get("silent"):
        return []
    reply = answer(query)
    if entry.get("spoof") == "case":
        return [reply[:12] + reply[12:end].swapcase() + reply[end:]]
    if entry.get("spoof") == "id":
        header = struct.pack("!HHHHHH", qid ^ 1, 0x8580, 1, 1, 0, 0)
        injected = record(name, 1, 60, ipaddress.IPv4Address(entry["inject"]).packed)
        return [header + query[12 : end + 4] + injected, reply]
    return [reply]


def answer(query):
    (qid, flags, qd) = struct.unpack("!HHH", query[:6])
    name, end = read_name(query, 12)
    qtype, _ = struct.unpack("!HH", query[end : end + 4])
    question = query[12 : end + 4]
    log.write(f"{name} {TYPES.get(qtype, qtype)}\n")
    answers = []
    rcode = 0
    current = name
    for _ in range(8):
        entry = lookup(current)
        if entry is None:
            if current == name:
                rcode = 3
            break
        ttl = entry.get("ttl", 1)
        if "CNAME" in entry:
            answers.append(record(current, 5, ttl, encode_name(entry["CNAME"])))
            current = entry["CNAME"]
            continue
        if qtype == 1:
            if "fresh" in entry:
                addresses = [fresh_a(entry["fresh"])]
            elif "count" in entry:
                addresses = block_a(entry)
            else:
                addresses = entry.get("A", [])
            for a in addresses:
                answers.append(record(current, 1, ttl, ipaddress.IPv4Address(a).packed))
        if qtype == 28:
            for a in entry.get("AAAA", []):
                answers.append(record(current, 28, ttl, ipaddress.IPv6Address(a).packed))
        break
    rd = flags & 0x0100
    header = struct.pack("!HHHHHH", qid, 0x8000 | 0x0400 | rd | 0x0080 | rcode, 1, len(answers), 0, 0)
    return header + question + b"".join(answers)


def serve_udp():
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((ADDR, PORT))
    while True:
        data, peer = sock.recvfrom(4096)
        try:
            for reply in answers(data):
                sock.sendto(reply, peer)
        except Exception as error:  # a test server: log and go on
            log.write(f"error {error}\n")


def serve_tcp_client(conn):
    try:
        serve_framed(conn)
    except OSError:  # the client went away (the proxy closes after a mismatch)
        pass


def serve_framed(conn):
    with conn:
        while True:
            head = conn.recv(2)
            if len(head) < 2:
                return
            (length,) = struct.unpack("!H", head)
            data = b""
            while len(data) < length:
                chunk = conn.recv(length - len(data))
                if not chunk:
                    return
                data += chunk
            for reply in answers(data):
                conn.sendall(struct.pack("!H", len(reply)) + reply)


def serve_tcp():
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((ADDR, PORT))
    sock.listen(64)
    while True:
        conn, _ = sock.accept()
        threading.Thread(target=serve_tcp_client, args=(conn,), daemon=True).start()


threading.Thread(target=serve_tcp, daemon=True).start()
print("ready", flush=True)
serve_udp()
