#!/usr/bin/env python3
"""egress's own measurements (run by bench/phases.sh, which sets up the namespaces and cgroup).

  egress_phases.py RULES_A RULES_B N

1. Load: `egress run` start -> "all policies enforced" on stderr, LOAD_REPEATS times; each time
   also reloads (rewrite the file with the other rule set, SIGHUP -> "reloaded"; RELOADS_FIRST
   on the first start, with the RSS after each, two on the others), RULES_A and RULES_B being
   N random and N near-miss CIDRs. The first start is checked with a probe: a
   connect to a deny-listed address must fail with EPERM.
2. Memory: the daemon's VmRSS/VmHWM and the memlock of the BPF maps it holds, after the first
   load and after its reloads.
3. Event pipeline: a client in the cgroup connects to a deny-listed address (EPERM, one blocked
   event each), paced at each of EVENT_RATES and then as fast as one and two clients can, for
   EVENT_SECS each, and once more with the daemon stopped (SIGSTOP) for half of it, past what
   any reader drains. The events that reached the JSON output and the drops the daemon reported
   are counted against the attempts: attempts = events + dropped means nothing was lost
   silently; dropped = 0 as well means nothing was lost at all.
JSON lines on stdout, logs on stderr.
"""
import json
import os
import queue
import signal
import statistics
import subprocess
import sys
import threading
import time

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402

ENV = os.environ
EGRESS = ENV["EGRESS_BIN"]
BIN = ENV["BENCH_BIN"]
TMP = ENV["TMP"]
RUN_ID = ENV.get("RUN_ID", "")
CG, CG_NAME, CLI_NS = ENV["CG"], ENV["CG_NAME"], ENV["CLI_NS"]
CPUS = [ENV.get("CLI_CPU", "0"), ENV.get("SRV_CPU", "1")]
PORTS = [ENV.get("CONN_PORT", "9000"), ENV.get("IPERF_PORT", "5201")]
LOAD_REPEATS = int(ENV.get("LOAD_REPEATS", "3"))
RELOADS_FIRST = int(ENV.get("RELOADS_FIRST", "6"))  # reloads of the first start (RSS after each)
EVENT_SECS = float(ENV.get("EVENT_SECS", "4"))
EVENT_RATES = [int(r) for r in ENV.get("EVENT_RATES", "25000 50000 100000 150000 200000 300000").split()]
LOAD_TIMEOUT = float(ENV.get("LOAD_TIMEOUT", "150"))
CLK_TCK = os.sysconf("SC_CLK_TCK")
ENFORCED = ("all policies enforced", "reloaded:")
REJECTED = ("reload rejected", "reload failed")


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def emit(kind, n, **fields):
    d = {"kind": kind, "run_id": RUN_ID, "config": "egress", "n": n}
    d.update(fields)
    bench.out(d)


def write_config(path, rules):
    text = bench.policy_yaml(rules, CG_NAME, ENV["EGRESS_PIN_DIR"], ENV["EGRESS_SOCKET"], ENV["SRV_IP"], PORTS)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def in_client(args, cpu=CPUS[0], **kw):
    """Runs args in the client cgroup and namespace, pinned to cpu."""
    script = 'cg=$1; ns=$2; cpu=$3; shift 3; echo $$ > "$cg/cgroup.procs" && exec ip netns exec "$ns" taskset -c "$cpu" "$@"'
    return subprocess.Popen(["sh", "-c", script, "sh", CG, CLI_NS, cpu] + args, stdout=subprocess.PIPE, text=True, **kw)


