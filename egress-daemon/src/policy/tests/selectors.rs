//! Selectors: each kind, their variants, and the errors that point at them.

use super::*;

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
