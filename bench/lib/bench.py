#!/usr/bin/env python3
"""Helpers of the benchmark scripts: rule files, JSON lines, policy files, kernel counters.

  bench.py rules DIR N VARIANT SRV_IP        -> path of the rule file (created on first use)
  bench.py first_deny RULEFILE               -> an address inside the file's first CIDR
  bench.py merge JSON k=v ...                -> one JSON line (v typed: int/float/bool/null/str)
  bench.py connect_summary FILE k=v ...      -> summary of the per-run tcpconn lines in FILE
  bench.py iperf_tcp FILE k=v ...            -> fields of `iperf3 -J` TCP output
  bench.py egress_policy RULEFILE CGROUP PIN_DIR SOCKET SRV_IP PORT... -> egress policy YAML
  bench.py bpf_stats BEFORE AFTER k=v ...    -> per-hook run count and ns per run between snapshots
  bench.py maps FILE k=v ...                 -> kernel map memory from `bpfstat maps` lines
  bench.py events FILE k=v ...               -> flow events and drop notices in egress JSON output

Rule files: the first N lines of one seeded list of 100,000 non-overlapping random IPv4 CIDRs
(50% /32, 20% /24, 30% /16../31 other than /24; none in 0/8, 10/8, 127/8 or 224/3, so none
contains the bench addresses). VARIANT nearmiss replaces the last 24 of the N with the 24
"siblings" of the server address (its address with bit L-1 flipped, as a /L, L = 9..32): none
contains the server but each shares L-1 leading bits with it, so a trie lookup for the server
walks its full depth instead of leaving near the root - the hard case.
"""
import bisect
import ipaddress
import json
import os
import random
import statistics
import sys

MASTER = 100_000
SEED = 42
NEAR_MISS = 24


def gen_cidrs(n_total, seed):
    rnd = random.Random(seed)
    starts, ends = [], []  # sorted, non-overlapping [start, end] intervals
    out = []
    others = [l for l in range(16, 32) if l != 24]
    while len(out) < n_total:
        r = rnd.random()
        plen = 32 if r < 0.5 else 24 if r < 0.7 else rnd.choice(others)
        first = rnd.randint(11, 223)
        if first == 127:
            continue
        addr = (first << 24) | rnd.getrandbits(24)
        size = 1 << (32 - plen)
        start = addr & ~(size - 1) & 0xFFFFFFFF
        end = start + size - 1
        i = bisect.bisect_right(starts, start)
        if i > 0 and ends[i - 1] >= start:
            continue
        if i < len(starts) and starts[i] <= end:
            continue
        starts.insert(i, start)
        ends.insert(i, end)
        out.append(f"{ipaddress.IPv4Address(start)}/{plen}")
    return out


def near_miss(server):
    a = int(ipaddress.IPv4Address(server))
    for plen in range(9, 33):
        sib = (a ^ (1 << (32 - plen))) & ~((1 << (32 - plen)) - 1) & 0xFFFFFFFF
        yield f"{ipaddress.IPv4Address(sib)}/{plen}"


def write_atomic(path, lines):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        for line in lines:
            f.write(line + "\n")
    os.replace(tmp, path)


def rules(directory, n, variant, server):
    n = int(n)
    if n > MASTER:
        sys.exit(f"N > {MASTER} is not supported")
    if variant not in ("random", "nearmiss"):
        sys.exit(f"unknown CIDR variant {variant}")
    os.makedirs(directory, exist_ok=True)
    master = os.path.join(directory, f"cidrs-{MASTER}-seed{SEED}.txt")
    if not os.path.exists(master):
        write_atomic(master, gen_cidrs(MASTER, SEED))
    if variant == "nearmiss" and n < NEAR_MISS:
        variant = "random"
    path = os.path.join(directory, f"cidrs-{n}-{variant}.txt")
    if not os.path.exists(path):
        with open(master) as f:
            base = [line.strip() for _, line in zip(range(n), f)]
        if variant == "nearmiss":
            base = base[: n - NEAR_MISS] + list(near_miss(server))
        write_atomic(path, base)
    print(path)


def first_deny(path):
    with open(path) as f:
        line = f.readline().strip()
    if not line:
        return
    net = ipaddress.ip_network(line)
    print(net.network_address + (1 if net.prefixlen < 31 else 0))


def typed(v):
    if v in ("true", "false"):
        return v == "true"
    if v == "null":
        return None
    for conv in (int, float):
        try:
            return conv(v)
        except ValueError:
            pass
    return v


def kv(args):
    d = {}
    for a in args:
        k, _, v = a.partition("=")
        d[k] = typed(v)
    return d


def out(d):
    print(json.dumps(d, separators=(",", ":")), flush=True)


def merge(base, args):
    d = kv(args)
    base = base.strip()
    d.update(json.loads(base) if base else {})
    out(d)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(l) for l in f if l.strip().startswith("{")]


def connect_summary(path, args):
    runs = read_jsonl(path)
    d = kv(args)
    if not runs:
        d.update(error="no connect runs")
        return out(d)
    cps = [r["cps"] for r in runs]
    med = statistics.median(cps)
    d.update(
        runs=len(runs),
        conns_per_run=runs[0]["conns"],
        connects_total=sum(r["conns"] + r["errors"] + r.get("warmup", 0) for r in runs),
        cps_median=round(med, 1),
        cps_min=round(min(cps), 1),
        cps_max=round(max(cps), 1),
        cps_spread_pct=round(100.0 * (max(cps) - min(cps)) / med, 1) if med else None,
        p50_us_median=round(statistics.median(r["p50_us"] for r in runs), 2),
        p99_us_median=round(statistics.median(r["p99_us"] for r in runs), 2),
        p99_us_max=round(max(r["p99_us"] for r in runs), 2),
        p999_us_median=round(statistics.median(r["p999_us"] for r in runs), 2),
        errors=sum(r["errors"] for r in runs),
        truncated=any(r["truncated"] for r in runs),
    )
    out(d)


