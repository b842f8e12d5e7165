#!/usr/bin/env bash
# The DNS proxy's cost: queries per second and latency of a closed-loop UDP client against a
# DNS server in a namespace of its own, queried directly (outside any covered cgroup) and then
# from a cgroup whose policy has a name rule (steered to egress's proxy, which filters, forwards
# and writes the answer's address into the kernel before answering). Prints one kind=dns line.
#
#   bench/dns.sh   (as root; DNS_SECS, DNS_PROCS)
set -uo pipefail
BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib/common.sh
. "$BENCH_DIR/lib/common.sh"

: "${DNS_SECS:=5}" "${DNS_PROCS:=4}"
NS=egress-bench-dns; HOST_IF=ebd0; PEER_IF=ebd1; HOST_IP=10.201.0.1; PEER_IP=10.201.0.2
DNS_CG_NAME=egress-bench-dns; DNS_CG="$CG_ROOT/$DNS_CG_NAME"
PINS=/sys/fs/bpf/egress-bench-dns; SOCKDIR=/run/egress-bench-dns; PROXY_PORT=5399
WORK=$(mktemp -d "$BENCH_TMPDIR/egress-bench-dns.XXXXXX")
SERVER_PID=""; EGRESS_PID=""

cleanup() {
    [ -n "$EGRESS_PID" ] && kill -TERM "$EGRESS_PID" 2>/dev/null && wait "$EGRESS_PID" 2>/dev/null
    [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null
    for cg in "$DNS_CG/client" "$DNS_CG"; do
        [ -d "$cg" ] && { echo 1 > "$cg/cgroup.kill" 2>/dev/null; sleep 0.1; rmdir "$cg" 2>/dev/null; }
    done
    ip netns del "$NS" 2>/dev/null
    rm -rf "$PINS" "$SOCKDIR" "$WORK"
}
trap cleanup EXIT

[ "$(id -u)" = 0 ] || die "run as root"
cleanup; WORK=$(mktemp -d "$BENCH_TMPDIR/egress-bench-dns.XXXXXX")
ip netns add "$NS"
ip link add "$HOST_IF" type veth peer name "$PEER_IF" netns "$NS"
ip addr add "$HOST_IP/24" dev "$HOST_IF"; ip link set "$HOST_IF" up
ip -n "$NS" addr add "$PEER_IP/24" dev "$PEER_IF"; ip -n "$NS" link set "$PEER_IF" up; ip -n "$NS" link set lo up

ip netns exec "$NS" python3 "$BENCH_DIR/../egress-daemon/tests/clients/dns_server.py" "$PEER_IP" 53 \
    '{"bench.dns.test": {"ttl": 60, "A": ["10.201.0.2"]}}' /dev/null > "$WORK/server.out" &
SERVER_PID=$!
for _ in $(seq 1 100); do grep -q ready "$WORK/server.out" 2>/dev/null && break; sleep 0.05; done

mkdir -p "$DNS_CG/client"
cat > "$WORK/policy.yaml" <<YAML
settings:
  attach: $DNS_CG_NAME
  pin_dir: $PINS
  control_socket: $SOCKDIR/control.sock
  dns:
    listen_port: $PROXY_PORT
    upstream: [$PEER_IP]
policies:
  - name: dns-bench
    cgroup: $DNS_CG_NAME/client
    rules:
      - allow: bench.dns.test
YAML
"$EGRESS_BIN" run --on-exit detach --config "$WORK/policy.yaml" > "$WORK/events" 2> "$WORK/daemon.log" &
EGRESS_PID=$!
for _ in $(seq 1 200); do grep -q "all policies enforced" "$WORK/daemon.log" && break; sleep 0.05; done
grep -q "all policies enforced" "$WORK/daemon.log" || { tail "$WORK/daemon.log" >&2; die "egress did not start"; }

load="$BENCH_DIR/lib/dns_load.py"
log "dns: direct to $PEER_IP:53 for ${DNS_SECS}s with $DNS_PROCS clients"
direct=$(python3 "$load" "$PEER_IP" 53 "$DNS_SECS" "$DNS_PROCS" bench.dns.test)
log "dns: through egress's proxy (steered) for ${DNS_SECS}s"
proxied=$(sh -c 'echo $$ > "$1/cgroup.procs" && shift && exec python3 "$@"' sh "$DNS_CG/client" \
    "$load" "$PEER_IP" 53 "$DNS_SECS" "$DNS_PROCS" bench.dns.test)
python3 - "$direct" "$proxied" "${RUN_ID:-}" <<'PY'
import json, sys
direct, proxy = json.loads(sys.argv[1]), json.loads(sys.argv[2])
added = proxy["p50_us"] - direct["p50_us"] if proxy["p50_us"] and direct["p50_us"] else None
print(json.dumps({"kind": "dns", "run_id": sys.argv[3], "direct": direct, "proxy": proxy,
                  "added_p50_us": added}))
PY
