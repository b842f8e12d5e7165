#!/usr/bin/env bash
# One point of the benchmark matrix: configuration CONFIG with N deny CIDRs of VARIANT.
#
#   bench/run.sh CONFIG N [random|nearmiss]        (as root; `cargo xtask bench` runs it)
#
# CONFIG names bench/configs/CONFIG.sh: none, egress, nft, iptables, ipset, bpf-ref.
#
# Topology, created for this run and removed on exit (also on failure or Ctrl-C):
#   [netns egress-bench-cli] ebc0 10.200.0.1/24 <--veth--> ebs0 10.200.0.2/24 [netns egress-bench-srv]
# Client processes run in the client namespace AND the cgroup $CG, pinned to CPU $CLI_CPU; the
# servers (tcpconn accept loop, iperf3 -s, UDP sink) run in the server namespace on CPU $SRV_CPU.
# Every filter holds the same rules: N deny CIDRs (none matches the server), the server allowed
# on tcp+udp ports 5201 and 9000, everything else denied.
#
# Output: JSON lines on stdout (kind = setup | probe | connect_run | connect | iperf_tcp | udp |
# bpf_stats | memory | matrix_events | teardown); logs on stderr.
#
# Environment: RUNS=3 COUNT=20000 MAXSEC=5 WARMUP=1000 TCP_SECS=5 UDP_SECS=3 UDP_LEN=64
#   LOAD_TIMEOUT=150 STATS_COUNT=20000 STATS_UDP_SECS=1 EGRESS_BIN BENCH_BIN BENCH_OUT
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib/common.sh
. "$BENCH_DIR/lib/common.sh"

CONFIG=${1:?usage: run.sh CONFIG N [random|nearmiss]}
N=${2:?usage: run.sh CONFIG N [random|nearmiss]}
VARIANT=${3:-random}
: "${RUNS:=3}" "${COUNT:=20000}" "${MAXSEC:=5}" "${WARMUP:=1000}"
: "${TCP_SECS:=5}" "${UDP_SECS:=3}" "${UDP_LEN:=64}" "${LOAD_TIMEOUT:=150}"
: "${STATS_COUNT:=20000}" "${STATS_UDP_SECS:=1}"

[ "$(id -u)" = 0 ] || die "run as root"
[ -n "$CG_ROOT" ] || die "no cgroup2 mount found in /proc/self/mountinfo"
CFG_FILE="$BENCH_DIR/configs/$CONFIG.sh"
[ -f "$CFG_FILE" ] || die "unknown config $CONFIG (no $CFG_FILE)"
[ -x "$BENCH_BIN/tcpconn" ] || die "$BENCH_BIN/tcpconn is missing (cargo xtask bench builds it)"

RUN_ID=${RUN_ID:-$(date +%Y%m%d-%H%M%S)}
TMP=$(mktemp -d "${BENCH_TMPDIR:-/tmp}/egress-bench.XXXXXX")
SERVER_PIDS=()
COMMON=(run_id="$RUN_ID" config="$CONFIG" n="$N" cidrs="$VARIANT")

# A configuration defines CFG_DESC and cfg_setup; the other hooks are optional.
cfg_prepare() { :; }   # untimed: write rule files
cfg_setup() { :; }     # timed: load the filter (return 124 past LOAD_TIMEOUT)
cfg_measure() { :; }   # while the filter is loaded, after the traffic: extra JSON lines
cfg_teardown() { :; }  # remove the filter (idempotent; also called on failure)
cfg_report() { :; }    # after teardown: extra JSON lines
CFG_DESC=""
# shellcheck disable=SC1090
. "$CFG_FILE"

