//! The data path tried as an attacker would: a process inside a covered cgroup, mostly as
//! uid 65534 with no capabilities, tries to get a byte to a denied address. Each attack is
//! checked twice: what the system call said, and what a packet capture on the far side of a
//! veth pair saw (no packet to a denied address, none carrying its own route).

mod common;

use std::{
    fs,
    path::PathBuf,
    process::{Child, Stdio},
    thread,
    time::{Duration, Instant},
};

use common::*;
use serde_json::Value;

/// A network namespace whose wire is captured: `.2` / `::2` are the allowed hosts, `.3` / `::3`
/// the denied ones, both on the far side of the same veth.
struct Wire {
    ns: NetNs,
    subnet: u8,
    capture: PathBuf,
    sniffer: Child,
}

impl Wire {
    fn new(subnet: u8) -> Self {
        let ns = NetNs::new(subnet);
        let peer_if = ns.host_if.replacen("eh", "ep", 1);
        sh(&format!("ip -n {} addr add 10.213.{subnet}.3/24 dev {peer_if}", ns.name));
        sh(&format!("ip -n {} -6 addr add fd00:e9e5:{subnet}::3/64 dev {peer_if} nodad", ns.name));
        let capture = std::env::temp_dir().join(unique("egress-capture"));
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients/sniff.py");
        let sniffer = ns
            .command("python3")
            .args([script, &peer_if])
            .arg(&capture)
            .stdout(Stdio::null())
            .spawn()
            .expect("start the capture");
        let wire = Self { ns, subnet, capture, sniffer };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !fs::read_to_string(&wire.capture).unwrap_or_default().contains("ready") {
            assert!(Instant::now() < deadline, "the capture did not start");
            thread::sleep(Duration::from_millis(20));
        }
        wire
    }

    fn host(&self, last: u8) -> String {
        format!("10.213.{}.{last}", self.subnet)
    }

    fn host6(&self, last: u8) -> String {
        format!("fd00:e9e5:{}::{last}", self.subnet)
    }

    fn packets(&self) -> Vec<Value> {
        fs::read_to_string(&self.capture)
            .unwrap_or_default()
            .lines()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .filter(|packet| packet.get("dst").is_some())
            .collect()
    }

