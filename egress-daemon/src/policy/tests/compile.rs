//! The compiler's output, and property tests holding the compiled maps (through a model of the
//! kernel lookup) to the reference evaluator.

use super::*;

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
            .prop_map(move |(x, len)| values::unmap(IpNet::V6(v6(mapped(x), len)))),
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

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    /// `judge::Judge` (explain, replay, candidates) answers as the kernel's lookup and the
    /// reference evaluator for policies without name rules, in both modes.
    #[test]
    fn userspace_judge_agrees_with_reference(
        policy in policy_strategy(),
        flows in prop::collection::vec(flow_strategy(), 48),
    ) {
        let judge = crate::policy::judge::Judge::new(&policy).expect("compiles");
        for &flow in &flows {
            let (dst, protocol, port) = flow;
            let got = judge.judge(crate::policy::judge::Flow { dst, protocol, port }, &[]);
            let has_ports = protocol == proto::TCP || protocol == proto::UDP;
            if has_ports && port == 0 {
                prop_assert_eq!(got.rule, rule_id::PORT_ZERO);
                prop_assert!(!got.allows());
                continue;
            }
            let (decided, rule) = reference_judge(&policy, flow);
            prop_assert_eq!((got.rule, got.allows()), (rule, decided == action::ALLOW), "flow {:?}", flow);
            let refused = if policy.mode == Mode::Audit { egress_common::verdict::AUDIT } else { egress_common::verdict::BLOCKED };
            prop_assert!(got.allows() || got.verdict == refused);
        }
    }
}
