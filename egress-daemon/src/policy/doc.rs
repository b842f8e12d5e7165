//! The shapes of a policy file as written: the serde types between YAML and [`PolicySet`].
//!
//! Checks across the fields of a rule or a policy run inside its visitor, so `serde_norway` gives
//! the error the mapping's position; checks across policies use positions captured with
//! [`Located`].

use std::{cell::Cell, collections::HashMap, fmt};

use egress_common::{MAX_CIDRS_V4, MAX_CIDRS_V6, MAX_PORT_RULES};
use serde::{
    de::{self, value::MapAccessDeserializer, Deserializer, MapAccess, Visitor},
    Deserialize,
};

use super::{
    model::{Action, LogLevel, Mode, NameRule, Policy, PolicySet, PortRange, Protocol, Rule, Selector, SocketKind},
    values::{CgroupPattern, ContainerRef, Destination, Name, UnitName},
};
use crate::{
    settings::{doc::SettingsDoc, Settings},
    yaml::{Bounds, Checked, ConfigError, Located, OneOrMany},
};

/// Reads a policy file's text into its shapes, every rule counted against [`MAX_RULES`].
pub(super) fn read(text: &str) -> Result<FileDoc, serde_norway::Error> {
    RULE_BUDGET.set(MAX_RULES);
    let doc = serde_norway::from_str::<FileDoc>(text);
    RULE_BUDGET.set(usize::MAX);
    doc
}

/// Most rules a file may hold, counting each time an alias repeats one: as many as the kernel
/// maps hold CIDRs. Bounds the memory and time a file of aliases of aliases can make the parser
/// spend ("billion laughs").
pub const MAX_RULES: usize = (MAX_CIDRS_V4 + MAX_CIDRS_V6) as usize;

thread_local! {
    /// Rules the file being parsed may still add.
    static RULE_BUDGET: Cell<usize> = const { Cell::new(usize::MAX) };
}

/// The top level of a policy file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileDoc {
    policies: OneOrMany<PolicyEntry>,
    #[serde(default)]
    settings: Option<SettingsDoc>,
}

/// What a policy mapping holds before its selectors are checked against each other.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyDoc {
    name: Located<Name>,
    #[serde(default)]
    cgroup: Option<Located<CgroupPattern>>,
    #[serde(default)]
    systemd_unit: Option<Located<UnitName>>,
    #[serde(default)]
    container: Option<Located<ContainerRef>>,
    #[serde(default = "default_action")]
    default: Checked<Action>,
    #[serde(default)]
    mode: Checked<Mode>,
    #[serde(default)]
    log: Checked<LogLevel>,
    #[serde(default)]
    rules: OneOrMany<AnyRule>,
    #[serde(default)]
    allow_sockets: OneOrMany<Checked<SocketKind>>,
}

fn default_action() -> Checked<Action> {
    Checked(Action::Deny)
}

/// The keys that select cgroups, as error messages list them.
const SELECTOR_KEYS: &str = "`cgroup`, `systemd_unit` or `container`";

/// A policy or rule mapping whose fields do not fit together.
#[derive(Debug, thiserror::Error)]
pub enum ShapeError {
    #[error("a policy takes exactly one selector, one of {SELECTOR_KEYS}; this one has {others} and {last}")]
    SelectorCount { others: String, last: String },
    #[error("a policy needs a selector: one of {SELECTOR_KEYS}")]
    NoSelector,
    #[error("a rule takes `allow` or `deny`, not both")]
    AllowAndDeny,
    #[error("a rule needs `allow: CIDR` or `deny: CIDR`")]
    NoAction,
    #[error("icmp has no ports: leave out `ports` or use protocol tcp or udp")]
    IcmpPorts,
    #[error(
        "a domain name can only be allowed: any name can point at any address and addresses are \
         shared, so a deny by name cannot be enforced; deny addresses with CIDRs"
    )]
    DenyName,
}

/// A checked policy and where its name and selector were written.
struct PolicyEntry {
    policy: Policy,
    name_at: (usize, usize),
    selector_at: (usize, usize),
}

impl<'de> Deserialize<'de> for PolicyEntry {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(PolicyVisitor)
    }
}

struct PolicyVisitor;

impl<'de> Visitor<'de> for PolicyVisitor {
    type Value = PolicyEntry;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a policy: a mapping with `name`, a selector and `rules`")
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<PolicyEntry, A::Error> {
        // Checked inside the visitor so that serde_norway gives the error the policy's position.
        let doc = PolicyDoc::deserialize(MapAccessDeserializer::new(map))?;
        doc.into_entry().map_err(de::Error::custom)
    }
}

impl PolicyDoc {
    fn into_entry(self) -> Result<PolicyEntry, ShapeError> {
        let mut selectors = Vec::new();
        if let Some(at) = self.cgroup {
            selectors.push((Selector::Cgroup(at.value.0), (at.line, at.column)));
        }
        if let Some(at) = self.systemd_unit {
            selectors.push((Selector::SystemdUnit(at.value.0), (at.line, at.column)));
        }
        if let Some(at) = self.container {
            selectors.push((Selector::Container(at.value.0), (at.line, at.column)));
        }
        if selectors.len() > 1 {
            let mut keys: Vec<String> = selectors.iter().map(|(s, _)| format!("`{}`", s.kind())).collect();
            let last = keys.pop().unwrap_or_default();
            return Err(ShapeError::SelectorCount { others: keys.join(", "), last });
        }
        let Some((selector, selector_at)) = selectors.pop() else {
            return Err(ShapeError::NoSelector);
        };
        let (mut rules, mut names) = (Vec::new(), Vec::new());
        for rule in self.rules.0 {
            match rule {
                AnyRule::Cidr(rule) => rules.push(rule),
                AnyRule::Name(rule) => names.push(rule),
            }
        }
        Ok(PolicyEntry {
            policy: Policy {
                name: self.name.value.0,
                selector,
                default: self.default.0,
                mode: self.mode.0,
                log: self.log.0,
                rules,
                names,
                allow_sockets: self.allow_sockets.0.into_iter().map(|kind| kind.0).collect(),
            },
            name_at: (self.name.line, self.name.column),
            selector_at,
        })
    }
}

