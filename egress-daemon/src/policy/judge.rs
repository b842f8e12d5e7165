//! The kernel's judgement of a flow (`judge` in `egress-ebpf/src/policy.rs`) run in userspace:
//! the same compiled map entries, the trie's longest-prefix lookup emulated, then
//! egress-common's port-table scan, learned-address check and DNS-bypass test. `egress
//! explain`, `egress replay` and candidate verdicts use it, so they answer what the kernel would,
//! not what a second reading of the rules says. Costs nothing in the kernel.

use std::net::IpAddr;

use egress_common::{action, family, lookup, mode, rule_id, verdict, Decision, PolicyInfo, PortTable};
use ipnet::IpNet;

use super::{
    compile::{compile_set, name_rule_entries, CompileError, CompiledSet},
    model::{Policy, PolicySet},
};

/// A destination as the kernel programs see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Flow {
    pub dst: IpAddr,
    /// IP protocol number (ICMPv6 is judged as ICMP).
    pub protocol: u8,
    /// Destination port; ignored for protocols without ports.
    pub port: u16,
}

/// What the kernel would do with a flow, and from which step of its judgement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Judgement {
    /// `verdict::*`: allowed, blocked, or audit (refused by a policy in audit mode).
    pub verdict: u8,
    /// Kernel rule id: an index into [`Policy::rule_texts`], or a `rule_id::*`.
    pub rule: u32,
    /// The longest CIDR of the policy holding the destination (the trie leaf), if any.
    pub leaf: Option<IpNet>,
    /// The leaf's port table decided (not its fallback).
    pub by_port_rule: bool,
    /// A learned address of a name rule decided.
    pub learned: bool,
}

impl Judgement {
    /// Allowed (audit counts as refused: enforced, it would be).
    pub fn allows(&self) -> bool {
        self.verdict == verdict::ALLOWED
    }
}

/// One policy compiled as the kernel holds it, ready to judge flows.
pub struct Judge {
    policy: Policy,
    info: PolicyInfo,
    /// Slot 0 of a set of this one policy: the trie keys of other slots never match it.
    compiled: CompiledSet,
}

