//! Bounded fuzzing of what `egress check` runs on a file (decode, parse, compile): random bytes,
//! random YAML-ish text, and mutations of real policy files must never panic or hang, and every
//! rejection must say `FILE:LINE:COL: message`. A few thousand cases, seconds in release.

use std::time::{Duration, Instant};

use proptest::{prelude::*, sample::Index};

use super::doc::MAX_RULES;
use super::validate::validate_policy_str;
use crate::yaml::{file_text as policy_text, ConfigError};

const FILE: &str = "fuzz.yaml";

/// Much more than a case takes in release (well under 10 ms); a hang fails instead of stalling.
const CASE_LIMIT: Duration = Duration::from_secs(5);

/// The shipped example.
const SHIPPED: &str = include_str!("../../../config/egress.yaml");

/// The policy-file example of an earlier README (docs/policy.md has today's).
const README_EXAMPLE: &str = "\
settings:                      # all optional
  attach: egress-demo          # where the programs are attached once (default: the cgroup2 root)
  history: 10000               # events kept in memory for `egress logs`
  control_socket: /run/egress/control.sock
  control_group: adm           # a group that may use the control socket besides root
  metrics: 127.0.0.1:9154      # Prometheus /metrics; off unless set
  pin_dir: /sys/fs/bpf/egress  # where programs' links and maps are pinned
policies:
  - name: demo
    cgroup: egress-demo        # cgroup v2 path relative to the cgroup2 mount
    default: deny              # deny | allow: when no rule matches
    mode: enforce              # enforce | audit (log what would be blocked, block nothing)
    rules:
      - allow: 127.0.0.1       # an address or a CIDR, IPv4 or IPv6
        protocol: tcp          # tcp | udp | icmp | any (default any)
        ports: [80, 8000-8080] # single ports and ranges; default all ports
      - deny: 127.0.0.0/8
";

/// Every selector kind, IPv6 and v4-mapped CIDRs, icmp, audit, flow-style maps and an anchor.
const SELECTORS: &str = "\
settings:
  attach: /
  history: 1_000
