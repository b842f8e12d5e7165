//! Domain names in policies, end to end: a real DNS server in a network namespace the test
//! creates answers for test names with addresses of hosts in that namespace; workloads in
//! covered cgroups resolve with real clients (glibc's `getaddrinfo` with its own resolv.conf,
//! `dig`) whatever resolver they name, and connect to what they learned.
//!
//! Traffic stays on loopback and inside the test's namespace: a resolver like 8.8.8.8 is only
//! named, never reached (the kernel rewrites the destination to the proxy at the system call,
//! and the policy refuses 8.8.8.8 should steering ever fail, so no packet could leave).

mod common;

use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use common::*;
use serde_json::Value;

const ECHO_PORT: u16 = 7000;

/// A namespace with a DNS server and an echo server on every address of `10.214.S.0/24`
/// (routed there from the host), a test cgroup with a workload child, and a daemon.
struct Lab {
    subnet: u8,
    log: PathBuf,
    cgroup: TestCgroup,
    workload: TestCgroup,
    file: PolicyFile,
    daemon: Option<Daemon>,
    servers: Vec<Child>,
    ns: NetNs,
}

impl Lab {
    /// `zone`: the DNS server's JSON zone; `policies`: YAML after `policies:`, where `{W}` is the
    /// workload's cgroup path; `dns`: extra `settings.dns` lines.
    fn new(subnet: u8, zone: &str, policies: &str, dns: &str) -> Self {
        let ns = NetNs::new(subnet);
        sh(&format!("ip -n {} route add local 10.214.{subnet}.0/24 dev lo", ns.name));
        sh(&format!("ip route add 10.214.{subnet}.0/24 via 10.213.{subnet}.2"));
        let dir = std::env::temp_dir().join(unique("egress-test-dns"));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let log = dir.join("queries.log");
        std::fs::write(&log, "").expect("query log");
        let mut servers = Vec::new();
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients/dns_server.py");
        let mut dns_server = ns
            .command("python3")
            .args([script, &format!("10.213.{subnet}.2"), "53", zone])
            .arg(&log)
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the DNS server");
        let mut ready = String::new();
        BufReader::new(dns_server.stdout.take().expect("stdout")).read_line(&mut ready).expect("DNS server ready");
        assert_eq!(ready.trim(), "ready");
        servers.push(dns_server);
        let mut echo = ns.command("python3").args(["-c", ECHO_SERVER]).stdout(Stdio::piped()).spawn().expect("echo");
        let mut ready = String::new();
        BufReader::new(echo.stdout.take().expect("stdout")).read_line(&mut ready).expect("echo server ready");
        servers.push(echo);

        let cgroup = TestCgroup::new("dns");
        let workload = cgroup.child("w");
        let file = PolicyFile::attached_at(Some(&cgroup.relative), "policies: []\n");
        let port = 5300 + u16::from(subnet);
        let settings = format!(
            "{}  dns:\n    listen_port: {port}\n    upstream: [10.213.{subnet}.2]\n{dns}",
            file.settings(Some(&cgroup.relative))
        );
        let policies = policies.replace("{W}", &workload.relative).replace("{C}", &cgroup.relative);
        file.rewrite(&format!("{settings}policies:\n{policies}"));
        let daemon = Daemon::start(&file);
        Self { subnet, log, cgroup, workload, file, daemon: Some(daemon), servers, ns }
    }

    fn daemon(&self) -> &Daemon {
        self.daemon.as_ref().expect("daemon")
    }

    fn queries(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `dig` in `cgroup`: the answer's status and addresses (`+short`-like), and the server line.
    fn dig(&self, cgroup: &TestCgroup, args: &[&str]) -> Dig {
        let out = cgroup
            .command("dig")
            .args(["+tries=1", "+time=3", "+nocookie", "+noedns"])
            .args(args)
            .output()
            .expect("run dig");
        Dig::parse(&stdout_of(&out))
    }

    /// Runs `script` with python in `cgroup`, with /etc/resolv.conf naming `resolver`.
    fn python_with_resolver(&self, cgroup: &TestCgroup, resolver: &str, script: &str, args: &[&str]) -> String {
        let conf = std::env::temp_dir().join(unique("egress-test-resolv"));
        std::fs::write(&conf, format!("nameserver {resolver}\noptions attempts:1 timeout:3\n")).expect("resolv.conf");
        let out = cgroup
            .command("unshare")
            .args([
                "-m",
                "sh",
                "-c",
                "mount --bind \"$0\" /etc/resolv.conf && exec python3 -c \"$1\" \"$2\" \"$3\" \"$4\"",
            ])
            .arg(&conf)
            .arg(script)
            .args(args)
            .output()
            .expect("run python");
        let _ = std::fs::remove_file(&conf);
        format!("{}{}", stdout_of(&out), if out.status.success() { String::new() } else { stderr_of(&out) })
    }

    fn resolver(&self) -> String {
        format!("10.213.{}.2", self.subnet)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.daemon.take();
        for server in &mut self.servers {
            let _ = server.kill();
            let _ = server.wait();
        }
        let _ = Command::new("ip").args(["route", "del", &format!("10.214.{}.0/24", self.subnet)]).status();
    }
}

/// What `dig` said.
#[derive(Debug)]
struct Dig {
    status: String,
    answers: Vec<String>,
    server: String,
    text: String,
}

impl Dig {
    fn parse(text: &str) -> Self {
        let status =
            text.split("status: ").nth(1).and_then(|rest| rest.split(',').next()).unwrap_or("NO ANSWER").to_string();
        let mut answers = Vec::new();
        let mut in_answer = false;
        for line in text.lines() {
            if line.starts_with(";; ANSWER SECTION") {
                in_answer = true;
                continue;
            }
            if in_answer {
                if line.trim().is_empty() {
                    in_answer = false;
                    continue;
                }
                if let Some(last) = line.split_whitespace().last() {
                    answers.push(last.to_string());
                }
            }
        }
        let server = text.lines().find_map(|l| l.strip_prefix(";; SERVER: ")).unwrap_or("").to_string();
        Self { status, answers, server, text: text.to_string() }
    }
}

const ECHO_SERVER: &str = r#"
import socket, threading
s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("::", 7000))
s.listen(512)
print("ready", flush=True)
def serve(c):
    with c:
        while True:
            d = c.recv(4096)
            if not d:
                return
            c.sendall(d)
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

