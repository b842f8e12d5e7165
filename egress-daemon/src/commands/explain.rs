//! `egress explain --config FILE --policy NAME HOST[:PORT][/PROTO]`: which rule decides a flow
//! and why, read from the file (no daemon, no kernel), for the enforced rules and, with
//! `--candidate FILE`, for the candidate's. The verdict comes from [`Judge`], the kernel's own
//! lookup over the compiled maps; the reasons (longest prefix, tie, default, learned name,
//! refusals no rule overrides) are read beside it from the rules.

use std::{
    net::{IpAddr, Ipv6Addr},
    path::PathBuf,
};

use anyhow::Context;
use egress_common::{lookup, proto, rule_id, verdict};

use crate::{
    policy::{
        domain,
        judge::{Flow, Judge, Judgement},
        model::{Action, Policy, PolicySet, Rule},
        reference,
        validate::validate_policy_file,
    },
    printable::escaped,
    settings::DnsSettings,
};

pub struct ExplainArgs {
    pub config: PathBuf,
    pub policy: String,
    pub candidate: Option<PathBuf>,
    pub target: String,
}

/// What to explain: a destination address or a domain name, protocol and port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub host: Host,
    pub protocol: u8,
    /// 0 for protocols without ports.
    pub port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Host {
    Addr(IpAddr),
    /// Normalised as rules compare names.
    Name(String),
}

/// `HOST[:PORT][/PROTO]`: HOST an IPv4 address, `[IPv6]` (or a bare IPv6 address without a
/// port) or a domain name; PROTO `tcp` (default), `udp` or `icmp`; a port is needed for tcp
/// and udp.
pub fn parse_target(text: &str) -> Result<Target, String> {
    let (rest, protocol) = match text.rsplit_once('/') {
        Some((rest, name)) => (rest, protocol_of(name)?),
        None => (text, proto::TCP),
    };
    let (host, port) = if let Some(inner) = rest.strip_prefix('[') {
        let (addr, after) = inner.split_once(']').ok_or_else(|| format!("`{text}`: `[` without `]`"))?;
        let port = match after.strip_prefix(':') {
            Some(port) => Some(port),
            None if after.is_empty() => None,
            None => return Err(format!("`{text}`: expected `:PORT` after `]`")),
        };
        (addr, port)
    } else if rest.parse::<Ipv6Addr>().is_ok() {
        (rest, None)
    } else {
        match rest.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (rest, None),
        }
    };
    let port = match port {
        Some(p) => p.parse::<u16>().map_err(|_| format!("`{text}`: `{p}` is not a port"))?,
        None if lookup::has_ports(protocol) => {
            return Err(format!("`{text}`: name a port for tcp and udp (`HOST:PORT`)"));
        }
        None => 0,
    };
    let host = match host.parse::<IpAddr>() {
        Ok(addr) => Host::Addr(addr.to_canonical()),
        Err(_) => Host::Name(domain::normalise(host).map_err(|e| format!("`{host}`: {e}"))?),
    };
    Ok(Target { host, protocol, port: lookup::rule_port(protocol, port) })
}

fn protocol_of(name: &str) -> Result<u8, String> {
    match name.to_ascii_lowercase().as_str() {
        "tcp" => Ok(proto::TCP),
        "udp" => Ok(proto::UDP),
        "icmp" | "icmp6" => Ok(proto::ICMP),
        other => Err(format!("`{other}` is not a protocol (tcp, udp or icmp)")),
    }
}

pub fn run(args: ExplainArgs) -> anyhow::Result<i32> {
    let target = parse_target(&args.target).map_err(anyhow::Error::msg)?;
    let set = validate_policy_file(&args.config)?;
    let policy = find(&set, &args.policy, &args.config)?;
    print!("{}", explain(policy, &set.settings.dns, &target, "enforced")?);
    if let Some(path) = &args.candidate {
        let candidate_set = validate_policy_file(path)?;
        let candidate = find(&candidate_set, &args.policy, path)?;
        print!("{}", explain(candidate, &candidate_set.settings.dns, &target, "candidate")?);
    }
    Ok(0)
}

fn find<'a>(set: &'a PolicySet, name: &str, path: &std::path::Path) -> anyhow::Result<&'a Policy> {
    set.policies.iter().find(|p| p.name == name).with_context(|| {
        let names: Vec<&str> = set.policies.iter().map(|p| p.name.as_str()).collect();
        format!("{}: no policy `{}` (it has: {})", path.display(), escaped(name), escaped(&names.join(", ")))
    })
}

