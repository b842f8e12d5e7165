"""Packet capture for the adversarial tests: every IP packet seen on one interface, one JSON
line each, flushed at once. Runs inside the far-side network namespace until killed.

usage: sniff.py IFACE OUTFILE
"""
import ipaddress
import json
import socket
import sys

ETH_P_ALL = 0x0003
IPV6_EXTENSIONS = {0, 43, 44, 51, 60, 135, 139, 140, 253, 254}


def summary(frame):
    ethertype = int.from_bytes(frame[12:14], "big")
    ip = frame[14:]
    if ethertype == 0x0800 and len(ip) >= 20:
        ihl = (ip[0] & 0x0F) * 4
        proto = ip[9]
        ports = ip[ihl:ihl + 4] if proto in (6, 17) else b""
        return {
            "dst": str(ipaddress.IPv4Address(ip[16:20])),
            "proto": proto,
            "dport": int.from_bytes(ports[2:4], "big") if len(ports) == 4 else None,
            "routed": ihl > 20,
            "segments": [],
        }
    if ethertype == 0x86DD and len(ip) >= 40:
        nxt, off, routed, segments = ip[6], 40, False, []
        while nxt in IPV6_EXTENSIONS and off + 8 <= len(ip):
            if nxt == 44:
                hdr_len = 8
            elif nxt == 51:
                hdr_len = (ip[off + 1] + 2) * 4
            else:
                hdr_len = (ip[off + 1] + 1) * 8
            if nxt == 43:
                routed = True
                for i in range(off + 8, min(off + hdr_len, len(ip)), 16):
                    segments.append(str(ipaddress.IPv6Address(ip[i:i + 16])))
            nxt = ip[off]
            off += hdr_len
        ports = ip[off:off + 4] if nxt in (6, 17) else b""
        return {
            "dst": str(ipaddress.IPv6Address(ip[24:40])),
            "proto": nxt,
            "dport": int.from_bytes(ports[2:4], "big") if len(ports) == 4 else None,
            "routed": routed,
            "segments": segments,
        }
    return None


def main():
    iface, path = sys.argv[1], sys.argv[2]
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    s.bind((iface, 0))
    with open(path, "a", buffering=1) as out:
        print(json.dumps({"ready": True}), file=out)
        while True:
            frame = s.recv(65535)
            packet = summary(frame)
            if packet is not None:
                print(json.dumps(packet), file=out)


main()