    /// Waits for stragglers, then asserts that no captured packet went to a denied host or
    /// carried a route of its own.
    fn assert_nothing_denied_reached(&self, attack: &str) {
        thread::sleep(Duration::from_millis(300));
        let denied = [self.host(3), self.host6(3)];
        for packet in self.packets() {
            let dst = packet["dst"].as_str().unwrap_or_default();
            let segments: Vec<&str> =
                packet["segments"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
            assert!(!denied.iter().any(|d| d == dst), "{attack}: a packet to {dst} reached the wire: {packet}");
            assert!(packet["routed"] != true, "{attack}: a source-routed packet reached the wire: {packet}");
            assert!(
                !segments.iter().any(|s| denied.iter().any(|d| d == s)),
                "{attack}: a packet routed through a denied host reached the wire: {packet}"
            );
        }
    }

    /// Waits until a packet to `dst` (and `dport`, when given) shows up: proves the capture sees
    /// what the tests send.
    fn wait_for_packet(&self, dst: &str, dport: Option<u64>) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let seen = self
                .packets()
                .iter()
                .any(|p| p["dst"].as_str() == Some(dst) && dport.is_none_or(|port| p["dport"].as_u64() == Some(port)));
            if seen {
                return;
            }
            assert!(Instant::now() < deadline, "the capture never saw a packet to {dst}: {:?}", self.packets());
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Wire {
    fn drop(&mut self) {
        let _ = self.sniffer.kill();
        let _ = self.sniffer.wait();
        let _ = fs::remove_file(&self.capture);
    }
}

/// Runs a Python script in `cgroup` as uid/gid 65534 with every capability dropped.
fn as_nobody(cgroup: &TestCgroup, script: &str, args: &[&str]) -> String {
    let output = cgroup
        .command("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all", "--bounding-set=-all"])
        .args(["--", "/usr/bin/python3", "-c", script])
        .args(args)
        .output()
        .expect("run python3 as nobody");
    let stderr = stderr_of(&output);
    assert!(stderr.trim().is_empty() || output.status.success(), "script failed: {stderr}");
    stdout_of(&output)
}

/// Runs a Python script in `cgroup` as root (a container that kept CAP_NET_RAW).
fn as_root(cgroup: &TestCgroup, script: &str, args: &[&str]) -> String {
    let output = cgroup.python(script, args);
    let stderr = stderr_of(&output);
    assert!(stderr.trim().is_empty() || output.status.success(), "script failed: {stderr}");
    stdout_of(&output)
}

/// Prints `name:outcome` lines: `ok`, an errno name, or `TIMEOUT`.
const PY_PRELUDE: &str = r#"
import errno, ipaddress, socket, struct, sys
def attempt(name, action):
    try:
        action()
        print(name + ":ok")
    except socket.timeout:
        print(name + ":TIMEOUT")
    except OSError as e:
        print(name + ":" + errno.errorcode.get(e.errno, str(e.errno)))
"#;

fn script(body: &str) -> String {
    format!("{PY_PRELUDE}\n{body}")
}

fn daemon_for(parent: &TestCgroup, policies: &str) -> (PolicyFile, Daemon) {
    let file = PolicyFile::attached_at(Some(&parent.relative), policies);
    let daemon = Daemon::start(&file);
    (file, daemon)
}

/// A policy that lets the workload reach `.2` / `::2` and loopback, nothing else.
fn strict_policy(cgroup: &TestCgroup, wire: &Wire) -> String {
    format!(
        "policies:\n  - name: strict\n    cgroup: {}\n    default: deny\n    rules:\n      - allow: {}\n      - allow: {}\n      - allow: 127.0.0.1\n      - allow: ::1\n",
        cgroup.relative,
        wire.host(2),
        wire.host6(2)
    )
}

fn blocked_with_rule(daemon: &Daemon, rule: &str) {
    daemon.wait_event(Duration::from_secs(5), |e| e["verdict"] == "blocked" && e["rule"] == rule);
}

#[test]
fn routing_headers_cannot_send_a_packet_through_a_denied_host() {
    if !privileged() {
        return;
    }
    let wire = Wire::new(61);
    let parent = TestCgroup::new("adv-route");
    let cg = parent.child("workload");
    let (_file, daemon) = daemon_for(&parent, &strict_policy(&cg, &wire));

    // A segment routing header: the kernel puts the final destination in segment 0 and sends
    // the packet to segment 1 (here the denied host) first.
    let attack = script(
        r#"
final, first = sys.argv[1], sys.argv[2]
srh = struct.pack("!BBBBBBH", 0, 4, 4, 1, 1, 0, 0) + bytes(16) + ipaddress.IPv6Address(first).packed
u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
attempt("set", lambda: u.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RTHDR, srh))
attempt("udp-sticky", lambda: u.sendto(b"x" * 8, (final, 9999)))
c = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
attempt("udp-cmsg", lambda: c.sendmsg([b"x" * 8], [(socket.IPPROTO_IPV6, socket.IPV6_RTHDR, srh)], 0, (final, 9999)))
t = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
t.settimeout(2)
t.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RTHDR, srh)
attempt("tcp-sticky", lambda: t.connect((final, 9999)))
"#,
    );
    let out = as_nobody(&cg, &attack, &[&wire.host6(2), &wire.host6(3)]);
    assert!(out.contains("set:ok"), "an unprivileged user can set IPV6_RTHDR here: {out}");
    for sent in ["udp-sticky", "udp-cmsg", "tcp-sticky"] {
        assert!(!out.contains(&format!("{sent}:ok")), "{sent} got through: {out}");
    }
    // A datagram is refused at the send; a TCP SYN is dropped, so connect() times out. This
    // kernel refuses a segment routing header as ancillary data (EINVAL) before any hook runs.
    assert!(out.contains("udp-sticky:EPERM"), "{out}");
    assert!(out.contains("udp-cmsg:EPERM") || out.contains("udp-cmsg:EINVAL"), "{out}");
    blocked_with_rule(&daemon, "source-routed");

    // IPv4 loose source routing (needs CAP_NET_RAW, so a root-in-container attacker).
    let lsrr = script(
        r#"
final, first = sys.argv[1], sys.argv[2]
options = bytes([1, 131, 7, 4]) + socket.inet_aton(first)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
attempt("set", lambda: u.setsockopt(socket.IPPROTO_IP, socket.IP_OPTIONS, options))
attempt("udp-lsrr", lambda: u.sendto(b"x" * 8, (final, 9999)))
"#,
    );
    let out = as_root(&cg, &lsrr, &[&wire.host(2), &wire.host(3)]);
    assert!(out.contains("set:ok"), "{out}");
    assert!(out.contains("udp-lsrr:EPERM"), "{out}");

    // The capture works: a plain datagram to the allowed host shows up.
    let plain = script(
        "attempt('plain', lambda: socket.socket(socket.AF_INET6, socket.SOCK_DGRAM).sendto(b'x', (sys.argv[1], 9999)))",
    );
    assert_eq!(as_nobody(&cg, &plain, &[&wire.host6(2)]), "plain:ok");
    wire.wait_for_packet(&wire.host6(2), Some(9999));
    wire.assert_nothing_denied_reached("routing headers");
}

