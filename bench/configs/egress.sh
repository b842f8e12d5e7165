# shellcheck shell=bash
# CONFIG egress: the daemon of this repository, `egress run --log-format json`, with one policy
# for the client cgroup (default `log: new`: an allowed event per new destination, blocked ones
# always, flow records counted). Its events go to a file on tmpfs: they are part of the product's
# cost and stay on. `--on-exit detach` and the bench's own
# pin directory and control socket (see bench.py egress_policy) keep it apart from any other
# egress on the machine.
CFG_DESC="egress run: one policy on the client cgroup, JSON flow events on"
: "${EGRESS_BIN:?EGRESS_BIN must name the egress binary}"
. "$BENCH_DIR/configs/_daemon.sh"
cfg_prepare() {
    $PY egress_policy "$2" "$CG_NAME" "$EGRESS_PIN_DIR" "$EGRESS_SOCKET" "$SRV_IP" "$CONN_PORT" "$IPERF_PORT" \
        > "$TMP/egress.yaml"
}
cfg_setup() {
    daemon_start 'all policies enforced' "$TMP/egress.err" "$TMP/events.jsonl" "$TMP/egress.err" \
        "$EGRESS_BIN" run --config "$TMP/egress.yaml" --log-format json --on-exit detach
}
cfg_measure() {
    daemon_memory
    bpf_stats_phase
}
cfg_teardown() {
    daemon_stop
    if grep -q '"level":"\(ERROR\|WARN\)"' "$TMP/egress.err" 2>/dev/null; then
        log "egress warnings/errors:"; grep '"level":"\(ERROR\|WARN\)"' "$TMP/egress.err" | tail -n 5 >&2
    fi
}
# kind=matrix_events: events the daemon wrote during this point (one per new destination) against
# the connects the clients made, and the drops it reported.
cfg_report() {
    [ -f "$TMP/events.jsonl" ] || return 0
    local connects
    connects=$(python3 -c 'import json,sys
t = 0
for p in sys.argv[1:]:
    for l in open(p):
        if l.startswith("{"):
            r = json.loads(l); t += r["conns"] + r["errors"] + r.get("warmup", 0)
print(t)' "$TMP/connect.jsonl" "$TMP/stats-connect.json" 2>/dev/null || echo null)
    $PY events "$TMP/events.jsonl" kind=matrix_events "${COMMON[@]}" client_connects="$connects"
}
