//! Finding the policy of a cgroup and judging a flow against it.

use aya_ebpf::maps::lpm_trie::Key;
use egress_common::{
    action, family, mode, proto, rule_id, verdict, CgroupBinding, RuleKeyV4, RuleKeyV6, MAX_CGROUP_LEVEL,
    MAX_PORT_RULES, POLICY_KEY_BITS,
};

use crate::maps::{CGROUP_POLICY, POLICY_INFO, PORT_TABLES, RULES_V4, RULES_V6, SETTINGS};

/// A destination as the programs see it; IPv4 (also v4-mapped IPv6) uses `addr[..4]`.
pub struct Flow {
    pub family: u8,
    pub addr: [u8; 16],
    /// Host byte order, 0 when the protocol has no ports.
    pub port: u16,
    /// Normalised with [`normalise_protocol`].
    pub protocol: u8,
}

/// The outcome of judging a flow.
pub struct Judgement {
    /// `verdict::*`, what the event reports.
    pub verdict: u8,
    pub rule: u32,
}

impl Judgement {
    pub fn lets_through(&self) -> bool {
        self.verdict != verdict::BLOCKED
    }
}

/// ICMPv6 is judged by `icmp` rules like ICMP.
#[inline(always)]
pub fn normalise_protocol(protocol: u8) -> u8 {
    if protocol == proto::ICMPV6 {
        proto::ICMP
    } else {
        protocol
    }
}

/// Binding of the nearest cgroup (the sender's own, then its ancestors) that has a policy.
/// `ancestor(level)` returns the id of the sender's ancestor at that level, 0 above its depth.
#[inline(always)]
pub fn policy_of(ancestor: impl Fn(i32) -> u64) -> Option<CgroupBinding> {
    let levels = SETTINGS.get(0).map_or(0, |s| s.policy_levels);
    let mut found = None;
    let mut level = 0u32;
    while level <= MAX_CGROUP_LEVEL {
        if levels >> level == 0 {
            break;
        }
        if levels & (1 << level) != 0 {
            let id = ancestor(level as i32);
            if id == 0 {
                break;
            }
            // SAFETY: the value is copied out at once.
            if let Some(binding) = unsafe { CGROUP_POLICY.get(&id) } {
                found = Some(*binding);
            }
        }
        level += 1;
    }
    found
}

/// Applies policy `slot` to `flow`. `udp_reply` says the destination sent to this socket first.
#[inline(always)]
pub fn judge(slot: u32, flow: &Flow, udp_reply: impl FnOnce() -> bool) -> Judgement {
    let Some(info) = POLICY_INFO.get(slot) else {
        return Judgement { verdict: verdict::ALLOWED, rule: rule_id::DEFAULT };
    };
    let (decided, rule) = decide(slot, flow).unwrap_or((info.default_action, rule_id::DEFAULT));
    if decided == action::ALLOW {
        return Judgement { verdict: verdict::ALLOWED, rule };
    }
    if flow.protocol == proto::UDP && udp_reply() {
        return Judgement { verdict: verdict::ALLOWED, rule: rule_id::REPLY };
    }
    let verdict = if info.mode == mode::AUDIT { verdict::AUDIT } else { verdict::BLOCKED };
    Judgement { verdict, rule }
}

/// `(action, rule)` of the longest prefix of the policy holding the destination, or `None` when
/// no rule's CIDR holds it.
#[inline(always)]
fn decide(slot: u32, flow: &Flow) -> Option<(u8, u32)> {
    let policy = slot.to_be_bytes();
    let decision = if flow.family == family::INET {
        let addr = [flow.addr[0], flow.addr[1], flow.addr[2], flow.addr[3]];
        RULES_V4.get(Key::new(POLICY_KEY_BITS + 32, RuleKeyV4 { policy, addr }))?
    } else {
        RULES_V6.get(Key::new(POLICY_KEY_BITS + 128, RuleKeyV6 { policy, addr: flow.addr }))?
    };
    if decision.port_table != 0 {
        // SAFETY: port tables are only replaced between reloads, never rewritten in place.
        if let Some(table) = unsafe { PORT_TABLES.get(&decision.port_table) } {
            let mut i = 0;
            while i < MAX_PORT_RULES {
                if i as u32 >= table.len {
                    break;
                }
                let r = &table.rules[i];
                let proto_matches = r.proto == proto::ANY || r.proto == flow.protocol;
                let port_matches = r.has_ports == 0
                    || (flow.port != 0 && r.port_lo <= flow.port && flow.port <= r.port_hi);
                if proto_matches && port_matches {
                    return Some((r.action, r.rule));
                }
                i += 1;
            }
        }
    }
    Some((decision.fallback_action, decision.fallback_rule))
}