impl Judge {
    pub fn new(policy: &Policy) -> Result<Self, CompileError> {
        let set = PolicySet { settings: Default::default(), policies: vec![policy.clone()] };
        let compiled = compile_set(&set, &[0], 1)?;
        let info = compiled.policies[0].info;
        Ok(Judge { policy: policy.clone(), info, compiled })
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The kernel's judgement of `flow` for a sender whose bound cgroup learned the destination
    /// from answers allowed by the name rules `learned` (indexes into `policy.names`; empty
    /// offline). A UDP reply to a peer that wrote first is not modelled (the kernel allows it).
    pub fn judge(&self, flow: Flow, learned: &[usize]) -> Judgement {
        let dst = flow.dst.to_canonical();
        let protocol = lookup::normalise_protocol(flow.protocol);
        let port = lookup::rule_port(protocol, flow.port);
        let none = Judgement { verdict: verdict::ALLOWED, rule: 0, leaf: None, by_port_rule: false, learned: false };
        if lookup::has_ports(protocol) && port == 0 {
            return self.refused(Judgement { rule: rule_id::PORT_ZERO, ..none });
        }
        let leaf = self.leaf(dst);
        let (decided, rule, by_port_rule) = match &leaf {
            Some((_, decision, table)) => {
                let by_port = table.and_then(|t| lookup::port_rule(t, protocol, port)).is_some();
                let (decided, rule) = lookup::resolve(decision, *table, protocol, port);
                (decided, rule, by_port)
            }
            None => (self.info.default_action, rule_id::DEFAULT, false),
        };
        let leaf = leaf.map(|(net, ..)| net);
        let found = Judgement { rule, leaf, by_port_rule, ..none };
        if !self.policy.names.is_empty() {
            let explicit_deny = decided != action::ALLOW && rule != rule_id::DEFAULT;
            if !explicit_deny {
                if let Some(name_rule) = self.learned_rule(learned, protocol, port) {
                    return Judgement { rule: name_rule, learned: true, by_port_rule: false, ..found };
                }
            }
            let (fam, addr) = flow_address(dst);
            if rule == rule_id::DEFAULT && lookup::is_dns_bypass(fam, &addr, protocol, port) {
                return self.refused(Judgement { rule: rule_id::DNS_BYPASS, ..found });
            }
        }
        if decided == action::ALLOW {
            return found;
        }
        self.refused(found)
    }

    /// The rule id's text: the rule as written, or the name of a special id (as events say it).
    pub fn rule_name(&self, rule: u32) -> String {
        rule_name(&self.policy, rule)
    }

    fn refused(&self, judgement: Judgement) -> Judgement {
        let verdict = if self.info.mode == mode::AUDIT { verdict::AUDIT } else { verdict::BLOCKED };
        Judgement { verdict, ..judgement }
    }

    /// As `learned_rule` in `egress-ebpf/src/dns.rs`: the rule id a learned entry of the name
    /// rules `learned` gives a flow of `protocol` and `port`; the entry's table is every such rule,
    /// scanned with nothing to fall back to.
    pub fn learned_rule(&self, learned: &[usize], protocol: u8, port: u16) -> Option<u32> {
        let protocol = lookup::normalise_protocol(protocol);
        let port = lookup::rule_port(protocol, port);
        const NO_MATCH: Decision =
            Decision { fallback_rule: rule_id::DEFAULT, port_table: 0, fallback_action: action::DENY, _pad: [0; 3] };
        let mut entries = Vec::new();
        for &index in learned {
            let rule = self.policy.names.get(index)?;
            entries.extend(name_rule_entries(rule, self.policy.name_rule_id(index)));
        }
        let mut table = PortTable { len: 0, rules: [Default::default(); egress_common::MAX_PORT_RULES] };
        let len = entries.len().min(table.rules.len());
        table.rules[..len].copy_from_slice(&entries[..len]);
        table.len = len as u32;
        let (decided, rule) = lookup::resolve(&NO_MATCH, Some(&table), protocol, port);
        (decided == action::ALLOW).then_some(rule)
    }

    /// The trie leaf of the longest prefix holding `dst` (canonical), its CIDR and port table.
    fn leaf(&self, dst: IpAddr) -> Option<(IpNet, &Decision, Option<&PortTable>)> {
        let compiled = &self.compiled.policies[0];
        let best = match dst {
            IpAddr::V4(a) => {
                let key = lookup::rule_key_v4(0, a.octets());
                let wanted = [key.policy.as_slice(), &key.addr].concat();
                compiled
                    .v4
                    .iter()
                    .filter(|(len, k, _)| prefix_equal(&[k.policy.as_slice(), &k.addr].concat(), &wanted, *len))
                    .max_by_key(|(len, ..)| *len)
                    .map(|(len, k, d)| (IpNet::new(IpAddr::from(k.addr), cidr_bits(*len)), d))
            }
            IpAddr::V6(a) => {
                let key = lookup::rule_key_v6(0, a.octets());
                let wanted = [key.policy.as_slice(), &key.addr].concat();
                compiled
                    .v6
                    .iter()
                    .filter(|(len, k, _)| prefix_equal(&[k.policy.as_slice(), &k.addr].concat(), &wanted, *len))
                    .max_by_key(|(len, ..)| *len)
                    .map(|(len, k, d)| (IpNet::new(IpAddr::from(k.addr), cidr_bits(*len)), d))
            }
        }?;
        let (net, decision) = best;
        let table = self
            .compiled
            .port_tables
            .iter()
            .find(|(id, _)| *id != 0 && *id == decision.port_table)
            .map(|(_, table)| table);
        Some((net.ok()?, decision, table))
    }
}

/// A rule id's text in `policy`: the rule as written, or the name of a special id.
pub fn rule_name(policy: &Policy, rule: u32) -> String {
    special_rule_name(rule).map_or_else(
        || policy.rule_texts().get(rule as usize).cloned().unwrap_or_else(|| format!("rule {rule}")),
        str::to_owned,
    )
}

/// The name events give a special rule id (`rule_id::*`), `None` for a rule of the file.
pub fn special_rule_name(rule: u32) -> Option<&'static str> {
    Some(match rule {
        rule_id::DEFAULT => "default",
        rule_id::REPLY => "reply",
        rule_id::PORT_ZERO => "port-zero",
        rule_id::SOURCE_ROUTED => "source-routed",
        rule_id::SOCKET_KIND => "socket-kind",
        rule_id::TOO_DEEP => "too-deep",
        rule_id::DNS_BYPASS => "dns-bypass",
        rule_id::MALFORMED => "malformed",
        rule_id::UNBINDABLE => "unbindable",
        _ => return None,
    })
}

fn cidr_bits(trie_len: u32) -> u8 {
    (trie_len - egress_common::POLICY_KEY_BITS) as u8
}

/// The family and address bytes a kernel flow carries (IPv4 in the first 4 bytes).
fn flow_address(dst: IpAddr) -> (u8, [u8; 16]) {
    match dst {
        IpAddr::V4(a) => {
            let mut addr = [0; 16];
            addr[..4].copy_from_slice(&a.octets());
            (family::INET, addr)
        }
        IpAddr::V6(a) => (family::INET6, a.octets()),
    }
}

/// Bits `[0, bits)` of `a` and `b` are equal.
fn prefix_equal(a: &[u8], b: &[u8], bits: u32) -> bool {
    let whole = (bits / 8) as usize;
    let rest = bits % 8;
    a[..whole] == b[..whole] && (rest == 0 || (a[whole] ^ b[whole]) >> (8 - rest) == 0)
}
