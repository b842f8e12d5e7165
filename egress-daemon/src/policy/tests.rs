//! Parser errors with their positions, the compiler's output, and property tests holding the
//! compiled maps (through a model of the kernel lookup) to the reference evaluator.

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

#[test]
fn parses_the_example() {
    let text = EXAMPLE.replace("/a/b/", "a//./b/");
    let set = parse(&text);
    assert_eq!(set.policies.len(), 2);
    let demo = &set.policies[0];
    assert_eq!(demo.name, "demo");
    assert_eq!(demo.selector, Selector::Cgroup("egress-demo".to_owned()));
    assert_eq!((demo.default, demo.mode), (Action::Allow, Mode::Audit));
    let texts: Vec<String> = demo.rules.iter().map(Rule::text).collect();
    assert_eq!(
        texts,
        [
            "allow 127.0.0.1/32 tcp ports 80,8000-8080",
            "deny 127.0.0.0/8",
            "allow 10.0.0.0/8 icmp",
            "allow 2001:db8::/32 udp ports 53",
        ]
    );
    let lines: Vec<usize> = demo.rules.iter().map(|r| r.line).collect();
    assert_eq!(lines, [7, 10, 11, 13]);
    assert_eq!(demo.rules[0].ports, [PortRange { lo: 80, hi: 80 }, PortRange { lo: 8000, hi: 8080 }]);
    assert_eq!(demo.summary(), "demo: cgroup egress-demo, default allow, mode audit, 4 rules (3 IPv4, 1 IPv6)");
    let other = &set.policies[1];
    assert_eq!(other.selector, Selector::Cgroup("a/b".to_owned()));
    assert_eq!(set.settings, Settings::default());
    assert_eq!((other.default, other.mode), (Action::Deny, Mode::Enforce));
    assert!(other.rules.is_empty());
}

#[test]
fn accepts_flow_style_and_single_ports() {
    let set = parse(&with_rules(
        "      - {deny: 10.0.0.0/8, protocol: TCP, ports: 22}\n      - {allow: 10.0.0.0/8, ports: 1-1024}\n",
    ));
    let rules = &set.policies[0].rules;
    assert_eq!(rules[0].text(), "deny 10.0.0.0/8 tcp ports 22");
    assert_eq!(rules[1].ports, [PortRange { lo: 1, hi: 1024 }]);
    assert_eq!(rules[1].line, 6);
}

#[test]
fn accepts_empty_settings() {
    let set = parse("settings: {}\npolicies: []\n");
    assert!(set.policies.is_empty());
    parse("settings:\npolicies: []\n");
}

#[test]
fn normalises_v4_mapped_cidrs() {
    let set =
        parse(&with_rules("      - deny: ::ffff:0:0/96\n      - allow: ::ffff:192.168.1.7\n      - allow: ::/0\n"));
    let nets: Vec<IpNet> = set.policies[0].rules.iter().map(|r| r.net).collect();
    assert_eq!(nets, [net("0.0.0.0/0"), net("192.168.1.7/32"), net("::/0")]);
}

#[test]
fn error_host_bits_points_at_the_cidr() {
    assert_error(
        &with_rules("      - allow: 10.0.0.1/8\n"),
        5,
        16,
        "policies[0].rules[0].allow: 10.0.0.1/8 has host bits set; did you mean 10.0.0.0/8?",
    );
    assert_error(&with_rules("      - deny: 2001:db8::1/32\n"), 5, 15, "did you mean 2001:db8::/32?");
}

#[test]
fn error_bad_address_points_at_it() {
    assert_error(&with_rules("      - allow: 10.0.0.0/33\n"), 5, 16, "not an IPv4 or IPv6");
    assert_error(&with_rules("      - allow: 10.0.0\n"), 5, 16, "not an IPv4 or IPv6");
    assert_error(&with_rules("      - allow: exa_mple!.com\n"), 5, 16, "characters a host name cannot have");
}

#[test]
fn parses_name_rules_beside_cidr_rules() {
    let set = parse(&with_rules(
        "      - allow: API.GitHub.com.\n        protocol: tcp\n        ports: [443]\n\
         \x20     - allow: 10.0.0.0/8\n      - allow: \"*.s3.amazonaws.com\"\n      - allow: \"**.bücher.example\"\n",
    ));
    let policy = &set.policies[0];
    assert_eq!(policy.rules.len(), 1);
    let names: Vec<String> = policy.names.iter().map(NameRule::text).collect();
    assert_eq!(
        names,
        ["allow api.github.com tcp ports 443", "allow *.s3.amazonaws.com", "allow **.xn--bcher-kva.example"]
    );
    assert_eq!(policy.names[0].line, 5);
    assert_eq!(policy.name_rule_id(0), 1);
    assert_eq!(policy.rule_texts().len(), 4);
    let compiled = compile_set(&set, &[0], 1).expect("compiles");
    assert_eq!(compiled.policies[0].info.flags, egress_common::policy_flags::NAME_RULES);
}

#[test]
fn error_name_rules_only_allow_and_wildcards_take_a_whole_label() {
    assert_error(&with_rules("      - deny: example.com\n"), 5, 9, "a domain name can only be allowed");
    assert_error(&with_rules("      - allow: \"foo*.example.com\"\n"), 5, 16, "a wildcard is only allowed");
    assert_error(&with_rules("      - allow: \"a..example.com\"\n"), 5, 16, "empty label");
}

#[test]
fn parses_dns_settings() {
    let text = "settings:\n  dns:\n    listen_port: 5353\n    upstream: [192.0.2.53, \"[2001:db8::53]:5353\"]\n    \
                refuse_with: NXDOMAIN\n    min_ttl: 2\n    grace: 0\n    max_addresses_per_answer: 8\n    \
                max_learned_per_cgroup: 100\npolicies: []\n";
    let dns = parse(text).settings.dns;
    assert_eq!(
        dns,
        DnsSettings {
            listen_port: 5353,
            upstream: vec!["192.0.2.53:53".parse().unwrap(), "[2001:db8::53]:5353".parse().unwrap()],
            refuse_with: RefuseWith::NxDomain,
            min_ttl: 2,
            grace: 0,
            max_addresses_per_answer: 8,
            max_learned_per_cgroup: 100,
        }
    );
    assert_error(
        "settings:\n  dns:\n    max_learned_per_cgroup: 0\npolicies: []\n",
        3,
        29,
        "not a number from 1 to 65536",
    );
    assert_error("settings:\n  dns:\n    listen_port: 53\npolicies: []\n", 3, 18, "cannot listen on port 53");
    assert_error("settings:\n  dns:\n    grace: 1d\npolicies: []\n", 3, 12, "not a number of seconds");
}