#[test]
fn unspecified_destinations_are_judged_as_the_address_the_kernel_uses() {
    if !privileged() {
        return;
    }
    let wire = Wire::new(62);
    let parent = TestCgroup::new("adv-any");
    let cg = parent.child("workload");
    let outside = parent.child("outside");
    let policies = format!(
        "policies:\n  - name: no-local\n    cgroup: {}\n    default: allow\n    rules:\n      - deny: 127.0.0.0/8\n      - deny: ::1/128\n      - deny: 10.213.62.0/24\n",
        cg.relative
    );
    let (_file, daemon) = daemon_for(&parent, &policies);
    let v4 = tcp_server("127.0.0.1:0");
    let v6 = tcp_server("[::1]:0");
    let any = tcp_server("0.0.0.0:0");
    let udp = udp_echo("127.0.0.1:0");
    let attack = script(
        r#"
v4, v6, any, udp = [int(a) for a in sys.argv[1:5]]
local = sys.argv[5]
def tcp(fam, addr, bind=None):
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.settimeout(2)
    if bind:
        s.bind(bind)
    s.connect(addr)
attempt("v4-any", lambda: tcp(socket.AF_INET, ("0.0.0.0", v4)))
attempt("v6-any", lambda: tcp(socket.AF_INET6, ("::", v6)))
attempt("mapped-any", lambda: tcp(socket.AF_INET6, ("::ffff:0.0.0.0", v4)))
attempt("udp-any", lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x", ("0.0.0.0", udp)))
attempt("bound-any", lambda: tcp(socket.AF_INET, ("0.0.0.0", any), (local, 0)))
"#,
    );
    let args = [v4.to_string(), v6.to_string(), any.to_string(), udp.to_string(), wire.host(1)];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = as_nobody(&cg, &attack, &args);
    for attempt in ["v4-any", "v6-any", "mapped-any", "udp-any", "bound-any"] {
        assert!(out.contains(&format!("{attempt}:EPERM")), "{attempt} was not refused: {out}");
    }
    // The same calls from a cgroup without a policy do reach the local host.
    let out = as_nobody(&outside, &attack, &args);
    for attempt in ["v4-any", "v6-any", "mapped-any", "udp-any", "bound-any"] {
        assert!(out.contains(&format!("{attempt}:ok")), "{attempt} does not reach the local host: {out}");
    }
    let event = daemon.wait_event(Duration::from_secs(5), |e| e["verdict"] == "blocked" && e["dst"] == "127.0.0.1");
    assert_eq!(event["rule"], "deny 127.0.0.0/8", "{event}");
}

#[test]
fn a_forged_datagram_does_not_make_a_denied_host_speak_first() {
    if !privileged() {
        return;
    }
    let wire = Wire::new(63);
    let parent = TestCgroup::new("adv-forge");
    let cg = parent.child("workload");
    let (_file, daemon) = daemon_for(&parent, &strict_policy(&cg, &wire));
    // One unprivileged process: a socket bound (IPV6_FREEBIND) to the denied address sends
    // over loopback to the workload's own socket, which then "replies".
    let attack = script(
        r#"
denied = sys.argv[1]
IPV6_FREEBIND = 78
server = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
server.bind(("::1", 0))
server.settimeout(3)
forger = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
forger.setsockopt(socket.IPPROTO_IPV6, IPV6_FREEBIND, 1)
attempt("bind", lambda: forger.bind((denied, 5353)))
attempt("forge", lambda: forger.sendto(b"hello", server.getsockname()[:2]))
data, peer = server.recvfrom(100)
print("peer:" + peer[0])
attempt("reply", lambda: server.sendto(b"secret", peer[:2]))
"#,
    );
    let out = as_nobody(&cg, &attack, &[&wire.host6(3)]);
    assert!(out.contains("bind:ok") && out.contains("forge:ok"), "{out}");
    assert!(out.contains(&format!("peer:{}", wire.host6(3))), "{out}");
    assert!(out.contains("reply:EPERM"), "the forged peer opened a reply path: {out}");
    wire.assert_nothing_denied_reached("forged reply");
    assert!(!daemon.events().iter().any(|e| e["rule"] == "reply"), "{:?}", daemon.events());

    // A datagram that really came from the denied host over the wire still opens the reply path.
    let reply = script(
        r#"
local = sys.argv[1]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((local, 7777))
s.settimeout(5)
print("ready", flush=True)
data, peer = s.recvfrom(100)
attempt("reply", lambda: s.sendto(b"pong", peer))
"#,
    );
    let mut workload = cg
        .command("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all", "--"])
        .args(["/usr/bin/python3", "-c", &reply, &wire.host(1)])
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the workload");
    thread::sleep(Duration::from_millis(500));
    let sender = "import socket,sys\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.bind((sys.argv[1],4444))\ns.sendto(b'ping',(sys.argv[2],7777))\n";
    let status = wire.ns.command("python3").args(["-c", sender, &wire.host(3), &wire.host(1)]).status();
    assert!(status.is_ok_and(|s| s.success()));
    let out = read_all(workload.stdout.take().expect("stdout"));
    let _ = workload.wait();
    assert!(out.contains("reply:ok"), "a real peer could not be answered: {out}");
    wire.wait_for_packet(&wire.host(3), Some(4444));
}

