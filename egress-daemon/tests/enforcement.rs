//! What a process inside a covered cgroup can and cannot send: every kind of traffic docs/enforcement.md
//! lists, judged by the real kernel programs loaded by `egress run`.

mod common;

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    process::Stdio,
    time::{Duration, Instant},
};

use common::*;

fn policy(cgroup: &TestCgroup, default: &str, rules: &str) -> PolicyFile {
    PolicyFile::attached_at(
        Some(&cgroup.relative),
        &format!(
            "policies:\n  - name: test\n    cgroup: {}\n    default: {default}\n    rules:\n{rules}",
            cgroup.relative
        ),
    )
}

const PY_UDP: &str = r#"
import socket, sys, errno
mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
fam = socket.AF_INET6 if ':' in host else socket.AF_INET
s = socket.socket(fam, socket.SOCK_DGRAM)
s.settimeout(2)
try:
    if mode == "connected":
        s.connect((host, port)); s.send(b"hi")
    elif mode == "sendto":
        s.sendto(b"hi", (host, port))
    elif mode == "sendmsg":
        s.sendmsg([b"hi"], [], 0, (host, port))
    data = s.recv(100)
    print("ok" if data == b"hi" else "bad")
except socket.timeout:
    print("TIMEOUT")
except OSError as e:
    print(errno.errorcode.get(e.errno, str(e.errno)))
"#;

#[test]
fn tcp_connect_ipv4_allowed_and_refused_with_eperm() {
    if !privileged() {
        return;
    }
    let cg = TestCgroup::new("tcp4");
    let port = tcp_server("127.0.0.1:0");
    let other = tcp_server("127.0.0.2:0");
    let file = policy(
        &cg,
        "deny",
        &format!(
            "      - allow: 127.0.0.1\n        protocol: tcp\n        ports: [{port}]\n      - deny: 127.0.0.0/8\n"
        ),
    );
    let daemon = Daemon::start(&file);

    assert_eq!(tcp_connect_from(&cg, "127.0.0.1", port), "ok");
    let started = Instant::now();
    assert_eq!(tcp_connect_from(&cg, "127.0.0.2", other), "EPERM");
    assert!(started.elapsed() < Duration::from_secs(2), "refusal must be immediate, not a timeout");
    // Same address, a port the rule does not name: the /8 deny decides.
    assert_eq!(tcp_connect_from(&cg, "127.0.0.1", other), "EPERM");
    // TCP Fast Open sends data with the SYN through sendto(): the connect hook still decides.
    let fast_open = r#"
import socket, sys, errno
s = socket.socket()
try:
    s.sendto(b"GET /", socket.MSG_FASTOPEN, ("127.0.0.2", int(sys.argv[1]))); print("ok")
except OSError as e:
    print(errno.errorcode.get(e.errno, str(e.errno)))
"#;
    assert_eq!(stdout_of(&cg.python(fast_open, &[&other.to_string()])), "EPERM");

    let blocked = daemon.wait_event(Duration::from_secs(3), |e| {
        e["verdict"] == "blocked" && e["dst"] == "127.0.0.2" && e["dport"] == other
    });
    assert_eq!(blocked["rule"], "deny 127.0.0.0/8");
    assert_eq!(blocked["protocol"], "tcp");
    assert_eq!(blocked["comm"], "python3");
    assert_eq!(blocked["cgroup"], cg.relative.as_str());
    daemon.wait_event(Duration::from_secs(3), |e| e["verdict"] == "allowed" && e["dport"] == port);
}

#[test]
fn tcp_connect_ipv6_and_v4_mapped_follow_the_right_rules() {
    if !privileged() {
        return;
    }
    let cg = TestCgroup::new("tcp6");
    let v6_port = tcp_server("[::1]:0");
    let dual = TcpListener::bind("[::]:0").expect("bind dual-stack");
    let dual_port = dual.local_addr().expect("addr").port();
    std::thread::spawn(move || for _ in dual.incoming() {});
    let file = policy(&cg, "allow", "      - deny: ::1\n        protocol: tcp\n      - deny: 127.0.0.2\n");
    let _daemon = Daemon::start(&file);

    assert_eq!(tcp_connect_from(&cg, "::1", v6_port), "EPERM");
    // A dual-stack socket reaching an IPv4 address through ::ffff:a.b.c.d is judged as IPv4.
    assert_eq!(tcp_connect_from(&cg, "::ffff:127.0.0.2", dual_port), "EPERM");
    assert_eq!(tcp_connect_from(&cg, "::ffff:127.0.0.1", dual_port), "ok");
    assert_eq!(tcp_connect_from(&cg, "127.0.0.2", dual_port), "EPERM");
}

