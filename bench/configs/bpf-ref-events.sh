# shellcheck shell=bash
# CONFIG bpf-ref-events: bpf-ref with one ring buffer event per connect4 call, as egress writes,
# submitted without waking the reader (BPF_RB_NO_WAKEUP; the loader drains every 10 ms). The
# yardstick for what an event per connect should cost.
CFG_DESC="bpf-ref + one ring buffer event per connect (no wakeup, drained every 10 ms)"
. "$BENCH_DIR/configs/_daemon.sh"
cfg_setup() {
    daemon_start '"ready":true' "$TMP/ref.out" "$TMP/ref.out" "$TMP/ref.err" \
        "$BENCH_BIN/egress_ref" "$BENCH_BIN/egress_ref.bpf.o" "$CG" "$2" \
        "$SRV_IP/32,any,$IPERF_PORT,$CONN_PORT" --max-seconds 1800 --events
}
cfg_measure() {
    daemon_memory
    bpf_stats_phase
}
cfg_teardown() { daemon_stop; }
