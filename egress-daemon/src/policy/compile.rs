//! The policy compiler: a [`PolicySet`] in, the entries of the kernel maps out.
//!
//! The kernel finds the longest CIDR of the policy that holds the destination, then scans that
//! leaf's port table and falls back to the leaf's fallback (`egress-ebpf/src/policy.rs`). So the
//! leaf of each CIDR `C` lists, in priority order, every rule whose CIDR contains `C` (the only
//! rules that can hold a destination whose longest stored CIDR is `C`), up to the first rule that
//! matches every flow.

use std::collections::{HashMap, HashSet};

use egress_common::{
    action, lookup, mode, policy_flags, rule_id, Decision, PolicyInfo, PortRule, PortTable, RuleKeyV4, RuleKeyV6,
    MAX_POLICY_SLOTS, MAX_PORT_RULES,
};
use ipnet::IpNet;

use super::model::{Action, Mode, NameRule, Policy, PolicySet, Protocol, Rule};
use crate::generation::PORT_TABLES_PER_GENERATION;

/// Why a policy set cannot be turned into map entries.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CompileError {
    #[error("{policies} policies but {slots} slots")]
    SlotCount { policies: usize, slots: usize },
    #[error("policy slot {0} is out of range or given to two policies")]
    BadSlot(u32),
    #[error("port table ids start at 1; 0 means no table")]
    ZeroTableId,
    #[error(
        "policy {policy}: destinations in {cidr} are subject to {count} port-specific rules; \
         at most {MAX_PORT_RULES} fit"
    )]
    TooManyPortRules { policy: String, cidr: IpNet, count: usize },
    #[error("policy {policy} has too many rules")]
    TooManyRules { policy: String },
    #[error("port tables: {needed} needed, {PORT_TABLES_PER_GENERATION} available per generation")]
    TooManyPortTables { needed: usize },
}

/// The map entries of one policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompiledPolicy {
    pub info: PolicyInfo,
    /// `(trie prefix length, key, leaf)`; the prefix length counts the slot bits.
    pub v4: Vec<(u32, RuleKeyV4, Decision)>,
    pub v6: Vec<(u32, RuleKeyV6, Decision)>,
}

/// The map entries of a policy set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompiledSet {
    /// In the order of `PolicySet::policies`.
    pub policies: Vec<CompiledPolicy>,
    /// `(id, table)`, ids consecutive from `first_table_id`, each table distinct.
    pub port_tables: Vec<(u32, PortTable)>,
}

/// The protocol number of `p` as the kernel programs compare it (`egress_common::proto`).
pub fn protocol_number(p: Protocol) -> u8 {
    p.number()
}

/// Compiles `set`, putting `set.policies[i]` in kernel slot `slots[i]` and numbering port tables
/// from `first_table_id` (at least 1). Identical port tables are shared by the whole set.
pub fn compile_set(set: &PolicySet, slots: &[u32], first_table_id: u32) -> Result<CompiledSet, CompileError> {
    check_slots(set, slots)?;
    let mut tables = Tables::new(first_table_id)?;
    let policies = set
        .policies
        .iter()
        .zip(slots)
        .map(|(policy, &slot)| compile_policy(policy, slot, &mut tables))
        .collect::<Result<_, _>>()?;
    if tables.entries.len() > PORT_TABLES_PER_GENERATION as usize {
        return Err(CompileError::TooManyPortTables { needed: tables.entries.len() });
    }
    Ok(CompiledSet { policies, port_tables: tables.entries })
}

fn check_slots(set: &PolicySet, slots: &[u32]) -> Result<(), CompileError> {
    if slots.len() != set.policies.len() {
        return Err(CompileError::SlotCount { policies: set.policies.len(), slots: slots.len() });
    }
    let mut seen = HashSet::new();
    match slots.iter().find(|&&slot| slot >= MAX_POLICY_SLOTS || !seen.insert(slot)) {
        Some(&slot) => Err(CompileError::BadSlot(slot)),
        None => Ok(()),
    }
}