/// Resolves `argv[1]` with getaddrinfo (IPv4) and connects to port `argv[2]`, `argv[3]` times:
/// prints `ok eperm other distinct_addresses`.
const PY_RESOLVE_CONNECT: &str = r#"
import socket, sys, errno
name, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ok = eperm = other = 0
seen = set()
for _ in range(n):
    try:
        addr = socket.getaddrinfo(name, port, socket.AF_INET, socket.SOCK_STREAM)[0][4]
        seen.add(addr[0])
        s = socket.socket()
        s.settimeout(5)
        s.connect(addr)
        s.close()
        ok += 1
    except OSError as e:
        if e.errno == errno.EPERM:
            eperm += 1
        else:
            other += 1
            print("error", e, file=sys.stderr)
print(ok, eperm, other, len(seen))
"#;

fn tcp_connect(cgroup: &TestCgroup, host: &str) -> String {
    tcp_connect_from(cgroup, host, ECHO_PORT)
}

fn policy(name: &str, cgroup: &str, default: &str, rules: &str) -> String {
    format!("  - name: {name}\n    cgroup: {cgroup}\n    default: {default}\n    rules:\n{rules}")
}

#[test]
fn an_allowed_name_connects_at_once_every_time_with_fresh_addresses_and_ttl_1() {
    if !privileged() {
        return;
    }
    let zone = r#"{"app.dns.test": {"ttl": 1, "fresh": "10.214.150"}}"#;
    let rules = "      - allow: app.dns.test\n        protocol: tcp\n        ports: [7000]\n";
    let lab = Lab::new(150, zone, &policy("names", "{W}", "deny", rules), "    min_ttl: 1\n    grace: 0\n");
    let resolver = lab.resolver();
    let started = Instant::now();
    let clients: Vec<_> = (0..8)
        .map(|_| {
            let conf = std::env::temp_dir().join(unique("egress-test-resolv"));
            std::fs::write(&conf, format!("nameserver {resolver}\noptions attempts:2 timeout:3\n")).unwrap();
            let child = lab
                .workload
                .command("unshare")
                .args([
                    "-m",
                    "sh",
                    "-c",
                    "mount --bind \"$0\" /etc/resolv.conf && exec python3 -c \"$1\" app.dns.test 7000 125",
                ])
                .arg(&conf)
                .arg(PY_RESOLVE_CONNECT)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("client");
            (child, conf)
        })
        .collect();
    let mut totals = [0u64; 3];
    let mut distinct = 0;
    for (child, conf) in clients {
        let out = child.wait_with_output().expect("client");
        let _ = std::fs::remove_file(conf);
        let line = stdout_of(&out);
        let numbers: Vec<u64> = line.split_whitespace().filter_map(|n| n.parse().ok()).collect();
        assert_eq!(numbers.len(), 4, "client output {line:?} {}", stderr_of(&out));
        for i in 0..3 {
            totals[i] += numbers[i];
        }
        distinct = distinct.max(numbers[3]);
    }
    let elapsed = started.elapsed();
    assert_eq!(totals, [1000, 0, 0], "ok, EPERM, other errors over 1,000 resolve+connect");
    assert!(distinct > 100, "each answer carried a fresh address: {distinct} distinct in one client");
    assert!(elapsed < Duration::from_secs(120), "took {elapsed:?}");
    eprintln!("1,000 resolve+connect with 8 clients in {elapsed:?}");
    let allowed = lab.daemon().wait_event(Duration::from_secs(5), |e| e["verdict"] == "allowed");
    assert_eq!(allowed["domain"], "app.dns.test", "{allowed}");
    assert_eq!(allowed["rule"], "allow app.dns.test tcp ports 7000");
}

#[test]
fn an_unlisted_name_is_refused_never_forwarded_and_reported_once() {
    if !privileged() {
        return;
    }
    let zone = r#"{"app.dns.test": {"A": ["10.214.151.1"]}, "secret.dns.test": {"A": ["10.214.151.2"]}}"#;
    let lab = Lab::new(151, zone, &policy("names", "{W}", "deny", "      - allow: app.dns.test\n"), "");
    let resolver = format!("@{}", lab.resolver());
    let refused = lab.dig(&lab.workload, &[&resolver, "secret.dns.test", "A"]);
    assert_eq!(refused.status, "REFUSED", "{}", refused.text);
    let allowed = lab.dig(&lab.workload, &[&resolver, "app.dns.test", "A"]);
    assert_eq!(allowed.status, "NOERROR", "{}", allowed.text);
    assert_eq!(allowed.answers, vec!["10.214.151.1"]);
    let event = lab.daemon().wait_event(Duration::from_secs(5), |e| e["domain"] == "secret.dns.test");
    assert_eq!(event["verdict"], "blocked");
    assert_eq!(event["rule"], "dns");
    thread::sleep(Duration::from_millis(300));
    let blocked: Vec<Value> = lab.daemon().events().into_iter().filter(|e| e["domain"] == "secret.dns.test").collect();
    assert_eq!(blocked.len(), 1, "one event: {blocked:#?}");
    let log = lab.queries();
    assert!(log.contains("app.dns.test A"), "allowed query forwarded: {log}");
    assert!(!log.contains("secret"), "the unlisted name never reached the upstream: {log}");
    assert_eq!(tcp_connect(&lab.workload, "10.214.151.1"), "ok");
    assert_eq!(tcp_connect(&lab.workload, "10.214.151.2"), "EPERM", "an address never learned");
    // The canary keeps browsers' own DNS over HTTPS off.
    let canary = lab.dig(&lab.workload, &[&resolver, "use-application-dns.net", "A"]);
    assert_eq!(canary.status, "NXDOMAIN");
}