#[test]
fn udp_connected_unconnected_and_sendmsg_are_judged() {
    if !privileged() {
        return;
    }
    let cg = TestCgroup::new("udp");
    let allowed = udp_echo("127.0.0.1:0");
    let denied = udp_echo("127.0.0.3:0");
    let file =
        policy(&cg, "deny", &format!("      - allow: 127.0.0.1\n        protocol: udp\n        ports: [{allowed}]\n"));
    let daemon = Daemon::start(&file);

    for mode in ["connected", "sendto", "sendmsg"] {
        let ok = stdout_of(&cg.python(PY_UDP, &[mode, "127.0.0.1", &allowed.to_string()]));
        assert_eq!(ok, "ok", "{mode} to the allowed port");
        let refused = stdout_of(&cg.python(PY_UDP, &[mode, "127.0.0.3", &denied.to_string()]));
        assert_eq!(refused, "EPERM", "{mode} to a denied address");
    }
    let event = daemon.wait_event(Duration::from_secs(3), |e| {
        e["verdict"] == "blocked" && e["protocol"] == "udp" && e["dst"] == "127.0.0.3"
    });
    assert_eq!(event["rule"], "default");
}

#[test]
fn unconnected_udp_reports_one_event_per_flow_not_per_datagram() {
    if !privileged() {
        return;
    }
    let cg = TestCgroup::new("udpflow");
    let port = udp_echo("127.0.0.1:0");
    let file = policy(&cg, "allow", "      - deny: 127.0.0.9\n");
    let daemon = Daemon::start(&file);
    let script = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(50):
    s.sendto(b"x", ("127.0.0.1", int(sys.argv[1])))
print("sent")
"#;
    assert_eq!(stdout_of(&cg.python(script, &[&port.to_string()])), "sent");
    daemon.wait_event(Duration::from_secs(3), |e| e["dport"] == port);
    std::thread::sleep(Duration::from_millis(300));
    let flows = daemon.events().iter().filter(|e| e["dport"] == port).count();
    assert_eq!(flows, 1, "50 datagrams on one socket to one destination are one flow");
}

#[test]
fn icmp_over_raw_and_unprivileged_ping_sockets() {
    if !privileged() {
        return;
    }
    let cg = TestCgroup::new("icmp");
    let file = policy(&cg, "allow", "      - deny: 127.0.0.4\n        protocol: icmp\n");
    let daemon = Daemon::start(&file);
    let script = r#"
import socket, sys, errno, struct
kind, host = sys.argv[1], sys.argv[2]
proto = socket.SOCK_RAW if kind == "raw" else socket.SOCK_DGRAM
s = socket.socket(socket.AF_INET, proto, socket.IPPROTO_ICMP)
s.settimeout(2)
packet = struct.pack("!BBHHH", 8, 0, 0xf7fe, 0, 1)  # echo request, precomputed checksum
try:
    s.sendto(packet, (host, 0))
    s.recv(100)
    print("ok")
except socket.timeout:
    print("TIMEOUT")
except OSError as e:
    print(errno.errorcode.get(e.errno, str(e.errno)))
"#;
    // Unprivileged ping sockets need the gid in ping_group_range; widen it for the test only.
    let range_path = "/proc/sys/net/ipv4/ping_group_range";
    let saved = std::fs::read_to_string(range_path).expect("read ping_group_range");
    std::fs::write(range_path, "0 0").expect("allow root ping sockets");
    let raw_denied = stdout_of(&cg.python(script, &["raw", "127.0.0.4"]));
    let raw_allowed = stdout_of(&cg.python(script, &["raw", "127.0.0.5"]));
    let dgram_denied = stdout_of(&cg.python(script, &["dgram", "127.0.0.4"]));
    let dgram_allowed = stdout_of(&cg.python(script, &["dgram", "127.0.0.5"]));
    let ping = cg.command("ping").args(["-c", "1", "-W", "1", "127.0.0.4"]).output().expect("ping");
    std::fs::write(range_path, saved.trim()).expect("restore ping_group_range");

    assert_eq!(raw_denied, "EPERM");
    assert_eq!(raw_allowed, "ok");
    assert_eq!(dgram_denied, "EPERM");
    assert_eq!(dgram_allowed, "ok");
    assert!(!ping.status.success(), "ping to a denied address must fail");
    let event = daemon.wait_event(Duration::from_secs(3), |e| {
        e["verdict"] == "blocked" && e["protocol"] == "icmp" && e["dst"] == "127.0.0.4"
    });
    assert_eq!(event["rule"], "deny 127.0.0.4/32 icmp");
}

