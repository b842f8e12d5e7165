//! Finding the policy of a cgroup and judging a flow against it.

use aya_ebpf::{helpers::generated::bpf_get_current_ancestor_cgroup_id, maps::lpm_trie::Key};
use egress_common::{
    action, family, log,
    lookup::{self, rule_key_v4, rule_key_v6, V4_LOOKUP_BITS, V6_LOOKUP_BITS},
    mode, policy_flags, proto, rule_id, verdict, CgroupBinding, Decision, PortTable, DEEP_LEVELS_BIT, DNS_PORT,
    DOT_PORT, MAX_CGROUP_LEVEL, MAX_POLICY_SLOTS, UNBINDABLE_SLOT,
};

// Re-exported: the judging API takes it (it lives in `destination` so that `dns` needs nothing from here).
pub use crate::destination::Flow;
use crate::maps::{CGROUP_POLICY, DEEP_GUARDS, POLICY_INFO, PORT_TABLES, RULES_V4, RULES_V6, SETTINGS};

/// The outcome of judging a flow.
pub struct Judgement {
    /// `verdict::*`, what the event reports.
    pub verdict: u8,
    pub rule: u32,
    /// `log::*` of the deciding policy: which allowed flows raise an event.
    pub log: u8,
    /// Allowed through an address a DNS answer taught: it lapses when the address expires, so
    /// the decision is never reused for a later `connect()`.
    pub learned: bool,
}

impl Judgement {
    pub fn lets_through(&self) -> bool {
        self.verdict != verdict::BLOCKED
    }
}

/// The current task's ancestor cgroup at `level` (0 above its depth), for [`policy_of`].
#[inline(always)]
pub fn current_ancestor(level: i32) -> u64 {
    // SAFETY: plain helper call.
    unsafe { bpf_get_current_ancestor_cgroup_id(level) }
}

/// Binding of the nearest cgroup (the sender's own, then its ancestors) that has a policy.
/// `ancestor(level)` returns the id of the sender's ancestor at that level, 0 above its depth;
/// `own` is the sender's own cgroup id (found directly when it is deeper than the walk).
#[inline(always)]
pub fn policy_of(ancestor: impl Fn(i32) -> u64, own: impl Fn() -> u64) -> Option<CgroupBinding> {
    bound_of(ancestor, own).map(|(_, binding)| binding)
}

/// [`policy_of`] with the id of the bound cgroup whose binding it is (the key of what that
/// cgroup learned from DNS).
#[inline(always)]
pub fn bound_of(ancestor: impl Fn(i32) -> u64, own: impl Fn() -> u64) -> Option<(u64, CgroupBinding)> {
    let levels = SETTINGS.get(0).map_or(0, |s| s.policy_levels);
    if levels & DEEP_LEVELS_BIT != 0 {
        if let Some(binding) = deep_binding(&ancestor, own) {
            return Some(binding);
        }
    }
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
                found = Some((id, *binding));
            }
        }
        level += 1;
    }
    found
}

/// For a sender deeper than the walk: its own binding, or the guard of its deepest walked
/// ancestor when some cgroup down there has a policy the walk cannot see.
#[inline(always)]
fn deep_binding(ancestor: &impl Fn(i32) -> u64, own: impl Fn() -> u64) -> Option<(u64, CgroupBinding)> {
    if ancestor(MAX_CGROUP_LEVEL as i32 + 1) == 0 {
        return None;
    }
    let id = own();
    // SAFETY: the values are copied out at once.
    if let Some(binding) = unsafe { CGROUP_POLICY.get(&id) } {
        return Some((id, *binding));
    }
    let guard = ancestor(MAX_CGROUP_LEVEL as i32);
    unsafe { DEEP_GUARDS.get(&guard) }.map(|binding| (guard, *binding))
}