#[test]
fn wildcards_match_one_or_more_labels_and_the_apex_only_when_listed() {
    if !privileged() {
        return;
    }
    let a = |ip: &str| format!(r#"{{"A": ["{ip}"]}}"#);
    let zone = format!(
        r#"{{"a.one.test": {}, "b.a.one.test": {}, "one.test": {}, "x.y.many.test": {}, "many.test": {}, "apex.test": {}}}"#,
        a("10.214.152.1"),
        a("10.214.152.2"),
        a("10.214.152.3"),
        a("10.214.152.4"),
        a("10.214.152.5"),
        a("10.214.152.6")
    );
    let rules = "      - allow: \"*.one.test\"\n      - allow: \"**.many.test\"\n      - allow: APEX.test.\n";
    let lab = Lab::new(152, &zone, &policy("names", "{W}", "deny", rules), "    refuse_with: nxdomain\n");
    let resolver = format!("@{}", lab.resolver());
    for (name, expected) in [
        ("a.one.test", "NOERROR"),
        ("b.a.one.test", "NXDOMAIN"),
        ("one.test", "NXDOMAIN"),
        ("x.y.many.test", "NOERROR"),
        ("many.test", "NXDOMAIN"),
        ("apex.test", "NOERROR"),
        ("A.One.Test.", "NOERROR"),
    ] {
        let dig = lab.dig(&lab.workload, &[&resolver, name, "A"]);
        assert_eq!(dig.status, expected, "{name}: {}", dig.text);
    }
    assert!(!lab.queries().contains("b.a.one.test"), "{}", lab.queries());
}

#[test]
fn learned_addresses_expire_for_new_connections_but_established_ones_keep_flowing() {
    if !privileged() {
        return;
    }
    let zone = r#"{"short.dns.test": {"ttl": 1, "A": ["10.214.153.7"]}}"#;
    let lab = Lab::new(
        153,
        zone,
        &policy("names", "{W}", "deny", "      - allow: short.dns.test\n"),
        "    min_ttl: 1\n    grace: 0\n",
    );
    const HOLD: &str = r#"
import socket, sys, time, errno
name = sys.argv[1]
addr = socket.getaddrinfo(name, 7000, socket.AF_INET, socket.SOCK_STREAM)[0][4]
held = socket.create_connection(addr, timeout=5)
time.sleep(3)
try:
    socket.create_connection(addr, timeout=5)
    fresh = "ok"
except OSError as e:
    fresh = errno.errorcode.get(e.errno, str(e.errno))
held.sendall(b"still here")
echo = held.recv(100).decode()
print(fresh, echo.replace(" ", "_"))
"#;
    let out = lab.python_with_resolver(&lab.workload, &lab.resolver(), HOLD, &["short.dns.test"]);
    assert_eq!(out, "EPERM still_here", "after the TTL: new connect refused, the held one flows");
}

#[test]
fn dns_over_tcp_aaaa_and_cname_chains_are_learned() {
    if !privileged() {
        return;
    }
    let zone = r#"{"v6.dns.test": {"AAAA": ["fd00:e9e5:154::2"]},
        "alias.dns.test": {"CNAME": "edge.cdn.test"}, "edge.cdn.test": {"A": ["10.214.154.9"]},
        "tcp.dns.test": {"A": ["10.214.154.10"]}}"#;
    let rules = "      - allow: v6.dns.test\n      - allow: alias.dns.test\n      - allow: tcp.dns.test\n";
    let lab = Lab::new(154, zone, &policy("names", "{W}", "deny", rules), "");
    let resolver = format!("@{}", lab.resolver());

    assert_eq!(tcp_connect(&lab.workload, "10.214.154.10"), "EPERM");
    let tcp = lab.dig(&lab.workload, &["+tcp", &resolver, "tcp.dns.test", "A"]);
    assert_eq!(
        (tcp.status.as_str(), tcp.answers.clone()),
        ("NOERROR", vec!["10.214.154.10".to_string()]),
        "{}",
        tcp.text
    );
    assert_eq!(tcp_connect(&lab.workload, "10.214.154.10"), "ok");

    assert_eq!(tcp_connect(&lab.workload, "fd00:e9e5:154::2"), "EPERM");
    let v6 = lab.dig(&lab.workload, &[&resolver, "v6.dns.test", "AAAA"]);
    assert_eq!(v6.answers, vec!["fd00:e9e5:154::2"], "{}", v6.text);
    assert_eq!(tcp_connect(&lab.workload, "fd00:e9e5:154::2"), "ok");

    let chain = lab.dig(&lab.workload, &[&resolver, "alias.dns.test", "A"]);
    assert_eq!(chain.answers, vec!["edge.cdn.test.", "10.214.154.9"], "{}", chain.text);
    assert_eq!(tcp_connect(&lab.workload, "10.214.154.9"), "ok");

    let status = lab.file.status_json();
    let names = &status["policies"][0];
    let learned: Vec<&str> =
        names["learned"].as_array().unwrap().iter().map(|l| l["address"].as_str().unwrap()).collect();
    assert!(learned.contains(&"10.214.154.9") && learned.contains(&"fd00:e9e5:154::2"), "{status:#}");
}