fn compile_policy(policy: &Policy, slot: u32, tables: &mut Tables) -> Result<CompiledPolicy, CompileError> {
    if u32::try_from(policy.rules.len() + policy.names.len()).map_or(true, |n| n >= rule_id::FIRST_SPECIAL) {
        return Err(CompileError::TooManyRules { policy: policy.name.clone() });
    }
    let v4 = compile_family(policy, Family::V4, tables)?
        .into_iter()
        .map(|leaf| {
            let key = lookup::rule_key_v4(slot, (leaf.addr as u32).to_be_bytes());
            (lookup::rule_prefix_len(leaf.len), key, leaf.decision)
        })
        .collect();
    let v6 = compile_family(policy, Family::V6, tables)?
        .into_iter()
        .map(|leaf| {
            let key = lookup::rule_key_v6(slot, leaf.addr.to_be_bytes());
            (lookup::rule_prefix_len(leaf.len), key, leaf.decision)
        })
        .collect();
    let info = PolicyInfo {
        active: 1,
        default_action: action_number(policy.default),
        mode: match policy.mode {
            Mode::Enforce => mode::ENFORCE,
            Mode::Audit => mode::AUDIT,
        },
        log: policy.log.number(),
        flags: if policy.names.is_empty() { 0 } else { policy_flags::NAME_RULES },
        allowed_sockets: policy.allow_sockets.iter().fold(0, |bits, kind| bits | kind.bit()),
        _pad: [0; 3],
    };
    Ok(CompiledPolicy { info, v4, v6 })
}