#[test]
fn raw_ip_of_any_protocol_is_covered_by_the_packet_hook() {
    if !privileged() {
        return;
    }
    let cg = TestCgroup::new("rawip");
    let file = policy(&cg, "deny", "      - allow: 127.0.0.1\n        protocol: tcp\n");
    let daemon = Daemon::start(&file);
    let script = r#"
import socket, errno
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, 253)
try:
    s.sendto(b"experiment", ("127.0.0.1", 0))
    print("sent")
except OSError as e:
    print(errno.errorcode.get(e.errno, str(e.errno)))
"#;
    assert_eq!(stdout_of(&cg.python(script, &[])), "EPERM");
    let event = daemon.wait_event(Duration::from_secs(3), |e| e["protocol"] == "ip-proto-253");
    assert_eq!(event["verdict"], "blocked");
    assert_eq!(event["rule"], "default");
    // Where the kernel lets packet programs name the current task (6.18 does), they do.
    if !daemon.log().contains("refuses the current-task helpers") {
        assert_eq!(event["comm"], "python3", "{event}");
        assert!(event["pid"].as_u64().is_some_and(|pid| pid > 0), "{event}");
    }
}

#[test]
fn servers_in_a_default_deny_cgroup_still_answer_their_clients() {
    if !privileged() {
        return;
    }
    let cg = TestCgroup::new("stateful");
    let file = policy(&cg, "deny", "");
    let _daemon = Daemon::start(&file);
    let server = r#"
import socket, sys
kind = sys.argv[1]
if kind == "tcp":
    l = socket.socket(); l.bind(("127.0.0.1", 0)); l.listen(); print(l.getsockname()[1], flush=True)
    c, _ = l.accept(); c.sendall(c.recv(100).upper()); c.close()
else:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1", 0))
    print(s.getsockname()[1], flush=True)
    data, peer = s.recvfrom(100); s.sendto(data.upper(), peer)
"#;
    for kind in ["tcp", "udp"] {
        let mut child =
            cg.command("python3").args(["-c", server, kind]).stdout(Stdio::piped()).spawn().expect("start server");
        let mut line = String::new();
        let mut stdout = child.stdout.take().expect("stdout");
        let mut byte = [0u8; 1];
        while stdout.read(&mut byte).map(|n| n == 1).unwrap_or(false) && byte[0] != b'\n' {
            line.push(byte[0] as char);
        }
        let port: u16 = line.trim().parse().expect("server port");
        let reply = if kind == "tcp" {
            let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to server");
            stream.set_read_timeout(Some(Duration::from_secs(3))).expect("timeout");
            stream.write_all(b"ping").expect("send");
            let mut buf = [0u8; 4];
            stream.read_exact(&mut buf).map(|()| buf.to_vec()).unwrap_or_default()
        } else {
            let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
            socket.set_read_timeout(Some(Duration::from_secs(3))).expect("timeout");
            socket.send_to(b"ping", ("127.0.0.1", port)).expect("send");
            let mut buf = [0u8; 4];
            socket.recv(&mut buf).map(|_| buf.to_vec()).unwrap_or_default()
        };
        assert_eq!(reply, b"PING", "{kind} server inside the cgroup must answer");
        let _ = child.wait();
    }
    // The same cgroup still cannot start flows of its own.
    let port = tcp_server("127.0.0.1:0");
    assert_eq!(tcp_connect_from(&cg, "127.0.0.1", port), "EPERM");
}