#[test]
fn error_reversed_range_points_at_it() {
    let rules = "      - allow: 10.0.0.0/8\n        protocol: tcp\n        ports: [80, 9000-8000]\n";
    assert_error(
        &with_rules(rules),
        7,
        21,
        "policies[0].rules[0].ports[1]: port range 9000-8000 is reversed; did you mean 8000-9000?",
    );
    let block = "      - allow: 10.0.0.0/8\n        ports:\n          - 22\n          - \"9000-8000\"\n";
    assert_error(&with_rules(block), 8, 13, "is reversed");
}

#[test]
fn error_port_zero_and_out_of_range() {
    assert_error(&with_rules("      - allow: 10.0.0.0/8\n        ports: 0\n"), 6, 16, "port 0");
    assert_error(&with_rules("      - allow: 10.0.0.0/8\n        ports: [0-80]\n"), 6, 17, "port 0");
    assert_error(
        &with_rules("      - allow: 10.0.0.0/8\n        ports: [70000]\n"),
        6,
        17,
        "port 70000 in `70000` is out of range",
    );
    assert_error(&with_rules("      - allow: 10.0.0.0/8\n        ports: [-5]\n"), 6, 17, "not a port");
    assert_error(&with_rules("      - allow: 10.0.0.0/8\n        ports: []\n"), 6, 16, "port list is empty");
}

#[test]
fn error_unknown_key_points_at_the_key() {
    assert_error(
        &with_rules("      - allow: 10.0.0.0/8\n        proto: tcp\n"),
        6,
        9,
        "policies[0].rules[0]: unknown field `proto`",
    );
    assert_error("policies:\n  - name: demo\n    cgroup: demo\n    defualt: deny\n", 4, 5, "unknown field `defualt`");
    assert_error("policies: []\npolicy: []\n", 2, 1, "unknown field `policy`");
    assert_error("settings:\n  level: 3\npolicies: []\n", 2, 3, "unknown field `level`");
}

#[test]
fn error_bad_keywords_point_at_the_value() {
    assert_error(&with_rules("      - allow: 10.0.0.0/8\n        protocol: sctp\n"), 6, 19, "unknown protocol `sctp`");
    assert_error("policies:\n  - name: a\n    cgroup: a\n    mode: loud\n", 4, 11, "unknown mode");
    assert_error("policies:\n  - name: a\n    cgroup: a\n    default: maybe\n", 4, 14, "unknown action");
}

#[test]
fn error_rule_shape_points_at_the_rule() {
    assert_error(
        &with_rules("      - allow: 10.0.0.0/8\n        protocol: icmp\n        ports: [80]\n"),
        5,
        9,
        "policies[0].rules[0]: icmp has no ports",
    );
    assert_error(
        &with_rules("      - allow: 10.0.0.0/8\n      - allow: 10.0.0.0/8\n        deny: 10.0.0.0/8\n"),
        6,
        9,
        "policies[0].rules[1]: a rule takes `allow` or `deny`, not both",
    );
    assert_error(&with_rules("      - protocol: tcp\n"), 5, 9, "needs `allow: CIDR` or `deny: CIDR`");
    assert_error(&with_rules("      - 10.0.0.0/8\n"), 5, 9, "expected a rule");
}

/// Each list of the file format written as its one element reads as a list of one.
#[test]
fn single_values_stand_for_lists_of_one() {
    let text = "\
settings:
  dns:
    upstream: 192.0.2.53
policies:
  name: solo
  cgroup: solo
  rules:
    allow: 10.0.0.0/8
    protocol: tcp
    ports: 443
  allow_sockets: packet
";
    let set = parse(text);
    assert_eq!(set.settings.dns.upstream, vec!["192.0.2.53:53".parse::<std::net::SocketAddr>().unwrap()]);
    assert_eq!(set.policies.len(), 1);
    let solo = &set.policies[0];
    assert_eq!(solo.name, "solo");
    assert_eq!(solo.rules.iter().map(Rule::text).collect::<Vec<_>>(), ["allow 10.0.0.0/8 tcp ports 443"]);
    assert_eq!(solo.allow_sockets, [model::SocketKind::Packet]);
    // A single name rule goes with the name rules.
    let named = parse("policies:\n  - name: n\n    cgroup: n\n    rules: {allow: api.example.com}\n");
    assert_eq!((named.policies[0].rules.len(), named.policies[0].names.len()), (0, 1));
    // Flow style, quoted, and the same values as lists of one.
    assert_eq!(settings_of("  dns:\n    upstream: \"[2001:db8::53]:5353\"\n").dns.upstream.len(), 1);
    assert_eq!(settings_of("  dns:\n    upstream: [192.0.2.53]\n").dns.upstream, set.settings.dns.upstream);
    // Empty keys stay empty lists.
    let empty = parse("policies:\n  - name: e\n    cgroup: e\n    rules:\n    allow_sockets:\n");
    assert!(empty.policies[0].rules.is_empty() && empty.policies[0].allow_sockets.is_empty());
}

/// An error inside a single value points where it would in a list of one.
#[test]
fn error_in_a_single_value_points_at_it() {
    let dns = |value: &str| format!("settings:\n  dns:\n    upstream: {value}\npolicies: []\n");
    assert_error(
        &dns("resolver.example"),
        3,
        15,
        "settings.dns.upstream: `resolver.example` is not a resolver address",
    );
    assert_error(&dns("[resolver.example]"), 3, 16, "settings.dns.upstream[0]: `resolver.example` is not a resolver");
    assert_error(&dns("1.5"), 3, 15, "`1.5` is not a resolver address");
    assert_error(&dns("{a: 1}"), 3, 15, "invalid type: map, expected a resolver address");

    let one_rule = |rule: &str| format!("policies:\n  - name: demo\n    cgroup: demo\n    rules:\n{rule}");
    assert_error(
        &one_rule("      allow: 10.0.0.1/8\n"),
        5,
        14,
        "policies[0].rules.allow: 10.0.0.1/8 has host bits set",
    );
    assert_error(
        &one_rule("      - allow: 10.0.0.1/8\n"),
        5,
        16,
        "policies[0].rules[0].allow: 10.0.0.1/8 has host bits set",
    );
    assert_error(
        &one_rule("      allow: 10.0.0.0/8\n      deny: 10.0.0.0/8\n"),
        5,
        7,
        "policies[0].rules: a rule takes",
    );
    assert_error(&one_rule("      allow: 10.0.0.0/8\n      proto: tcp\n"), 6, 7, "unknown field `proto`");
    assert_error(&one_rule("      allow: 10.0.0.0/8\n      ports: 0\n"), 6, 14, "port 0");
    assert_error(&one_rule("      10.0.0.0/8\n"), 5, 7, "expected a rule");

    let sockets = |value: &str| format!("policies:\n  - name: a\n    cgroup: a\n    allow_sockets: {value}\n");
    assert_error(&sockets("raw"), 4, 20, "policies[0].allow_sockets: unknown socket kind `raw`");
    assert_error(&sockets("[packet, raw]"), 4, 29, "policies[0].allow_sockets[1]: unknown socket kind `raw`");

    assert_error("policies:\n  name: a\n  cgroup: a\n  mode: loud\n", 4, 9, "policies.mode: unknown mode `loud`");
    assert_error("policies:\n  name: a\n", 2, 3, "a policy needs a selector");
    assert_error("policies: web\n", 1, 11, "expected a policy");
}