fn action_number(a: Action) -> u8 {
    match a {
        Action::Allow => action::ALLOW,
        Action::Deny => action::DENY,
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn bits(self) -> u32 {
        match self {
            Family::V4 => 32,
            Family::V6 => 128,
        }
    }
}

/// A rule's CIDR as a number, IPv4 in the low 32 bits.
fn cidr_of(net: &IpNet) -> (Family, u128, u8) {
    match net {
        IpNet::V4(n) => (Family::V4, u128::from(u32::from(n.network())), n.prefix_len()),
        IpNet::V6(n) => (Family::V6, u128::from(n.network()), n.prefix_len()),
    }
}

/// The leaf of one distinct CIDR.
struct Leaf {
    addr: u128,
    len: u8,
    decision: Decision,
}

/// What the leaf of a CIDR decides, kept while its sub-CIDRs are compiled.
struct Level {
    addr: u128,
    len: u8,
    port_rules: Vec<PortRule>,
    fallback: (u8, u32),
}

impl Level {
    fn contains(&self, addr: u128, len: u8, bits: u32) -> bool {
        self.len <= len && (self.addr ^ addr) & prefix_mask(bits, self.len) == 0
    }
}

fn prefix_mask(bits: u32, len: u8) -> u128 {
    if len == 0 {
        return 0;
    }
    let host = bits - u32::from(len);
    (u128::MAX >> (128 - bits)) >> host << host
}

/// A rule of one family as `(address, prefix length, is allow, index)`: sorting these puts deny
/// before allow within a CIDR, then file order.
type SortKey = (u128, u8, bool, usize);

/// The leaves of one address family of `policy`.
///
/// Sorted by (address, prefix length), CIDRs come in depth-first order of the prefix tree, so a
/// stack holds the stored ancestors of the current CIDR and its top is the nearest: the rules
/// that contain a CIDR are its own rules followed by everything its nearest ancestor's leaf lists.
fn compile_family(policy: &Policy, family: Family, tables: &mut Tables) -> Result<Vec<Leaf>, CompileError> {
    let bits = family.bits();
    let mut order: Vec<SortKey> = policy
        .rules
        .iter()
        .enumerate()
        .filter_map(|(index, rule)| {
            let (f, addr, len) = cidr_of(&rule.net);
            (f == family).then_some((addr, len, rule.action == Action::Allow, index))
        })
        .collect();
    order.sort_unstable();

    let mut leaves = Vec::new();
    let mut stack: Vec<Level> = Vec::new();
    for group in order.chunk_by(|a, b| (a.0, a.1) == (b.0, b.1)) {
        let (addr, len) = (group[0].0, group[0].1);
        while stack.last().is_some_and(|top| !top.contains(addr, len, bits)) {
            stack.pop();
        }
        let level = level_of(policy, group, stack.last())?;
        let decision = Decision {
            fallback_rule: level.fallback.1,
            port_table: tables.id_of(&level.port_rules)?,
            fallback_action: level.fallback.0,
            _pad: [0; 3],
        };
        leaves.push(Leaf { addr, len, decision });
        stack.push(level);
    }
    Ok(leaves)
}

/// The leaf of the CIDR whose own rules are `group`, in priority order.
fn level_of(policy: &Policy, group: &[SortKey], parent: Option<&Level>) -> Result<Level, CompileError> {
    let (addr, len, _, first) = group[0];
    let mut port_rules = Vec::new();
    let mut fallback = None;
    for &(.., index) in group {
        let rule = &policy.rules[index];
        // Checked against rule_id::REPLY by the caller.
        let id = index as u32;
        if rule.is_catch_all() {
            fallback = Some((action_number(rule.action), id));
            break;
        }
        push_port_rules(&mut port_rules, rule, id);
    }
    let fallback = match (fallback, parent) {
        (Some(own), _) => own,
        (None, Some(parent)) => {
            port_rules.extend_from_slice(&parent.port_rules);
            parent.fallback
        }
        (None, None) => (action_number(policy.default), rule_id::DEFAULT),
    };
    if port_rules.len() > MAX_PORT_RULES {
        return Err(CompileError::TooManyPortRules {
            policy: policy.name.clone(),
            cidr: policy.rules[first].net,
            count: port_rules.len(),
        });
    }
    Ok(Level { addr, len, port_rules, fallback })
}

/// The allow entries a learned address of name rule `rule` (kernel rule id `id`) carries.
pub fn name_rule_entries(rule: &NameRule, id: u32) -> Vec<PortRule> {
    let entry = PortRule {
        rule: id,
        port_lo: 0,
        port_hi: u16::MAX,
        proto: rule.protocol.number(),
        action: action::ALLOW,
        has_ports: 0,
        _pad: 0,
    };
    if rule.ports.is_empty() {
        return vec![entry];
    }
    rule.ports.iter().map(|range| PortRule { port_lo: range.lo, port_hi: range.hi, has_ports: 1, ..entry }).collect()
}

/// The port-table entries of a rule that does not match every flow.
fn push_port_rules(out: &mut Vec<PortRule>, rule: &Rule, id: u32) {
    let entry = PortRule {
        rule: id,
        port_lo: 0,
        port_hi: u16::MAX,
        proto: rule.protocol.number(),
        action: action_number(rule.action),
        has_ports: 0,
        _pad: 0,
    };
    if rule.ports.is_empty() {
        out.push(entry);
    } else {
        out.extend(rule.ports.iter().map(|range| PortRule {
            port_lo: range.lo,
            port_hi: range.hi,
            has_ports: 1,
            ..entry
        }));
    }
}

/// The distinct port tables of a set and their ids.
struct Tables {
    ids: HashMap<Vec<PortRule>, u32>,
    entries: Vec<(u32, PortTable)>,
    next_id: u32,
}

impl Tables {
    fn new(first_id: u32) -> Result<Self, CompileError> {
        if first_id == 0 {
            return Err(CompileError::ZeroTableId);
        }
        Ok(Tables { ids: HashMap::new(), entries: Vec::new(), next_id: first_id })
    }

    /// The id of the table holding `rules` (at most `MAX_PORT_RULES`), 0 for none.
    fn id_of(&mut self, rules: &[PortRule]) -> Result<u32, CompileError> {
        if rules.is_empty() {
            return Ok(0);
        }
        if let Some(&id) = self.ids.get(rules) {
            return Ok(id);
        }
        let id = self.next_id;
        self.next_id = id.checked_add(1).ok_or(CompileError::TooManyPortTables { needed: self.entries.len() + 1 })?;
        let mut table = PortTable { len: rules.len() as u32, rules: [PortRule::default(); MAX_PORT_RULES] };
        table.rules[..rules.len()].copy_from_slice(rules);
        self.ids.insert(rules.to_vec(), id);
        self.entries.push((id, table));
        Ok(id)
    }
}
