//! `settings:`: defaults, every key, and the errors that point at their values.

use super::*;

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