#[test]
fn error_names_and_cgroups() {
    let two = "policies:\n  - name: web\n    cgroup: a/b\n  - name: web\n    cgroup: c\n";
    assert_error(two, 4, 11, "policies[1].name: duplicate policy name `web` (first at line 2)");
    let same_cgroup = "policies:\n  - name: a\n    cgroup: x/y\n  - name: b\n    cgroup: x//y/\n";
    assert_error(same_cgroup, 5, 13, "policies[1].cgroup: cgroup `x/y` already has the policy at line 3");
    assert_error("policies:\n  - name: \"\"\n    cgroup: a\n", 2, 11, "policy name is empty");
    assert_error("policies:\n  - name: a\n    cgroup: /sys/fs/cgroup/a\n", 3, 13, "must be relative");
    assert_error("policies:\n  - name: a\n    cgroup: a/../b\n", 3, 13, "must not contain `..`");
    assert_error("policies:\n  - name: a\n    cgroup: ./\n", 3, 13, "cgroup path is empty");
    assert_error(
        "policies:\n  - name: a\n",
        2,
        5,
        "policies[0]: a policy needs a selector: one of `cgroup`, `systemd_unit` or `container`",
    );
}

#[test]
fn error_yaml_syntax_has_a_position() {
    let err = parse_err("policies:\n  - name: a\n   cgroup: [\n");
    assert!(err.line >= 2, "{err}");
    assert!(err.column >= 1, "{err}");
    assert!(!err.message.contains(&format!("at line {} column {}", err.line, err.column)), "{err}");
}

#[test]
fn unreadable_file_has_no_position() {
    let path = std::path::Path::new("/nonexistent/egress/policy.yaml");
    let Err(err) = parse_policy_file(path) else { panic!("read a missing file") };
    assert_eq!((err.line, err.column), (0, 0));
    assert!(err.to_string().starts_with("/nonexistent/egress/policy.yaml: cannot read"), "{err}");
}

/// One policy named `p` with the selector line `selector` (e.g. `cgroup: a`).
fn with_selector(selector: &str) -> String {
    format!("policies:\n  - name: p\n    {selector}\n")
}

/// The selector of the only policy of a file with the selector line `selector`.
fn selector_of(selector: &str) -> Selector {
    let set = parse(&with_selector(selector));
    set.policies[0].selector.clone()
}

#[test]
fn parses_each_selector_kind() {
    let text = "\
policies:
  - name: demo
    cgroup: egress-demo
  - name: docker
    cgroup: system.slice//docker-*.scope/
  - name: kube
    cgroup: kubepods.slice/**/**
  - name: nginx
    systemd_unit: nginx.service
  - name: web
    container: web-1
    default: allow
    rules:
      - deny: 10.0.0.0/8
  - name: by-id
    container: 0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef
  - name: by-prefix
    container: 3f2a
";
    let set = parse(text);
    let selectors: Vec<(&str, &str, bool)> =
        set.policies.iter().map(|p| (p.selector.kind(), p.selector.value(), p.selector.is_glob())).collect();
    assert_eq!(
        selectors,
        [
            ("cgroup", "egress-demo", false),
            ("cgroup", "system.slice/docker-*.scope", true),
            ("cgroup", "kubepods.slice/**", true),
            ("systemd_unit", "nginx.service", false),
            ("container", "web-1", false),
            ("container", "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef", false),
            ("container", "3f2a", false),
        ]
    );
    assert_eq!(set.policies[3].selector.to_string(), "systemd_unit nginx.service");
    assert_eq!(set.policies[4].selector.to_string(), "container web-1");
    assert_eq!(set.policies[1].selector.to_string(), "cgroup system.slice/docker-*.scope");
    assert_eq!(
        set.policies[4].summary(),
        "web: container web-1, default allow, mode enforce, 1 rules (1 IPv4, 0 IPv6)"
    );
    assert_eq!(
        set.policies[0].summary(),
        "demo: cgroup egress-demo, default deny, mode enforce, 0 rules (0 IPv4, 0 IPv6)"
    );
}

#[test]
fn accepts_selector_variants() {
    let cases = [
        ("cgroup: \"**\"", Selector::Cgroup("**".to_owned())),
        ("cgroup: a/?/b", Selector::Cgroup("a/?/b".to_owned())),
        ("cgroup: ./a/./b", Selector::Cgroup("a/b".to_owned())),
        ("cgroup: \"**/x/**/**/y\"", Selector::Cgroup("**/x/**/y".to_owned())),
        ("systemd_unit: getty@tty1.service", Selector::SystemdUnit("getty@tty1.service".to_owned())),
        ("systemd_unit: user-1000.slice", Selector::SystemdUnit("user-1000.slice".to_owned())),
        ("systemd_unit: session-3.scope", Selector::SystemdUnit("session-3.scope".to_owned())),
        ("systemd_unit: sshd.socket", Selector::SystemdUnit("sshd.socket".to_owned())),
        ("systemd_unit: 'dev-x\\x2dy.service'", Selector::SystemdUnit("dev-x\\x2dy.service".to_owned())),
        ("container: 1234", Selector::Container("1234".to_owned())),
        ("container: my_app.v2", Selector::Container("my_app.v2".to_owned())),
        ("container: 0123456789ab", Selector::Container("0123456789ab".to_owned())),
    ];
    for (line, expected) in cases {
        assert_eq!(selector_of(line), expected, "{line}");
    }
    assert!(!Selector::SystemdUnit("a*.service".to_owned()).is_glob());
    assert!(!Selector::Container("x".to_owned()).is_glob());
}

#[test]
fn error_cgroup_globs_point_at_the_value() {
    assert_error(
        &with_selector("cgroup: kubepods.slice/pod**"),
        3,
        13,
        "policies[0].cgroup: cgroup glob `kubepods.slice/pod**`: `**` must be a whole path component",
    );
    assert_error(&with_selector("cgroup: /system.slice/*.scope"), 3, 13, "must be relative to the cgroup2 mount");
    assert_error(&with_selector("cgroup: a/../*"), 3, 13, "must not contain `..`");
    assert_error(&with_selector("cgroup: \"\""), 3, 13, "cgroup path is empty");
}