/// The explanation of `target` under `policy`, headed `label` (`enforced`, `candidate`).
pub fn explain(policy: &Policy, dns: &DnsSettings, target: &Target, label: &str) -> anyhow::Result<String> {
    let judge = Judge::new(policy).with_context(|| format!("policy {}", policy.name))?;
    let mut out = format!(
        "{label}: policy {} (mode {}, default {}), {} {}\n",
        escaped(&policy.name),
        policy.mode,
        policy.default,
        protocol_name(target.protocol),
        target_text(target)
    );
    match &target.host {
        Host::Addr(addr) => {
            let flow = Flow { dst: *addr, protocol: target.protocol, port: target.port };
            let judgement = judge.judge(flow, &[]);
            out += &format!("  verdict: {}\n", verdict_text(&judge, &judgement));
            for line in reasons(policy, &judgement, flow) {
                out += &format!("  why: {line}\n");
            }
            let explicit_deny = !judgement.allows() && judgement.rule < rule_id::FIRST_SPECIAL;
            if !policy.names.is_empty() && !explicit_deny && judgement.rule != rule_id::PORT_ZERO {
                out += "  note: if the DNS proxy learned this address from an answer a name rule allows, that \
                        rule decides instead (unless a deny rule holds the address); offline, nothing is learned\n";
            }
        }
        Host::Name(name) => out += &explain_name(policy, &judge, dns, name, target),
    }
    Ok(out)
}

fn verdict_text(judge: &Judge, j: &Judgement) -> String {
    let word = match j.verdict {
        verdict::ALLOWED => "allowed",
        verdict::AUDIT => "refused in enforce mode; audit mode lets it through and reports it",
        _ => "refused",
    };
    format!("{word}, rule `{}`", escaped(&judge.rule_name(j.rule)))
}

/// Why the judgement came out as it did, in the kernel's order of steps.
fn reasons(policy: &Policy, j: &Judgement, flow: Flow) -> Vec<String> {
    let dst = flow.dst.to_canonical();
    let protocol = lookup::normalise_protocol(flow.protocol);
    let port = lookup::rule_port(protocol, flow.port);
    match j.rule {
        rule_id::PORT_ZERO => {
            return vec![
                "destination port 0 is reserved: refused whatever the rules say (no rule can override it)".into()
            ]
        }
        rule_id::DNS_BYPASS => {
            return vec![
                "no rule decides, and this is DNS over TLS (port 853) or HTTPS to a well-known DNS-over-HTTPS \
                 resolver from a policy with name rules: it would carry queries past the name filter, so it is \
                 refused unless a rule allows this address and port explicitly"
                    .into(),
            ]
        }
        _ => {}
    }
    let matching: Vec<(usize, &Rule)> =
        policy.rules.iter().enumerate().filter(|(_, r)| reference::matches(r, dst, protocol, port)).collect();
    let mut out = Vec::new();
    match j.leaf {
        Some(leaf) => out.push(format!("longest prefix of the policy holding {dst} is {leaf}")),
        None => out.push(format!("no rule's CIDR holds {dst}")),
    }
    if j.rule == rule_id::DEFAULT {
        out.push(if j.leaf.is_some() {
            format!(
                "no rule under {} matches {} port {port}: the default ({}) decides",
                fmt_leaf(j),
                protocol_name(protocol),
                policy.default
            )
        } else {
            format!("the default ({}) decides", policy.default)
        });
        return out;
    }
    let Some(winner) = policy.rules.get(j.rule as usize) else {
        return out;
    };
    out.push(format!("deciding rule: {}", rule_ref(winner)));
    for (_, other) in matching.iter().filter(|(i, _)| *i != j.rule as usize) {
        let why = if other.net.prefix_len() < winner.net.prefix_len() {
            format!("shorter prefix /{} < /{}", other.net.prefix_len(), winner.net.prefix_len())
        } else if other.action != winner.action {
            "tie on the prefix: deny wins over allow".to_string()
        } else {
            "tie on the prefix and action: the earlier rule wins".to_string()
        };
        out.push(format!("also matches, loses: {} ({why})", rule_ref(other)));
    }
    out
}

fn fmt_leaf(j: &Judgement) -> String {
    j.leaf.map_or_else(String::new, |l| l.to_string())
}

fn rule_ref(rule: &Rule) -> String {
    if rule.line > 0 {
        format!("line {} `{}`", rule.line, escaped(&rule.text()))
    } else {
        format!("`{}`", escaped(&rule.text()))
    }
}

