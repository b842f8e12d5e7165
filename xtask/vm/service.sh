#!/bin/bash
# The service suite of `cargo xtask vm-test`: runs as a systemd unit in a guest whose PID 1 is
# systemd (a Debian root file system, xtask/src/vm/rootfs.rs). /src holds what a user's checkout
# would: target/package/egress_*.deb (made on the host by `cargo xtask package`), config/, and
# readme-steps.sh, the shell block of the README's "Run as a service" section, extracted at test
# time. Each line of that block runs verbatim, in order, from /src; after the lines that install
# the package, start, reload, show status, follow logs and read the journal, the suite checks
# what the README promises, against what the package installed (/usr/bin/egress, its unit). Then it restarts
# the service under a client hammering a denied address. One `CHECK <step> PASS|FAIL <detail>`
# line per step goes to the serial console (xtask/src/vm.rs parses them); the unit powers the
# guest off when this script ends. Every address used is on the guest's loopback.

export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export SYSTEMD_COLORS=0 SYSTEMD_PAGER= SYSTEMD_URLIFY=0
cd /src || exit 1
echo # the console may hold terminal escapes from systemd: start the suite on a fresh line

# The example policy's workload cgroup (the README's demo has `cargo xtask run` create it).
WORK=/sys/fs/cgroup/egress-demo
mkdir -p $WORK
echo "0 2147483647" > /proc/sys/net/ipv4/ping_group_range
CONFIG=/etc/egress/egress.yaml
FAILED=0

COVERED=$WORK
. /usr/local/lib/egress-vm/checks.sh
# step LINE: runs one README line verbatim; non-zero status is a failure of the current check.
step() {
    echo "INFO step $1"
    out=$(bash -c "$1" 2>&1 < /dev/null)
    status=$?
    [ $status -eq 0 ] || fail "\`$1\`:exit=$status:$(echo "$out" | tail -n 3 | tr ' \n' '__')"
    return $status
}
# The example policy: 127.0.0.1 tcp 80 and 8000-8080 allowed, the rest of 127.0.0.0/8 denied.
enforced() { # enforced WHAT: the example policy is in force for the workload cgroup
    want EPERM "$1-deny" incg vmclient tcp 127.0.0.2 8000
    want pass "$1-allow" incg vmclient tcp 127.0.0.1 8000
}
active() { [ "$(systemctl is-active egress)" = active ] || fail "$1:service=$(systemctl is-active egress)"; }
# installed: what the package put in place, and that installing it enabled and started nothing.
# The shipped policy file covers nothing: the service starts with it and judges no connection.
installed() {
    [ "$(dpkg-query -W -f '${Status}' egress 2>&1)" = "install ok installed" ] || fail "not-installed"
    [ "$(command -v egress)" = /usr/bin/egress ] || fail "egress-is:$(command -v egress)"
    [ "$(dpkg-query -S /usr/bin/egress 2>/dev/null | cut -d: -f1)" = egress ] || fail "/usr/bin/egress-not-from-the-package"
    echo "INFO version $(egress --version)"
    egress --version | grep -q 'Linux 5.8 or later' || fail "version-names-no-minimum-linux"
    unit=$(systemctl show -p FragmentPath --value egress)
    case "$unit" in /lib/systemd/system/egress.service | /usr/lib/systemd/system/egress.service) ;; *) fail "unit-at:$unit" ;; esac
    grep -q '^ExecStart=/usr/bin/egress run --config /etc/egress/egress.yaml$' "$unit" || fail "unit-execstart"
    for f in /usr/share/man/man1/egress.1.gz /usr/share/man/man1/egress-run.1.gz \
        /usr/share/bash-completion/completions/egress /usr/share/doc/egress/copyright \
        /usr/share/doc/egress/examples/egress.yaml; do
        [ -s "$f" ] || fail "missing:$f"
    done
    [ "$(systemctl is-enabled egress 2>&1)" = disabled ] || fail "enabled-by-install:$(systemctl is-enabled egress 2>&1)"
    [ "$(systemctl is-active egress 2>&1)" = inactive ] || fail "started-by-install:$(systemctl is-active egress 2>&1)"
    dpkg-query -W -f '${Conffiles}' egress | grep -q " $CONFIG " || fail "$CONFIG-not-a-conffile"
    egress check $CONFIG > /dev/null 2>&1 || fail "shipped-$CONFIG-rejected"
    systemctl start egress || fail "start-with-the-shipped-file"
    active shipped-file
    want pass "shipped-file-covers-nothing" incg vmclient tcp 127.0.0.2 8000
    systemctl stop egress
}

echo "INFO kernel $(uname -r)"
echo "INFO systemd $(dpkg-query -W -f '${Version}' systemd 2>/dev/null)"
echo "INFO pid1 $(cat /proc/1/comm)"

