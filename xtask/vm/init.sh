#!/bin/busybox sh
# /init of the VM suite (`cargo xtask vm-test`): runs as PID 1 in a throwaway QEMU guest, starts
# the freshly built daemon on a policy for one child cgroup, drives traffic from that cgroup with
# vmclient (xtask/vm/vmclient.c) and prints one `CHECK <name> PASS|FAIL|SKIP <detail>` line per
# check on the serial console, which the host parses (xtask/src/vm.rs). Then it powers off.
# Every address used is on the guest's loopback, or a documentation prefix that never leaves it.

/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
mount -t tmpfs tmp /tmp
mount -t tmpfs run /run
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t bpf bpf /sys/fs/bpf
mount -t securityfs securityfs /sys/kernel/security 2>/dev/null
ip link set lo up
# Ping sockets for every gid (the default "1 0" allows none, root included).
echo "0 2147483647" > /proc/sys/net/ipv4/ping_group_range

CG=/sys/fs/cgroup/egress-vm/work
mkdir -p $CG
CONFIG=/etc/egress.yaml
EVENTS=/tmp/events.json
DAEMON_LOG=/tmp/daemon.log

write_config() { # write_config EXTRA_RULES
    cat > $CONFIG.new <<EOF
settings:
  attach: egress-vm
policies:
  - name: vm
    cgroup: egress-vm/work
    default: deny
    rules:
      - allow: 127.0.0.1
      - allow: ::1
$1
EOF
    mv $CONFIG.new $CONFIG
}

# start_daemon: starts `egress run` and waits (60 s: software emulation is slow) until it says
# every policy is enforced. Returns non-zero if it does not.
start_daemon() {
    : > $DAEMON_LOG
    egress run --config $CONFIG --log-format json >> $EVENTS 2>> $DAEMON_LOG &
    DAEMON=$!
    i=0
    while [ $i -lt 600 ]; do
        grep -q "all policies enforced" $DAEMON_LOG && return 0
        kill -0 $DAEMON 2>/dev/null || return 1
        sleep 0.1
        i=$((i + 1))
    done
    return 1
}

COVERED=$CG
. /checks.sh
FAILED=0
echo "INFO kernel $(uname -r)"
echo "INFO lsm $(cat /sys/kernel/security/lsm 2>/dev/null)"
write_config ""

begin refusal
# A kernel without the ring buffer (Linux 5.8), masked with the daemon's test hook: refused at
# once, naming what is missing and the first Linux that has it.
out=$(EGRESS_FAULT_POINT=fail-probe-ringbuf egress run --config $CONFIG 2>&1)
status=$?
[ $status -ne 0 ] || fail "daemon-started"
echo "$out" | grep -q "it lacks BPF map type ringbuf (Linux 5.8)" || fail "message:$(echo "$out" | tail -n 2 | tr ' \n' '__')"
echo "INFO refusal $(echo "$out" | grep -o 'this kernel cannot run egress[^"]*' | head -n 1)"
end

begin load
if start_daemon; then
    end
else
    fail "daemon did not become ready: $(tail -n 5 $DAEMON_LOG | tr '\n' ' ')"
    end
    echo "LOG ---- daemon log"
    sed 's/^/LOG /' $DAEMON_LOG
    echo "DONE"
    poweroff -f
fi
echo "INFO guard $(grep -o 'AF_PACKET guard: [^"]*' $DAEMON_LOG | head -n 1)"

begin tcp
want EPERM "deny-v4" incg vmclient tcp 127.0.0.2 8000
want pass "allow-v4" incg vmclient tcp 127.0.0.1 8000
want EPERM "deny-v6" incg vmclient tcp 2001:db8::1 80
want pass "allow-v6" incg vmclient tcp ::1 8000
want pass "uncovered" vmclient tcp 127.0.0.2 8000
end

begin flow-opener
# Two more connects to a destination the workload reached: both reuse its decision, and their
# flows, opened at the SYN, still name the process (handed over by connect() on kernels whose
# packet hooks may not read the task).
incg vmclient tcp 127.0.0.1 8000 > /dev/null 2>&1
incg vmclient tcp 127.0.0.1 8000 > /dev/null 2>&1
named=0
for _ in $(seq 50); do
    named=$(egress logs --flows --json 2>/dev/null | grep '"dstaddr":"127.0.0.1"' | grep '"dstport":8000' |
        grep -c '"comm":"vmclient"')
    [ "$named" -ge 3 ] && break
    sleep 0.2
