# shellcheck shell=bash
# Shared by the configurations that run a filter daemon (egress, bpf-ref): start it in the root
# namespace (cgroup programs are not bound to a network namespace), wait until it says it
# enforces, stop it by PID, and check that nothing stays attached to the client cgroup.
DAEMON_PID=""

# daemon_start READY_REGEX READY_FILE STDOUT STDERR CMD...: returns 124 past LOAD_TIMEOUT.
daemon_start() {
    local regex=$1 ready_file=$2 out=$3 err=$4 deadline
    shift 4
    log "starting: $*"
    "$@" > "$out" 2> "$err" < /dev/null &
    DAEMON_PID=$!
    deadline=$(( $(date +%s) + LOAD_TIMEOUT ))
    until grep -Eq "$regex" "$ready_file" 2>/dev/null; do
        if ! kill -0 "$DAEMON_PID" 2>/dev/null; then
            log "the daemon exited early:"; tail -n 20 "$err" >&2; DAEMON_PID=""; return 1
        fi
        [ "$(date +%s)" -lt "$deadline" ] || { log "not enforcing within ${LOAD_TIMEOUT}s"; return 124; }
        sleep 0.01
    done
}

daemon_stop() {
    [ -n "$DAEMON_PID" ] || return 0
    kill -TERM "$DAEMON_PID" 2>/dev/null
    for _ in $(seq 1 100); do kill -0 "$DAEMON_PID" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$DAEMON_PID" 2>/dev/null; then log "SIGKILL $DAEMON_PID"; kill -KILL "$DAEMON_PID"; fi
    wait "$DAEMON_PID" 2>/dev/null
    DAEMON_PID=""
    # Links are released asynchronously; allow up to 3 s before calling it a leak.
    local left=""
    for _ in $(seq 1 30); do
        left=$("$BENCH_BIN/bpfstat" progs "$CG" 2>/dev/null || true)
        [ -z "$left" ] && break
        sleep 0.1
    done
    [ -z "$left" ] || log "WARNING: programs still attached to $CG after the daemon exited: $left"
}

# kind=memory: the daemon's RSS (and peak) and the kernel memory of the maps it holds.
daemon_memory() {
    [ -n "$DAEMON_PID" ] || return 0
    "$BENCH_BIN/bpfstat" maps "$DAEMON_PID" > "$TMP/maps.jsonl"
    # shellcheck disable=SC2046
    $PY maps "$TMP/maps.jsonl" kind=memory "${COMMON[@]}" pid="$DAEMON_PID" $(proc_mem "$DAEMON_PID")
}