#[test]
fn sockets_outside_the_flow_hooks_are_refused_unless_allowed() {
    if !privileged() {
        return;
    }
    let parent = TestCgroup::new("adv-sock");
    let strict = parent.child("strict");
    let allowed = parent.child("allowed");
    let outside = parent.child("outside");
    let policies = format!(
        "policies:\n  - name: strict\n    cgroup: {}\n    default: allow\n  - name: raw-ok\n    cgroup: {}\n    default: allow\n    allow_sockets: [packet, mptcp]\n",
        strict.relative, allowed.relative
    );
    let (_file, daemon) = daemon_for(&parent, &policies);
    let attack = script(
        r#"
attempt("mptcp", lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM, 262))
attempt("packet", lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3)))
attempt("unix", lambda: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
"#,
    );
    let mptcp_here = as_root(&outside, &attack, &[]).contains("mptcp:ok");
    let out = as_root(&strict, &attack, &[]);
    assert!(out.contains("unix:ok"), "{out}");
    if mptcp_here {
        assert!(out.contains("mptcp:EPERM"), "{out}");
    }
    let guard_on = daemon.log().contains("AF_PACKET guard: on");
    if guard_on {
        assert!(out.contains("packet:EPERM"), "{out}");
        blocked_with_rule(&daemon, "socket-kind");
    } else {
        assert!(daemon.log().contains("AF_PACKET guard: off"), "{}", daemon.log());
    }
    let out = as_root(&allowed, &attack, &[]);
    assert!(out.contains("packet:ok"), "{out}");
    if mptcp_here {
        assert!(out.contains("mptcp:ok"), "{out}");
    }
}