#[test]
fn error_unit_names_point_at_the_value() {
    let cases = [
        ("nginx", "`nginx` is not a .service, .scope, .slice or .socket unit"),
        ("home.mount", "is not a .service, .scope, .slice or .socket unit"),
        ("multi-user.target", "is not a .service, .scope, .slice or .socket unit"),
        ("system.slice/nginx.service", "is a path, not a systemd unit name; use `cgroup:`"),
        ("nginx-*.service", "use a `cgroup:` glob"),
        ("getty@.service", "is a template; name an instance like getty@NAME.service"),
        (".service", "is not a systemd unit name"),
        ("'ng inx.service'", "is not a systemd unit name"),
    ];
    for (value, needle) in cases {
        let text = with_selector(&format!("systemd_unit: {value}"));
        assert_error(&text, 3, 19, needle);
        assert!(parse_err(&text).message.starts_with("policies[0].systemd_unit: "));
    }
    let long = format!("systemd_unit: {}.service", "a".repeat(250));
    assert_error(&with_selector(&long), 3, 19, "longer than 255");
}

#[test]
fn error_container_refs_point_at_the_value() {
    for value in ["-web", "web/1", "'web 1'", "\"\"", "_web", "wéb", "\"*\""] {
        assert_error(&with_selector(&format!("container: {value}")), 3, 16, "policies[0].container: ");
    }
    assert_error(&with_selector(&format!("container: {}", "a".repeat(256))), 3, 16, "is not a container id or name");
}

#[test]
fn error_selector_count_points_at_the_policy() {
    assert_error(
        "policies:\n  - name: p\n    cgroup: a\n    container: web\n",
        2,
        5,
        "policies[0]: a policy takes exactly one selector, one of `cgroup`, `systemd_unit` or \
         `container`; this one has `cgroup` and `container`",
    );
    assert_error(
        "policies:\n  - name: ok\n    cgroup: ok\n  - systemd_unit: a.service\n    name: p\n    cgroup: a\n    container: b\n",
        4,
        5,
        "policies[1]: a policy takes exactly one selector, one of `cgroup`, `systemd_unit` or \
         `container`; this one has `cgroup`, `systemd_unit` and `container`",
    );
    assert_error(
        "policies:\n  - {name: p, systemd_unit: a.service, container: b}\n",
        2,
        5,
        "this one has `systemd_unit` and `container`",
    );
    assert_error(
        "policies:\n  - name: p\n    rules: []\n",
        2,
        5,
        "policies[0]: a policy needs a selector: one of `cgroup`, `systemd_unit` or `container`",
    );
    assert_error("policies:\n  - name: p\n    cgroup:\n", 2, 5, "a policy needs a selector");
    assert_error(
        "policies:\n  - name: p\n    pod: x\n",
        3,
        5,
        "unknown field `pod`, expected one of `name`, `cgroup`, `systemd_unit`, `container`",
    );
    assert_error("policies:\n  - cgroup: a\n", 2, 5, "missing field `name`");
    assert_error("policies:\n  - web\n", 2, 5, "expected a policy");
}

#[test]
fn error_duplicate_selectors_point_at_the_second() {
    assert_error(
        "policies:\n  - name: a\n    systemd_unit: nginx.service\n  - name: b\n    systemd_unit: nginx.service\n",
        5,
        19,
        "policies[1].systemd_unit: systemd_unit `nginx.service` already has the policy at line 3",
    );
    assert_error(
        "policies:\n  - name: a\n    container: web\n  - name: b\n    cgroup: web\n  - name: c\n    container: web\n",
        7,
        16,
        "policies[2].container: container `web` already has the policy at line 3",
    );
    assert_error(
        "policies:\n  - name: a\n    cgroup: k/**\n  - name: b\n    cgroup: k//**/**/\n",
        5,
        13,
        "policies[1].cgroup: cgroup `k/**` already has the policy at line 3",
    );
    // Same value, different kinds: distinct selectors.
    let set = parse("policies:\n  - name: a\n    container: web\n  - name: b\n    cgroup: web\n");
    assert_eq!(set.policies.len(), 2);
}

#[test]
fn settings_default_when_absent_or_empty() {
    let defaults = Settings {
        attach: "/".into(),
        history: 10_000,
        control_socket: "/run/egress/control.sock".into(),
        control_group: None,
        metrics: None,
        pin_dir: "/sys/fs/bpf/egress".into(),
        events_per_second: egress_common::DEFAULT_EVENT_BUDGET,
        events_written_per_second: 10_000,
        flow_interval: std::time::Duration::from_secs(60),
        dns: DnsSettings::default(),
    };
    assert_eq!(Settings::default(), defaults);
    assert_eq!(PolicySet::default().settings, defaults);
    for text in [
        "policies: []\n",
        "settings:\npolicies: []\n",
        "settings: {}\npolicies: []\n",
        "settings:\n  metrics:\n  attach:\npolicies: []\n",
    ] {
        assert_eq!(parse(text).settings, defaults, "{text}");
    }
}

fn settings_of(lines: &str) -> Settings {
    parse(&format!("settings:\n{lines}policies: []\n")).settings
}

#[test]
fn parses_every_setting() {
    let text = "\
settings:
  attach: /egress-test//parent/
  history: 500
  control_socket: /run/egress//ctl.sock
  control_group: adm
  metrics: 127.0.0.1:9154
  pin_dir: /sys/fs/bpf/egress-test/
  events_per_second: 2_000
  events_written_per_second: 50_000
  flow_interval: 2s
policies:
  - name: a
    cgroup: egress-test/parent/a
";
    let text = text.replace("/egress-test//parent/", "egress-test//parent/");
    let set = parse(&text);
    assert_eq!(
        set.settings,
        Settings {
            attach: "egress-test/parent".to_owned(),
            history: 500,
            control_socket: "/run/egress/ctl.sock".into(),
            control_group: Some("adm".to_owned()),
            metrics: Some("127.0.0.1:9154".parse().expect("addr")),
            pin_dir: "/sys/fs/bpf/egress-test".into(),
            events_per_second: 2_000,
            events_written_per_second: 50_000,
            flow_interval: std::time::Duration::from_secs(2),
            dns: DnsSettings::default(),
        }
    );
    assert_eq!(settings_of("  flow_interval: 5m\n").flow_interval, std::time::Duration::from_secs(300));
    assert_eq!(settings_of("  flow_interval: 90\n").flow_interval, std::time::Duration::from_secs(90));
    let settings = settings_of;
    assert_eq!(settings("  attach: /\n").attach, "/");
    assert_eq!(settings("  attach: \"\"\n").attach, "/");
    assert_eq!(settings("  attach: ./a/.\n").attach, "a");
    assert_eq!(settings("  history: 1\n").history, 1);
    assert_eq!(settings("  history: 10000000\n").history, 10_000_000);
    assert_eq!(settings("  history: \"10_000\"\n").history, 10_000);
    assert_eq!(settings("  metrics: 9154\n").metrics, Some("127.0.0.1:9154".parse().expect("addr")));
    assert_eq!(settings("  metrics: \"[::1]:9154\"\n").metrics, Some("[::1]:9154".parse().expect("addr")));
    assert_eq!(settings("  metrics: 0.0.0.0:80\n").metrics, Some("0.0.0.0:80".parse().expect("addr")));
    assert_eq!(settings("  control_group: 100\n").control_group.as_deref(), Some("100"));
    assert_eq!(settings("  control_group: _egress-ops\n").control_group.as_deref(), Some("_egress-ops"));
    // Settings may come after the policies.
    let set = parse("policies: []\nsettings:\n  history: 7\n");
    assert_eq!(set.settings.history, 7);
}

