//! The policy model: what a policy file means, independent of YAML and of the kernel maps.

use std::fmt;

use egress_common::proto;
use ipnet::IpNet;

pub use super::domain::DomainPattern;
use crate::{settings::Settings, yaml::Keyword};

macro_rules! keywords {
    ($($ty:ident: $kind:literal => [$($word:ident),+];)+) => {
        $(
            impl Keyword for $ty {
                const KIND: &'static str = $kind;
                const ALL: &'static [Self] = &[$($ty::$word),+];
                fn keyword(self) -> &'static str {
                    self.as_str()
                }
            }
        )+
    };
}

keywords! {
    Action: "action" => [Allow, Deny];
    Mode: "mode" => [Enforce, Audit];
    SocketKind: "socket kind" => [Packet, Mptcp, Other];
    Protocol: "protocol" => [Tcp, Udp, Icmp, Any];
    LogLevel: "log setting" => [Blocked, New, All];
}

/// What a rule (or a policy's default) does with a flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    Allow,
    Deny,
}

impl Action {
    /// The keyword used in policy files.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Deny => "deny",
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A kind of socket the per-flow hooks cannot judge, which a policy may let its cgroups open
/// (`allow_sockets`); every other covered cgroup is refused it at `socket()`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SocketKind {
    /// `AF_PACKET`: raw frames, outside the IP stack.
    Packet,
    /// Multipath TCP, whose later subflows a kernel worker opens.
    Mptcp,
    /// Every other family that leaves the host outside IP (`AF_XDP`, `AF_VSOCK`, ...).
    Other,
}

impl SocketKind {
    /// The keyword used in policy files.
    pub fn as_str(self) -> &'static str {
        match self {
            SocketKind::Packet => "packet",
            SocketKind::Mptcp => "mptcp",
            SocketKind::Other => "other",
        }
    }

    /// The kernel's `socket_kind` bit.
    pub fn bit(self) -> u32 {
        match self {
            SocketKind::Packet => egress_common::socket_kind::PACKET,
            SocketKind::Mptcp => egress_common::socket_kind::MPTCP,
            SocketKind::Other => egress_common::socket_kind::OTHER,
        }
    }
}

/// Which allowed flows raise an event (`log:`); blocked and audited flows always do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum LogLevel {
    /// Only blocked and audited flows.
    Blocked,
    /// Also the first time a workload reaches a destination (address, port, protocol) within
    /// an hour.
    #[default]
    New,
    /// Every allowed flow decision.
    All,
}

impl LogLevel {
    /// The keyword used in policy files.
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Blocked => "blocked",
            LogLevel::New => "new",
            LogLevel::All => "all",
        }
    }

    /// The kernel's `log::*` value.
    pub fn number(self) -> u8 {
        match self {
            LogLevel::Blocked => egress_common::log::BLOCKED,
            LogLevel::New => egress_common::log::NEW,
            LogLevel::All => egress_common::log::ALL,
        }
    }
}

/// How a policy applies its verdicts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Mode {
    /// Denied flows are refused.
    #[default]
    Enforce,
    /// Denied flows are reported and let through.
    Audit,
}

impl Mode {
    /// The keyword used in policy files.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Audit => "audit",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The protocols a rule can be limited to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Protocol {
    #[default]
    Any,
    Tcp,
    Udp,
    /// ICMP for IPv4 destinations, ICMPv6 for IPv6 ones.
    Icmp,
}

impl Protocol {
    /// The keyword used in policy files.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Any => "any",
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Icmp => "icmp",
        }
    }

    /// The protocol number the kernel programs compare with (`egress_common::proto`).
    pub fn number(self) -> u8 {
        match self {
            Protocol::Any => proto::ANY,
            Protocol::Tcp => proto::TCP,
            Protocol::Udp => proto::UDP,
            Protocol::Icmp => proto::ICMP,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An inclusive range of ports, `1 <= lo <= hi`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PortRange {
    pub lo: u16,
    pub hi: u16,
}

impl PortRange {
    /// Whether `port` lies in the range.
    pub fn contains(self, port: u16) -> bool {
        self.lo <= port && port <= self.hi
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.lo == self.hi {
            write!(f, "{}", self.lo)
        } else {
            write!(f, "{}-{}", self.lo, self.hi)
        }
    }
}

/// One `allow` or `deny` line of a policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub action: Action,
    /// Host bits clear; v4-mapped IPv6 CIDRs are stored as IPv4.
    pub net: IpNet,
    pub protocol: Protocol,
    /// Empty: every port, and also protocols without ports.
    pub ports: Vec<PortRange>,
    /// Line of the rule in its file (1-based), 0 when not read from a file.
    pub line: usize,
}

impl Rule {
    /// The rule in one line, e.g. `allow 127.0.0.1/32 tcp ports 80,8000-8080`.
    pub fn text(&self) -> String {
        rule_text(&format!("{} {}", self.action, self.net), self.protocol, &self.ports)
    }

    /// Whether the rule applies to every flow under its CIDR (any protocol, every port).
    pub fn is_catch_all(&self) -> bool {
        self.protocol == Protocol::Any && self.ports.is_empty()
    }
}

/// An `allow` rule that names a domain: the addresses the daemon's DNS proxy learns from
/// answers for matching names are allowed, with the rule's protocol and ports, until they expire.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NameRule {
    pub pattern: DomainPattern,
    pub protocol: Protocol,
    /// Empty: every port, and also protocols without ports.
    pub ports: Vec<PortRange>,
    /// Line of the rule in its file (1-based), 0 when not read from a file.
    pub line: usize,
}

impl NameRule {
    /// The rule in one line, e.g. `allow *.example.com tcp ports 443`.
    pub fn text(&self) -> String {
        rule_text(&format!("allow {}", self.pattern), self.protocol, &self.ports)
    }
}