#[test]
fn port_zero_is_refused_whatever_the_rules_say() {
    if !privileged() {
        return;
    }
    let wire = Wire::new(64);
    let parent = TestCgroup::new("adv-port0");
    let cg = parent.child("workload");
    let policies = format!(
        "policies:\n  - name: ports\n    cgroup: {}\n    default: allow\n    rules:\n      - deny: {}\n        ports: [1-65535]\n",
        cg.relative,
        wire.host(2)
    );
    let (_file, daemon) = daemon_for(&parent, &policies);
    let attack = script(
        r#"
t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
t.settimeout(2)
attempt("tcp0", lambda: t.connect((sys.argv[1], 0)))
"#,
    );
    let out = as_nobody(&cg, &attack, &[&wire.host(2)]);
    assert_eq!(out, "tcp0:EPERM");
    blocked_with_rule(&daemon, "port-zero");
    thread::sleep(Duration::from_millis(300));
    assert!(
        !wire.packets().iter().any(|p| p["dport"].as_u64() == Some(0)),
        "a packet to port 0 reached the wire: {:?}",
        wire.packets()
    );
}

#[test]
fn a_cgroup_deeper_than_the_kernel_walk_is_enforced_and_its_unbound_neighbours_refused() {
    if !privileged() {
        return;
    }
    let parent = TestCgroup::new("adv-deep");
    // The test parent is level 1; levels 2..=16 below it, then two cgroups at level 17.
    let chain: Vec<String> = (2..=16).map(|level| format!("l{level}")).collect();
    let chain = chain.join("/");
    let bound = parent.child(&format!("{chain}/bound"));
    let unbound = parent.child(&format!("{chain}/unbound"));
    let policies = format!(
        "policies:\n  - name: deep\n    cgroup: {}\n    default: deny\n    rules:\n      - allow: 127.0.0.1\n",
        bound.relative
    );
    let (file, daemon) = daemon_for(&parent, &policies);
    let port = tcp_server("0.0.0.0:0");
    assert_eq!(tcp_connect_from(&bound, "127.0.0.1", port), "ok");
    assert_eq!(tcp_connect_from(&bound, "127.0.0.2", port), "EPERM");
    assert_eq!(tcp_connect_from(&unbound, "127.0.0.1", port), "EPERM");
    blocked_with_rule(&daemon, "too-deep");

    let report = file.status_json();
    let row = report["cgroups"]
        .as_array()
        .and_then(|rows| rows.iter().find(|row| row["cgroup"] == bound.relative.as_str()))
        .unwrap_or_else(|| panic!("deep cgroup missing from status: {report}"));
    assert_eq!(row["deep"], true, "{row}");
    assert!(
        report["guarantees"]
            .as_array()
            .is_some_and(|lines| lines.iter().any(|l| l.as_str().is_some_and(|l| l.starts_with("deep cgroups:")))),
        "{report}"
    );
}

/// Builds raw packets for the attacks below: IPv6 headers, extension headers, UDP and TCP.
const PY_PACKETS: &str = r#"
def v6(src, dst, nxt, payload):
    return (struct.pack("!IHBB", 6 << 28, len(payload), nxt, 64)
            + ipaddress.IPv6Address(src).packed + ipaddress.IPv6Address(dst).packed + payload)