def iperf_tcp(path, args):
    d = kv(args)
    try:
        with open(path) as f:
            j = json.load(f)
        e = j["end"]
        d.update(
            gbps=round(e["sum_received"]["bits_per_second"] / 1e9, 3),
            retransmits=e["sum_sent"].get("retransmits"),
            seconds=round(e["sum_received"]["seconds"], 2),
            cpu_host_pct=round(e["cpu_utilization_percent"]["host_total"], 1),
        )
    except Exception as ex:  # noqa: BLE001 - any parse failure is reported in the line
        d.update(error=f"iperf3 tcp output not understood: {ex}")
    out(d)


def policy_yaml(path, cgroup, pin_dir, socket, server, ports):
    """One policy for the client cgroup: the N deny CIDRs, the server allowed on the bench ports
    (tcp and udp), default deny - the same rule set every configuration gets, with the event
    budget lifted. The programs attach
    to the client cgroup alone, and the pins and the control socket are the bench's own, so the
    bench never meets another egress daemon on the machine."""
    lines = [
        "# generated by bench/lib/bench.py for `cargo xtask bench`",
        "settings:",
        f"  attach: {cgroup}",
        f"  pin_dir: {pin_dir}",
        f"  control_socket: {socket}",
        # The per-cgroup event budget and the output's total would suppress most of the event
        # phases' blocked connects; lifted so that those phases measure the ring buffer and the
        # daemon.
        "  events_per_second: 10000000",
        "  events_written_per_second: 10000000",
        "policies:",
        "  - name: bench",
        f"    cgroup: {cgroup}",
        "    default: deny",
        "    rules:",
        f"      - allow: {server}",
        "        protocol: any",
        f"        ports: [{', '.join(str(p) for p in ports)}]",
    ]
    with open(path) as f:
        lines.extend(f"      - deny: {c.strip()}" for c in f if c.strip())
    return "\n".join(lines) + "\n"


def egress_policy(path, cgroup, pin_dir, socket, server, ports):
    sys.stdout.write(policy_yaml(path, cgroup, pin_dir, socket, server, ports))


def bpf_stats(before, after, args):
    """Run count and mean ns per run of each attached program between two `bpfstat progs`
    snapshots (the kernel counts only while kernel.bpf_stats_enabled=1)."""
    old = {(p["hook"], p["id"]): p for p in read_jsonl(before)}
    for p in read_jsonl(after):
        o = old.get((p["hook"], p["id"]), {"run_cnt": 0, "run_time_ns": 0})
        cnt = p["run_cnt"] - o["run_cnt"]
        ns = p["run_time_ns"] - o["run_time_ns"]
        d = kv(args)
        d.update(hook=p["hook"], prog=p["name"], prog_id=p["id"], run_cnt=cnt, run_time_ns=ns,
                 ns_per_run=round(ns / cnt, 1) if cnt > 0 else None, jited_bytes=p.get("jited_bytes"))
        out(d)


def maps(path, args):
    ms = read_jsonl(path)
    d = kv(args)
    d.update(
        maps=len(ms),
        map_memlock_bytes=sum(m["memlock"] for m in ms if m["memlock"] > 0),
        largest_maps=[f"{m['name']}:{m['memlock']}" for m in sorted(ms, key=lambda m: -m["memlock"])[:4]],
    )
    out(d)


def count_events(path, offset=0):
    """Flow events by verdict and the drops the daemon reported, from byte OFFSET on."""
    counts = {"allowed": 0, "blocked": 0, "audit": 0, "dropped": 0, "drop_notices": 0, "other_lines": 0}
    with open(path, "rb") as f:
        f.seek(offset)
        for raw in f:
            if b'"verdict":"allowed"' in raw:
                counts["allowed"] += 1
            elif b'"verdict":"blocked"' in raw:
                counts["blocked"] += 1
            elif b'"verdict":"audit"' in raw:
                counts["audit"] += 1
            elif b'"events_dropped"' in raw:
                counts["drop_notices"] += 1
                counts["dropped"] += json.loads(raw).get("dropped", 0)
            elif raw.strip():
                counts["other_lines"] += 1
    return counts


def events(path, args):
    d = kv(args)
    d.update(count_events(path))
    out(d)


def main():
    cmd, rest = sys.argv[1], sys.argv[2:]
    if cmd == "rules":
        rules(*rest[:4])
    elif cmd == "first_deny":
        first_deny(rest[0])
    elif cmd == "merge":
        merge(rest[0], rest[1:])
    elif cmd == "connect_summary":
        connect_summary(rest[0], rest[1:])
    elif cmd == "iperf_tcp":
        iperf_tcp(rest[0], rest[1:])
    elif cmd == "egress_policy":
        egress_policy(rest[0], rest[1], rest[2], rest[3], rest[4], rest[5:])
    elif cmd == "bpf_stats":
        bpf_stats(rest[0], rest[1], rest[2:])
    elif cmd == "maps":
        maps(rest[0], rest[1:])
    elif cmd == "events":
        events(rest[0], rest[1:])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
