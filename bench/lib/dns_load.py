#!/usr/bin/env python3
"""Closed-loop DNS load: PROCS processes, each sending one query at a time over UDP (unconnected
sendto, as musl does) to SERVER:PORT for SECS seconds. Prints one JSON object: queries/s, latency
percentiles (microseconds), and how many queries got no answer or an unexpected one.

usage: dns_load.py SERVER PORT SECS PROCS NAME
"""
import json
import multiprocessing
import os
import socket
import struct
import sys
import time


def query(name, qid):
    q = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    for label in name.split("."):
        q += bytes([len(label)]) + label.encode()
    return q + b"\0" + struct.pack("!HH", 1, 1)


def worker(args):
    server, port, secs, name = args
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(2)
    latencies, errors = [], 0
    deadline = time.monotonic() + secs
    qid = os.getpid() & 0xFFFF
    while time.monotonic() < deadline:
        qid = (qid + 1) & 0xFFFF
        start = time.perf_counter_ns()
        s.sendto(query(name, qid), (server, port))
        try:
            data, peer = s.recvfrom(4096)
            if peer[0] != server or struct.unpack("!H", data[:2])[0] != qid or data[3] & 0x0F != 0:
                errors += 1
                continue
        except socket.timeout:
            errors += 1
            continue
        latencies.append(time.perf_counter_ns() - start)
    return latencies, errors


def main():
    server, port, secs, procs, name = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    with multiprocessing.Pool(procs) as pool:
        results = pool.map(worker, [(server, port, secs, name)] * procs)
    latencies = sorted(l for r in results for l in r[0])
    errors = sum(r[1] for r in results)
    pct = lambda p: latencies[min(len(latencies) - 1, int(len(latencies) * p))] / 1000 if latencies else None
    print(json.dumps({"queries": len(latencies), "qps": round(len(latencies) / secs), "p50_us": pct(0.5),
                      "p99_us": pct(0.99), "errors": errors, "procs": procs}))


if __name__ == "__main__":
    main()