/// A rule in one line: what it matches, then its protocol and ports where it names them.
fn rule_text(head: &str, protocol: Protocol, ports: &[PortRange]) -> String {
    let mut text = head.to_owned();
    if protocol != Protocol::Any {
        text.push(' ');
        text.push_str(protocol.as_str());
    }
    if !ports.is_empty() {
        let ports: Vec<String> = ports.iter().map(ToString::to_string).collect();
        text.push_str(" ports ");
        text.push_str(&ports.join(","));
    }
    text
}

/// Which cgroups a policy governs.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Selector {
    /// A cgroup path or glob relative to the cgroup2 mount, normalised to `a/b/c` (no leading or
    /// trailing `/`, no empty or `.` components). `*` matches within one path component, `?` one
    /// character, and a `**` component any number of components.
    Cgroup(String),
    /// A systemd unit name such as `nginx.service`: the cgroups named after it.
    SystemdUnit(String),
    /// A container id, an id prefix of at least 4 hex digits, or a container name.
    Container(String),
}

impl Selector {
    /// The key used in policy files: `cgroup`, `systemd_unit` or `container`.
    pub fn kind(&self) -> &'static str {
        match self {
            Selector::Cgroup(_) => "cgroup",
            Selector::SystemdUnit(_) => "systemd_unit",
            Selector::Container(_) => "container",
        }
    }

    /// The path, glob, unit or container as written (cgroup paths normalised).
    pub fn value(&self) -> &str {
        match self {
            Selector::Cgroup(v) | Selector::SystemdUnit(v) | Selector::Container(v) => v,
        }
    }

    /// Whether this is a `cgroup` selector with a wildcard (`*`, `?` or `**`).
    pub fn is_glob(&self) -> bool {
        match self {
            Selector::Cgroup(pattern) => crate::cgroup::is_glob(pattern),
            Selector::SystemdUnit(_) | Selector::Container(_) => false,
        }
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.kind(), self.value())
    }
}

/// Whether a cgroup path (relative, normalised, "" for root) matches a cgroup glob or plain path.
///
/// `*` matches any run of characters within one path component (never `/`), `?` exactly one
/// character, and a component that is exactly `**` matches zero or more whole components. A
/// pattern without wildcards matches only the identical path. Empty components (doubled, leading
/// or trailing `/`) are ignored on both sides.
pub fn cgroup_glob_matches(pattern: &str, path: &str) -> bool {
    let pattern: Vec<&str> = pattern.split('/').filter(|c| !c.is_empty()).collect();
    let path: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
    wildcard_match(&pattern, &path, |p| *p == "**", |p, c| component_matches(p, c))
}

/// Whether one path component matches one pattern component (`*` and `?` wildcards).
fn component_matches(pattern: &str, component: &str) -> bool {
    let pattern: Vec<char> = pattern.chars().collect();
    let component: Vec<char> = component.chars().collect();
    wildcard_match(&pattern, &component, |p| *p == '*', |p, c| *p == '?' || p == c)
}

/// Matches `text` against `pattern`, where `is_star` elements match any run of elements and other
/// elements match one element as `one` says. The greedy algorithm with one backtrack point: at
/// most `pattern.len() * text.len()` steps, never exponential.
fn wildcard_match<P, T>(pattern: &[P], text: &[T], is_star: impl Fn(&P) -> bool, one: impl Fn(&P, &T) -> bool) -> bool {
    let (mut p, mut t) = (0, 0);
    // After the last star seen: the pattern index following it and the text index it resumes at.
    let mut backtrack: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some(element) if is_star(element) => {
                p += 1;
                backtrack = Some((p, t));
            }
            Some(element) if one(element, &text[t]) => {
                p += 1;
                t += 1;
            }
            _ => match backtrack {
                Some((after_star, resume)) => {
                    p = after_star;
                    t = resume + 1;
                    backtrack = Some((after_star, resume + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(is_star)
}

/// The rules applied to the cgroups a selector names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub name: String,
    /// Which cgroups the policy governs.
    pub selector: Selector,
    /// What happens when no rule matches.
    pub default: Action,
    pub mode: Mode,
    /// Which allowed flows raise an event.
    pub log: LogLevel,
    pub rules: Vec<Rule>,
    /// Rules that name domains; their kernel rule ids follow the CIDR rules'
    /// (`rules.len() + index`).
    pub names: Vec<NameRule>,
    /// Socket kinds outside the flow hooks' view that the policy allows.
    pub allow_sockets: Vec<SocketKind>,
}

impl Policy {
    /// One line for logs and status output, e.g.
    /// `demo: cgroup egress-demo, default deny, mode enforce, 2 rules (1 IPv4, 1 IPv6)`.
    pub fn summary(&self) -> String {
        let v4 = self.rules.iter().filter(|r| r.net.addr().is_ipv4()).count();
        let v6 = self.rules.len() - v4;
        let names = if self.names.is_empty() { String::new() } else { format!(", {} name rules", self.names.len()) };
        format!(
            "{}: {}, default {}, mode {}, {} rules ({v4} IPv4, {v6} IPv6){names}",
            self.name,
            self.selector,
            self.default,
            self.mode,
            self.rules.len(),
        )
    }

    /// The kernel rule id of name rule `index`.
    pub fn name_rule_id(&self, index: usize) -> u32 {
        (self.rules.len() + index) as u32
    }

    /// Every rule's text, indexed by kernel rule id.
    pub fn rule_texts(&self) -> Vec<String> {
        self.rules.iter().map(Rule::text).chain(self.names.iter().map(NameRule::text)).collect()
    }
}

/// Everything one policy file says.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicySet {
    pub settings: Settings,
    pub policies: Vec<Policy>,
}