/// Applies policy `slot` to `flow`. `udp_reply` says the destination sent to this socket first;
/// `bound` is the bound cgroup whose binding gave the slot (whose learned addresses apply).
///
/// A rule's explicit deny wins over a learned address; a learned address allowed by a name rule
/// wins over the default and over CIDR allows (so the event names the domain).
#[inline(always)]
pub fn judge(bound: u64, slot: u32, flow: &Flow, udp_reply: impl FnOnce() -> bool) -> Judgement {
    if slot >= MAX_POLICY_SLOTS {
        // A deep guard (see `deep_binding`), a cgroup that could not be bound, or a slot no
        // policy owns: fail closed.
        let rule = if slot == UNBINDABLE_SLOT { rule_id::UNBINDABLE } else { rule_id::TOO_DEEP };
        return Judgement { verdict: verdict::BLOCKED, rule, log: log::ALL, learned: false };
    }
    let Some(info) = POLICY_INFO.get(slot) else {
        return Judgement { verdict: verdict::BLOCKED, rule: rule_id::DEFAULT, log: log::ALL, learned: false };
    };
    if flow.has_ports() && flow.port == 0 {
        return refused(info.mode, rule_id::PORT_ZERO);
    }
    let (decided, rule) = decide(slot, flow).unwrap_or((info.default_action, rule_id::DEFAULT));
    if info.flags & policy_flags::NAME_RULES != 0 {
        let explicit_deny = decided != action::ALLOW && rule != rule_id::DEFAULT;
        if !explicit_deny {
            if let Some(name_rule) = crate::dns::learned_rule(bound, flow) {
                return Judgement { verdict: verdict::ALLOWED, rule: name_rule, log: info.log, learned: true };
            }
        }
        if rule == rule_id::DEFAULT && crate::dns::is_bypass(flow) {
            return refused(info.mode, rule_id::DNS_BYPASS);
        }
    }
    if decided == action::ALLOW {
        return Judgement { verdict: verdict::ALLOWED, rule, log: info.log, learned: false };
    }
    if flow.protocol == proto::UDP && udp_reply() {
        return Judgement { verdict: verdict::ALLOWED, rule: rule_id::REPLY, log: info.log, learned: false };
    }
    refused(info.mode, rule)
}

/// What a policy in `mode` does with a flow it does not allow.
#[inline(always)]
pub fn refused(mode: u8, rule: u32) -> Judgement {
    let verdict = if mode == mode::AUDIT { verdict::AUDIT } else { verdict::BLOCKED };
    Judgement { verdict, rule, log: log::ALL, learned: false }
}

/// The mode of the policy in `slot` (`mode::ENFORCE` for guards and unknown slots).
#[inline(always)]
pub fn mode_of(slot: u32) -> u8 {
    POLICY_INFO.get(slot).map_or(mode::ENFORCE, |info| info.mode)
}

/// `(action, rule)` of the longest prefix of the policy holding the destination, or `None` when
/// no rule's CIDR holds it.
#[inline(always)]
fn decide(slot: u32, flow: &Flow) -> Option<(u8, u32)> {
    let (decision, table) = leaf(slot, flow)?;
    Some(lookup::resolve(decision, table, flow.protocol, flow.port))
}

/// Whether the rule that allows `flow` names its port: an allow with `ports:` listing it, not a
/// rule for every port of the address, nor the default.
#[inline(always)]
pub fn allowed_by_port_rule(slot: u32, flow: &Flow) -> bool {
    let Some((_, Some(table))) = leaf(slot, flow) else { return false };
    lookup::port_rule(table, flow.protocol, flow.port).is_some_and(|r| r.has_ports != 0 && r.action == action::ALLOW)
}

/// The trie leaf of the longest prefix holding the destination, and the port table it names.
#[inline(always)]
fn leaf(slot: u32, flow: &Flow) -> Option<(&'static Decision, Option<&'static PortTable>)> {
    let decision = if flow.family == family::INET {
        let addr = [flow.addr[0], flow.addr[1], flow.addr[2], flow.addr[3]];
        RULES_V4.get(Key::new(V4_LOOKUP_BITS, rule_key_v4(slot, addr)))?
    } else {
        RULES_V6.get(Key::new(V6_LOOKUP_BITS, rule_key_v6(slot, flow.addr)))?
    };
    // SAFETY: port tables are only replaced between reloads, never rewritten in place.
    let table = if decision.port_table != 0 { unsafe { PORT_TABLES.get(&decision.port_table) } } else { None };
    Some((decision, table))
}

/// A packet of a raw socket to the DNS or DNS-over-TLS port, from a policy with name rules.
/// Steering sees only the system calls of TCP and UDP sockets, so such a packet would carry any
/// query past the name filter: it is refused unless a rule allows that address with the port
/// listed (`ports: [53]`), a resolver the policy names on purpose.
#[inline(always)]
pub fn carries_unsteered_dns(slot: u32, flow: &Flow) -> bool {
    if !flow.has_ports() || (flow.port != DNS_PORT && flow.port != DOT_PORT) {
        return false;
    }
    let Some(info) = POLICY_INFO.get(slot) else { return false };
    info.flags & policy_flags::NAME_RULES != 0 && !allowed_by_port_rule(slot, flow)
}
