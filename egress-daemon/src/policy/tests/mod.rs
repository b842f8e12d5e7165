//! The policy module's tests, by topic; the helpers they share are here.

use std::{
    collections::HashSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use egress_common::{
    action, lookup, proto, rule_id, Decision, PolicyInfo, PortRule, MAX_POLICY_SLOTS, MAX_PORT_RULES, POLICY_KEY_BITS,
};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use proptest::prelude::*;

use super::*;
use crate::settings::{DnsSettings, RefuseWith, Settings};

fn parse(text: &str) -> PolicySet {
    match parse_policy_str(text, "p.yaml") {
        Ok(set) => set,
        Err(err) => panic!("{err}"),
    }
}

fn parse_err(text: &str) -> ConfigError {
    match parse_policy_str(text, "p.yaml") {
        Ok(set) => panic!("parsed, expected an error: {set:?}"),
        Err(err) => err,
    }
}

/// Asserts the error's position and that its message contains `needle`.
#[track_caller]
fn assert_error(text: &str, line: usize, column: usize, needle: &str) {
    let err = parse_err(text);
    assert_eq!((err.line, err.column), (line, column), "{err}");
    assert!(err.message.contains(needle), "{err:?} lacks {needle:?}");
    assert_eq!(err.to_string(), format!("p.yaml:{line}:{column}: {}", err.message));
}

fn settings_of(lines: &str) -> Settings {
    parse(&format!("settings:\n{lines}policies: []\n")).settings
}

fn net(text: &str) -> IpNet {
    text.parse().expect("test CIDR")
}

/// One policy named `demo` whose rules are `rules` (indented under `rules:`).
fn with_rules(rules: &str) -> String {
    format!("policies:\n  - name: demo\n    cgroup: demo\n    rules:\n{rules}")
}

const EXAMPLE: &str = "\
policies:
  - name: demo
    cgroup: egress-demo
    default: allow
    mode: audit
    rules:
      - allow: 127.0.0.1
        protocol: tcp
        ports: [80, 8000-8080]
      - deny: 127.0.0.0/8
      - allow: ::ffff:10.0.0.0/104
        protocol: icmp
      - allow: 2001:db8::/32
        protocol: udp
        ports: \"53\"
  - name: other
    cgroup: /a/b/
    rules: []
";

mod compile;
mod globs;
mod parse;
mod selectors;
mod settings;