begin install
LOGS_PID=""
while IFS= read -r line <&3; do
    case "$line" in
    "" | "#"*) continue ;;
    "cargo xtask package"*)
        # Done on the host: the guest has no toolchain; the package is in place.
        ls target/package/egress_*.deb > /dev/null 2>&1 || fail "no-target/package/egress_*.deb"
        ;;
    *"apt install"*)
        step "$line"
        installed
        ;;
    *"enable --now"* | *"systemctl start"*)
        end
        begin start
        before=$(date +%s%N)
        step "$line"
        after=$(date +%s%N)
        # Type=notify: `systemctl start` returns once the daemon said READY=1, which it says
        # only once every policy is in the kernel. Checked at once, with no wait.
        enforced right-after-start
        active start
        [ "$(systemctl show -p Type --value egress)" = notify ] || fail "type:$(systemctl show -p Type --value egress)"
        echo "INFO start-ms $(((after - before) / 1000000))"
        end
        ;;
    *"systemctl reload"*)
        begin reload
        step "$line"
        enforced unchanged-file
        # A good edit: 127.0.0.2 port 9000 allowed from now on.
        cp $CONFIG /tmp/egress.yaml.orig
        sed -i 's/^    rules:$/    rules:\n      - allow: 127.0.0.2\n        protocol: tcp\n        ports: [9000]/' $CONFIG
        grep -q 'ports: \[9000\]' $CONFIG || fail "could-not-edit-$CONFIG"
        step "$line"
        want pass "edited-allowed" incg vmclient tcp 127.0.0.2 9000
        want EPERM "edited-other-port" incg vmclient tcp 127.0.0.2 9001
        active reload
        end
        begin reload-broken
        cp $CONFIG /tmp/egress.yaml.good
        printf '  - name: broken\n    cgroup: [\n' >> $CONFIG
        out=$(bash -c "$line" 2>&1 < /dev/null) && fail "broken-file-accepted"
        echo "INFO reload-broken $(echo "$out" | head -n 3 | tr '\n' ' ')"
        # The previous policy (the good edit) stays in force, and the service keeps running.
        want pass "previous-allowed" incg vmclient tcp 127.0.0.2 9000
        want EPERM "previous-denied" incg vmclient tcp 127.0.0.2 9001
        active reload-broken
        cp /tmp/egress.yaml.orig $CONFIG
        step "$line"
        want EPERM "restored" incg vmclient tcp 127.0.0.2 9000
        end
        ;;
    "egress status"*)
        begin status
        step "$line"
        egress status 2>&1 | sed 's/^/INFO status /'
        egress status 2>&1 | grep -q demo || fail "status-names-no-policy-demo"
        end
        ;;
    *"logs -f"*)
        begin logs
        echo "INFO step $line &"
        bash -c "$line" > /tmp/logs.out 2>&1 < /dev/null &
        LOGS_PID=$!
        sleep 2
        want EPERM "blocked" incg vmclient tcp 127.0.0.2 7777
        for _ in $(seq 50); do grep -q '127.0.0.2:7777' /tmp/logs.out && break; sleep 0.2; done
        grep -q '127.0.0.2:7777' /tmp/logs.out || fail "no-line-for-127.0.0.2:7777($(wc -l < /tmp/logs.out)_lines:$(tail -c 200 /tmp/logs.out | tr ' \n' '__'))"
        grep '127.0.0.2:7777' /tmp/logs.out | head -n 1 | sed 's/^/INFO logs /'
        kill -0 $LOGS_PID 2>/dev/null || fail "logs-f-exited"
        kill $LOGS_PID 2>/dev/null
        end
        ;;
    *journalctl*)
        begin journal
        for _ in $(seq 25); do
            step "$line" > /dev/null
            echo "$out" | grep -q '127.0.0.2:7777' && break
            BAD=""
            sleep 0.4
        done
        echo "$out" | grep -q '127.0.0.2:7777' || fail "no-warning-for-127.0.0.2:7777:$(echo "$out" | tail -n 2 | tr ' \n' '__')"
        echo "$out" | grep '127.0.0.2:7777' | head -n 1 | sed 's/^/INFO journal /'
        # Only priority warning and above: allowed flows (info) are not among them.
        echo "$out" | grep -q 'ALLOWED' && fail "allowed-flows-at-warning"
        end
        ;;
    *)
        step "$line"
        ;;
    esac
done 3< readme-steps.sh

begin restart
# A client in the covered cgroup connects to a denied address, back to back, while systemd
# stops the daemon and starts a new one: not one connection may get through.
rm -f /tmp/stop
incg vmclient hammer 127.0.0.2 9 /tmp/stop > /tmp/hammer.out 2>&1 &
HAMMER=$!
sleep 1
pid_before=$(systemctl show -p MainPID --value egress)
step "systemctl restart egress"
enforced right-after-restart
sleep 1
touch /tmp/stop
wait $HAMMER
pid_after=$(systemctl show -p MainPID --value egress)
result=$(cat /tmp/hammer.out)
echo "INFO hammer $result"
case "$result" in
"ok eperm="*" through=0 other=0") ;;
*) fail "hammer:$(echo $result | tr ' ' _)" ;;
esac
[ "$pid_before" != "$pid_after" ] || fail "same-main-pid:$pid_after"
active restart
end

begin remove
# Removing the package stops and disables the service; what it enforced stays pinned (docs/service.md);
# purging removes the policy file.
step "apt-get remove -y egress"
[ ! -e /usr/bin/egress ] || fail "/usr/bin/egress-still-there"
[ "$(systemctl is-active egress 2>&1)" != active ] || fail "still-active"
[ -f $CONFIG ] || fail "remove-took-$CONFIG"
want EPERM "pinned-after-remove" incg vmclient tcp 127.0.0.2 8000
step "apt-get purge -y egress"
[ ! -e $CONFIG ] || fail "purge-left-$CONFIG"
end

if [ $FAILED -ne 0 ]; then
    echo "LOG ---- journalctl -u egress"
    journalctl -u egress --no-pager 2>&1 | tail -n 60 | sed 's/^/LOG /'
fi
echo "DONE"