impl FileDoc {
    pub(super) fn into_set(self, file: &str) -> Result<PolicySet, ConfigError> {
        let policies = self.policies.0;
        let names = policies.iter().map(|e| (e.policy.name.as_str(), "name", e.name_at));
        check_unique(names, file, |name, _, first| format!("duplicate policy name `{name}` (first at line {first})"))?;
        let selectors = policies.iter().map(|e| {
            let s = &e.policy.selector;
            ((s.kind(), s.value()), s.kind(), e.selector_at)
        });
        check_unique(selectors, file, |(kind, value), _, first| {
            format!("{kind} `{value}` already has the policy at line {first}; a selector takes one policy")
        })?;
        Ok(PolicySet {
            settings: self.settings.map_or_else(Settings::default, SettingsDoc::into_settings),
            policies: policies.into_iter().map(|e| e.policy).collect(),
        })
    }
}

/// Fails at the second policy whose key repeats an earlier one's; `field` is the policy key the
/// error names, `(line, column)` where it was written.
fn check_unique<K: Eq + std::hash::Hash>(
    values: impl Iterator<Item = (K, &'static str, (usize, usize))>,
    file: &str,
    message: impl Fn(K, &str, usize) -> String,
) -> Result<(), ConfigError> {
    let mut first_line = HashMap::new();
    for (index, (key, field, (line, column))) in values.enumerate() {
        if let Some(&first) = first_line.get(&key) {
            return Err(ConfigError {
                file: file.to_owned(),
                line,
                column,
                message: format!("policies[{index}].{field}: {}", message(key, field, first)),
            });
        }
        first_line.insert(key, line);
    }
    Ok(())
}

/// What a rule mapping holds before its fields are checked against each other.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleDoc {
    allow: Option<Located<Destination>>,
    deny: Option<Located<Destination>>,
    #[serde(default)]
    protocol: Checked<Protocol>,
    #[serde(default)]
    ports: Ports,
}

impl RuleDoc {
    fn into_rule(self) -> Result<AnyRule, ShapeError> {
        let (action, destination) = match (self.allow, self.deny) {
            (Some(net), None) => (Action::Allow, net),
            (None, Some(net)) => (Action::Deny, net),
            (Some(_), Some(_)) => return Err(ShapeError::AllowAndDeny),
            (None, None) => return Err(ShapeError::NoAction),
        };
        let protocol = self.protocol.0;
        if protocol == Protocol::Icmp && !self.ports.0.is_empty() {
            return Err(ShapeError::IcmpPorts);
        }
        let line = destination.line;
        match destination.value {
            Destination::Net(net) => Ok(AnyRule::Cidr(Rule { action, net, protocol, ports: self.ports.0, line })),
            Destination::Name(_) if action == Action::Deny => Err(ShapeError::DenyName),
            Destination::Name(pattern) => Ok(AnyRule::Name(NameRule { pattern, protocol, ports: self.ports.0, line })),
        }
    }
}

/// A rule as written: a CIDR rule or a name rule.
enum AnyRule {
    Cidr(Rule),
    Name(NameRule),
}

impl<'de> Deserialize<'de> for AnyRule {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(RuleVisitor)
    }
}

struct RuleVisitor;

impl<'de> Visitor<'de> for RuleVisitor {
    type Value = AnyRule;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a rule: a mapping with `allow` or `deny`")
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<AnyRule, A::Error> {
        let left = RULE_BUDGET.get();
        if left == 0 {
            return Err(de::Error::custom(format_args!(
                "more than {MAX_RULES} rules (counting each repetition through an alias); \
                 the kernel maps hold no more"
            )));
        }
        RULE_BUDGET.set(left - 1);
        // Checked inside the visitor so that serde_norway gives the error the rule's position.
        let doc = RuleDoc::deserialize(MapAccessDeserializer::new(map))?;
        doc.into_rule().map_err(de::Error::custom)
    }
}

/// `ports:` is one port or range, or a list of them.
#[derive(Default)]
struct Ports(Vec<PortRange>);

/// More can never compile, and the cap bounds what an aliased list can expand to.
const PORT_BOUNDS: Bounds = Bounds {
    max: MAX_PORT_RULES,
    too_many: || {
        format!("more than {MAX_PORT_RULES} port ranges in one rule; at most {MAX_PORT_RULES} apply to one destination")
    },
    empty: Some("the port list is empty; leave out `ports` to match every port"),
};

impl<'de> Deserialize<'de> for Ports {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let ranges = OneOrMany::<Checked<PortRange>>::deserialize_bounded(deserializer, &PORT_BOUNDS)?;
        Ok(Ports(ranges.0.into_iter().map(|Checked(range)| range).collect()))
    }
}