policies:
  - name: web
    systemd_unit: nginx.service
    default: allow
    rules: &common
      - deny: 10.0.0.0/8
        protocol: udp
        ports: 53
      - deny: fd00::/8
      - {allow: \"::ffff:10.1.0.0/112\", protocol: tcp, ports: [443, \"8000-8080\"]}
  - name: pods
    cgroup: kubepods.slice/**/cri-containerd-*.scope
    mode: audit
    rules: *common
  - name: db
    container: 3f2a9c1b
    rules:
      - allow: 192.168.0.0/16
        protocol: icmp
      - deny: 0.0.0.0/0
        protocol: any
";

const SEEDS: [&str; 3] = [SHIPPED, README_EXAMPLE, SELECTORS];

/// Runs the check on `bytes` and holds the outcome to the contract.
fn check_bytes(bytes: Vec<u8>) -> Result<(), TestCaseError> {
    // libyaml also breaks lines at CR, NEL, LS and PS: an upper bound on the lines it counts.
    let breaks = ['\n', '\r', '\u{85}', '\u{2028}', '\u{2029}'];
    let lines = String::from_utf8_lossy(&bytes).chars().filter(|c| breaks.contains(c)).count() + 1;
    let started = Instant::now();
    let result = policy_text(bytes, FILE).and_then(|text| validate_policy_str(&text, FILE));
    let took = started.elapsed();
    prop_assert!(took < CASE_LIMIT, "the check took {took:?}");
    match result {
        Ok(set) => {
            for policy in &set.policies {
                let _ = policy.summary();
            }
        }
        Err(err) => assert_positioned(&err, lines)?,
    }
    Ok(())
}

fn assert_positioned(err: &ConfigError, lines: usize) -> Result<(), TestCaseError> {
    prop_assert!(err.line >= 1 && err.column >= 1, "no position: {err:?}");
    // One past the last line is where an unterminated construct ends.
    prop_assert!(err.line <= lines + 1, "line {} of {lines}: {err:?}", err.line);
    prop_assert!(!err.message.trim().is_empty(), "no message: {err:?}");
    let rendered = err.to_string();
    let prefix = format!("{FILE}:{}:{}: ", err.line, err.column);
    prop_assert!(rendered.starts_with(&prefix), "{rendered:?} does not start with {prefix:?}");
    Ok(())
}

/// One edit of a file.
#[derive(Clone, Debug)]
enum Mutation {
    FlipBit(Index, u8),
    Delete(Index, usize),
    Insert(Index, &'static str),
    DuplicateLine(Index),
    SwapLines(Index, Index),
    Truncate(Index),
    /// Replaces the scalar after a `: ` with this.
    ReplaceValue(Index, &'static str),
    Nest(Index, usize, bool),
}

/// Bits of YAML syntax, odd scalars and odd bytes.
const PUNCTUATION: &[&str] = &[
    ":",
    ": ",
    "- ",
    "-",
    "[",
    "]",
    "{",
    "}",
    ",",
    "&a ",
    "*a",
    "*a ",
    "&b [*a, *a, *a] ",
    "!!str ",
    "!!binary ",
    "!<tag> ",
    "|",
    ">-",
    "'",
    "\"",
    "\\",
    "#",
    "---\n",
    "...\n",
    "\t",
    "\n",
    "\r\n",
    "? ",
    "%YAML 1.2\n",
    "%TAG ! tag:x,2000:\n",
    "<<: *a\n",
    "\u{feff}",
    "\0",
    "\u{85}",
    "\u{2028}",
    "~",
    "null",
    " ",
    "    ",
];

/// Values that stress number and address parsing.
const VALUES: &[&str] = &[
    "99999999999999999999999999999999",
    "-1",
    "0",
    "65536",
    "4294967296",
    "18446744073709551616",
    "1e400",
    ".nan",
    "-.inf",
    "0x50",
    "0o17",
    "1_000_000_000_000",
    "80-",
    "-80",
    "8080-80",
    "1.2.3.4/33",
    "::/129",
    "::ffff:1.2.3.4/200",
    "300.1.1.1",
    "\"\"",
    "''",
    "[]",
    "{}",
    "[[[[]]]]",
    "*undefined",
    "!!int 12",
    "yes",
    "/",
    "../..",
    "\"\\u0000\"",
    "\"\\x1b[2K\"",
];

impl Mutation {
    fn apply(&self, bytes: &mut Vec<u8>) {
        let at = |i: &Index, len: usize| if len == 0 { 0 } else { i.index(len + 1) };
        match self {
            Mutation::FlipBit(i, bit) if !bytes.is_empty() => {
                let pos = i.index(bytes.len());
                bytes[pos] ^= 1 << (bit % 8);
            }
            Mutation::FlipBit(..) => {}
            Mutation::Delete(i, len) => {
                let start = at(i, bytes.len());
                let end = (start + len).min(bytes.len());
                bytes.drain(start..end);
            }
            Mutation::Insert(i, text) => {
                let pos = at(i, bytes.len());
                bytes.splice(pos..pos, text.bytes());
            }
            Mutation::DuplicateLine(i) => {
                let mut lines = split_lines(bytes);
                let n = i.index(lines.len());
                lines.insert(n, lines[n].clone());
                *bytes = lines.concat();
            }
            Mutation::SwapLines(a, b) => {
                let mut lines = split_lines(bytes);
                let len = lines.len();
                lines.swap(a.index(len), b.index(len));
                *bytes = lines.concat();
            }
            Mutation::Truncate(i) => bytes.truncate(at(i, bytes.len())),
            Mutation::ReplaceValue(i, value) => {
                let starts: Vec<usize> =
                    bytes.windows(2).enumerate().filter(|(_, w)| w == b": ").map(|(n, _)| n + 2).collect();
                if starts.is_empty() {
                    return;
                }
                let start = starts[i.index(starts.len())];
                let end =
                    bytes[start..].iter().position(|&b| b == b'\n' || b == b' ').map_or(bytes.len(), |n| start + n);
                bytes.splice(start..end, value.bytes());
            }
            Mutation::Nest(i, depth, flow) => {
                let pos = at(i, bytes.len());
                let nested = if *flow {
                    format!("{}{}", "[".repeat(*depth), "]".repeat(*depth))
                } else {
                    (0..*depth).map(|d| format!("{}- \n", " ".repeat(d * 2))).collect()
                };
                bytes.splice(pos..pos, nested.into_bytes());
            }
        }
    }
}

/// Lines with their newlines, at least one.
fn split_lines(bytes: &[u8]) -> Vec<Vec<u8>> {
    let mut lines: Vec<Vec<u8>> = bytes.split_inclusive(|&b| b == b'\n').map(<[u8]>::to_vec).collect();
    if lines.is_empty() {
        lines.push(Vec::new());
    }
    lines
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        3 => (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::FlipBit(i, b)),
        2 => (any::<Index>(), 1..64usize).prop_map(|(i, n)| Mutation::Delete(i, n)),
        3 => (any::<Index>(), prop::sample::select(PUNCTUATION)).prop_map(|(i, t)| Mutation::Insert(i, t)),
        1 => any::<Index>().prop_map(Mutation::DuplicateLine),
        1 => (any::<Index>(), any::<Index>()).prop_map(|(a, b)| Mutation::SwapLines(a, b)),
        1 => any::<Index>().prop_map(Mutation::Truncate),
        3 => (any::<Index>(), prop::sample::select(VALUES)).prop_map(|(i, v)| Mutation::ReplaceValue(i, v)),
        1 => (any::<Index>(), 1..300usize, any::<bool>()).prop_map(|(i, d, f)| Mutation::Nest(i, d, f)),
    ]
}

/// YAML built to expand: `levels` anchors, each a list of `width` aliases of the one before,
/// so the last one stands for `width^levels` copies of the innermost value.
fn laughs(levels: usize, width: usize, innermost: &str, indent: &str) -> String {
    let mut out = format!("{indent}- &l0 {innermost}\n");
    for level in 1..=levels {
        let refs = vec![format!("*l{}", level - 1); width].join(", ");
        out.push_str(&format!("{indent}- &l{level} [{refs}]\n"));
    }
    out
}

/// A policy file with an alias bomb: nested aliases where the schema takes no nesting (rules,
/// ports, merge keys, an unknown key), or one level of aliases repeating many rules in many
/// policies, which the parser's rule budget ends.
fn bomb_file(place: usize, levels: usize, width: usize) -> String {
    let head = "policies:\n  - name: p\n    cgroup: c\n    rules:\n";
    match place % 6 {
        0 => format!("{head}{}", laughs(levels, width, "{deny: 10.0.0.0/8}", "      ")),
        1 => format!(
            "{head}      - allow: 10.0.0.0/8\n        protocol: tcp\n        ports:\n{}",
            laughs(levels, width, "80", "          ")
        ),
        2 => {
            let mut out = format!("{head}      - &m0 {{deny: 10.0.0.0/8}}\n");
            for level in 1..=levels {
                let refs = vec![format!("*m{}", level - 1); width].join(", ");
                out.push_str(&format!("      - &m{level} {{<<: [{refs}]}}\n"));
            }
            out
        }
        3 => format!("junk:\n{}policies: []\n", laughs(levels, width, "x", "  ")),
        // Many policies sharing one rule list, and many rules sharing one port list.
        _ => {
            let ports = if place % 6 == 5 { ", ports: *ports" } else { "" };
            let rules = vec![format!("{{deny: 10.0.0.0/8, protocol: tcp{ports}}}"); width * 4].join(", ");
            let mut out = format!(
                "policies:\n  - name: p0\n    cgroup: c0\n    rules:\n      \
                 - {{allow: \"::1\", protocol: tcp, ports: &ports [1, 2]}}\n  \
                 - name: p1\n    cgroup: c1\n    rules: &r [{rules}]\n"
            );
            for n in 2..=levels * width * 8 {
                out.push_str(&format!("  - {{name: p{n}, cgroup: c{n}, rules: *r}}\n"));
            }
            out
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_are_rejected_with_a_position_or_accepted(
        bytes in prop::collection::vec(any::<u8>(), 0..1024),
        as_text in any::<bool>(),
    ) {
        // Raw bytes are almost never UTF-8; half the cases decode them so the parser sees them.
        let bytes = if as_text { String::from_utf8_lossy(&bytes).into_owned().into_bytes() } else { bytes };
        check_bytes(bytes)?;
    }

    #[test]
    fn random_yaml_like_text_is_rejected_with_a_position_or_accepted(
        text in "([a-z0-9 :,./*&!|>'\"#@%?~\\[\\]{}\\-\\t\\n]|policies|rules|allow|deny|ports|name|cgroup|settings){0,200}"
    ) {
        check_bytes(text.into_bytes())?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2500, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn mutated_policy_files_are_rejected_with_a_position_or_accepted(
        seed in prop::sample::select(&SEEDS[..]),
        edits in prop::collection::vec(mutation(), 1..8),
    ) {
        let mut bytes = seed.as_bytes().to_vec();
        for edit in &edits {
            edit.apply(&mut bytes);
        }
        check_bytes(bytes)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 120, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn alias_bombs_end_quickly_with_a_position(place in 0..6usize, levels in 1..10usize, width in 1..10usize) {
        check_bytes(bomb_file(place, levels, width).into_bytes())?;
    }
}

#[test]
fn seeds_are_valid_policy_files() {
    for seed in SEEDS {
        if let Err(err) = validate_policy_str(seed, FILE) {
            panic!("{err}\n{seed}");
        }
    }
}

/// The classic bombs at full size: `9^9` copies if expanded.
#[test]
fn billion_laughs_fail_fast_with_a_position() {
    for place in 0..6 {
        let text = bomb_file(place, 9, 9);
        let started = Instant::now();
        let result = validate_policy_str(&text, FILE);
        assert!(started.elapsed() < CASE_LIMIT, "place {place}: {:?}", started.elapsed());
        let err = result.expect_err("a bomb is not a valid file");
        assert!(err.line >= 1 && err.column >= 1, "place {place}: {err}");
    }
}

/// Aliases may repeat rules up to the kernel's capacity, and no further.
#[test]
fn rule_repetition_through_aliases_is_bounded() {
    let rules = vec!["{deny: 10.0.0.0/8}"; 1000].join(", ");
    let mut text = format!("policies:\n  - name: p0\n    cgroup: c0\n    rules: &r [{rules}]\n");
    let policies = MAX_RULES / 1000 + 1;
    for n in 1..policies {
        text.push_str(&format!("  - {{name: p{n}, cgroup: c{n}, rules: *r}}\n"));
    }
    let started = Instant::now();
    let err = validate_policy_str(&text, FILE).expect_err("more rules than the maps hold");
    eprintln!("{} bytes expanding to {} rules: {:?}: {err}", text.len(), policies * 1000, started.elapsed());
    assert!(err.message.contains("rules (counting each repetition"), "{err}");
    // At the repeated rule, in the anchored list.
    assert_eq!(err.line, 4, "{err}");
}

#[test]
fn errors_serde_norway_leaves_unplaced_get_a_position() {
    let at = |text: &str| {
        let err = validate_policy_str(text, FILE).expect_err(text);
        (err.line, err.column, err.message)
    };
    let (line, column, message) = at("");
    assert_eq!((line, column), (1, 1), "{message}");
    let (line, column, message) = at("policies: []\n---\npolicies: []\n");
    assert_eq!((line, column), (2, 1), "{message}");
    assert!(message.contains("more than one document"), "{message}");
}

#[test]
fn bytes_that_are_not_utf8_are_an_error_at_their_position() {
    let err = policy_text(b"policies:\n  - name: \xc3\x28\n".to_vec(), FILE).expect_err("not UTF-8");
    assert_eq!((err.line, err.column), (2, 11), "{err}");
    assert_eq!(err.to_string(), "fuzz.yaml:2:11: the file is not UTF-8 text");
}

#[test]
fn too_many_port_rules_point_at_the_rule() {
    let ports: Vec<String> = (1..=17).map(|p| p.to_string()).collect();
    let text = format!(
        "policies:\n  - name: p\n    cgroup: c\n    rules:\n      - allow: 10.0.0.0/8\n        ports: [{}]\n",
        ports.join(", ")
    );
    let err = validate_policy_str(&text, FILE).expect_err("17 port ranges");
    assert_eq!(err.line, 6, "{err}");
    assert!(err.message.contains("more than 16 port ranges"), "{err}");
    // Spread over two rules of one CIDR, the compiler finds it: the first rule's line.
    let half = |from: u16| (from..from + 9).map(|p| p.to_string()).collect::<Vec<_>>().join(", ");
    let text = format!(
        "policies:\n  - name: p\n    cgroup: c\n    rules:\n      - allow: 10.0.0.0/8\n        ports: [{}]\n      \
         - deny: 10.0.0.0/8\n        ports: [{}]\n",
        half(1),
        half(100)
    );
    let err = validate_policy_str(&text, FILE).expect_err("18 port ranges");
    assert_eq!((err.line, err.column), (5, 9), "{err}");
    assert!(err.message.contains("port-specific rules"), "{err}");
}