def udp(dport, data=b"x"):
    return struct.pack("!HHHH", 4444, dport, 8 + len(data), 0) + data
def tcp(dport):
    return struct.pack("!HHIIBBHHH", 4444, dport, 1, 0, 5 << 4, 2, 1024, 0, 0)
def dest_opts(nxt):
    # Eight octets: next header, length 0, one PadN option of four octets.
    return bytes([nxt, 0, 1, 4, 0, 0, 0, 0])
def routing(nxt, segment):
    # A segment routing header with one segment.
    return bytes([nxt, 2, 4, 0, 0, 0, 0, 0]) + ipaddress.IPv6Address(segment).packed
def chain(depth, last, inner):
    out = inner
    nxt = last
    for _ in range(depth):
        out = dest_opts(nxt) + out
        nxt = 60
    return nxt, out
def raw6():
    return socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW)
"#;

#[test]
fn packets_the_hook_cannot_parse_are_refused() {
    if !privileged() {
        return;
    }
    let wire = Wire::new(65);
    let parent = TestCgroup::new("adv-malformed");
    let cg = parent.child("workload");
    let (file, daemon) = daemon_for(&parent, &strict_policy(&cg, &wire));
    // Raw sockets need CAP_NET_RAW: a root-in-container attacker.
    let attack = script(&format!(
        "{PY_PACKETS}{}",
        r#"
me, allowed, denied, me6, allowed6, denied6 = sys.argv[1:7]
r4u = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP)
r4t = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
r6u = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_UDP)
attempt("short-udp4-denied", lambda: r4u.sendto(b"ab", (denied, 0)))
attempt("short-udp4-allowed", lambda: r4u.sendto(b"ab", (allowed, 0)))
attempt("short-tcp4", lambda: r4t.sendto(b"abc", (denied, 0)))
attempt("short-udp6", lambda: r6u.sendto(b"ab", (denied6, 0)))
# A destination options header that claims 2 KB in a packet of 200 octets.
overlong = bytes([17, 255]) + bytes(198)
attempt("overlong-opts", lambda: raw6().sendto(v6(me6, denied6, 60, overlong), (denied6, 0)))
attempt("overlong-opts-allowed", lambda: raw6().sendto(v6(me6, allowed6, 60, overlong), (allowed6, 0)))
# A routing header behind four (and eight) destination options headers.
for depth in (4, 8):
    nxt, body = chain(depth, 43, routing(17, denied6) + udp(9999))
    attempt("deep-route-%d" % depth, lambda: raw6().sendto(v6(me6, allowed6, nxt, body), (allowed6, 0)))
# A chain longer than the walk: what follows it was never seen.
nxt, body = chain(20, 17, udp(9999))
attempt("too-deep", lambda: raw6().sendto(v6(me6, allowed6, nxt, body), (allowed6, 0)))
# Whole packets still go where the policy allows.
attempt("whole-udp4", lambda: r4u.sendto(udp(9999), (allowed, 0)))
nxt, body = chain(2, 17, udp(9998))
attempt("whole-opts6", lambda: raw6().sendto(v6(me6, allowed6, nxt, body), (allowed6, 0)))
"#
    ));
    let args = [wire.host(1), wire.host(2), wire.host(3), wire.host6(1), wire.host6(2), wire.host6(3)];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = as_root(&cg, &attack, &args);
    for refused in [
        "short-udp4-denied",
        "short-udp4-allowed",
        "short-tcp4",
        "short-udp6",
        "overlong-opts",
        "overlong-opts-allowed",
        "deep-route-4",
        "deep-route-8",
        "too-deep",
    ] {
        assert!(out.contains(&format!("{refused}:EPERM")), "{refused} was not refused: {out}");
    }
    assert!(out.contains("whole-udp4:ok") && out.contains("whole-opts6:ok"), "{out}");
    wire.wait_for_packet(&wire.host(2), Some(9999));
    wire.wait_for_packet(&wire.host6(2), Some(9998));
    wire.assert_nothing_denied_reached("malformed packets");
    assert!(
        !wire.packets().iter().any(|p| p["dst"].as_str() == Some(&wire.host6(2)) && p["dport"].as_u64() == Some(9999)),
        "a packet behind a routing header or a too-long chain reached the wire: {:?}",
        wire.packets()
    );
    blocked_with_rule(&daemon, "malformed");
    blocked_with_rule(&daemon, "source-routed");
    let status = file.status_json();
    assert!(status["malformed_packets"].as_u64().is_some_and(|n| n >= 7), "{status}");
}

