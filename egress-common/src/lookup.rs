//! How a flow is looked up in a policy, written once: the kernel programs run these functions,
//! the compiler builds its trie keys with them, and the daemon's property tests check them (not
//! a copy) against the reference evaluator. Only the trie and hash lookups are the kernel's.

use crate::{
    dns::{DOH_RESOLVERS_V4, DOH_RESOLVERS_V6, DOT_PORT, HTTPS_PORT},
    family, proto, Decision, PortRule, PortTable, RuleKeyV4, RuleKeyV6, MAX_PORT_RULES, POLICY_KEY_BITS,
};

/// Prefix length of a full IPv4 lookup key (policy slot and address).
pub const V4_LOOKUP_BITS: u32 = POLICY_KEY_BITS + 32;
/// Prefix length of a full IPv6 lookup key.
pub const V6_LOOKUP_BITS: u32 = POLICY_KEY_BITS + 128;

/// ICMPv6 is judged by `icmp` rules like ICMP.
#[inline(always)]
pub const fn normalise_protocol(protocol: u8) -> u8 {
    if protocol == proto::ICMPV6 {
        proto::ICMP
    } else {
        protocol
    }
}

/// TCP and UDP flows carry a destination port that rules can match.
#[inline(always)]
pub const fn has_ports(protocol: u8) -> bool {
    protocol == proto::TCP || protocol == proto::UDP
}

/// The port rules see: 0 for protocols without ports, whatever the call said.
#[inline(always)]
pub const fn rule_port(protocol: u8, port: u16) -> u16 {
    if has_ports(protocol) {
        port
    } else {
        0
    }
}

/// The IPv4 trie key of policy `slot` and `addr` (network byte order).
#[inline(always)]
pub const fn rule_key_v4(slot: u32, addr: [u8; 4]) -> RuleKeyV4 {
    RuleKeyV4 { policy: slot.to_be_bytes(), addr }
}

/// The IPv6 trie key of policy `slot` and `addr` (network byte order).
#[inline(always)]
pub const fn rule_key_v6(slot: u32, addr: [u8; 16]) -> RuleKeyV6 {
    RuleKeyV6 { policy: slot.to_be_bytes(), addr }
}

/// The trie prefix length of a rule for a CIDR of `cidr_bits`.
#[inline(always)]
pub const fn rule_prefix_len(cidr_bits: u8) -> u32 {
    POLICY_KEY_BITS + cidr_bits as u32
}

/// `(action, rule)` of the trie leaf `decision` for a flow: the first rule of its port table
/// that matches the protocol and port, else the leaf's fallback. `table` is the port table the
/// leaf names (`None` when it names none or the table is missing). `protocol` is normalised and
/// `port` as [`rule_port`] gives it.
#[inline(always)]
pub fn resolve(decision: &Decision, table: Option<&PortTable>, protocol: u8, port: u16) -> (u8, u32) {
    match table.and_then(|table| port_rule(table, protocol, port)) {
        Some(r) => (r.action, r.rule),
        None => (decision.fallback_action, decision.fallback_rule),
    }
}

/// The first rule of `table` that matches the protocol and port.
#[inline(always)]
pub fn port_rule(table: &PortTable, protocol: u8, port: u16) -> Option<&PortRule> {
    let mut i = 0;
    while i < MAX_PORT_RULES {
        if i as u32 >= table.len {
            break;
        }
        let r = &table.rules[i];
        let proto_matches = r.proto == proto::ANY || r.proto == protocol;
        let port_matches = r.has_ports == 0 || (port != 0 && r.port_lo <= port && port <= r.port_hi);
        if proto_matches && port_matches {
            return Some(r);
        }
        i += 1;
    }
    None
}

/// DNS over TLS, or HTTPS to a well-known DNS-over-HTTPS resolver: refused to a policy with name
/// rules when no rule allows it explicitly (it would carry queries past the name filter).
/// `addr` as [`crate::FlowId::addr`]: IPv4 in the first 4 bytes when `fam` is `family::INET`.
#[inline(always)]
pub fn is_dns_bypass(fam: u8, addr: &[u8; 16], protocol: u8, port: u16) -> bool {
    if !has_ports(protocol) {
        return false;
    }
    if port == DOT_PORT {
        return true;
    }
    if port != HTTPS_PORT {
        return false;
    }
    if fam == family::INET {
        let mut i = 0;
        while i < DOH_RESOLVERS_V4.len() {
            let r = &DOH_RESOLVERS_V4[i];
            if addr[0] == r[0] && addr[1] == r[1] && addr[2] == r[2] && addr[3] == r[3] {
                return true;
            }
            i += 1;
        }
        return false;
    }
    let mut i = 0;
    while i < DOH_RESOLVERS_V6.len() {
        if *addr == DOH_RESOLVERS_V6[i] {
            return true;
        }
        i += 1;
    }
    false
}
