//! The policy model: what a policy file means, independent of YAML and of the kernel maps.

use std::fmt;

use egress_common::proto;
use ipnet::IpNet;

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
        let mut text = format!("{} {}", self.action, self.net);
        if self.protocol != Protocol::Any {
            text.push(' ');
            text.push_str(self.protocol.as_str());
        }
        if !self.ports.is_empty() {
            let ports: Vec<String> = self.ports.iter().map(ToString::to_string).collect();
            text.push_str(" ports ");
            text.push_str(&ports.join(","));
        }
        text
    }

    /// Whether the rule applies to every flow under its CIDR (any protocol, every port).
    pub fn is_catch_all(&self) -> bool {
        self.protocol == Protocol::Any && self.ports.is_empty()
    }
}

/// The rules of one cgroup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub name: String,
    /// cgroup v2 path relative to the cgroup2 mount, without leading or trailing `/`.
    pub cgroup: String,
    /// What happens when no rule matches.
    pub default: Action,
    pub mode: Mode,
    pub rules: Vec<Rule>,
}

impl Policy {
    /// One line for logs and status output.
    pub fn summary(&self) -> String {
        let v4 = self.rules.iter().filter(|r| r.net.addr().is_ipv4()).count();
        let v6 = self.rules.len() - v4;
        format!(
            "{}: cgroup {}, default {}, mode {}, {} rules ({v4} IPv4, {v6} IPv6)",
            self.name,
            self.cgroup,
            self.default,
            self.mode,
            self.rules.len(),
        )
    }
}

/// Every policy of one policy file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicySet {
    pub policies: Vec<Policy>,
}