done
[ "$named" -ge 3 ] || fail "flows-naming-vmclient:$named"
echo "INFO opener $(grep -o 'connect() hands it over' $DAEMON_LOG | head -n 1)"
end

begin udp
want EPERM "sendto-deny" incg vmclient udp 127.0.0.2 9000
want EPERM "connect-deny" incg vmclient udpc 127.0.0.2 9000
want pass "sendto-allow" incg vmclient udp 127.0.0.1 9000
want EPERM "sendto-deny-v6" incg vmclient udp 2001:db8::1 53
end

begin icmp
want EPERM "ping-deny" incg vmclient ping 127.0.0.2
want pass "ping-allow" incg vmclient ping 127.0.0.1
end

begin raw
want EPERM "raw-icmp-deny" incg vmclient raw 127.0.0.2
want pass "raw-icmp-allow" incg vmclient raw 127.0.0.1
end

begin v4-mapped
want EPERM "tcp-deny" incg vmclient tcp ::ffff:127.0.0.2 8000
want EPERM "udp-deny" incg vmclient udp ::ffff:127.0.0.2 9000
want pass "tcp-allow" incg vmclient tcp ::ffff:127.0.0.1 8000
end

begin stateful
# A server in the cgroup answers a client whose address (127.0.0.3) the policy denies.
incg vmclient tcpserve 127.0.0.1 7000 > /tmp/tcpserve.out 2>&1 &
want pass "tcp-reply" vmclient tcpget 127.0.0.3 127.0.0.1 7000
wait $!
incg vmclient udpserve 127.0.0.1 7001 127.0.0.4 > /tmp/udpserve.out 2>&1 &
want pass "udp-ask" vmclient udpask 127.0.0.3 127.0.0.1 7001
wait $!
served=$(cat /tmp/udpserve.out)
[ "$served" = "ok reply=sent stranger=EPERM" ] || fail "udp-server:$(echo $served | tr ' ' _)"
end

begin events
# The refusals above were reported, naming the process; ring-buffer events arrive within ~50 ms.
sleep 0.5
blocked=$(grep '"verdict":"blocked"' $EVENTS | grep '"comm":"vmclient"' | grep -c '"dst":"127.0.0.2"')
[ "$blocked" -gt 0 ] || fail "no-blocked-event-for-vmclient($(wc -l < $EVENTS)_lines)"
grep '"rule":"reply"' $EVENTS | grep -q '"comm":"vmclient"' || fail "no-reply-event"
end

begin reload
write_config "      - allow: 127.0.0.2
        protocol: tcp
        ports: [8000]"
out=$(egress reload 2>&1) || fail "egress-reload:$(echo $out | tr ' ' _)"
want pass "newly-allowed" incg vmclient tcp 127.0.0.2 8000
want EPERM "other-port" incg vmclient tcp 127.0.0.2 8001
want EPERM "udp-still-denied" incg vmclient udp 127.0.0.2 8000
end

begin restart
kill -9 $DAEMON
wait $DAEMON 2>/dev/null
# Pinned links and maps keep enforcing with no daemon.
want EPERM "no-daemon-deny" incg vmclient tcp 127.0.0.5 8000
want pass "no-daemon-allow" incg vmclient tcp 127.0.0.2 8000
if start_daemon; then
    want EPERM "adopted-deny" incg vmclient tcp 127.0.0.5 8000
    want pass "adopted-allow" incg vmclient tcp 127.0.0.2 8000
    links=$(ls /sys/fs/bpf/egress 2>/dev/null | wc -l)
    echo "INFO pins-after-restart $links"
else
    fail "restart:$(tail -n 3 $DAEMON_LOG | tr '\n ' '__')"
fi
end

if grep -qw bpf /sys/kernel/security/lsm 2>/dev/null; then
    begin af-packet
    want EPERM "covered" incg vmclient packet
    want pass "uncovered" vmclient packet
    grep -q "AF_PACKET guard: on" $DAEMON_LOG || fail "daemon: $(grep -o 'AF_PACKET guard: [^"]*' $DAEMON_LOG | head -n 1)"
    end
else
    skip af-packet "BPF LSM not active (lsm=$(cat /sys/kernel/security/lsm 2>/dev/null))"
fi

if [ $FAILED -ne 0 ]; then
    echo "LOG ---- daemon log"
    sed 's/^/LOG /' $DAEMON_LOG
    echo "LOG ---- events"
    sed 's/^/LOG /' $EVENTS
fi
echo "DONE"
poweroff -f