#[test]
fn a_workload_naming_8_8_8_8_is_steered_and_dns_bypasses_are_refused() {
    if !privileged() {
        return;
    }
    let zone = r#"{"app.dns.test": {"A": ["10.214.155.1"]}}"#;
    // Default allow: only the bypass rule stands between the workload and DoT/DoH; 8.8.8.8 is
    // denied outright so that nothing could ever leave for it even if steering failed.
    let rules = "      - deny: 8.8.8.8\n      - deny: 2001:4860:4860::8888\n      - allow: app.dns.test\n";
    let lab = Lab::new(155, zone, &policy("names", "{W}", "allow", rules), "");
    let via_google = lab.dig(&lab.workload, &["@8.8.8.8", "app.dns.test", "A"]);
    assert_eq!(via_google.status, "NOERROR", "{}", via_google.text);
    assert!(via_google.server.starts_with("8.8.8.8#53"), "the reply looks as if from 8.8.8.8: {}", via_google.text);
    let via_google_tcp = lab.dig(&lab.workload, &["+tcp", "@8.8.8.8", "app.dns.test", "A"]);
    assert_eq!(via_google_tcp.status, "NOERROR", "{}", via_google_tcp.text);
    assert!(lab.queries().matches("app.dns.test A").count() >= 2, "{}", lab.queries());
    // glibc's resolver (connected UDP, checks the source of the reply) through 8.8.8.8.
    let out = lab.python_with_resolver(&lab.workload, "8.8.8.8", PY_RESOLVE_CONNECT, &["app.dns.test", "7000", "3"]);
    assert_eq!(out, "3 0 0 1");

    // DNS over TLS to the namespace's resolver: refused although the default allows.
    assert_eq!(tcp_connect_from(&lab.workload, &lab.resolver(), 853), "EPERM");
    let event = lab.daemon().wait_event(Duration::from_secs(5), |e| e["rule"] == "dns-bypass");
    assert_eq!(event["dport"], 853);
    // Ordinary traffic still follows the default.
    assert_eq!(tcp_connect(&lab.workload, "10.214.155.77"), "ok");
    // DNS over HTTPS to a well-known resolver, from inside the test's namespace where no route
    // leads out: refused at connect (EPERM) where the default would let it try (ENETUNREACH).
    let in_namespace = |host: &str, port: &str| {
        let out = lab
            .workload
            .command("ip")
            .args(["netns", "exec", &lab.ns.name, "python3", "-c", PY_TCP_CONNECT, host, port])
            .output()
            .expect("connect in the namespace");
        stdout_of(&out)
    };
    assert_eq!(in_namespace("1.1.1.1", "443"), "EPERM");
    assert_eq!(in_namespace("1.1.1.1", "80"), "ENETUNREACH");
}

#[test]
fn an_address_learned_in_one_cgroup_never_allows_another() {
    if !privileged() {
        return;
    }
    let zone = r#"{"one.dns.test": {"A": ["10.214.156.1"]}, "two.dns.test": {"A": ["10.214.156.2"]}}"#;
    let other = "{C}/other";
    let policies = format!(
        "{}{}",
        policy("first", "{W}", "deny", "      - allow: one.dns.test\n"),
        policy("second", other, "deny", "      - allow: two.dns.test\n")
    );
    let lab = Lab::new(156, zone, &policies, "");
    let second = lab.cgroup.child("other");
    // The daemon binds the new cgroup when it appears.
    thread::sleep(Duration::from_millis(500));
    let resolver = format!("@{}", lab.resolver());
    assert_eq!(lab.dig(&lab.workload, &[&resolver, "one.dns.test"]).status, "NOERROR");
    assert_eq!(tcp_connect(&lab.workload, "10.214.156.1"), "ok");
    assert_eq!(tcp_connect(&second, "10.214.156.1"), "EPERM", "learned by the first cgroup only");
    assert_eq!(lab.dig(&second, &[&resolver, "one.dns.test"]).status, "REFUSED");
    assert_eq!(lab.dig(&second, &[&resolver, "two.dns.test"]).status, "NOERROR");
    assert_eq!(tcp_connect(&second, "10.214.156.2"), "ok");
    assert_eq!(tcp_connect(&lab.workload, "10.214.156.2"), "EPERM");
}

#[test]
fn sockets_in_another_network_namespace_are_not_steered_and_learn_nothing() {
    if !privileged() {
        return;
    }
    let zone = r#"{"app.dns.test": {"A": ["10.214.157.1"]}}"#;
    // The resolver is allowed by CIDR, so the query itself goes through, unsteered.
    let rules =
        "      - allow: app.dns.test\n      - allow: 10.213.157.2\n        protocol: udp\n        ports: [53]\n";
    let lab = Lab::new(157, zone, &policy("names", "{W}", "deny", rules), "");
    // Into the cgroup first, then the namespace (`ip netns exec` hides the cgroup2 mount).
    let out = lab
        .workload
        .command("ip")
        .args(["netns", "exec", &lab.ns.name, "dig", "+short", "+tries=1", "+time=3", "@10.213.157.2", "app.dns.test"])
        .output()
        .expect("dig in the namespace");
    assert_eq!(stdout_of(&out), "10.214.157.1", "answered by the server itself: {}", stderr_of(&out));
    let connect = lab
        .workload
        .command("ip")
        .args(["netns", "exec", &lab.ns.name, "python3", "-c", PY_TCP_CONNECT, "10.214.157.1", "7000"])
        .output()
        .expect("connect in the namespace");
    assert_eq!(stdout_of(&connect), "EPERM", "nothing was learned for a namespace the proxy does not serve");
    let status = lab.file.status_json();
    assert!(status["policies"][0]["names_seen"].is_null(), "{status:#}");
}