class Daemon:
    """`egress run` with its stderr read line by line, each line stamped when it arrived."""

    def __init__(self, config, events_path=None):
        self.lines = queue.Queue()
        self.stderr_log = open(os.path.join(TMP, "egress.err"), "a")
        out = open(events_path, "wb") if events_path else subprocess.DEVNULL
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [EGRESS, "run", "--config", config, "--log-format", "json", "--on-exit", "detach"],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.PIPE)
        if events_path:
            out.close()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for raw in self.proc.stderr:
            line = raw.decode(errors="replace")
            self.lines.put((time.monotonic(), line))
            self.stderr_log.write(line)
            self.stderr_log.flush()
        self.lines.put((time.monotonic(), None))

    def wait_enforced(self, since):
        """Seconds from `since` to the next line saying the policies are in force."""
        deadline = since + LOAD_TIMEOUT
        while True:
            try:
                t, line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError(f"egress did not enforce within {LOAD_TIMEOUT} s")
            if line is None:
                raise RuntimeError(f"egress exited (status {self.proc.wait()}); see {self.stderr_log.name}")
            if any(r in line for r in REJECTED):
                raise RuntimeError(f"egress rejected the policy file: {line.strip()}")
            if any(e in line for e in ENFORCED):
                return t - since

    def reload(self):
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGHUP)
        return self.wait_enforced(t0)

    def cpu_ticks(self):
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime

    def rss_kib(self):
        with open(f"/proc/{self.proc.pid}/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))

    def memory(self, n, phase):
        mem = {}
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    mem[line.split(":")[0]] = int(line.split()[1])
        maps = subprocess.run([f"{BIN}/bpfstat", "maps", str(self.proc.pid)], capture_output=True, text=True,
                              check=True).stdout
        ms = [json.loads(l) for l in maps.splitlines() if l.startswith("{")]
        emit("memory", n, cidrs="random", phase=phase, pid=self.proc.pid, rss_kib=mem.get("VmRSS"),
             hwm_kib=mem.get("VmHWM"), maps=len(ms), map_memlock_bytes=sum(max(0, m["memlock"]) for m in ms),
             map_memlock=({m["name"]: m["memlock"] for m in ms}))

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                log("egress did not stop on SIGTERM; SIGKILL")
                self.proc.kill()
                self.proc.wait()


def probe(address):
    p = in_client([f"{BIN}/tcpconn", "probe", address, PORTS[0], "300"])
    out, _ = p.communicate(timeout=30)
    return json.loads(out)["probe"]


def load_phase(rules_a, rules_b, n, config, deny_ip):
    starts, reloads = [], []
    for rep in range(1, LOAD_REPEATS + 1):
        write_config(config, rules_a)
        d = Daemon(config)
        try:
            start_s = d.wait_enforced(d.started)
            denied = probe(deny_ip) if rep == 1 and deny_ip else None
            if rep == 1:
                d.memory(n, "loaded")
            rel, rss = [], []
            count = RELOADS_FIRST if rep == 1 else 2
            for k in range(count):
                write_config(config, rules_b if k % 2 == 0 else rules_a)
                rel.append(d.reload())
                rss.append(d.rss_kib())
            if rep == 1:
                d.memory(n, f"after {count} reloads")
        finally:
            d.stop()
        starts.append(start_s)
        reloads.extend(rel)
        emit("egress_load", n, repeat=rep, start_s=round(start_s, 3), reload_s=[round(r, 3) for r in rel],
             rss_kib_after_each_reload=rss,
             **({"deny_probe": denied} if denied else {}))
        log(f"load {rep}: start {start_s:.3f} s, reloads {', '.join(f'{r:.3f}' for r in rel)} s")
    emit("egress_load_summary", n, repeats=LOAD_REPEATS,
         start_s_median=round(statistics.median(starts), 3), start_s_min=round(min(starts), 3),
         start_s_max=round(max(starts), 3), reload_s_median=round(statistics.median(reloads), 3),
         reload_s_min=round(min(reloads), 3), reload_s_max=round(max(reloads), 3))


def file_size(path):
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def event_phase(d, events_path, n, deny_ip, label, rate, clients, stall=0.0):
    """One load level; `stall` > 0 stops the daemon (SIGSTOP) that long in the middle of it, so
    that the ring buffer overflows and the drops must show up as reported, not as silence."""
    off = file_size(events_path)
    ticks0 = d.cpu_ticks()
    t0 = time.monotonic()
    procs = [in_client([f"{BIN}/tcpconn", "denyloop", deny_ip, PORTS[0], str(EVENT_SECS), str(rate)], cpu=CPUS[i])
             for i in range(clients)]
    if stall:
        time.sleep(max(0.0, (EVENT_SECS - stall) / 2))
        d.proc.send_signal(signal.SIGSTOP)
        time.sleep(stall)
        d.proc.send_signal(signal.SIGCONT)
    results = [json.loads(p.communicate(timeout=EVENT_SECS + 60)[0]) for p in procs]
    t_end = time.monotonic()
    # Wait until the output has stopped growing, and long enough for the daemon's drop check
    # (every 0.5 s) to have reported what the phase lost.
    size, t_grow = file_size(events_path), t_end
    while True:
        time.sleep(0.02)
        now, s = time.monotonic(), file_size(events_path)
        if s != size:
            size, t_grow = s, now
        elif now - t_grow >= 0.6 and now - t_end >= 1.2:
            break
        if now - t_end > 60:
            break
    ticks = d.cpu_ticks() - ticks0
    c = bench.count_events(events_path, off)
    attempts = sum(r["attempts"] for r in results)
    delivered, dropped = c["blocked"], c["dropped"]
    span = max(t_grow, t_end) - t0
    elapsed = max(r["elapsed_s"] for r in results)
    fields = dict(
        phase=label, clients=clients, target_rate=rate or None, secs=EVENT_SECS, daemon_stopped_s=stall,
        attempts=attempts, attempts_per_s=round(attempts / elapsed), eperm=sum(r["eperm"] for r in results),
        events=delivered, dropped_reported=dropped, drop_notices=c["drop_notices"],
        unaccounted=attempts - delivered - dropped, lossless=dropped == 0 and attempts == delivered,
        events_per_s=round(delivered / span), output_lag_s=round(max(0.0, t_grow - t_end), 3),
        daemon_cpu_pct=round(100.0 * ticks / CLK_TCK / span, 1),
    )
    emit("egress_events", n, cidrs="random", **fields)
    log(f"events {label}: {attempts} attempts ({fields['attempts_per_s']}/s), {delivered} events, "
        f"{dropped} dropped reported, {fields['unaccounted']} unaccounted, lag {fields['output_lag_s']} s, "
        f"daemon CPU {fields['daemon_cpu_pct']}%")
    return fields


def events_phase(rules_a, n, config, deny_ip):
    write_config(config, rules_a)
    events_path = os.path.join(TMP, "events.jsonl")
    d = Daemon(config, events_path)
    try:
        d.wait_enforced(d.started)
        for rate in EVENT_RATES:
            f = event_phase(d, events_path, n, deny_ip, f"paced {rate}/s", rate, 1)
            if f["attempts_per_s"] < 0.9 * rate:
                log(f"one client cannot make {rate} attempts/s; no higher paced rates")
                break
        event_phase(d, events_path, n, deny_ip, "1 client, unpaced", 0, 1)
        event_phase(d, events_path, n, deny_ip, "2 clients, unpaced", 0, 2)
        # Past what the daemon drains: stop it for a while under full load.
        stall = round(EVENT_SECS / 2, 2)
        event_phase(d, events_path, n, deny_ip, f"2 clients, daemon stopped {stall} s", 0, 2, stall=stall)
        d.memory(n, "after the event phases")
    finally:
        d.stop()


def main():
    rules_a, rules_b, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    config = os.path.join(TMP, "egress.yaml")
    with open(rules_a) as f:
        first = f.readline().strip()
    # Without rules, the client's deny target is any address outside the allow rule.
    deny_ip = None
    if first:
        import ipaddress
        net = ipaddress.ip_network(first)
        deny_ip = str(net.network_address + (1 if net.prefixlen < 31 else 0))
    load_phase(rules_a, rules_b, n, config, deny_ip)
    events_phase(rules_a, n, config, deny_ip or "192.0.2.1")


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(130))
    main()