#[test]
fn error_bad_settings_point_at_the_value() {
    let cases: &[(&str, usize, &str)] = &[
        ("attach: /sys/fs/cgroup/x", 11, "settings.attach: cgroup path `/sys/fs/cgroup/x` must be relative"),
        ("attach: a/../b", 11, "must not contain `..`"),
        ("attach: system.slice/docker-*.scope", 11, "is a glob; the programs attach to one cgroup"),
        ("attach: [a]", 11, "invalid type"),
        ("history: 0", 12, "settings.history: history 0 is out of range; keep 1 to 10000000 events"),
        ("history: 10000001", 12, "out of range"),
        ("history: 99999999999999999999999", 12, "is not a number of events"),
        ("history: -1", 12, "`-1` is not a number of events"),
        ("history: many", 12, "is not a number of events"),
        ("history: 1.5", 12, "is not a number of events"),
        ("control_socket: run/egress.sock", 19, "settings.control_socket: `run/egress.sock` is not an absolute path"),
        ("control_socket: /run/egress/", 19, "names a directory"),
        ("control_socket: /run/../etc/x.sock", 19, "must not contain `..`"),
        ("control_socket: \"\"", 19, "is not an absolute path"),
        ("control_group: \"adm staff\"", 18, "settings.control_group: `adm staff` is not a group name"),
        ("control_group: \"\"", 18, "is not a group name"),
        ("control_group: -adm", 18, "is not a group name"),
        ("metrics: localhost:9154", 12, "settings.metrics: `localhost:9154` is not a listen address"),
        ("metrics: 127.0.0.1", 12, "is not a listen address"),
        ("metrics: 70000", 12, "is not a listen address"),
        ("metrics: \"127.0.0.1:99999\"", 12, "is not a listen address"),
        ("pin_dir: sys/fs/bpf/egress", 12, "settings.pin_dir: `sys/fs/bpf/egress` is not an absolute path"),
        ("pin_dir: /", 12, "not /"),
        ("pin_dir: /sys/fs/bpf/../egress", 12, "must not contain `..`"),
        (
            "events_written_per_second: 0",
            30,
            "settings.events_written_per_second: events_written_per_second `0` is out of range; keep 1 to 10000000",
        ),
        ("events_written_per_second: 10000001", 30, "out of range"),
        ("events_written_per_second: lots", 30, "out of range"),
    ];
    for &(line, column, needle) in cases {
        assert_error(&format!("settings:\n  {line}\npolicies: []\n"), 2, column, needle);
    }
    let long = format!("control_socket: /run/{}.sock", "s".repeat(100));
    assert_error(&format!("settings:\n  {long}\npolicies: []\n"), 2, 19, "a Unix socket path holds at most 107");
    let long = format!("control_group: {}", "g".repeat(33));
    assert_error(&format!("settings:\n  {long}\npolicies: []\n"), 2, 18, "at most 32");
    assert_error(
        "settings:\n  history: 5\n  atach: x\npolicies: []\n",
        3,
        3,
        "settings: unknown field `atach`, expected one of `attach`, `history`",
    );
    assert_error("settings: [history]\npolicies: []\n", 1, 11, "invalid type: sequence");
}

#[test]
fn glob_star_stays_within_a_component() {
    let m = cgroup_glob_matches;
    assert!(m("system.slice/docker-*.scope", "system.slice/docker-3f2a.scope"));
    assert!(m("system.slice/docker-*.scope", "system.slice/docker-.scope"));
    assert!(!m("system.slice/docker-*.scope", "system.slice/docker-a/b.scope"));
    assert!(!m("system.slice/docker-*.scope", "system.slice/docker-3f2a.scope/init"));
    assert!(!m("system.slice/docker-*.scope", "docker-3f2a.scope"));
    assert!(m("*", "a"));
    assert!(!m("*", "a/b"));
    assert!(!m("*", ""));
    assert!(m("a/*", "a/b"));
    assert!(!m("a/*", "a"));
    assert!(m("*/*", "x/y"));
    assert!(m("a*b*c", "abc"));
    assert!(m("a*b*c", "axxbyybc"));
    assert!(!m("a*b*c", "axxbyyb"));
    assert!(m("*.scope", ".scope"));
}

#[test]
fn glob_question_mark_is_one_character() {
    let m = cgroup_glob_matches;
    assert!(m("pod?", "pod1"));
    assert!(!m("pod?", "pod"));
    assert!(!m("pod?", "pod12"));
    assert!(m("p?d", "pöd"));
    assert!(!m("a?b", "a/b"));
    assert!(m("??", "ab"));
}

#[test]
fn glob_double_star_spans_whole_components() {
    let m = cgroup_glob_matches;
    let kube = "kubepods.slice/**";
    assert!(m(kube, "kubepods.slice"));
    assert!(m(kube, "kubepods.slice/kubepods-besteffort.slice"));
    assert!(m(kube, "kubepods.slice/a.slice/b.slice/cri-containerd-1.scope"));
    assert!(!m(kube, "kubepods.slicex"));
    assert!(!m(kube, "system.slice/kubepods.slice"));
    assert!(m("**", ""));
    assert!(m("**", "a/b/c"));
    assert!(m("**/docker-*.scope", "docker-1.scope"));
    assert!(m("**/docker-*.scope", "system.slice/docker-1.scope"));
    assert!(!m("**/docker-*.scope", "system.slice/docker-1.scope/init"));
    assert!(m("a/**/z", "a/z"));
    assert!(m("a/**/z", "a/b/c/z"));
    assert!(!m("a/**/z", "a/b/c/zz"));
    assert!(m("a/**/b/**/c", "a/x/b/y/b/z/c"));
    assert!(!m("a/**/b/**/c", "a/x/c"));
    assert!(m("a/**/*.scope", "a/s.slice/x.scope"));
    assert!(!m("a/**/*.scope", "a/s.slice"));
}

#[test]
fn glob_plain_path_matches_exactly() {
    let m = cgroup_glob_matches;
    assert!(m("egress-demo", "egress-demo"));
    assert!(m("a/b", "a/b"));
    assert!(!m("a/b", "a"));
    assert!(!m("a/b", "a/b/c"));
    assert!(!m("a", "ab"));
    assert!(!m("a", ""));
    assert!(m("", ""));
    assert!(!m("", "a"));
    // Empty components are ignored on both sides.
    assert!(m("/a//b/", "a/b"));
    assert!(m("a/b", "/a/b/"));
}

