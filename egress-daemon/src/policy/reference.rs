//! The meaning of a policy as a plain loop over its rules: the specification the compiled maps
//! are tested against, and an answer to "what would happen to this flow".

use std::net::IpAddr;

use egress_common::proto;

use super::model::{Action, Policy, Protocol, Rule};

/// What `policy` does with a flow to `dst` (`protocol` is the IP protocol number, `port` the
/// destination port or 0), and the index of the deciding rule (`None`: the default decided).
///
/// Among the rules that match, the longest prefix wins, then deny over allow, then the earlier
/// rule.
pub fn evaluate(policy: &Policy, dst: IpAddr, protocol: u8, port: u16) -> (Action, Option<usize>) {
    let dst = dst.to_canonical();
    let protocol = if protocol == proto::ICMPV6 { proto::ICMP } else { protocol };
    let mut best: Option<(usize, &Rule)> = None;
    for (index, rule) in policy.rules.iter().enumerate() {
        if matches(rule, dst, protocol, port) && best.is_none_or(|(_, b)| outranks(rule, b)) {
            best = Some((index, rule));
        }
    }
    best.map_or((policy.default, None), |(index, rule)| (rule.action, Some(index)))
}

pub(crate) fn matches(rule: &Rule, dst: IpAddr, protocol: u8, port: u16) -> bool {
    let protocol_matches = rule.protocol == Protocol::Any || rule.protocol.number() == protocol;
    let has_port = protocol == proto::TCP || protocol == proto::UDP;
    let port_matches = rule.ports.is_empty() || (has_port && rule.ports.iter().any(|r| r.contains(port)));
    rule.net.contains(&dst) && protocol_matches && port_matches
}

fn outranks(rule: &Rule, other: &Rule) -> bool {
    let rank = |r: &Rule| (r.net.prefix_len(), r.action == Action::Deny);
    rank(rule) > rank(other)
}