#[test]
fn egress_exec_steers_dns_to_a_proxy_of_its_own() {
    if !privileged() {
        return;
    }
    let zone = r#"{"app.dns.test": {"A": ["10.214.158.1"]}}"#;
    // The lab's daemon governs an empty cgroup; exec runs the policy on its own programs.
    let lab = Lab::new(158, zone, &policy("names", "{C}/unused", "deny", "      - allow: app.dns.test\n"), "");
    let script = "dig +short +tries=1 +time=3 @10.213.158.2 app.dns.test; \
                  dig +short +tries=1 +time=3 @10.213.158.2 other.dns.test; \
                  python3 -c \"$0\" 10.214.158.1 7000; python3 -c \"$0\" 10.214.158.2 7000";
    let out = Command::new(egress_bin())
        .args(["exec", "--config"])
        .arg(&lab.file.path)
        .args(["--policy", "names", "--", "sh", "-c", script, PY_TCP_CONNECT])
        .output()
        .expect("egress exec");
    assert_eq!(stdout_of(&out), "10.214.158.1\nok\nEPERM", "{}", stderr_of(&out));
    assert!(stderr_of(&out).contains("other.dns.test"), "a blocked event names the refused query");
    assert!(!lab.queries().contains("other.dns.test"), "{}", lab.queries());
}

/// Resolves `argv[1]`, then sends a datagram to port `argv[2]` of its address every 50 ms from
/// one unconnected UDP socket, for `argv[3]` seconds: prints `first:OUTCOME` and, once a send
/// is refused, `refused_after:SECONDS`.
const PY_DATAGRAMS_UNTIL_REFUSED: &str = r#"
import errno, socket, sys, time
name, port, limit = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
addr = socket.getaddrinfo(name, port, socket.AF_INET, socket.SOCK_DGRAM)[0][4][0]
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
start = time.monotonic()
first = True
while time.monotonic() - start < limit:
    try:
        u.sendto(b"x", (addr, port))
        outcome = "ok"
    except OSError as e:
        outcome = errno.errorcode.get(e.errno, str(e.errno))
    if first:
        print("first:" + outcome)
        first = False
    elif outcome == "EPERM":
        print("refused_after:%.2f" % (time.monotonic() - start))
        break
    time.sleep(0.05)
"#;

#[test]
fn a_datagram_socket_cannot_reuse_a_learned_address_after_it_expired() {
    if !privileged() {
        return;
    }
    let zone = r#"{"app.dns.test": {"ttl": 1, "A": ["10.214.170.1"]}}"#;
    let rules = "      - allow: app.dns.test\n        protocol: udp\n        ports: [7001]\n";
    let lab = Lab::new(170, zone, &policy("names", "{W}", "deny", rules), "    min_ttl: 1\n    grace: 0\n");
    let out = lab.python_with_resolver(
        &lab.workload,
        &lab.resolver(),
        PY_DATAGRAMS_UNTIL_REFUSED,
        &["app.dns.test", "7001", "8"],
    );
    assert!(out.contains("first:ok"), "the learned address was not allowed: {out}");
    // Learned for one second (TTL 1, no grace): later datagrams on the same socket must be
    // judged again and refused, not let through on the socket's earlier decision.
    let refused_after: f64 = out
        .lines()
        .find_map(|l| l.strip_prefix("refused_after:"))
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| panic!("datagrams went on after the learned address expired: {out}"));
    assert!(refused_after < 4.0, "refused only after {refused_after} s: {out}");
}

/// Python: a DNS query for `name` with id `qid` (type A, class IN, recursion desired).
const PY_QUERY: &str = r#"
import socket, struct, sys, time, json, errno
def query(name, qid):
    q = struct.pack("!HHHHHH", qid & 0xFFFF, 0x0100, 1, 0, 0, 0)
    for label in name.split("."):
        q += bytes([len(label)]) + label.encode()
    return q + b"\0" + struct.pack("!HH", 1, 1)
RCODES = {0: "NOERROR", 2: "SERVFAIL", 3: "NXDOMAIN", 5: "REFUSED"}
def rcode(reply):
    return RCODES.get(reply[3] & 0xF, str(reply[3] & 0xF)) if len(reply) >= 4 else "SHORT"
def recv_framed(s):
    head = b""
    while len(head) < 2:
        chunk = s.recv(2 - len(head))
        if not chunk:
            return b""
        head += chunk
    (length,) = struct.unpack("!H", head)
    data = b""
    while len(data) < length:
        chunk = s.recv(length - len(data))
        if not chunk:
            return b""
        data += chunk
    return data
"#;

/// Sends queries for `argv[2]` (`#` replaced by a counter) over one UDP socket to `argv[1]`,
/// `argv[4]` every 20 ms for `argv[3]` seconds, then collects answers for 2.5 s: prints
/// `{"sent": n, "codes": {...}}`.
const PY_FLOOD: &str = r##"
resolver, pattern, seconds, per_tick = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect((resolver, 53))
s.setblocking(False)
codes = {}
def drain():
    while True:
        try:
            reply = s.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return
        codes[rcode(reply)] = codes.get(rcode(reply), 0) + 1