/// The glob semantics written as plainly as possible, to test the matcher against.
fn naive_glob(pattern: &[&str], path: &[&str]) -> bool {
    fn component(p: &[char], c: &[char]) -> bool {
        match p.split_first() {
            None => c.is_empty(),
            Some(('*', rest)) => (0..=c.len()).any(|i| component(rest, &c[i..])),
            Some(('?', rest)) => !c.is_empty() && component(rest, &c[1..]),
            Some((ch, rest)) => c.first() == Some(ch) && component(rest, &c[1..]),
        }
    }
    match pattern.split_first() {
        None => path.is_empty(),
        Some((&"**", rest)) => (0..=path.len()).any(|i| naive_glob(rest, &path[i..])),
        Some((p, rest)) => {
            path.first().is_some_and(|c| {
                let p: Vec<char> = p.chars().collect();
                let c: Vec<char> = c.chars().collect();
                component(&p, &c)
            }) && naive_glob(rest, &path[1..])
        }
    }
}

fn components(text: &str) -> Vec<&str> {
    text.split('/').filter(|c| !c.is_empty()).collect()
}

fn rule(action: Action, cidr: &str, protocol: Protocol, ports: &[(u16, u16)]) -> Rule {
    let ports = ports.iter().map(|&(lo, hi)| PortRange { lo, hi }).collect();
    Rule { action, net: net(cidr), protocol, ports, line: 0 }
}

fn policy(rules: Vec<Rule>) -> Policy {
    Policy {
        name: "demo".to_owned(),
        selector: Selector::Cgroup("demo".to_owned()),
        default: Action::Deny,
        mode: Mode::Enforce,
        log: Default::default(),
        names: Vec::new(),
        allow_sockets: Vec::new(),
        rules,
    }
}

fn set_of(policies: Vec<Policy>) -> PolicySet {
    PolicySet { settings: Settings::default(), policies }
}

fn compile(set: &PolicySet, slots: &[u32], first_table_id: u32) -> CompiledSet {
    match compile_set(set, slots, first_table_id) {
        Ok(compiled) => compiled,
        Err(err) => panic!("{err}"),
    }
}

#[test]
fn compiles_nested_cidrs() {
    let set = set_of(vec![policy(vec![
        rule(Action::Allow, "10.0.0.0/8", Protocol::Tcp, &[(80, 80)]),
        rule(Action::Deny, "10.1.0.0/16", Protocol::Any, &[]),
        rule(Action::Allow, "10.1.2.0/24", Protocol::Udp, &[]),
        rule(Action::Allow, "2001:db8::/32", Protocol::Any, &[]),
    ])]);
    let compiled = compile(&set, &[7], 5);
    let policy = &compiled.policies[0];
    assert_eq!(
        policy.info,
        PolicyInfo {
            active: 1,
            default_action: action::DENY,
            mode: egress_common::mode::ENFORCE,
            log: egress_common::log::NEW,
            flags: 0,
            allowed_sockets: 0,
            _pad: [0; 3],
        }
    );
    let slot = 7u32.to_be_bytes();
    let leaf = |fallback_action, fallback_rule, port_table| Decision {
        fallback_rule,
        port_table,
        fallback_action,
        _pad: [0; 3],
    };
    let v4: Vec<(u32, [u8; 4], [u8; 4], Decision)> =
        policy.v4.iter().map(|(len, key, d)| (*len, key.policy, key.addr, *d)).collect();
    assert_eq!(
        v4,
        [
            (40, slot, [10, 0, 0, 0], leaf(action::DENY, rule_id::DEFAULT, 5)),
            (48, slot, [10, 1, 0, 0], leaf(action::DENY, 1, 0)),
            (56, slot, [10, 1, 2, 0], leaf(action::DENY, 1, 6)),
        ]
    );
    assert_eq!(policy.v6.len(), 1);
    assert_eq!(policy.v6[0].0, POLICY_KEY_BITS + 32);
    assert_eq!(policy.v6[0].2, leaf(action::ALLOW, 3, 0));
    let tables: Vec<(u32, Vec<PortRule>)> =
        compiled.port_tables.iter().map(|(id, t)| (*id, t.rules[..t.len as usize].to_vec())).collect();
    let port_rule = |rule, port_lo, port_hi, proto, has_ports| PortRule {
        rule,
        port_lo,
        port_hi,
        proto,
        action: action::ALLOW,
        has_ports,
        _pad: 0,
    };
    assert_eq!(
        tables,
        [(5, vec![port_rule(0, 80, 80, proto::TCP, 1)]), (6, vec![port_rule(2, 0, 65535, proto::UDP, 0)]),]
    );
}

#[test]
fn shares_identical_port_tables_across_policies() {
    let rules = vec![
        rule(Action::Allow, "10.0.0.0/8", Protocol::Tcp, &[(443, 443)]),
        rule(Action::Allow, "192.168.0.0/16", Protocol::Tcp, &[(443, 443)]),
    ];
    let mut other = policy(rules.clone());
    other.name = "other".to_owned();
    let set = set_of(vec![policy(rules), other]);
    let compiled = compile(&set, &[1, 2], 1);
    // Rule ids differ (0 and 1), so each policy has two tables and the second policy reuses them.
    assert_eq!(compiled.port_tables.len(), 2);
    let tables = |p: &CompiledPolicy| p.v4.iter().map(|e| e.2.port_table).collect::<Vec<_>>();
    assert_eq!(tables(&compiled.policies[0]), [1, 2]);
    assert_eq!(tables(&compiled.policies[1]), [1, 2]);
}

#[test]
fn rejects_too_many_port_rules() {
    let mut rules: Vec<Rule> =
        (1..=MAX_PORT_RULES as u16).map(|p| rule(Action::Allow, "10.0.0.0/8", Protocol::Tcp, &[(p, p)])).collect();
    let set = set_of(vec![policy(rules.clone())]);
    assert!(compile_set(&set, &[0], 1).is_ok());
    rules.push(rule(Action::Deny, "10.1.0.0/16", Protocol::Udp, &[]));
    let set = set_of(vec![policy(rules)]);
    let err = compile_set(&set, &[0], 1).expect_err("one port rule too many");
    assert_eq!(
        err,
        CompileError::TooManyPortRules {
            policy: "demo".to_owned(),
            cidr: net("10.1.0.0/16"),
            count: MAX_PORT_RULES + 1
        }
    );
    assert!(err.to_string().contains("policy demo: destinations in 10.1.0.0/16"), "{err}");
}

#[test]
fn rejects_bad_slots_and_table_ids() {
    let set = set_of(vec![policy(vec![]), policy(vec![])]);
    assert_eq!(compile_set(&set, &[0], 1).err(), Some(CompileError::SlotCount { policies: 2, slots: 1 }));
    assert_eq!(compile_set(&set, &[3, 3], 1).err(), Some(CompileError::BadSlot(3)));
    assert_eq!(compile_set(&set, &[0, MAX_POLICY_SLOTS], 1).err(), Some(CompileError::BadSlot(MAX_POLICY_SLOTS)));
    assert_eq!(compile_set(&set, &[0, 1], 0).err(), Some(CompileError::ZeroTableId));
}

