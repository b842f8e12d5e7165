# Shared helpers of the benchmark scripts (sourced by run.sh and phases.sh).
# shellcheck shell=bash
#
# Everything the benchmark creates has a name of its own: two network namespaces joined by one
# veth pair, and one cgroup v2 directory for the client. Nothing else on the machine is touched:
# not the root cgroup, not the caller's cgroup, not the root network namespace.

: "${BENCH_DIR:=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
: "${BENCH_OUT:=$BENCH_DIR/../target/bench}"   # rules/, logs/, results.*
: "${BENCH_BIN:=$BENCH_OUT/bin}"               # tcpconn, bpfstat, egress_ref, egress_ref.bpf.o
: "${CLI_NS:=egress-bench-cli}"  # client namespace (the filters apply to the client)
: "${SRV_NS:=egress-bench-srv}"  # server namespace
: "${CLI_IF:=ebc0}"
: "${SRV_IF:=ebs0}"
: "${CLI_IP:=10.200.0.1}"
: "${SRV_IP:=10.200.0.2}"
: "${CONN_PORT:=9000}"           # tcpconn server (TCP) and UDP sink port
: "${IPERF_PORT:=5201}"
: "${CLI_CPU:=0}"                # client processes
: "${SRV_CPU:=1}"                # server processes
: "${CG_NAME:=egress-bench-client}"
# Scratch files (flow events included) on tmpfs when there is one, so disk writeback adds no noise.
if [ -z "${BENCH_TMPDIR:-}" ]; then [ -d /dev/shm ] && [ -w /dev/shm ] && BENCH_TMPDIR=/dev/shm || BENCH_TMPDIR=/tmp; fi
# The cgroup2 mount from mountinfo (a bind mount of a subtree, root other than "/", is not it).
: "${CG_ROOT:=$(awk '{ for (i = 7; i <= NF; i++) if ($i == "-") break; if ($(i+1) == "cgroup2" && $4 == "/") { print $5; exit } }' /proc/self/mountinfo)}"
: "${CG:=$CG_ROOT/$CG_NAME}"     # the cgroup every client process runs in (all configs)
: "${EGRESS_PIN_DIR:=/sys/fs/bpf/egress-bench}"            # egress's pins: the bench's own
: "${EGRESS_SOCKET:=/run/egress-bench/control.sock}"       # egress's control socket: likewise
export EGRESS_PIN_DIR EGRESS_SOCKET BENCH_TMPDIR BENCH_DIR BENCH_OUT BENCH_BIN CLI_NS SRV_NS SRV_IP CLI_IP CONN_PORT IPERF_PORT CLI_CPU SRV_CPU CG CG_ROOT CG_NAME

PY="python3 $BENCH_DIR/lib/bench.py"

log() { echo "[$(date +%H:%M:%S)] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }
nsc() { ip netns exec "$CLI_NS" "$@"; }   # run in the client namespace
nss() { ip netns exec "$SRV_NS" "$@"; }   # run in the server namespace

# Runs a command in the client namespace *and* the client cgroup, pinned to CLI_CPU (or $CPU).
# The wrapper shell moves itself into $CG and then execs, so the command and all its sockets
# belong to $CG, where the cgroup programs are attached. It joins the cgroup before
# `ip netns exec`, which remounts /sys and hides the cgroup2 mount.
in_client() {
    sh -c 'cg=$1; ns=$2; cpu=$3; shift 3; echo $$ > "$cg/cgroup.procs" && exec ip netns exec "$ns" taskset -c "$cpu" "$@"' \
        sh "$CG" "$CLI_NS" "${CPU:-$CLI_CPU}" "$@"
}

netns_up() {
    netns_down quiet
    ip netns add "$CLI_NS"
    ip netns add "$SRV_NS"
    ip link add "$CLI_IF" netns "$CLI_NS" type veth peer name "$SRV_IF" netns "$SRV_NS"
    for ns in "$CLI_NS" "$SRV_NS"; do
        ip netns exec "$ns" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1
        ip -n "$ns" link set lo up
    done
    ip -n "$CLI_NS" addr add "$CLI_IP/24" dev "$CLI_IF"
    ip -n "$SRV_NS" addr add "$SRV_IP/24" dev "$SRV_IF"
    ip -n "$CLI_NS" link set "$CLI_IF" up
    ip -n "$SRV_NS" link set "$SRV_IF" up
    # The client's default route points at the server namespace, which does not forward: packets
    # to deny-listed addresses stay in our two namespaces and die there if no filter stops them.
    ip -n "$CLI_NS" route add default via "$SRV_IP"
    nsc sysctl -qw net.ipv4.ip_local_port_range="1024 65535"
    nss sysctl -qw net.core.somaxconn=4096 net.ipv4.tcp_max_syn_backlog=4096 net.ipv4.ip_forward=0
    mkdir -p "$CG"
}

netns_down() {
    # What an egress daemon of ours that died without cleaning up left pinned (never anything else).
    rm -rf "$EGRESS_PIN_DIR" "$(dirname "$EGRESS_SOCKET")" 2>/dev/null || true
    ip netns del "$CLI_NS" 2>/dev/null || true
    ip netns del "$SRV_NS" 2>/dev/null || true
    if [ -d "$CG" ]; then
        # Only bench clients ever run in $CG: kill what is left rather than move it anywhere.
        if [ -s "$CG/cgroup.procs" ]; then
            echo 1 > "$CG/cgroup.kill" 2>/dev/null || true
            for _ in $(seq 1 50); do [ -s "$CG/cgroup.procs" ] || break; sleep 0.02; done
        fi
        rmdir "$CG" 2>/dev/null || { [ "${1:-}" = quiet ] || log "warning: could not remove $CG"; }
    fi
}

# Path of the rule file for N CIDRs of VARIANT (random | nearmiss), created on first use.
rules_file() {
    $PY rules "$BENCH_OUT/rules" "$1" "$2" "$SRV_IP"
}

# Restores kernel.bpf_stats_enabled if bpf_stats_on changed it.
BPF_STATS_OLD=""
bpf_stats_on() {
    BPF_STATS_OLD=$(cat /proc/sys/kernel/bpf_stats_enabled)
    echo 1 > /proc/sys/kernel/bpf_stats_enabled
}
bpf_stats_restore() {
    if [ -n "$BPF_STATS_OLD" ]; then
        echo "$BPF_STATS_OLD" > /proc/sys/kernel/bpf_stats_enabled
        BPF_STATS_OLD=""
    fi
}

# VmRSS and VmHWM of PID in KiB, as "rss_kib=.. hwm_kib=..".
proc_mem() {
    awk '/^VmRSS:/{r=$2} /^VmHWM:/{h=$2} END{printf "rss_kib=%d hwm_kib=%d", r, h}' "/proc/$1/status"
}
