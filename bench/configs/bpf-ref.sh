# shellcheck shell=bash
# CONFIG bpf-ref: a minimal cgroup BPF filter in C with libbpf (bench/src/egress_ref*.c): LPM
# tries for deny and allow, on connect4, sendmsg4 and cgroup_skb/egress (an LPM lookup per
# packet), no events. The yardstick for egress's kernel cost per program run.
CFG_DESC="reference cgroup BPF in C: deny+allow LPM tries on connect4/sendmsg4/skb egress, no events"
. "$BENCH_DIR/configs/_daemon.sh"
cfg_setup() {
    daemon_start '"ready":true' "$TMP/ref.out" "$TMP/ref.out" "$TMP/ref.err" \
        "$BENCH_BIN/egress_ref" "$BENCH_BIN/egress_ref.bpf.o" "$CG" "$2" \
        "$SRV_IP/32,any,$IPERF_PORT,$CONN_PORT" --max-seconds 1800
}
cfg_measure() {
    daemon_memory
    bpf_stats_phase
}
cfg_teardown() { daemon_stop; }