sent = 0
end = time.time() + seconds
while time.time() < end:
    for _ in range(per_tick):
        try:
            s.send(query(pattern.replace("#", str(sent)), sent))
            sent += 1
        except BlockingIOError:
            break
    drain()
    time.sleep(0.02)
until = time.time() + 2.5
while time.time() < until:
    drain()
    time.sleep(0.05)
print(json.dumps({"sent": sent, "codes": codes}), flush=True)
"##;

/// Opens `argv[2]` TCP connections to `argv[1]`:53 and holds them for `argv[3]` seconds; after
/// one second counts how many the far side has not closed: prints `{"open": n}`.
const PY_HOLD_TCP: &str = r#"
resolver, count, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
start = time.time()
held = []
for _ in range(count):
    s = socket.socket()
    s.settimeout(2)
    try:
        s.connect((resolver, 53))
        held.append(s)
    except OSError:
        pass
time.sleep(1)
still = 0
for s in held:
    s.setblocking(False)
    try:
        still += 1 if s.recv(1, socket.MSG_PEEK) else 0
    except BlockingIOError:
        still += 1
    except OSError:
        pass
print(json.dumps({"open": still}), flush=True)
time.sleep(max(0, seconds - (time.time() - start)))
"#;

/// Resolves `argv[2]` at `argv[1]` `argv[3]` times over UDP then `argv[4]` times over TCP, each
/// on a fresh socket, 50 ms apart: prints `{"udp": [ms...], "tcp": [ms...], "codes": {...}}`.
const PY_TIMED: &str = r#"
resolver, name, n_udp, n_tcp = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
out = {"udp": [], "tcp": [], "codes": {}}
for i in range(n_udp + n_tcp):
    tcp = i >= n_udp
    start = time.perf_counter()
    try:
        if tcp:
            s = socket.create_connection((resolver, 53), timeout=3)
            q = query(name, i)
            s.sendall(struct.pack("!H", len(q)) + q)
            reply = recv_framed(s)
        else:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.settimeout(3)
            s.connect((resolver, 53))
            s.send(query(name, i))
            reply = s.recv(4096)
        code = rcode(reply)
    except OSError as e:
        code = "TIMEOUT" if isinstance(e, socket.timeout) else errno.errorcode.get(e.errno, str(e))
    s.close()
    out["tcp" if tcp else "udp"].append(round((time.perf_counter() - start) * 1000, 2))
    out["codes"][code] = out["codes"].get(code, 0) + 1
    time.sleep(0.05)
print(json.dumps(out), flush=True)
"#;

/// Sends a query for `argv[2]` over TCP to `argv[1]`:53, then another: prints the first
/// answer's code and whether the connection was closed after it.
const PY_TCP_TWICE: &str = r#"
s = socket.create_connection((sys.argv[1], 53), timeout=3)
q = query(sys.argv[2], 7)
s.sendall(struct.pack("!H", len(q)) + q)
first = rcode(recv_framed(s))
try:
    s.sendall(struct.pack("!H", len(q)) + q)
    second = "closed" if not recv_framed(s) else "open"
except OSError:
    second = "closed"
print(first, second)
"#;

/// Runs one of the scripts above (with [`PY_QUERY`]) in `cgroup`.
fn python_dns(cgroup: &TestCgroup, script: &str, args: &[&str]) -> Command {
    let mut command = cgroup.command("python3");
    command.arg("-c").arg(format!("{PY_QUERY}{script}")).args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    command
}

fn json_of(out: &std::process::Output) -> Value {
    serde_json::from_str(&stdout_of(out)).unwrap_or_else(|_| panic!("{}\n{}", stdout_of(out), stderr_of(out)))
}

#[test]
fn refused_query_events_keep_to_the_cgroups_event_budget() {
    if !privileged() {
        return;
    }
    let zone = r#"{"app.dns.test": {"A": ["10.214.159.1"]}}"#;
    let policies = format!(
        "{}{}",
        policy("flooder", "{W}", "deny", "      - allow: app.dns.test\n"),
        policy("quiet", "{C}/other", "deny", "      - allow: app.dns.test\n")
    );
    let lab = Lab::new(159, zone, &policies, "  events_per_second: 50\n");
    let other = lab.cgroup.child("other");
    thread::sleep(Duration::from_millis(500));
    let resolver = lab.resolver();
    let started = Instant::now();
    let flood =
        python_dns(&lab.workload, PY_FLOOD, &[&resolver, "n#.flood.dns.test", "1.5", "40"]).spawn().expect("flood");
    thread::sleep(Duration::from_millis(700));
    // Mid-flood: another cgroup's refusal has a budget of its own.
    let quiet = lab.dig(&other, &[&format!("@{resolver}"), "quiet.dns.test", "A"]);
    assert_eq!(quiet.status, "REFUSED", "{}", quiet.text);
    let flood = json_of(&flood.wait_with_output().expect("flood"));
    let elapsed = started.elapsed();
    let sent = flood["sent"].as_u64().unwrap_or(0);
    let refused = flood["codes"]["REFUSED"].as_u64().unwrap_or(0);
    assert!(refused >= 1_000, "the flood was answered: {flood}");
    lab.daemon().wait_event(Duration::from_secs(5), |e| e["domain"] == "quiet.dns.test");
    thread::sleep(Duration::from_millis(300));
    let written = lab
        .daemon()
        .events()
        .into_iter()
        .filter(|e| e["rule"] == "dns" && e["cgroup"] == lab.workload.relative.as_str())
        .count() as u64;
    // One budget per second the flood touched: at most ceil(elapsed) + 1 windows of 50.
    let windows = elapsed.as_secs() + 2;
    eprintln!("{sent} queries ({refused} REFUSED) in {elapsed:?}: {written} events written");
    assert!(written > 0 && written <= 50 * windows, "{written} events for {refused} refusals in {elapsed:?}");
    let status = lab.file.status_json();
    let row = status["cgroups"]
        .as_array()
        .and_then(|rows| rows.iter().find(|r| r["cgroup"] == lab.workload.relative.as_str()))
        .cloned()
        .unwrap_or_else(|| panic!("no status row: {status:#}"));
    let suppressed = row["suppressed"].as_u64().unwrap_or(0);
    assert!(suppressed + written >= refused, "suppressed {suppressed} + written {written} < {refused}: {row}");
}

