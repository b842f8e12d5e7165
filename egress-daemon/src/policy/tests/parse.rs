//! Reading policy files: what parses, and where each error points.

use super::*;

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

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4000))]

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
