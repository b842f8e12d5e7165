//! Safe rollouts (issue 19): `egress explain` agrees with the kernel. Random policies over
//! loopback and a test namespace's addresses (subnets 200-219), random TCP and UDP connects from
//! a real cgroup: the kernel's verdict (EPERM, or the connect going through to a refusal by the
//! peer) and the rule its event names are what `egress explain` says of the same flow.

mod common;

use std::{collections::BTreeMap, process::Command, time::Duration};

use common::*;

/// xorshift64*: reproducible random cases without a dependency; the seed is printed on failure.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

/// `(protocol, host, port)` connects, one per line of stdin; prints `ok`, or the errno name.
/// A connection the peer refuses (ECONNREFUSED) got past the hooks: it counts as allowed.
const PY_CONNECTS: &str = r#"
import socket, sys, errno
for line in sys.stdin:
    proto, host, port = line.split()
    fam = socket.AF_INET6 if ':' in host else socket.AF_INET
    kind = socket.SOCK_STREAM if proto == 'tcp' else socket.SOCK_DGRAM
    s = socket.socket(fam, kind)
    s.settimeout(2)
    try:
        s.connect((host, int(port)))
        print("ok", flush=True)
    except socket.timeout:
        print("TIMEOUT", flush=True)
    except OSError as e:
        print(errno.errorcode.get(e.errno, str(e.errno)), flush=True)
    s.close()
"#;

const SUBNET: u8 = 200;

fn random_rules(rng: &mut Rng) -> String {
    let nets = [
        "127.0.0.0/8",
        "127.213.0.0/16",
        "127.213.200.0/24",
        "127.213.200.0/28",
        "127.213.200.8/29",
        "127.213.200.4/30",
        "127.213.200.5/32",
        "127.213.200.9/32",
        "10.213.200.0/24",
        "10.213.200.2/32",
        "::1/128",
        "::/0",
        "fd00:e9e5:200::/64",
        "fd00:e9e5:200::2/128",
    ];
    let ports = ["", "80", "443", "[80, 443]", "8000-8080", "53"];
    let mut rules = String::new();
    for _ in 0..(3 + rng.below(8)) {
        let action = if rng.below(2) == 0 { "allow" } else { "deny" };
        rules += &format!("      - {action}: \"{}\"\n", rng.pick(&nets));
        match rng.below(3) {
            0 => {}
            1 => rules += "        protocol: tcp\n",
            _ => rules += "        protocol: udp\n",
        }
        let port = rng.pick(&ports);
        if !port.is_empty() {
            rules += &format!("        ports: {port}\n");
        }
    }
    rules
}

fn random_flow(rng: &mut Rng) -> (String, String, u16) {
    let hosts = [
        "127.0.0.1",
        "127.213.200.1",
        "127.213.200.5",
        "127.213.200.6",
        "127.213.200.9",
        "127.213.200.77",
        "127.213.9.1",
        "127.9.9.9",
        "10.213.200.2",
        "::1",
        "fd00:e9e5:200::2",
    ];
    let protocol = if rng.below(2) == 0 { "tcp" } else { "udp" };
    let port = *rng.pick(&[22u16, 53, 80, 443, 8000, 8050, 8080, 8081]);
    (protocol.to_string(), rng.pick(&hosts).to_string(), port)
}

fn target(host: &str, port: u16, protocol: &str) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}/{protocol}")
    } else {
        format!("{host}:{port}/{protocol}")
    }
}

/// `(allowed, rule)` from `egress explain`'s verdict line.
fn explained(file: &PolicyFile, host: &str, port: u16, protocol: &str) -> (bool, String) {
    let out = Command::new(egress_bin())
        .args(["explain", "--policy", "rollout", "--config"])
        .arg(&file.path)
        .arg(target(host, port, protocol))
        .output()
        .expect("run egress explain");
    let text = stdout_of(&out);
    assert!(out.status.success(), "egress explain failed: {}", stderr_of(&out));
    let verdict = text.lines().find_map(|l| l.trim().strip_prefix("verdict: ")).unwrap_or_else(|| panic!("{text}"));
    let rule = verdict.split_once("rule `").and_then(|(_, r)| r.strip_suffix('`')).unwrap_or_else(|| panic!("{text}"));
    (verdict.starts_with("allowed"), rule.to_string())
}

#[test]
fn explain_agrees_with_the_kernel_on_random_flows() {
    if !privileged() {
        return;
    }
    let _ns = NetNs::new(SUBNET);
    let seed = std::env::var("EGRESS_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x5eed_1900_u64);
    let mut rng = Rng(seed);
    let mut compared = 0;
    for round in 0..4 {
        let cg = TestCgroup::new("explain");
        let default = if rng.below(2) == 0 { "allow" } else { "deny" };
        let rules = random_rules(&mut rng);
        let file = PolicyFile::attached_at(
            Some(&cg.relative),
            &format!(
                "policies:\n  - name: rollout\n    cgroup: {}\n    default: {default}\n    log: all\n    rules:\n{rules}",
                cg.relative
            ),
        );
        let daemon = Daemon::start(&file);
        let flows: BTreeMap<(String, String, u16), ()> = (0..40).map(|_| (random_flow(&mut rng), ())).collect();
        let input: String = flows.keys().map(|(p, h, port)| format!("{p} {h} {port}\n")).collect();
        let mut cmd = cg.command("python3");
        cmd.arg("-c").arg(PY_CONNECTS);
        let results = run_connects(cmd, &input);
        assert_eq!(results.len(), flows.len(), "round {round}: {results:?}");
        for ((protocol, host, port), result) in flows.keys().zip(&results) {
            let context = format!("seed {seed:#x} round {round} {protocol} {host}:{port} -> {result}\nrules:\n{rules}");
            let kernel_allowed = match result.as_str() {
                "ok" | "ECONNREFUSED" => true,
                "EPERM" => false,
                other => panic!("unexpected connect result {other}: {context}"),
            };
            let (allowed, rule) = explained(&file, host, *port, protocol);
            assert_eq!(allowed, kernel_allowed, "verdict: {context}");
            let verdict = if kernel_allowed { "allowed" } else { "blocked" };
            let event = daemon.wait_event(Duration::from_secs(5), |e| {
                e["verdict"] == verdict
                    && e["dst"] == host.as_str()
                    && e["dport"] == *port
                    && e["protocol"] == protocol.as_str()
            });
            assert_eq!(event["rule"], rule.as_str(), "rule: {context}");
            compared += 1;
        }
        daemon.stop();
    }
    assert!(compared >= 100, "only {compared} flows compared");
}

fn run_connects(mut cmd: Command, input: &str) -> Vec<String> {
    use std::io::Write;
    let mut child =
        cmd.stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::piped()).spawn().expect("start python3");
    child.stdin.take().expect("stdin").write_all(input.as_bytes()).expect("write flows");
    let out = child.wait_with_output().expect("python3");
    String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect()
}
