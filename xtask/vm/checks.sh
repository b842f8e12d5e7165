# Check helpers shared by the guests' suites (init.sh, service.sh); sourced, not run. The suite
# sets COVERED (the covered cgroup's directory) and FAILED=0 first; each check prints one
# `CHECK <name> PASS|FAIL|SKIP <detail>` line, which the host parses (xtask/src/vm.rs).

# Runs a command in the covered cgroup.
incg() { sh -c 'echo $$ > '$COVERED'/cgroup.procs && exec "$@"' incg "$@"; }

# verdict CMD...: `pass` when the call went through the filter (for TCP a refused connection
# counts: the SYN reached the closed port), `EPERM` when refused by the filter, else the outcome.
verdict() {
    out=$("$@" 2>&1)
    case "$out" in
    ok*) echo pass ;;
    "err ECONNREFUSED"*) echo pass ;;
    err*) echo "$out" | cut -d' ' -f2 ;;
    *) echo "other:$(echo $out | tr ' ' _)" ;;
    esac
}

begin() { CHECK=$1; BAD=""; }
fail() { BAD="$BAD $*"; }
want() { # want EXPECTED WHAT CMD...
    expected=$1; what=$2; shift 2
    got=$(verdict "$@")
    [ "$got" = "$expected" ] || fail "$what:want=$expected,got=$got"
}
end() {
    if [ -z "$BAD" ]; then echo "CHECK $CHECK PASS"; else echo "CHECK $CHECK FAIL$BAD"; FAILED=1; fi
}
skip() { echo "CHECK $1 SKIP $2"; }
