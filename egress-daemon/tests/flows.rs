//! Flow records: what the kernel counts per flow matches what the peer received, long flows get
//! interim records, and repeated connections to one destination raise one event but are all
//! counted.
//!
//! Bytes are IP bytes, headers included, each packet of a GSO train counted with its own
//! headers: a TCP record's `bytes_out` lies between the payload the peer received and that
//! payload plus 120 bytes (the largest IPv4 plus TCP header) per packet; a UDP datagram counts
//! exactly 28 bytes of headers (IPv4 20, UDP 8).

mod common;

use std::{
    process::Command,
    time::{Duration, Instant},
};

use common::*;
use serde_json::Value;

/// The largest IPv4 header plus the largest TCP header.
const MAX_TCP_HEADERS: u64 = 120;
/// IPv4 plus UDP headers.
const UDP_HEADERS: u64 = 28;
/// Generous bound for a record to come out after its flow ended (sweeps run every second).
const RECORD_WAIT: Duration = Duration::from_secs(20);

/// A policy file for `cg` allowing `allow`, with `extra` settings lines.
fn policy(cg: &TestCgroup, extra_settings: &str, allow: &str, log: &str) -> PolicyFile {
    let file = PolicyFile::attached_at(Some(&cg.relative), "policies: []\n");
    file.rewrite(&format!(
        "{}{extra_settings}policies:\n  - name: flows\n    cgroup: {}\n    default: deny\n    log: {log}\n    rules:\n      - allow: {allow}\n",
        file.settings(Some(&cg.relative)),
        cg.relative
    ));
    file
}

/// Every flow record the daemon keeps, as JSON.
fn flow_records(file: &PolicyFile) -> Vec<Value> {
    let out = Command::new(egress_bin())
        .args(["logs", "--flows", "--json", "--socket"])
        .arg(&file.socket)
        .output()
        .expect("run egress logs --flows");
    assert!(out.status.success(), "egress logs --flows failed: {}", stderr_of(&out));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON: {line}: {e}")))
        .collect()
}

