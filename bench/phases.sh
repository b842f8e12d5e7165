#!/usr/bin/env bash
# egress's own measurements at N CIDRs: policy load and reload time, daemon and map memory, and
# the event pipeline's throughput. (The matrix in run.sh measures what the traffic sees.)
#
#   bench/phases.sh N       (as root; `cargo xtask bench` runs it at N=100000)
#
# Uses the same namespaces and client cgroup as run.sh (no servers: the event load is connects
# that egress refuses with EPERM before any packet leaves). JSON lines on stdout (kind =
# egress_load | egress_load_summary | memory | egress_events), logs on stderr.
# Environment: LOAD_REPEATS=3 EVENT_SECS=4 EVENT_RATES="25000 50000 100000 150000 200000 300000"
#   EGRESS_BIN BENCH_BIN BENCH_OUT
set -euo pipefail
BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib/common.sh
. "$BENCH_DIR/lib/common.sh"

N=${1:?usage: phases.sh N}
: "${EGRESS_BIN:?EGRESS_BIN must name the egress binary}"
[ "$(id -u)" = 0 ] || die "run as root"
[ -n "$CG_ROOT" ] || die "no cgroup2 mount found in /proc/self/mountinfo"

TMP=$(mktemp -d "${BENCH_TMPDIR:-/tmp}/egress-bench.XXXXXX")
export TMP
cleanup() {
    set +e
    netns_down
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log "=== egress phases at N=$N: load/reload, memory, event pipeline ==="
netns_up
python3 "$BENCH_DIR/lib/egress_phases.py" \
    "$(rules_file "$N" random)" "$(rules_file "$N" nearmiss)" "$N"