/// A domain name: whether its queries are answered, and what its learned addresses may reach.
fn explain_name(policy: &Policy, judge: &Judge, dns: &DnsSettings, name: &str, target: &Target) -> String {
    let allowing: Vec<usize> =
        policy.names.iter().enumerate().filter(|(_, r)| r.pattern.matches(name)).map(|(i, _)| i).collect();
    if allowing.is_empty() {
        let answer = dns.refuse_with.as_str();
        return format!(
            "  verdict: no name rule matches {name}: the DNS proxy answers its queries with {answer}, so nothing \
             is learned for it; an address the workload already knows is judged by the CIDR rules \
             (`egress explain ADDRESS`)\n"
        );
    }
    let mut out = String::new();
    for &index in &allowing {
        let rule = &policy.names[index];
        let line = if rule.line > 0 { format!("line {} ", rule.line) } else { String::new() };
        out += &format!("  name rule {line}`{}` matches {name}: its queries are answered\n", escaped(&rule.text()));
    }
    if let Some(rule) = judge.learned_rule(&allowing, target.protocol, target.port) {
        out += &format!(
            "  verdict: the addresses learned from those answers are allowed for {} port {}, rule `{}`, for the \
             answer's TTL (at least {} s) plus {} s of grace after it\n",
            protocol_name(target.protocol),
            target.port,
            escaped(&judge.rule_name(rule)),
            dns.min_ttl,
            dns.grace,
        );
        let denies: Vec<String> = policy.rules.iter().filter(|r| r.action == Action::Deny).map(rule_ref).collect();
        if !denies.is_empty() {
            out += &format!("  but: a deny rule holding a learned address still wins over it: {}\n", denies.join(", "));
        }
    } else {
        out += &format!(
            "  verdict: the name rules do not cover {} port {}: learned addresses are judged by the CIDR rules \
             and the default ({})\n",
            protocol_name(target.protocol),
            target.port,
            policy.default
        );
    }
    out
}

fn protocol_name(protocol: u8) -> &'static str {
    match protocol {
        proto::TCP => "tcp",
        proto::UDP => "udp",
        _ => "icmp",
    }
}

fn target_text(target: &Target) -> String {
    let host = match &target.host {
        Host::Addr(IpAddr::V6(a)) if target.port != 0 => format!("[{a}]"),
        Host::Addr(a) => a.to_string(),
        Host::Name(n) => n.clone(),
    };
    if target.port == 0 {
        host
    } else {
        format!("{host}:{}", target.port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::parse_policy_str;

    const FILE: &str = "\
policies:
  - name: web
    cgroup: web
    default: deny
    rules:
      - allow: 10.0.0.0/8
        protocol: tcp
        ports: [443]
      - deny: 10.1.0.0/16
      - allow: 10.1.2.0/24
      - deny: 10.1.2.0/24
        protocol: udp
      - allow: api.example.com
        protocol: tcp
        ports: [443]
";

    fn explained(target: &str) -> String {
        let set = parse_policy_str(FILE, "t.yaml").unwrap();
        explain(&set.policies[0], &set.settings.dns, &parse_target(target).unwrap(), "enforced").unwrap()
    }

    #[test]
    fn targets_parse() {
        assert_eq!(
            parse_target("10.0.0.1:443").unwrap(),
            Target { host: Host::Addr("10.0.0.1".parse().unwrap()), protocol: proto::TCP, port: 443 }
        );
        assert_eq!(parse_target("[::1]:53/udp").unwrap().protocol, proto::UDP);
        assert_eq!(parse_target("::1/icmp").unwrap().port, 0);
        assert_eq!(parse_target("API.Example.com:443").unwrap().host, Host::Name("api.example.com".into()));
        assert!(parse_target("10.0.0.1").is_err(), "tcp needs a port");
        assert!(parse_target("10.0.0.1:x").is_err());
        assert!(parse_target("10.0.0.1:1/sctp").is_err());
    }

    #[test]
    fn longest_prefix_and_losers() {
        let text = explained("10.1.2.3:443");
        assert!(text.contains("verdict: allowed, rule `allow 10.1.2.0/24`"), "{text}");
        assert!(text.contains("longest prefix of the policy holding 10.1.2.3 is 10.1.2.0/24"), "{text}");
        assert!(text.contains("shorter prefix /16 < /24"), "{text}");
        assert!(text.contains("shorter prefix /8 < /24"), "{text}");
    }

    #[test]
    fn tie_deny_wins() {
        let text = explained("10.1.2.3:53/udp");
        assert!(text.contains("verdict: refused, rule `deny 10.1.2.0/24 udp`"), "{text}");
        assert!(text.contains("tie on the prefix: deny wins over allow"), "{text}");
    }

    #[test]
    fn default_and_refusals_no_rule_overrides() {
        let text = explained("192.0.2.1:80");
        assert!(text.contains("verdict: refused, rule `default`"), "{text}");
        assert!(text.contains("no rule's CIDR holds 192.0.2.1"), "{text}");
        let text = explained("10.0.0.1:0");
        assert!(text.contains("rule `port-zero`") && text.contains("no rule can override"), "{text}");
        let text = explained("1.1.1.1:443");
        assert!(text.contains("rule `dns-bypass`"), "{text}");
    }

    #[test]
    fn names_say_what_learned_addresses_allow() {
        let text = explained("api.example.com:443");
        assert!(text.contains("allowed for tcp port 443, rule `allow api.example.com tcp ports 443`"), "{text}");
        assert!(text.contains("plus 30 s of grace"), "{text}");
        let text = explained("api.example.com:80");
        assert!(text.contains("do not cover tcp port 80"), "{text}");
        let text = explained("other.example.com:443");
        assert!(text.contains("no name rule matches other.example.com"), "{text}");
    }
}