#[test]
fn raw_packets_to_dns_ports_are_refused_in_a_policy_with_name_rules() {
    if !privileged() {
        return;
    }
    let wire = Wire::new(66);
    let parent = TestCgroup::new("adv-rawdns");
    let cg = parent.child("workload");
    let file = PolicyFile::attached_at(Some(&parent.relative), "");
    // The resolver's address is allowed on every port, as a CIDR rule for a whole network would.
    let policy = |resolver_rule: &str| {
        format!(
            "{}  dns:\n    listen_port: 5366\n    upstream: [{}]\npolicies:\n  - name: names\n    cgroup: {}\n    default: deny\n    rules:\n      - allow: app.dns.test\n{resolver_rule}      - allow: {}\n",
            file.settings(Some(&parent.relative)),
            wire.host(2),
            cg.relative,
            wire.host6(2)
        )
    };
    file.rewrite(&policy(&format!("      - allow: {}\n", wire.host(2))));
    let daemon = Daemon::start(&file);
    let attack = script(&format!(
        "{PY_PACKETS}{}",
        r#"
resolver, resolver6 = sys.argv[1:3]
query = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x06secret\x04evil\x00\x00\x01\x00\x01"
r4u = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP)
r4t = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
r6u = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_UDP)
attempt("raw-udp53", lambda: r4u.sendto(udp(53, query), (resolver, 0)))
attempt("raw-tcp53", lambda: r4t.sendto(tcp(53), (resolver, 0)))
attempt("raw-tcp853", lambda: r4t.sendto(tcp(853), (resolver, 0)))
attempt("raw-udp53-v6", lambda: r6u.sendto(udp(53, query), (resolver6, 0)))
attempt("raw-other", lambda: r4u.sendto(udp(9999), (resolver, 0)))
"#
    ));
    let args = [wire.host(2), wire.host6(2)];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = as_root(&cg, &attack, &args);
    for refused in ["raw-udp53", "raw-tcp53", "raw-tcp853", "raw-udp53-v6"] {
        assert!(out.contains(&format!("{refused}:EPERM")), "{refused} was not refused: {out}");
    }
    assert!(out.contains("raw-other:ok"), "{out}");
    wire.wait_for_packet(&wire.host(2), Some(9999));
    thread::sleep(Duration::from_millis(300));
    let dns_packets =
        |packets: &[Value]| packets.iter().filter(|p| matches!(p["dport"].as_u64(), Some(53 | 853))).count();
    assert_eq!(dns_packets(&wire.packets()), 0, "raw DNS reached the wire: {:?}", wire.packets());
    blocked_with_rule(&daemon, "dns-bypass");

    // A rule that lists the port for that resolver allows it on purpose.
    file.rewrite(&policy(&format!("      - allow: {}\n        ports: [53]\n", wire.host(2))));
    daemon.signal(libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = as_root(&cg, &attack, &args);
        if out.contains("raw-udp53:ok") {
            assert!(out.contains("raw-tcp853:EPERM") && out.contains("raw-udp53-v6:EPERM"), "{out}");
            break;
        }
        assert!(Instant::now() < deadline, "the reload never allowed the named resolver: {out}");
        thread::sleep(Duration::from_millis(200));
    }
    wire.wait_for_packet(&wire.host(2), Some(53));
}