#[test]
fn reference_ranks_prefix_then_deny_then_order() {
    let p = policy(vec![
        rule(Action::Allow, "10.0.0.0/8", Protocol::Any, &[]),
        rule(Action::Deny, "10.0.0.0/8", Protocol::Tcp, &[(22, 22)]),
        rule(Action::Allow, "10.0.0.0/24", Protocol::Tcp, &[(22, 22)]),
        rule(Action::Allow, "10.0.0.0/24", Protocol::Icmp, &[]),
        rule(Action::Allow, "10.0.0.0/24", Protocol::Tcp, &[(1, 100)]),
    ]);
    let at = |a: [u8; 4]| IpAddr::from(a);
    assert_eq!(reference::evaluate(&p, at([10, 9, 0, 1]), proto::TCP, 22), (Action::Deny, Some(1)));
    assert_eq!(reference::evaluate(&p, at([10, 9, 0, 1]), proto::UDP, 22), (Action::Allow, Some(0)));
    assert_eq!(reference::evaluate(&p, at([10, 0, 0, 1]), proto::TCP, 22), (Action::Allow, Some(2)));
    let mapped = IpAddr::V6(Ipv4Addr::new(10, 0, 0, 1).to_ipv6_mapped());
    assert_eq!(reference::evaluate(&p, mapped, proto::ICMPV6, 0), (Action::Allow, Some(3)));
    assert_eq!(reference::evaluate(&p, at([11, 0, 0, 1]), proto::TCP, 22), (Action::Deny, None));
}

/// Bits `[0, bits)` of `a` and `b` are equal.
fn prefix_equal(a: &[u8], b: &[u8], bits: u32) -> bool {
    let whole = (bits / 8) as usize;
    let rest = bits % 8;
    a[..whole] == b[..whole] && (rest == 0 || (a[whole] ^ b[whole]) >> (8 - rest) == 0)
}

/// The kernel's lookup (`egress-ebpf/src/policy.rs`) with its trie lookups emulated: the
/// longest prefix in the tries (holding every policy of the set) for slot and destination, then
/// the port-table scan of `egress_common::lookup` that the kernel runs, then the policy default.
fn kernel_judge(set: &CompiledSet, slot: u32, info: PolicyInfo, flow: (IpAddr, u8, u16)) -> (u8, u32) {
    let (dst, protocol, port) = flow;
    // As sock_addr.rs builds the flow.
    let protocol = lookup::normalise_protocol(protocol);
    let port = lookup::rule_port(protocol, port);
    let key_bytes = |policy: [u8; 4], addr: &[u8]| [policy.as_slice(), addr].concat();
    type Leaves<'a> = Vec<(u32, Vec<u8>, &'a Decision)>;
    let (wanted, entries): (Vec<u8>, Leaves) = match dst.to_canonical() {
        IpAddr::V4(a) => {
            let key = lookup::rule_key_v4(slot, a.octets());
            let all = set.policies.iter().flat_map(|p| &p.v4);
            (key_bytes(key.policy, &key.addr), all.map(|(len, k, d)| (*len, key_bytes(k.policy, &k.addr), d)).collect())
        }
        IpAddr::V6(a) => {
            let key = lookup::rule_key_v6(slot, a.octets());
            let all = set.policies.iter().flat_map(|p| &p.v6);
            (key_bytes(key.policy, &key.addr), all.map(|(len, k, d)| (*len, key_bytes(k.policy, &k.addr), d)).collect())
        }
    };
    let leaf = entries.iter().filter(|(len, key, _)| prefix_equal(key, &wanted, *len)).max_by_key(|(len, ..)| *len);
    let Some((_, _, decision)) = leaf else {
        return (info.default_action, rule_id::DEFAULT);
    };
    let table = set.port_tables.iter().find(|(id, _)| *id != 0 && *id == decision.port_table).map(|(_, table)| table);
    lookup::resolve(decision, table, protocol, port)
}

fn reference_judge(policy: &Policy, flow: (IpAddr, u8, u16)) -> (u8, u32) {
    let (decided, rule) = reference::evaluate(policy, flow.0, flow.1, flow.2);
    let decided = if decided == Action::Allow { action::ALLOW } else { action::DENY };
    (decided, rule.map_or(rule_id::DEFAULT, |i| i as u32))
}

/// Properties of the output beyond the lookups: unique trie keys, table ids as promised.
fn check_shape(compiled: &CompiledSet, first_table_id: u32) {
    let mut keys = HashSet::new();
    for p in &compiled.policies {
        for (len, key, _) in &p.v4 {
            assert!(keys.insert((*len, key.policy, key.addr.to_vec())), "duplicate key");
        }
        for (len, key, _) in &p.v6 {
            assert!(keys.insert((*len, key.policy, key.addr.to_vec())), "duplicate key");
        }
    }
    let ids: Vec<u32> = compiled.port_tables.iter().map(|(id, _)| *id).collect();
    let expected: Vec<u32> = (first_table_id..).take(ids.len()).collect();
    assert_eq!(ids, expected);
    let contents: HashSet<Vec<PortRule>> =
        compiled.port_tables.iter().map(|(_, t)| t.rules[..t.len as usize].to_vec()).collect();
    assert_eq!(contents.len(), ids.len(), "duplicate port tables");
    for p in &compiled.policies {
        let leaves = p.v4.iter().map(|e| e.2).chain(p.v6.iter().map(|e| e.2));
        for d in leaves {
            assert!(d.port_table == 0 || ids.contains(&d.port_table), "missing table");
        }
    }
}

fn net_strategy() -> impl Strategy<Value = IpNet> {
    let v4 = |x: u8, len: u8| IpNet::V4(Ipv4Net::new(Ipv4Addr::new(10, 0, 0, x), len).expect("len").trunc());
    let v6 = |addr: Ipv6Addr, len: u8| Ipv6Net::new(addr, len).expect("len").trunc();
    let mapped = |x: u8| Ipv4Addr::new(10, 0, 0, x).to_ipv6_mapped();
    let v4_lens = prop::sample::select(vec![0u8, 8, 16, 24, 25, 26, 28, 30, 31, 32]);
    let v6_lens = prop::sample::select(vec![0u8, 32, 64, 120, 124, 126, 128]);
    let mapped_lens = prop::sample::select(vec![96u8, 104, 120, 124, 127, 128]);
    prop_oneof![
        6 => (any::<u8>(), v4_lens).prop_map(move |(x, len)| v4(x, len)),
        2 => (any::<u8>(), v6_lens).prop_map(move |(x, len)| {
            IpNet::V6(v6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, u16::from(x)), len))
        }),
        // As the parser stores them, and (only possible from code) as written.
        2 => (any::<u8>(), mapped_lens.clone())
            .prop_map(move |(x, len)| parse::unmap(IpNet::V6(v6(mapped(x), len)))),
        1 => (any::<u8>(), mapped_lens).prop_map(move |(x, len)| IpNet::V6(v6(mapped(x), len))),
    ]
}