cleanup() {
    set +e
    bpf_stats_restore
    cfg_teardown >&2 2>&1
    for p in "${SERVER_PIDS[@]}"; do kill "$p" 2>/dev/null; done
    sleep 0.2
    for p in "${SERVER_PIDS[@]}"; do kill -0 "$p" 2>/dev/null && kill -9 "$p" 2>/dev/null; done
    for p in "${SERVER_PIDS[@]}"; do wait "$p" 2>/dev/null; done
    netns_down
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log "=== config=$CONFIG N=$N cidrs=$VARIANT ($CFG_DESC) ==="
netns_up

# Servers: started without shell functions so that $! is the server itself (ip netns exec and
# taskset exec in place); bounded lifetimes in case a kill is missed.
ip netns exec "$SRV_NS" taskset -c "$SRV_CPU" "$BENCH_BIN/tcpconn" server "$CONN_PORT" 1800 \
    >"$TMP/tcpconn-server.log" 2>&1 </dev/null &
SERVER_PIDS+=($!)
ip netns exec "$SRV_NS" taskset -c "$SRV_CPU" timeout 1800 iperf3 -s -p "$IPERF_PORT" \
    >"$TMP/iperf3-server.log" 2>&1 </dev/null &
SERVER_PIDS+=($!)
sleep 0.5

# --- the filter ---
RULES=$(rules_file "$N" "$VARIANT")
cfg_prepare "$N" "$RULES" >&2
t0=$(date +%s.%N)
rc=0
cfg_setup "$N" "$RULES" >&2 || rc=$?
t1=$(date +%s.%N)
load_s=$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.3f", b-a}')
$PY merge '{}' kind=setup "${COMMON[@]}" load_s="$load_s" rc="$rc" desc="$CFG_DESC" loadavg="$(cut -d" " -f1 /proc/loadavg)"
if [ "$rc" = 124 ]; then
    $PY merge '{}' kind=skip "${COMMON[@]}" reason="filter load exceeded LOAD_TIMEOUT=${LOAD_TIMEOUT}s"
    exit 0
fi
[ "$rc" = 0 ] || die "cfg_setup failed (rc=$rc)"

# --- probes: the server must connect; a deny-listed address must not ---
p_ok=$(in_client "$BENCH_BIN/tcpconn" probe "$SRV_IP" "$CONN_PORT" 2000)
deny_ip=$($PY first_deny "$RULES")
if [ -n "$deny_ip" ]; then
    # Make the deny-listed address answer (on the server namespace's lo): without an enforcing
    # filter the probe says "ok"; with one it fails (ETIMEDOUT for a netfilter DROP, which TCP
    # retries; EPERM for a cgroup/connect4 reject).
    ip -n "$SRV_NS" addr add "$deny_ip/32" dev lo
    p_deny=$(in_client "$BENCH_BIN/tcpconn" probe "$deny_ip" "$CONN_PORT" 300)
else
    p_deny='{"probe":"n/a"}'
fi
$PY merge '{}' kind=probe "${COMMON[@]}" \
    allowed="$(echo "$p_ok" | python3 -c 'import json,sys; print(json.load(sys.stdin)["probe"])')" \
    deny_target="${deny_ip:-none}" \
    denied="$(echo "$p_deny" | python3 -c 'import json,sys; print(json.load(sys.stdin)["probe"])')"
echo "$p_ok" | grep -q '"ok"' || die "server not reachable through the filter: $p_ok"
if [ -n "$deny_ip" ] && [ "$CONFIG" != none ] && echo "$p_deny" | grep -q '"ok"'; then
    die "the filter does not block $deny_ip: $p_deny"
fi

# --- (a) TCP connect rate and connect() latency ---
: > "$TMP/connect.jsonl"
for r in $(seq 1 "$RUNS"); do
    w=$WARMUP; [ "$r" -gt 1 ] && w=200
    line=$(in_client "$BENCH_BIN/tcpconn" client "$SRV_IP" "$CONN_PORT" "$COUNT" "$MAXSEC" "$w")
    echo "$line" >> "$TMP/connect.jsonl"
    $PY merge "$line" kind=connect_run "${COMMON[@]}" run="$r"
done
$PY connect_summary "$TMP/connect.jsonl" kind=connect "${COMMON[@]}"

# --- (b) TCP throughput, iperf3, one stream ---
if [ "$TCP_SECS" -gt 0 ]; then
    in_client timeout $((TCP_SECS + 30)) iperf3 -c "$SRV_IP" -p "$IPERF_PORT" -t "$TCP_SECS" -P 1 -J \
        > "$TMP/iperf-tcp.json" 2>&1 || true
    $PY iperf_tcp "$TMP/iperf-tcp.json" kind=iperf_tcp "${COMMON[@]}" secs="$TCP_SECS"
fi

# --- (c) UDP small-packet rate ---
# tcpconn udpblast: sendmmsg() of 64 datagrams of UDP_LEN bytes per call, to a sink in the
# server namespace. pps_sent is the sender's rate, where the whole egress path (filter included)
# runs on the sender's CPU. connected: one connect(), then packets (cgroup/connect4 once);
# unconnected: a destination on every datagram (cgroup/sendmsg4 per datagram).
udp_blast() {  # MODE SECS -> one JSON object
    local mode=$1 secs=$2 sink snd
    ip netns exec "$SRV_NS" taskset -c "$SRV_CPU" "$BENCH_BIN/tcpconn" udpsink "$CONN_PORT" \
        $((secs + 15)) > "$TMP/udpsink.json" 2>&1 </dev/null &
    sink=$!
    sleep 0.3
    snd=$(in_client timeout $((secs + 10)) "$BENCH_BIN/tcpconn" udpblast "$SRV_IP" "$CONN_PORT" \
        "$secs" "$UDP_LEN" "$mode" || echo '{}')
    wait "$sink" || true
    python3 -c 'import json,sys; a=json.loads(sys.argv[1] or "{}"); a.update(json.load(open(sys.argv[2]))); print(json.dumps(a))' \
        "$snd" "$TMP/udpsink.json" 2>/dev/null || echo "$snd"
}
if [ "$UDP_SECS" -gt 0 ]; then
    for mode in connected unconnected; do
        sleep 0.3
        $PY merge "$(udp_blast "$mode" "$UDP_SECS")" kind=udp mode="$mode" "${COMMON[@]}" secs="$UDP_SECS"
    done
fi

# --- (d) kernel cost per program run (egress, bpf-ref) ---
# A fixed workload with kernel.bpf_stats_enabled=1 (restored right after): one connect run and
# one short UDP blast of each mode. Measured after the rates above, which it would slow down.
bpf_stats_phase() {
    bpf_stats_on
    "$BENCH_BIN/bpfstat" progs "$CG" > "$TMP/bpf-before.jsonl"
    in_client "$BENCH_BIN/tcpconn" client "$SRV_IP" "$CONN_PORT" "$STATS_COUNT" "$MAXSEC" 0 > "$TMP/stats-connect.json"
    udp_blast connected "$STATS_UDP_SECS" > /dev/null
    udp_blast unconnected "$STATS_UDP_SECS" > /dev/null
    "$BENCH_BIN/bpfstat" progs "$CG" > "$TMP/bpf-after.jsonl"
    bpf_stats_restore
    $PY bpf_stats "$TMP/bpf-before.jsonl" "$TMP/bpf-after.jsonl" kind=bpf_stats "${COMMON[@]}"
}

cfg_measure
cfg_teardown >&2
cfg_report
t2=$(date +%s.%N)
$PY merge '{}' kind=teardown "${COMMON[@]}" total_s="$(awk -v a="$t0" -v b="$t2" 'BEGIN{printf "%.1f", b-a}')"
