#!/usr/bin/env bash
# The whole benchmark: the matrix (run.sh for every configuration, N and CIDR variant), egress's
# own phases (phases.sh), then the Markdown summary. `cargo xtask bench` builds the tools and
# runs this; it can also be run by hand once they are built.
#
#   bench/run_all.sh            (as root)   QUICK=1: the smoke subset CI runs (about a minute)
#
# Results: $BENCH_OUT/results.jsonl (every JSON line), $BENCH_OUT/results.md (tables), and the
# logs of every point under $BENCH_OUT/logs/. Exit status 1 when a point failed or the results
# do not hold together (summarize.py --check); a missed performance target does not fail.
#
# Environment: CONFIGS, NS_LIST, VARIANTS, PHASES_N and every tunable of run.sh / phases.sh.
set -uo pipefail
BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib/common.sh
. "$BENCH_DIR/lib/common.sh"

if [ "${QUICK:-0}" = 1 ]; then
    : "${CONFIGS:=egress nft}" "${NS_LIST:=0 1000}" "${VARIANTS:=random}" "${PHASES_N:=1000}"
    : "${RUNS:=1}" "${COUNT:=5000}" "${WARMUP:=200}" "${TCP_SECS:=1}" "${UDP_SECS:=1}"
    : "${STATS_COUNT:=2000}" "${STATS_UDP_SECS:=1}"
    : "${LOAD_REPEATS:=1}" "${RELOADS_FIRST:=2}" "${EVENT_SECS:=1}" "${EVENT_RATES:=50000}"
else
    : "${CONFIGS:=egress nft iptables ipset bpf-ref bpf-ref-events}" "${NS_LIST:=0 1000 10000 100000}"
    : "${VARIANTS:=random nearmiss}" "${PHASES_N:=100000}"
fi
export RUNS COUNT WARMUP TCP_SECS UDP_SECS STATS_COUNT STATS_UDP_SECS LOAD_REPEATS RELOADS_FIRST EVENT_SECS EVENT_RATES
read -r -a CONFIG_LIST <<< "$CONFIGS"

[ "$(id -u)" = 0 ] || die "run as root"
RUN_ID=${RUN_ID:-$(date -u +%Y%m%d-%H%M%S)}; export RUN_ID
mkdir -p "$BENCH_OUT/logs"
OUT="$BENCH_OUT/results.jsonl"
LOGS="$BENCH_OUT/logs"
rm -f "$LOGS"/*.log
: > "$OUT"

env_line() {  # kind=env (start) or kind=env_end: the machine, the tools and how busy it was
    $PY merge '{}' kind="$1" run_id="$RUN_ID" quick="${QUICK:-0}" date="$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
        kernel="$(uname -r)" ncpu="$(nproc)" \
        cpu="$(awk -F': ' '/model name/{print $2; exit}' /proc/cpuinfo)" \
        mem_mib="$(awk '/MemTotal/{printf "%d", $2/1024}' /proc/meminfo)" \
        loadavg="$(cut -d' ' -f1-3 /proc/loadavg)" \
        egress="$("${EGRESS_BIN:-false}" --version 2>/dev/null | awk '{print $NF}' || echo unknown)" \
        git="$(git -C "$BENCH_DIR" describe --always --dirty 2>/dev/null || echo unknown)" \
        nft="$(nft --version 2>/dev/null)" iptables="$(iptables -V 2>/dev/null)" \
        ipset="$(ipset --version 2>/dev/null | head -1)" iperf3="$(iperf3 --version 2>/dev/null | head -1)" \
        jit="$(cat /proc/sys/net/core/bpf_jit_enable)" \
        runs="${RUNS:-3}" count="${COUNT:-20000}" tcp_secs="${TCP_SECS:-5}" udp_secs="${UDP_SECS:-3}" \
        configs="$CONFIGS" ns="$NS_LIST" variants="$VARIANTS" | tee -a "$OUT"
}

FAILED=0
point() {  # CONFIG N VARIANT
    local log="$LOGS/$1-$2-$3.log"
    log "$1 N=$2 $3"
    if ! "$BENCH_DIR/run.sh" "$@" 2> "$log" | tee -a "$OUT"; then
        FAILED=1
        log "FAILED: run.sh $* (log: $log)"; tail -n 5 "$log" >&2
        $PY merge '{}' kind=error run_id="$RUN_ID" config="$1" n="$2" cidrs="$3" log="$log" | tee -a "$OUT"
    fi
}

env_line env
t0=$(date +%s)
point none 0 random
half=$(( (${#CONFIG_LIST[@]} + 1) / 2 )); i=0
for c in "${CONFIG_LIST[@]}"; do
    i=$((i + 1))
    for n in $NS_LIST; do
        for v in $VARIANTS; do
            # With no CIDRs the variants are the same point.
            [ "$n" = 0 ] && [ "$v" != "${VARIANTS%% *}" ] && continue
            point "$c" "$n" "$v"
        done
    done
    [ "$i" = "$half" ] && [ "${#CONFIG_LIST[@]}" -gt 2 ] && point none 0 random
done
point none 0 random

if [ -n "$PHASES_N" ] && [[ " $CONFIGS " == *" egress "* ]]; then
    if ! "$BENCH_DIR/phases.sh" "$PHASES_N" 2> "$LOGS/phases-$PHASES_N.log" | tee -a "$OUT"; then
        FAILED=1
        log "FAILED: phases.sh $PHASES_N (log: $LOGS/phases-$PHASES_N.log)"; tail -n 5 "$LOGS/phases-$PHASES_N.log" >&2
        $PY merge '{}' kind=error run_id="$RUN_ID" config=egress phase=phases n="$PHASES_N" | tee -a "$OUT"
    fi
fi
if [[ " $CONFIGS " == *" egress "* ]]; then
    [ "${QUICK:-0}" = 1 ] && export DNS_SECS=${DNS_SECS:-1}
    if ! "$BENCH_DIR/dns.sh" 2> "$LOGS/dns.log" | tee -a "$OUT"; then
        FAILED=1
        log "FAILED: dns.sh (log: $LOGS/dns.log)"; tail -n 5 "$LOGS/dns.log" >&2
        $PY merge '{}' kind=error run_id="$RUN_ID" config=egress phase=dns | tee -a "$OUT"
    fi
fi
env_line env_end > /dev/null
log "total wall time: $(( $(date +%s) - t0 )) s"

python3 "$BENCH_DIR/lib/summarize.py" "$OUT" > "$BENCH_OUT/results.md" || FAILED=1
python3 "$BENCH_DIR/lib/summarize.py" --check "$OUT" || FAILED=1
exit "$FAILED"