fn rule_strategy() -> impl Strategy<Value = Rule> {
    let protocols = prop::sample::select(vec![Protocol::Any, Protocol::Tcp, Protocol::Udp, Protocol::Icmp]);
    let range = prop::sample::select(vec![(22, 22), (53, 53), (80, 80), (443, 443), (80, 443), (8000, 8080)]);
    let ports = prop_oneof![
        2 => Just(Vec::new()),
        1 => prop::collection::vec(range, 1..=3),
    ];
    (any::<bool>(), net_strategy(), protocols, ports).prop_map(|(allow, net, protocol, ports)| {
        let ports = if protocol == Protocol::Icmp { Vec::new() } else { ports };
        Rule {
            action: if allow { Action::Allow } else { Action::Deny },
            net,
            protocol,
            ports: ports.into_iter().map(|(lo, hi)| PortRange { lo, hi }).collect(),
            line: 0,
        }
    })
}

fn policy_strategy() -> impl Strategy<Value = Policy> {
    // At most 10 rules of at most 3 ranges, and at most MAX_PORT_RULES port-table entries in all
    // (one per range, one for a protocol rule without ports, none for a catch-all), so that no
    // leaf can be subject to more than the kernel scans (the compiler refuses such a file).
    (
        prop::collection::vec(rule_strategy(), 0..=10).prop_filter("at most MAX_PORT_RULES port entries", |rules| {
            let entries = rules.iter().filter(|rule| !rule.is_catch_all()).map(|rule| rule.ports.len().max(1));
            entries.sum::<usize>() <= egress_common::MAX_PORT_RULES
        }),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(rules, allow, audit)| Policy {
            name: "p".to_owned(),
            selector: Selector::Cgroup("p".to_owned()),
            default: if allow { Action::Allow } else { Action::Deny },
            mode: if audit { Mode::Audit } else { Mode::Enforce },
            log: Default::default(),
            rules,
            names: Vec::new(),
            allow_sockets: Vec::new(),
        })
}

fn flow_strategy() -> impl Strategy<Value = (IpAddr, u8, u16)> {
    let dst = prop_oneof![
        4 => any::<u8>().prop_map(|x| IpAddr::from([10, 0, 0, x])),
        1 => Just(IpAddr::from([10, 0, 1, 1])),
        1 => Just(IpAddr::from([11, 0, 0, 1])),
        2 => any::<u8>().prop_map(|x| IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, u16::from(x)))),
        1 => Just(IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb9, 0, 0, 0, 0, 0, 1))),
        2 => any::<u8>().prop_map(|x| IpAddr::V6(Ipv4Addr::new(10, 0, 0, x).to_ipv6_mapped())),
    ];
    let with_port = (
        prop::sample::select(vec![proto::TCP, proto::UDP]),
        prop::sample::select(vec![0u16, 22, 53, 79, 80, 81, 443, 444, 8000, 8050, 8080, 8081, 65535]),
    );
    // The kernel reports port 0 for protocols without ports.
    let portless = prop::sample::select(vec![proto::ICMP, proto::ICMPV6, 132]).prop_map(|p| (p, 0u16));
    let protocol_port = prop_oneof![3 => with_port, 1 => portless];
    (dst, protocol_port).prop_map(|(dst, (protocol, port))| (dst, protocol, port))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4000))]

    #[test]
    fn kernel_lookup_agrees_with_reference(
        policies in prop::collection::vec(policy_strategy(), 1..=3),
        base_slot in 0u32..8000,
        slot_step in 1u32..50,
        first_table_id in 1u32..1000,
        flows in prop::collection::vec(flow_strategy(), 48),
    ) {
        let slots: Vec<u32> = (0..policies.len() as u32).map(|i| base_slot + i * slot_step).collect();
        let set = set_of(policies);
        let compiled = compile(&set, &slots, first_table_id);
        check_shape(&compiled, first_table_id);
        for ((policy, compiled_policy), &slot) in set.policies.iter().zip(&compiled.policies).zip(&slots) {
            for &flow in &flows {
                let kernel = kernel_judge(&compiled, slot, compiled_policy.info, flow);
                prop_assert_eq!(kernel, reference_judge(policy, flow), "flow {:?}", flow);
            }
        }
    }

    #[test]
    fn glob_matcher_agrees_with_naive(
        pattern in "(\\*\\*|[ab*?]{0,4})(/(\\*\\*|[ab*?]{0,4})){0,4}",
        path in "[ab]{0,3}(/[ab]{0,3}){0,5}",
    ) {
        let expected = naive_glob(&components(&pattern), &components(&path));
        prop_assert_eq!(cgroup_glob_matches(&pattern, &path), expected);
    }

    /// Mangled versions of a valid file fail with a position inside the file, never a panic.
    #[test]
    fn mangled_files_fail_cleanly(at in 0usize..EXAMPLE.len(), cut in 0usize..12, insert in "[ -~\n]{0,6}") {
        let mut text = EXAMPLE.to_owned();
        let at = (0..=at).rev().find(|&i| text.is_char_boundary(i)).unwrap_or(0);
        let end = (at + cut).min(text.len());
        text.replace_range(at..end, &insert);
        if let Err(err) = parse_policy_str(&text, "p.yaml") {
            let lines = text.lines().count() + 1;
            prop_assert!(err.line >= 1 && err.line <= lines, "{}", err);
            prop_assert!(err.column >= 1, "{}", err);
        }
    }
}

#[test]
fn compiles_100k_cidrs() {
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let rules: Vec<Rule> = (0..100_000)
        .map(|i| {
            let r = next();
            let len = 16 + (r % 17) as u8;
            let addr = Ipv4Addr::from((r >> 32) as u32);
            let tcp = i % 10 == 0;
            Rule {
                action: if r & 1 == 0 { Action::Allow } else { Action::Deny },
                net: IpNet::V4(Ipv4Net::new(addr, len).expect("len").trunc()),
                protocol: if tcp { Protocol::Tcp } else { Protocol::Any },
                ports: if tcp { vec![PortRange { lo: 443, hi: 443 }] } else { Vec::new() },
                line: i + 1,
            }
        })
        .collect();
    let distinct: HashSet<IpNet> = rules.iter().map(|r| r.net).collect();
    let set = set_of(vec![policy(rules)]);
    let compiled = compile(&set, &[0], 1);
    assert_eq!(compiled.policies[0].v4.len(), distinct.len());
    check_shape(&compiled, 1);
}