#[test]
fn a_cgroup_flooding_the_proxy_does_not_delay_another_cgroups_answers() {
    if !privileged() {
        return;
    }
    let zone = r#"{"app.dns.test": {"A": ["10.214.160.1"]}, "slow.dns.test": {"silent": true}}"#;
    let policies = format!(
        "{}{}",
        policy("flooder", "{W}", "deny", "      - allow: slow.dns.test\n"),
        policy("victim", "{C}/other", "deny", "      - allow: app.dns.test\n")
    );
    let lab = Lab::new(160, zone, &policies, "");
    let other = lab.cgroup.child("other");
    thread::sleep(Duration::from_millis(500));
    let resolver = lab.resolver();

    // The attack: queries upstream never answers (each would hold a slot for 2 s) at 1,000 a
    // second, refused names at 1,000 a second, and 150 TCP connections held open.
    let attack = [
        python_dns(&lab.workload, PY_FLOOD, &[&resolver, "slow.dns.test", "6", "20"]).spawn().expect("flood"),
        python_dns(&lab.workload, PY_FLOOD, &[&resolver, "n#.refused.dns.test", "6", "20"]).spawn().expect("flood"),
        python_dns(&lab.workload, PY_HOLD_TCP, &[&resolver, "150", "8"]).spawn().expect("hold"),
    ];
    thread::sleep(Duration::from_millis(1_500));
    let timed = python_dns(&other, PY_TIMED, &[&resolver, "app.dns.test", "40", "10"]).output().expect("timed");
    let timed = json_of(&timed);
    let outputs: Vec<Value> =
        attack.into_iter().map(|child| json_of(&child.wait_with_output().expect("attack"))).collect();
    eprintln!("victim: {timed}\nattack: {outputs:?}");
    assert_eq!(timed["codes"]["NOERROR"], 50, "every answer came: {timed}");
    let mut times: Vec<f64> = ["udp", "tcp"]
        .iter()
        .flat_map(|t| timed[t].as_array().cloned().unwrap_or_default())
        .filter_map(|v| v.as_f64())
        .collect();
    times.sort_by(f64::total_cmp);
    let (median, slowest) = (times[times.len() / 2], times[times.len() - 1]);
    eprintln!("victim answers: median {median} ms, slowest {slowest} ms");
    assert!(slowest < 100.0, "slowest answer {slowest} ms (median {median} ms): {timed}");
    let slow = &outputs[0]["codes"];
    assert!(slow["SERVFAIL"].as_u64().unwrap_or(0) > 1_000, "over its share, answered at once: {slow}");
    assert!(outputs[2]["open"].as_u64().unwrap_or(999) <= 16, "TCP connections kept: {}", outputs[2]);
    assert!(lab.file.status_json()["dns_busy"].as_u64().unwrap_or(0) > 1_000);

    // A refused query over TCP closes the connection; an answered one keeps it.
    let twice = python_dns(&lab.workload, PY_TCP_TWICE, &[&resolver, "nope.dns.test"]).output().expect("tcp");
    assert_eq!(stdout_of(&twice), "REFUSED closed", "{}", stderr_of(&twice));
    let twice = python_dns(&other, PY_TCP_TWICE, &[&resolver, "app.dns.test"]).output().expect("tcp");
    assert_eq!(stdout_of(&twice), "NOERROR open", "{}", stderr_of(&twice));
}

#[test]
fn upstream_answers_that_do_not_echo_the_query_end_it_and_teach_nothing() {
    if !privileged() {
        return;
    }
    let zone = r#"{"good.dns.test": {"A": ["10.214.161.1"]},
        "case.dns.test": {"A": ["10.214.161.66"], "spoof": "case"},
        "id.dns.test": {"A": ["10.214.161.67"], "spoof": "id", "inject": "10.214.161.68"}}"#;
    let rules = "      - allow: good.dns.test\n      - allow: case.dns.test\n      - allow: id.dns.test\n";
    let lab = Lab::new(161, zone, &policy("names", "{W}", "deny", rules), "");
    let resolver = format!("@{}", lab.resolver());
    for (name, tcp) in
        [("case.dns.test", false), ("id.dns.test", false), ("case.dns.test", true), ("id.dns.test", true)]
    {
        let started = Instant::now();
        let args: &[&str] = if tcp { &["+tcp", &resolver, name, "A"] } else { &[&resolver, name, "A"] };
        let dig = lab.dig(&lab.workload, args);
        let elapsed = started.elapsed();
        assert_eq!(dig.status, "SERVFAIL", "{name} tcp={tcp}: {}", dig.text);
        assert!(elapsed < Duration::from_secs(1), "{name} tcp={tcp}: answered after {elapsed:?}");
    }
    for injected in ["10.214.161.66", "10.214.161.67", "10.214.161.68"] {
        assert_eq!(tcp_connect(&lab.workload, injected), "EPERM", "{injected} was learned");
    }
    // A resolver that echoes the question is answered, in the workload's own spelling.
    let good = lab.dig(&lab.workload, &[&resolver, "GoOd.DNS.test", "A"]);
    assert_eq!((good.status.as_str(), good.answers.clone()), ("NOERROR", vec!["10.214.161.1".to_string()]));
    assert!(good.text.contains(";GoOd.DNS.test."), "{}", good.text);
    let good_tcp = lab.dig(&lab.workload, &["+tcp", &resolver, "good.dns.test", "A"]);
    assert_eq!(good_tcp.status, "NOERROR", "{}", good_tcp.text);
    assert_eq!(tcp_connect(&lab.workload, "10.214.161.1"), "ok");
    assert_eq!(lab.file.status_json()["dns_upstream_mismatches"], 4);
}