#[test]
fn connections_open_before_the_policy_keep_running_new_ones_are_judged() {
    if !privileged() {
        return;
    }
    let cg = TestCgroup::new("existing");
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let client = r#"
import socket, sys, time, errno
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
print("connected", flush=True)
sys.stdin.readline()            # the policy is attached meanwhile
s.sendall(b"after")
print("sent", flush=True)
t = socket.socket()
try:
    t.connect(("127.0.0.1", int(sys.argv[1]))); print("new:ok")
except OSError as e:
    print("new:" + errno.errorcode.get(e.errno, str(e.errno)))
"#;
    let mut child = cg
        .command("python3")
        .args(["-c", client, &port.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start client");
    let (mut accepted, _) = listener.accept().expect("accept");
    let file = policy(&cg, "deny", "");
    let _daemon = Daemon::start(&file);
    child.stdin.take().expect("stdin").write_all(b"go\n").expect("resume client");
    accepted.set_read_timeout(Some(Duration::from_secs(3))).expect("timeout");
    let mut buf = [0u8; 5];
    accepted.read_exact(&mut buf).expect("the open connection still carries data");
    assert_eq!(&buf, b"after");
    let out = child.wait_with_output().expect("client");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("new:EPERM"), "a new connection is judged: {text}");
}

#[test]
fn hosts_in_a_network_namespace_are_filtered_per_address() {
    if !privileged() {
        return;
    }
    let ns = NetNs::new(41);
    let cg = TestCgroup::new("netns");
    let mut servers = Vec::new();
    for addr in ["10.213.41.2", "[fd00:e9e5:41::2]"] {
        let script = "import socket,sys\nfam=socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET\nl=socket.socket(fam)\nl.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\nl.bind((sys.argv[1].strip('[]'), 8080)); l.listen()\nwhile True:\n    c,_=l.accept(); c.close()\n";
        servers.push(ns.command("python3").args(["-c", script, addr]).spawn().expect("server in netns"));
    }
    std::thread::sleep(Duration::from_millis(400));
    let file = policy(&cg, "deny", "      - allow: 10.213.41.0/24\n        protocol: tcp\n        ports: [8080]\n");
    let _daemon = Daemon::start(&file);
    assert_eq!(tcp_connect_from(&cg, "10.213.41.2", 8080), "ok");
    assert_eq!(tcp_connect_from(&cg, "fd00:e9e5:41::2", 8080), "EPERM");
    for mut server in servers {
        let _ = server.kill();
        let _ = server.wait();
    }
}

#[test]
fn a_process_moved_into_a_covered_cgroup_is_judged_there_also_on_old_sockets() {
    if !privileged() {
        return;
    }
    let parent = TestCgroup::new("moved");
    let open = parent.child("open");
    let covered = parent.child("covered");
    let port = udp_echo("127.0.0.1:0");
    let file = PolicyFile::attached_at(
        Some(&parent.relative),
        &format!("policies:\n  - name: covered\n    cgroup: {}\n    default: deny\n", covered.relative),
    );
    let _daemon = Daemon::start(&file);
    let script = r#"
import socket, sys, errno, os
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.sendto(b"x", ("127.0.0.1", int(sys.argv[1])))
print("before:ok")
with open(sys.argv[2], "w") as procs:
    procs.write(str(os.getpid()))
try:
    s.sendto(b"x", ("127.0.0.1", int(sys.argv[1]))); print("after:ok")
except OSError as e:
    print("after:" + errno.errorcode.get(e.errno, str(e.errno)))
"#;
    let procs = covered.dir.join("cgroup.procs");
    let out = stdout_of(&open.python(script, &[&port.to_string(), &procs.to_string_lossy()]));
    assert_eq!(out, "before:ok\nafter:EPERM");
}

#[test]
fn io_uring_connect_and_sendmsg_are_judged_like_the_system_calls() {
    if !privileged() {
        return;
    }
    let source = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients/uring_connect.c");
    let binary = std::env::temp_dir().join(unique("egress-uring"));
    let built = std::process::Command::new("cc")
        .args(["-O2", "-o"])
        .arg(&binary)
        .arg(source)
        .arg("-luring")
        .status()
        .expect("run cc (gcc and liburing-dev are installed by `cargo xtask setup`)");
    assert!(built.success(), "building the io_uring client failed");
    let cg = TestCgroup::new("uring");
    let tcp = tcp_server("127.0.0.2:0");
    let udp = udp_echo("127.0.0.2:0");
    let file = policy(&cg, "allow", "      - deny: 127.0.0.2\n");
    let _daemon = Daemon::start(&file);
    let run = |kind: &str, port: u16| {
        stdout_of(
            &cg.command(binary.to_str().expect("path"))
                .args([kind, "127.0.0.2", &port.to_string()])
                .output()
                .expect("run client"),
        )
    };
    let tcp_result = run("tcp", tcp);
    let udp_result = run("udp", udp);
    let _ = std::fs::remove_file(&binary);
    assert_eq!(tcp_result, "EPERM");
    assert_eq!(udp_result, "EPERM");
}