/// The records to `dst`:`port` over `protocol`, once `done` says enough of them came.
fn wait_records(
    file: &PolicyFile,
    protocol: &str,
    dst: &str,
    port: u16,
    done: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let deadline = Instant::now() + RECORD_WAIT;
    loop {
        let records: Vec<Value> = flow_records(file)
            .into_iter()
            .filter(|r| r["protocol"] == protocol && r["dstaddr"] == dst && r["dstport"] == port)
            .collect();
        if done(&records) {
            return records;
        }
        assert!(Instant::now() < deadline, "no complete flow records to {dst}:{port} in time: {records:#?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn sum(records: &[Value], field: &str) -> u64 {
    records.iter().map(|r| r[field].as_u64().unwrap_or_else(|| panic!("{field} in {r}"))).sum()
}

fn ended(records: &[Value]) -> bool {
    records.iter().any(|r| r["status"] == "end")
}

const TCP_SINK: &str = r#"
import socket, sys
l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind((sys.argv[1], int(sys.argv[2]))); l.listen()
print("ready", flush=True)
c, _ = l.accept(); n = 0
while True:
    d = c.recv(65536)
    if not d: break
    n += len(d)
c.sendall(b"r" * 1000); c.close()
print(n, flush=True)
"#;

const UDP_ECHO_COUNT: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
for i in range(int(sys.argv[3])):
    d, peer = s.recvfrom(4096); s.sendto(d, peer)
print(int(sys.argv[3]), flush=True)
"#;

#[test]
fn a_tcp_transfer_and_a_udp_exchange_are_counted_as_the_peer_received_them() {
    if !privileged() {
        return;
    }
    let ns = NetNs::new(61);
    let cg = TestCgroup::new("flows-count");
    let file = policy(&cg, "  flow_interval: 2\n", "10.213.61.0/24", "new");
    let _daemon = Daemon::start(&file);

    let tcp_sink = ns
        .command("python3")
        .args(["-c", TCP_SINK, "10.213.61.2", "9000"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("tcp sink in netns");
    let udp_echo = ns
        .command("python3")
        .args(["-c", UDP_ECHO_COUNT, "10.213.61.2", "9001", "20"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("udp echo in netns");
    std::thread::sleep(Duration::from_millis(500));

    let payload: u64 = 2_000_000;
    let client = cg.python(
        r#"
import socket, struct, sys
s = socket.create_connection(("10.213.61.2", 9000))
s.sendall(b"x" * int(sys.argv[1])); s.shutdown(socket.SHUT_WR)
got = 0
while True:
    d = s.recv(65536)
    if not d: break
    got += len(d)
# tcp_info's tcpi_bytes_sent (Linux 4.19+): payload bytes sent, retransmissions included.
sent = struct.unpack_from("Q", s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 232), 200)[0]
s.close()
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(5)
echoed = 0
for i in range(20):
    u.sendto(b"y" * 200, ("10.213.61.2", 9001)); u.recvfrom(4096); echoed += 1
u.close()
print(got, echoed, sent)
"#,
        &[&payload.to_string()],
    );
    let out = stdout_of(&client);
    let fields: Vec<&str> = out.split_whitespace().collect();
    assert_eq!(fields[..2], ["1000", "20"], "client: {out} {}", stderr_of(&client));
    // What left the socket: the payload, plus whatever TCP had to send again (a veth under load
    // drops now and then); the records count the wire, so retransmitted bytes are in them.
    let sent: u64 = fields[2].parse().expect("bytes sent");
    assert!(sent >= payload, "bytes sent {sent} < payload {payload}");
    let sink_out = tcp_sink.wait_with_output().expect("tcp sink");
    assert_eq!(stdout_of(&sink_out).lines().last(), Some(payload.to_string().as_str()), "the peer got it all");
    let echo_out = udp_echo.wait_with_output().expect("udp echo");
    assert_eq!(stdout_of(&echo_out).lines().last(), Some("20"));

    let tcp = wait_records(&file, "tcp", "10.213.61.2", 9000, ended);
    let (packets_out, bytes_out) = (sum(&tcp, "packets_out"), sum(&tcp, "bytes_out"));
    assert!(
        bytes_out >= sent && bytes_out <= sent + MAX_TCP_HEADERS * packets_out,
        "TCP bytes out {bytes_out} for {sent} payload bytes sent ({payload} once) in {packets_out} packets: {tcp:#?}"
    );
    // A 1500-byte MTU carries at most 1460 payload bytes: GSO trains count as their packets.
    assert!(packets_out >= payload / 1460, "TCP packets out {packets_out}: {tcp:#?}");
    let (packets_in, bytes_in) = (sum(&tcp, "packets_in"), sum(&tcp, "bytes_in"));
    assert!(bytes_in >= 1000 && bytes_in <= 1000 + MAX_TCP_HEADERS * packets_in, "TCP bytes in {bytes_in}: {tcp:#?}");
    let end = tcp.iter().find(|r| r["status"] == "end").expect("an end record");
    assert_eq!(end["action"], "ACCEPT");
    assert_eq!(end["policy"], "flows");
    assert_eq!(end["rule"], "allow 10.213.61.0/24");
    assert_eq!(end["comm"], "python3");
    assert_eq!(end["cgroup"], cg.relative.as_str());
    assert_eq!(end["srcaddr"], "10.213.61.1");
    assert!(end["srcport"].as_u64().is_some_and(|p| p > 0), "{end}");

    let udp = wait_records(&file, "udp", "10.213.61.2", 9001, ended);
    assert_eq!(sum(&udp, "packets_out"), 20, "{udp:#?}");
    assert_eq!(sum(&udp, "bytes_out"), 20 * (200 + UDP_HEADERS), "{udp:#?}");
    assert_eq!(sum(&udp, "packets_in"), 20, "{udp:#?}");
    assert_eq!(sum(&udp, "bytes_in"), 20 * (200 + UDP_HEADERS), "{udp:#?}");
    assert_eq!(udp.iter().filter(|r| r["status"] == "end").count(), 1, "{udp:#?}");

    // `egress top` sums them per workload and destination.
    let top = Command::new(egress_bin())
        .args(["top", "--once", "--json", "--window", "5m", "--socket"])
        .arg(&file.socket)
        .output()
        .expect("run egress top");
    assert!(top.status.success(), "{}", stderr_of(&top));
    let rows: Vec<Value> = serde_json::from_slice(&top.stdout).expect("top JSON");
    let row = rows.iter().find(|r| r["dstport"] == 9000).expect("a top row for the TCP flow");
    assert_eq!(row["bytes_out"].as_u64(), Some(bytes_out), "{rows:#?}");
}

#[test]
fn a_flow_longer_than_the_interval_gets_interim_records() {
    if !privileged() {
        return;
    }
    let ns = NetNs::new(62);
    let cg = TestCgroup::new("flows-interim");
    let file = policy(&cg, "  flow_interval: 2\n", "10.213.62.0/24", "new");
    let _daemon = Daemon::start(&file);
    let sink = ns
        .command("python3")
        .args(["-c", TCP_SINK, "10.213.62.2", "9000"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("tcp sink in netns");
    std::thread::sleep(Duration::from_millis(500));
    // About 7 s of traffic: 15 chunks of 10 kB, 0.5 s apart.
    let client = cg.python(
        r#"
import socket, time
s = socket.create_connection(("10.213.62.2", 9000))
for i in range(15):
    s.sendall(b"x" * 10000); time.sleep(0.5)
s.shutdown(socket.SHUT_WR)
while s.recv(65536): pass
s.close()
print("done")
"#,
        &[],
    );
    assert_eq!(stdout_of(&client), "done", "{}", stderr_of(&client));
    assert_eq!(stdout_of(&sink.wait_with_output().expect("sink")).lines().last(), Some("150000"));

    let records = wait_records(&file, "tcp", "10.213.62.2", 9000, ended);
    let interim = records.iter().filter(|r| r["status"] == "interim").count();
    assert!(interim >= 2, "a 7 s flow with a 2 s interval has interim records: {records:#?}");
    assert_eq!(records.iter().filter(|r| r["status"] == "end").count(), 1, "{records:#?}");
    // The records tile the flow: each starts where the one before ended.
    for pair in records.windows(2) {
        assert_eq!(pair[1]["start"], pair[0]["end"], "{records:#?}");
    }
    let bytes_out = sum(&records, "bytes_out");
    assert!(bytes_out >= 150_000 && bytes_out <= 150_000 + MAX_TCP_HEADERS * sum(&records, "packets_out"));
}

#[test]
fn ten_thousand_connections_to_one_destination_raise_one_event_and_are_all_counted() {
    if !privileged() {
        return;
    }
    let cg = TestCgroup::new("flows-many");
    let port = tcp_server("127.0.0.1:0");
    let file = policy(&cg, "  history: 30000\n  flow_interval: 2\n", "127.0.0.1", "new");
    let daemon = Daemon::start(&file);
    let client = cg.python(
        r#"
import socket, sys
ok = 0
for i in range(10000):
    s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
    s.close(); ok += 1
print(ok)
"#,
        &[&port.to_string()],
    );
    assert_eq!(stdout_of(&client), "10000", "{}", stderr_of(&client));

    let records = wait_records(&file, "tcp", "127.0.0.1", port, |records| {
        records.iter().filter(|r| r["status"] == "end").count() >= 10_000
    });
    assert_eq!(records.iter().filter(|r| r["status"] == "end").count(), 10_000, "one end per connection");
    assert!(records.iter().all(|r| r["action"] == "ACCEPT" && r["packets_out"].as_u64() >= Some(1)));
    // Only the first connect() was judged; the others reused its decision, and their flows were
    // opened at the SYN: each still names the process that opened it.
    let unnamed: Vec<&Value> = records.iter().filter(|r| r["comm"] != "python3").collect();
    assert!(unnamed.is_empty(), "{} of 10000 flows name no process, e.g. {:#?}", unnamed.len(), unnamed.first());

    std::thread::sleep(Duration::from_millis(300));
    let allowed: Vec<Value> = daemon
        .events()
        .into_iter()
        .filter(|e| e["verdict"] == "allowed" && e["dport"] == port && e["cgroup"] == cg.relative.as_str())
        .collect();
    assert_eq!(allowed.len(), 1, "log: new raises one event per workload destination: {allowed:#?}");
    let status = file.status_json();
    let row = status["cgroups"].as_array().and_then(|rows| rows.iter().find(|r| r["cgroup"] == cg.relative.as_str()));
    assert_eq!(row.map(|r| r["allowed"].clone()), Some(Value::from(10_000)), "every flow still counted: {status}");
}

#[test]
fn log_all_and_log_blocked_choose_which_allowed_flows_raise_events() {
    if !privileged() {
        return;
    }
    let port = tcp_server("127.0.0.1:0");
    for (log, expected) in [("all", 3), ("blocked", 0)] {
        let cg = TestCgroup::new("flows-log");
        let file = policy(&cg, "", "127.0.0.1", log);
        let daemon = Daemon::start(&file);
        for _ in 0..3 {
            assert_eq!(tcp_connect_from(&cg, "127.0.0.1", port), "ok");
        }
        assert_eq!(tcp_connect_from(&cg, "127.0.0.2", port), "EPERM");
        daemon.wait_event(Duration::from_secs(5), |e| e["verdict"] == "blocked" && e["dst"] == "127.0.0.2");
        std::thread::sleep(Duration::from_millis(300));
        let allowed = daemon.events().iter().filter(|e| e["verdict"] == "allowed" && e["dport"] == port).count();
        assert_eq!(allowed, expected, "log: {log}");
    }
}

#[test]
fn a_datagram_flow_that_went_idle_is_counted_again_when_its_socket_sends_again() {
    if !privileged() {
        return;
    }
    let cg = TestCgroup::new("flows-idle");
    let sink = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp sink");
    let port = sink.local_addr().expect("sink address").port();
    let file = policy(&cg, "  flow_interval: 1\n", "127.0.0.1", "new");
    let _daemon = Daemon::start(&file);
    // The second burst reuses the socket's decision (per CPU, without a map lookup); the flow
    // ended after two idle intervals, so that burst must open it again, not go uncounted.
    let client = cg.python(
        r#"
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(5): s.sendto(b"a" * 10, ("127.0.0.1", int(sys.argv[1])))
time.sleep(4)
for i in range(7): s.sendto(b"b" * 10, ("127.0.0.1", int(sys.argv[1])))
time.sleep(0.3)
print("sent")
"#,
        &[&port.to_string()],
    );
    assert_eq!(stdout_of(&client), "sent", "{}", stderr_of(&client));
    let records = wait_records(&file, "udp", "127.0.0.1", port, |records| {
        sum(records, "packets_out") >= 12 && records.iter().filter(|r| r["status"] == "end").count() >= 2
    });
    assert_eq!(sum(&records, "packets_out"), 12, "every datagram counted once: {records:#?}");
    assert_eq!(sum(&records, "bytes_out"), 12 * (10 + UDP_HEADERS), "{records:#?}");
}