/// Queries `argv[2]` (`#` replaced by 0, 1, ...) `argv[3]` times over UDP to `argv[1]`:53, one
/// at a time: prints `{"codes": {...}, "records": [answer records of each NOERROR reply]}`.
const PY_NAMES: &str = r##"
resolver, pattern, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect((resolver, 53))
s.settimeout(3)
codes, records = {}, []
for i in range(n):
    s.send(query(pattern.replace("#", str(i)), i))
    try:
        reply = s.recv(65535)
    except socket.timeout:
        reply = b""
    code = rcode(reply)
    codes[code] = codes.get(code, 0) + 1
    if code == "NOERROR":
        records.append(struct.unpack("!H", reply[6:8])[0])
print(json.dumps({"codes": codes, "records": records}))
"##;

#[test]
fn a_cgroup_flooding_learned_addresses_hits_its_quota_and_others_keep_resolving() {
    if !privileged() {
        return;
    }
    // Every name under the wildcard answers 1,000 addresses never seen before, for 3 s.
    let zone = r#"{"*.flood.dns.test": {"count": 1000, "from": "10.216.0.1", "ttl": 3},
        "app.dns.test": {"A": ["10.214.162.1"], "ttl": 60}}"#;
    let policies = format!(
        "{}{}",
        policy("flooder", "{W}", "deny", "      - allow: \"*.flood.dns.test\"\n"),
        policy(
            "victim",
            "{C}/other",
            "deny",
            "      - allow: app.dns.test\n        protocol: tcp\n        ports: [7000]\n"
        )
    );
    let lab = Lab::new(162, zone, &policies, "    min_ttl: 1\n    grace: 0\n    max_learned_per_cgroup: 256\n");
    let other = lab.cgroup.child("other");
    thread::sleep(Duration::from_millis(500));
    let resolver = lab.resolver();

    // 20 names of 1,000 addresses each: 32 learned per answer (the rest cut from the answer), so
    // 8 answers fill the quota of 256 and the other 12 get SERVFAIL.
    let flood =
        json_of(&python_dns(&lab.workload, PY_NAMES, &[&resolver, "n#.flood.dns.test", "20"]).output().expect("flood"));
    let status = lab.file.status_json();
    eprintln!("flood: {flood}");
    assert_eq!(flood["codes"]["NOERROR"], 8, "{flood}");
    assert_eq!(flood["codes"]["SERVFAIL"], 12, "{flood}");
    let records: Vec<u64> = flood["records"].as_array().unwrap().iter().filter_map(Value::as_u64).collect();
    assert!(records.iter().all(|n| *n == 32), "each answer carries the 32 addresses learned: {records:?}");
    let row = |status: &Value, cgroup: &str| {
        status["cgroups"]
            .as_array()
            .and_then(|rows| rows.iter().find(|r| r["cgroup"] == cgroup))
            .cloned()
            .unwrap_or_else(|| panic!("no status row for {cgroup}: {status:#}"))
    };
    assert_eq!(row(&status, &lab.workload.relative)["learned"], 256, "{status:#}");
    assert_eq!(status["dns_quota"], 12, "{status:#}");
    let fill = status["maps"].as_array().and_then(|maps| maps.iter().find(|m| m["map"] == "LEARNED")).cloned();
    let used = fill.as_ref().and_then(|f| f["used"].as_u64()).unwrap_or(u64::MAX);
    assert!(used <= 256, "the kernel map holds the quota, not 20 answers' worth: {fill:?}");
    let event = lab.daemon().wait_event(Duration::from_secs(5), |e| e["rule"] == "dns-quota");
    assert_eq!(event["verdict"], "blocked", "{event}");
    assert_eq!(event["cgroup"], lab.workload.relative.as_str(), "{event}");
    assert_eq!(event["domain"], "n8.flood.dns.test", "{event}");

    // Another cgroup under the same daemon still resolves and connects.
    let app = lab.dig(&other, &[&format!("@{resolver}"), "app.dns.test", "A"]);
    assert_eq!((app.status.as_str(), app.answers.clone()), ("NOERROR", vec!["10.214.162.1".to_string()]));
    assert_eq!(tcp_connect(&other, "10.214.162.1"), "ok");
    assert_eq!(row(&lab.file.status_json(), &other.relative)["learned"], 1);

    // Once its addresses expire, the flooding cgroup resolves again (over TCP too, capped).
    thread::sleep(Duration::from_secs(4));
    let again = lab.dig(&lab.workload, &["+tcp", &format!("@{resolver}"), "again.flood.dns.test", "A"]);
    assert_eq!(again.status, "NOERROR", "{}", again.text);
    assert_eq!(again.answers.len(), 32, "{}", again.text);
}
