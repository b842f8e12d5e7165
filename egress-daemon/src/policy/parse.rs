//! Reading policy files: YAML in, [`PolicySet`] out, every error pointing at a line and column.
//!
//! Values are checked while they are read, so `serde_norway` attaches the position of the offending
//! scalar to the error; checks across the fields of a rule run inside the rule's visitor and get
//! the position of the rule. Checks across policies use positions captured with [`Located`].

use std::{
    borrow::Cow,
    cell::Cell,
    collections::HashMap,
    convert::Infallible,
    fmt,
    marker::PhantomData,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
};

use egress_common::{MAX_CIDRS_V4, MAX_CIDRS_V6, MAX_PORT_RULES};
use ipnet::{IpNet, Ipv4Net};
use serde::{
    de::{self, value::MapAccessDeserializer, Deserializer, MapAccess, Visitor},
    Deserialize,
};

use super::model::{
    is_glob, one_of, Action, DnsSettings, DomainPattern, Keyword, LogLevel, Mode, NameRule, Policy, PolicySet,
    PortRange, Protocol, RefuseWith, Rule, Selector, Settings, SocketKind, MAX_EVENT_BUDGET, MAX_FLOW_INTERVAL_SECS,
    MAX_HISTORY,
};
use super::one_or_many::{Bounds, OneOrMany};

/// A policy file that cannot be used, and where the problem is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    /// 1-based; 0 when the error has no position (the file could not be read).
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.file, self.message)
        } else {
            write!(f, "{}:{}:{}: {}", self.file, self.line, self.column, self.message)
        }
    }
}

impl std::error::Error for ConfigError {}

/// Reads and checks the policy file at `path`.
pub fn parse_policy_file(path: &Path) -> Result<PolicySet, ConfigError> {
    parse_policy_str(&read_policy_file(path)?, &path.display().to_string())
}

/// The text of the policy file at `path`. An unreadable file is the only error without a
/// position.
pub fn read_policy_file(path: &Path) -> Result<String, ConfigError> {
    let file = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|err| ConfigError {
        file: file.clone(),
        line: 0,
        column: 0,
        message: format!("cannot read the policy file: {err}"),
    })?;
    policy_text(bytes, &file)
}

/// A policy file's bytes as text; bytes that are not UTF-8 are an error at their position.
pub fn policy_text(bytes: Vec<u8>, file: &str) -> Result<String, ConfigError> {
    String::from_utf8(bytes).map_err(|err| {
        let valid = &err.as_bytes()[..err.utf8_error().valid_up_to()];
        let line_start = valid.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        // Valid by construction: the bytes before the error decode.
        let column = String::from_utf8_lossy(&valid[line_start..]).chars().count() + 1;
        ConfigError {
            file: file.to_owned(),
            line: valid.iter().filter(|&&b| b == b'\n').count() + 1,
            column,
            message: "the file is not UTF-8 text".to_owned(),
        }
    })
}

/// Checks a policy file's text; `file` names it in errors.
pub fn parse_policy_str(text: &str, file: &str) -> Result<PolicySet, ConfigError> {
    RULE_BUDGET.set(MAX_RULES);
    let doc = serde_norway::from_str::<FileDoc>(text);
    RULE_BUDGET.set(usize::MAX);
    doc.map_err(|err| yaml_error(&err, text, file))?.into_set(file)
}

/// Most rules a file may hold, counting each time an alias repeats one: as many as the kernel
/// maps hold CIDRs. Bounds the memory and time a file of aliases of aliases can make the parser
/// spend ("billion laughs").
pub const MAX_RULES: usize = (MAX_CIDRS_V4 + MAX_CIDRS_V6) as usize;

thread_local! {
    /// Rules the file being parsed may still add.
    static RULE_BUDGET: Cell<usize> = const { Cell::new(usize::MAX) };
}

/// Turns `serde_norway`'s `path: message at line L column C` into a [`ConfigError`].
fn yaml_error(err: &serde_norway::Error, text: &str, file: &str) -> ConfigError {
    let mut message = err.to_string();
    let Some(at) = err.location() else {
        let (line, column) = unmarked_position(&message, text);
        return ConfigError { file: file.to_owned(), line, column, message };
    };
    let suffixes = [format!(" at line {} column {}", at.line(), at.column()), format!(" at position {}", at.index())];
    if let Some((start, len)) = suffixes.iter().find_map(|s| message.find(s.as_str()).map(|start| (start, s.len()))) {
        message.replace_range(start..start + len, "");
    }
    ConfigError { file: file.to_owned(), line: at.line(), column: at.column(), message }
}

/// Where to point an error `serde_norway` gives no position (a document that is empty, one of
/// several, or whose aliases repeat too much): the end of the text, the second document's
/// marker, or the first alias; the start of the text when none is found.
fn unmarked_position(message: &str, text: &str) -> (usize, usize) {
    let lines = || text.lines().enumerate().map(|(i, l)| (i + 1, l));
    let found = if message.starts_with("EOF") {
        let last = text.lines().count().max(1);
        let len = text.lines().last().map_or(0, |l| l.chars().count());
        Some((last, len + 1))
    } else if message.contains("more than one document") {
        // The marker after the first line with content starts the second document.
        let first = lines().find(|(_, l)| !l.trim().is_empty() && !l.trim_start().starts_with('#'));
        lines()
            .skip_while(|(n, _)| first.is_some_and(|(f, _)| n <= &f))
            .find(|(_, l)| l.starts_with("---") || l.starts_with("..."))
            .map(|(n, _)| (n, 1))
    } else if message.contains("repetition limit") {
        lines().find_map(|(n, l)| {
            let at = l.char_indices().find(|&(i, c)| c == '*' && (i == 0 || l[..i].ends_with([' ', '[', '{', ','])))?;
            Some((n, l[..at.0].chars().count() + 1))
        })
    } else {
        None
    };
    found.unwrap_or((1, 1))
}

/// The top level of a policy file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDoc {
    policies: OneOrMany<PolicyEntry>,
    #[serde(default)]
    settings: Option<SettingsDoc>,
}

/// `settings:`; every key optional.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SettingsDoc {
    #[serde(default)]
    attach: Option<Checked<AttachPath>>,
    #[serde(default)]
    history: Option<Checked<History>>,
    #[serde(default)]
    control_socket: Option<Checked<SocketPath>>,
    #[serde(default)]
    control_group: Option<Checked<GroupName>>,
    #[serde(default)]
    metrics: Option<Checked<MetricsAddr>>,
    #[serde(default)]
    pin_dir: Option<Checked<PinDir>>,
    #[serde(default)]
    events_per_second: Option<Checked<EventBudget>>,
    #[serde(default)]
    events_written_per_second: Option<Checked<WrittenBudget>>,
    #[serde(default)]
    flow_interval: Option<Checked<FlowInterval>>,
    dns: Option<DnsDoc>,
}

impl SettingsDoc {
    fn into_settings(self) -> Settings {
        let defaults = Settings::default();
        Settings {
            attach: self.attach.map_or(defaults.attach, |v| v.0 .0),
            history: self.history.map_or(defaults.history, |v| v.0 .0),
            events_per_second: self.events_per_second.map_or(defaults.events_per_second, |v| v.0 .0),
            events_written_per_second: self
                .events_written_per_second
                .map_or(defaults.events_written_per_second, |v| v.0 .0),
            flow_interval: self.flow_interval.map_or(defaults.flow_interval, |v| v.0 .0),
            control_socket: self.control_socket.map_or(defaults.control_socket, |v| v.0 .0),
            control_group: self.control_group.map(|v| v.0 .0).or(defaults.control_group),
            metrics: self.metrics.map(|v| v.0 .0).or(defaults.metrics),
            pin_dir: self.pin_dir.map_or(defaults.pin_dir, |v| v.0 .0),
            dns: self.dns.map_or(defaults.dns, DnsDoc::into_settings),
        }
    }
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
    fn into_entry(self) -> Result<PolicyEntry, String> {
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
            return Err(format!(
                "a policy takes exactly one selector, one of {SELECTOR_KEYS}; this one has {} and {last}",
                keys.join(", ")
            ));
        }
        let Some((selector, selector_at)) = selectors.pop() else {
            return Err(format!("a policy needs a selector: one of {SELECTOR_KEYS}"));
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
    fn into_set(self, file: &str) -> Result<PolicySet, ConfigError> {
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
    fn into_rule(self) -> Result<AnyRule, &'static str> {
        let (action, destination) = match (self.allow, self.deny) {
            (Some(net), None) => (Action::Allow, net),
            (None, Some(net)) => (Action::Deny, net),
            (Some(_), Some(_)) => return Err("a rule takes `allow` or `deny`, not both"),
            (None, None) => return Err("a rule needs `allow: CIDR` or `deny: CIDR`"),
        };
        let protocol = self.protocol.0;
        if protocol == Protocol::Icmp && !self.ports.0.is_empty() {
            return Err("icmp has no ports: leave out `ports` or use protocol tcp or udp");
        }
        let line = destination.line;
        match destination.value {
            Destination::Net(net) => Ok(AnyRule::Cidr(Rule { action, net, protocol, ports: self.ports.0, line })),
            Destination::Name(_) if action == Action::Deny => {
                Err("a domain name can only be allowed: any name can point at any address and addresses are \
                 shared, so a deny by name cannot be enforced; deny addresses with CIDRs")
            }
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

/// A value written as one YAML scalar and checked as it is read, so that errors point at it.
trait Scalar: Sized {
    /// Completes "expected ..." in type errors.
    fn expecting() -> Cow<'static, str>;

    fn parse(text: &str) -> Result<Self, String>;
}

/// A [`Scalar`] read from YAML.
#[derive(Default)]
struct Checked<T>(T);

impl<'de, T: Scalar> Deserialize<'de> for Checked<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_str(ScalarVisitor(PhantomData)).map(Checked)
    }
}

struct ScalarVisitor<T>(PhantomData<T>);

impl<'de, T: Scalar> Visitor<'de> for ScalarVisitor<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&T::expecting())
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<T, E> {
        T::parse(text).map_err(E::custom)
    }

    fn visit_u64<E: de::Error>(self, number: u64) -> Result<T, E> {
        self.visit_str(&number.to_string())
    }

    fn visit_i64<E: de::Error>(self, number: i64) -> Result<T, E> {
        self.visit_str(&number.to_string())
    }

    // Only a single value standing for a list is read as YAML typed it (see `OneOrMany`).
    fn visit_f64<E: de::Error>(self, number: f64) -> Result<T, E> {
        self.visit_str(&number.to_string())
    }

    fn visit_bool<E: de::Error>(self, value: bool) -> Result<T, E> {
        self.visit_str(&value.to_string())
    }
}

/// A [`Scalar`] and where it was written (1-based; 0 when the position is unknown).
struct Located<T> {
    value: T,
    line: usize,
    column: usize,
}

/// Message of the error [`Located`] provokes to learn a position.
const CAPTURED: &str = "position captured";

impl<'de, T: Scalar> Deserialize<'de> for Located<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // serde_norway has no spans, but it stamps the position of the scalar being read on any
        // error its visitor returns. So the visitor stores the value and fails on purpose, and the
        // position is read back from the error. Only scalars: one event, so nothing is left half
        // read when the error is dropped.
        let mut value = None;
        let Err(err) = deserializer.deserialize_str(Capture { value: &mut value });
        match value {
            Some(value) => {
                let (line, column) = position_in(&err.to_string());
                Ok(Located { value, line, column })
            }
            None => Err(err),
        }
    }
}

struct Capture<'a, T> {
    value: &'a mut Option<T>,
}

impl<'de, T: Scalar> Visitor<'de> for Capture<'_, T> {
    type Value = Infallible;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&T::expecting())
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<Infallible, E> {
        *self.value = Some(T::parse(text).map_err(E::custom)?);
        Err(E::custom(CAPTURED))
    }

    fn visit_u64<E: de::Error>(self, number: u64) -> Result<Infallible, E> {
        self.visit_str(&number.to_string())
    }

    fn visit_i64<E: de::Error>(self, number: i64) -> Result<Infallible, E> {
        self.visit_str(&number.to_string())
    }
}

/// `(line, column)` from `serde_norway`'s `... at line L column C`, `(0, 0)` when absent.
fn position_in(message: &str) -> (usize, usize) {
    let Some((_, at)) = message.rsplit_once(" at line ") else {
        return (0, 0);
    };
    let Some((line, column)) = at.split_once(" column ") else {
        return (0, 0);
    };
    match (line.parse(), column.trim_end().parse()) {
        (Ok(line), Ok(column)) => (line, column),
        _ => (0, 0),
    }
}

impl<K: Keyword> Scalar for K {
    fn expecting() -> Cow<'static, str> {
        one_of::<K>().into()
    }

    fn parse(text: &str) -> Result<Self, String> {
        K::ALL
            .iter()
            .copied()
            .find(|keyword| keyword.keyword().eq_ignore_ascii_case(text))
            .ok_or_else(|| format!("unknown {} `{text}`; expected {}", K::KIND, one_of::<K>()))
    }
}

impl Scalar for PortRange {
    fn expecting() -> Cow<'static, str> {
        "a port or a port range like 8000-8080".into()
    }

    fn parse(text: &str) -> Result<Self, String> {
        let (lo, hi) = match text.split_once('-') {
            Some((lo, hi)) => (port(lo, text)?, port(hi, text)?),
            None => (port(text, text)?, port(text, text)?),
        };
        if lo > hi {
            return Err(format!("port range {text} is reversed; did you mean {hi}-{lo}?"));
        }
        Ok(PortRange { lo, hi })
    }
}

/// One port of `whole` (a port or a range).
fn port(text: &str, whole: &str) -> Result<u16, String> {
    match text.trim().parse::<u32>() {
        Ok(0) => Err(format!("port 0 in `{whole}` is not a port; ports are 1-65535")),
        Ok(port) => {
            u16::try_from(port).map_err(|_| format!("port {port} in `{whole}` is out of range; ports are 1-65535"))
        }
        Err(_) => Err(format!("`{whole}` is not a port or a port range like 8000-8080")),
    }
}

impl Scalar for IpNet {
    fn expecting() -> Cow<'static, str> {
        "an IP address or CIDR".into()
    }

    fn parse(text: &str) -> Result<Self, String> {
        let net =
            if text.contains('/') { text.parse::<IpNet>().ok() } else { text.parse::<IpAddr>().ok().map(IpNet::from) };
        let net = net.ok_or_else(|| format!("`{text}` is not an IPv4 or IPv6 address or CIDR"))?;
        if net != net.trunc() {
            return Err(format!("{text} has host bits set; did you mean {}?", net.trunc()));
        }
        Ok(unmap(net))
    }
}

/// The IPv4 CIDR equal to a CIDR inside `::ffff:0:0/96`, other CIDRs as they are: the kernel
/// judges v4-mapped destinations with the IPv4 rules.
pub(crate) fn unmap(net: IpNet) -> IpNet {
    let IpNet::V6(v6) = net else { return net };
    match (v6.prefix_len().checked_sub(96), v6.network().to_ipv4_mapped()) {
        (Some(len), Some(addr)) => Ipv4Net::new(addr, len).map_or(net, IpNet::V4),
        _ => net,
    }
}

/// A policy's name: anything but empty.
struct Name(String);

impl Scalar for Name {
    fn expecting() -> Cow<'static, str> {
        "a policy name".into()
    }

    fn parse(text: &str) -> Result<Self, String> {
        if text.trim().is_empty() {
            return Err("the policy name is empty".to_owned());
        }
        Ok(Name(text.to_owned()))
    }
}

/// The components of a cgroup path relative to the cgroup2 mount, without empty or `.` ones.
fn cgroup_components<'a>(text: &'a str, what: &str) -> Result<Vec<&'a str>, String> {
    if text.starts_with('/') {
        return Err(format!("{what} `{text}` must be relative to the cgroup2 mount (no leading `/`)"));
    }
    let parts: Vec<&str> = text.split('/').filter(|p| !p.is_empty() && *p != ".").collect();
    if parts.contains(&"..") {
        return Err(format!("{what} `{text}` must not contain `..`"));
    }
    Ok(parts)
}

/// A `cgroup:` selector: a path or glob relative to the cgroup2 mount, normalised to `a/b/c`.
struct CgroupPattern(String);

impl Scalar for CgroupPattern {
    fn expecting() -> Cow<'static, str> {
        "a cgroup path or glob relative to the cgroup2 mount".into()
    }

    fn parse(text: &str) -> Result<Self, String> {
        let mut parts = cgroup_components(text, "cgroup path")?;
        if parts.is_empty() {
            return Err("the cgroup path is empty; name a cgroup below the cgroup2 mount".to_owned());
        }
        if let Some(part) = parts.iter().find(|p| p.contains("**") && **p != "**") {
            return Err(format!(
                "cgroup glob `{text}`: `**` must be a whole path component (as in `a/**/b`), \
                 not part of `{part}`; use `*` within a component"
            ));
        }
        // `**/**` means the same as `**`.
        parts.dedup_by(|a, b| *a == "**" && *b == "**");
        Ok(CgroupPattern(parts.join("/")))
    }
}

/// `settings.attach`: one cgroup, [`crate::cgroup::ROOT`] for the cgroup2 root.
struct AttachPath(String);

impl Scalar for AttachPath {
    fn expecting() -> Cow<'static, str> {
        "a cgroup path relative to the cgroup2 mount, or / for its root".into()
    }

    fn parse(text: &str) -> Result<Self, String> {
        if text.trim() == "/" || text.is_empty() {
            return Ok(AttachPath(crate::cgroup::ROOT.to_string()));
        }
        let parts = cgroup_components(text, "cgroup path")?;
        if is_glob(text) {
            return Err(format!("`{text}` is a glob; the programs attach to one cgroup (or / for the cgroup2 root)"));
        }
        Ok(AttachPath(parts.join("/")))
    }
}

/// A `systemd_unit:` selector.
struct UnitName(String);

impl Scalar for UnitName {
    fn expecting() -> Cow<'static, str> {
        "a systemd unit name like nginx.service".into()
    }

    fn parse(text: &str) -> Result<Self, String> {
        if text.contains('/') {
            return Err(format!("`{text}` is a path, not a systemd unit name; use `cgroup:` for cgroup paths"));
        }
        if is_glob(text) {
            return Err(format!("`{text}`: systemd_unit takes one unit name; use a `cgroup:` glob to match several"));
        }
        let Some(prefix) = crate::cgroup::SELECTABLE_UNIT_SUFFIXES.iter().find_map(|s| text.strip_suffix(s)) else {
            return Err(format!(
                "`{text}` is not a .service, .scope, .slice or .socket unit; policies select \
                 the units that run workloads"
            ));
        };
        let valid = |c: char| c.is_ascii_alphanumeric() || ":-_.\\@".contains(c);
        if prefix.is_empty() || prefix.starts_with(['.', '@']) || !prefix.chars().all(valid) {
            return Err(format!(
                "`{text}` is not a systemd unit name: letters, digits and `:-_.\\@` before the suffix"
            ));
        }
        if text.len() > 255 {
            return Err(format!("unit name `{text}` is longer than 255 characters"));
        }
        if prefix.ends_with('@') {
            return Err(format!("`{text}` is a template; name an instance like {prefix}NAME{}", &text[prefix.len()..]));
        }
        Ok(UnitName(text.to_owned()))
    }
}

/// A `container:` selector: an id, an id prefix of at least 4 hex digits, or a name.
struct ContainerRef(String);

impl Scalar for ContainerRef {
    fn expecting() -> Cow<'static, str> {
        "a container id, id prefix or name".into()
    }

    fn parse(text: &str) -> Result<Self, String> {
        let valid_first = text.starts_with(|c: char| c.is_ascii_alphanumeric());
        let valid_rest = text.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
        if !valid_first || !valid_rest || text.len() > 255 {
            return Err(format!(
                "`{text}` is not a container id or name: a letter or digit, then letters, digits, \
                 `_`, `.` or `-` (at most 255)"
            ));
        }
        Ok(ContainerRef(text.to_owned()))
    }
}

/// `settings.history`.
struct History(usize);

impl Scalar for History {
    fn expecting() -> Cow<'static, str> {
        "a number of events".into()
    }

    fn parse(text: &str) -> Result<Self, String> {
        let number =
            text.trim().replace('_', "").parse::<u64>().map_err(|_| format!("`{text}` is not a number of events"))?;
        match usize::try_from(number) {
            Ok(n) if (1..=MAX_HISTORY).contains(&n) => Ok(History(n)),
            _ => Err(format!("history {number} is out of range; keep 1 to {MAX_HISTORY} events")),
        }
    }
}

/// `settings.flow_interval`: seconds, as a number or with an `s` or `m` suffix.
struct FlowInterval(std::time::Duration);

impl Scalar for FlowInterval {
    fn expecting() -> Cow<'static, str> {
        "a number of seconds like 60, 60s or 1m".into()
    }

    fn parse(text: &str) -> Result<Self, String> {
        let trimmed = text.trim();
        let (number, scale) = match trimmed.strip_suffix('m') {
            Some(minutes) => (minutes, 60),
            None => (trimmed.strip_suffix('s').unwrap_or(trimmed), 1),
        };
        match number.trim().parse::<u64>().ok().and_then(|n| n.checked_mul(scale)) {
            Some(secs) if (1..=MAX_FLOW_INTERVAL_SECS).contains(&secs) => {
                Ok(FlowInterval(std::time::Duration::from_secs(secs)))
            }
            _ => Err(format!("flow_interval `{text}` is out of range; keep 1s to {MAX_FLOW_INTERVAL_SECS}s")),
        }
    }
}

/// `settings.events_per_second`.
struct EventBudget(u32);

impl Scalar for EventBudget {
    fn expecting() -> Cow<'static, str> {
        "a number of events per second".into()
    }

    fn parse(text: &str) -> Result<Self, String> {
        match text.trim().replace('_', "").parse::<u32>() {
            Ok(n) if (1..=MAX_EVENT_BUDGET).contains(&n) => Ok(EventBudget(n)),
            _ => Err(format!("events_per_second `{text}` is out of range; keep 1 to {MAX_EVENT_BUDGET}")),
        }
    }
}

/// `settings.events_written_per_second`.
struct WrittenBudget(u32);

impl Scalar for WrittenBudget {
    fn expecting() -> Cow<'static, str> {
        "a number of events per second".into()
    }

    fn parse(text: &str) -> Result<Self, String> {
        match text.trim().replace('_', "").parse::<u32>() {
            Ok(n) if (1..=MAX_EVENT_BUDGET).contains(&n) => Ok(WrittenBudget(n)),
            _ => Err(format!("events_written_per_second `{text}` is out of range; keep 1 to {MAX_EVENT_BUDGET}")),
        }
    }
}

/// An absolute path without `..`, normalised (no empty or `.` components, no trailing `/`).
fn absolute_path(text: &str) -> Result<PathBuf, String> {
    if !text.starts_with('/') {
        return Err(format!("`{text}` is not an absolute path"));
    }
    let parts: Vec<&str> = text.split('/').filter(|p| !p.is_empty() && *p != ".").collect();
    if parts.contains(&"..") {
        return Err(format!("path `{text}` must not contain `..`"));
    }
    Ok(PathBuf::from(format!("/{}", parts.join("/"))))
}

/// `settings.control_socket`.
struct SocketPath(PathBuf);

/// Longest path a Unix socket address holds (`sun_path` less its NUL).
const MAX_SOCKET_PATH: usize = 107;

impl Scalar for SocketPath {
    fn expecting() -> Cow<'static, str> {
        "an absolute path for the control socket".into()
    }

    fn parse(text: &str) -> Result<Self, String> {
        let path = absolute_path(text)?;
        if text.ends_with('/') || path == Path::new("/") {
            return Err(format!(
                "`{text}` names a directory; give the socket's file name, like /run/egress/control.sock"
            ));
        }
        let len = path.as_os_str().len();
        if len > MAX_SOCKET_PATH {
            return Err(format!(
                "socket path `{}` is {len} bytes; a Unix socket path holds at most {MAX_SOCKET_PATH}",
                path.display()
            ));
        }
        Ok(SocketPath(path))
    }
}

/// `settings.pin_dir`.
struct PinDir(PathBuf);

impl Scalar for PinDir {
    fn expecting() -> Cow<'static, str> {
        "an absolute directory in a bpffs".into()
    }

    fn parse(text: &str) -> Result<Self, String> {
        let path = absolute_path(text)?;
        if path == Path::new("/") {
            return Err("pin_dir must be a directory in a bpffs, like /sys/fs/bpf/egress, not /".to_owned());
        }
        Ok(PinDir(path))
    }
}

/// `settings.control_group`: a group name (or number).
struct GroupName(String);

impl Scalar for GroupName {
    fn expecting() -> Cow<'static, str> {
        "a group name".into()
    }

    fn parse(text: &str) -> Result<Self, String> {
        let body = text.strip_suffix('$').unwrap_or(text);
        let valid_first = body.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_');
        let valid_rest = body.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
        if !valid_first || !valid_rest || text.len() > 32 {
            return Err(format!(
                "`{text}` is not a group name: a letter, digit or `_`, then letters, digits, \
                 `_`, `.` or `-` (at most 32)"
            ));
        }
        Ok(GroupName(text.to_owned()))
    }
}

/// `settings.metrics`: `ADDRESS:PORT`, or a port alone for 127.0.0.1.
struct MetricsAddr(SocketAddr);

impl Scalar for MetricsAddr {
    fn expecting() -> Cow<'static, str> {
        "a listen address like 127.0.0.1:9154".into()
    }

    fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if let Ok(addr) = text.parse::<SocketAddr>() {
            return Ok(MetricsAddr(addr));
        }
        if let Ok(port) = text.parse::<u16>() {
            return Ok(MetricsAddr(SocketAddr::from((Ipv4Addr::LOCALHOST, port))));
        }
        Err(format!("`{text}` is not a listen address like 127.0.0.1:9154 or [::1]:9154"))
    }
}

/// What a rule's `allow` or `deny` names: addresses, or a domain.
enum Destination {
    Net(IpNet),
    Name(DomainPattern),
}

impl Scalar for Destination {
    fn expecting() -> Cow<'static, str> {
        "an IP address, a CIDR or a domain name".into()
    }

    fn parse(text: &str) -> Result<Self, String> {
        // Digits, dots, colons and slashes only: meant as an address, so its error is an address's.
        let looks_numeric = text.trim().chars().all(|c| c.is_ascii_digit() || ".:/".contains(c));
        if looks_numeric || text.contains(':') || text.contains('/') {
            return IpNet::parse(text).map(Destination::Net);
        }
        DomainPattern::parse(text).map(Destination::Name).map_err(|error| {
            format!("{error}; expected an IP address, a CIDR or a domain name like api.example.com or *.example.com")
        })
    }
}

/// `settings.dns`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DnsDoc {
    #[serde(default)]
    listen_port: Option<Checked<ListenPort>>,
    #[serde(default)]
    upstream: Option<OneOrMany<Checked<Upstream>>>,
    #[serde(default)]
    refuse_with: Option<Checked<RefuseWith>>,
    #[serde(default)]
    min_ttl: Option<Checked<Seconds>>,
    #[serde(default)]
    grace: Option<Checked<Seconds>>,
    #[serde(default)]
    max_addresses_per_answer: Option<Checked<Count<MAX_ADDRESSES_PER_ANSWER>>>,
    #[serde(default)]
    max_learned_per_cgroup: Option<Checked<Count<{ egress_common::MAX_LEARNED }>>>,
}

impl DnsDoc {
    fn into_settings(self) -> DnsSettings {
        let defaults = DnsSettings::default();
        DnsSettings {
            listen_port: self.listen_port.map_or(defaults.listen_port, |v| v.0 .0),
            upstream: self.upstream.map_or(defaults.upstream, |list| list.0.into_iter().map(|v| v.0 .0).collect()),
            refuse_with: self.refuse_with.map_or(defaults.refuse_with, |v| v.0),
            min_ttl: self.min_ttl.map_or(defaults.min_ttl, |v| v.0 .0),
            grace: self.grace.map_or(defaults.grace, |v| v.0 .0),
            max_addresses_per_answer: self
                .max_addresses_per_answer
                .map_or(defaults.max_addresses_per_answer, |v| v.0 .0),
            max_learned_per_cgroup: self.max_learned_per_cgroup.map_or(defaults.max_learned_per_cgroup, |v| v.0 .0),
        }
    }
}

/// Largest `settings.dns.max_addresses_per_answer` (more do not fit a 64 KiB message anyway).
const MAX_ADDRESSES_PER_ANSWER: u32 = 4_096;

/// A count from 1 to `MAX`.
struct Count<const MAX: u32>(u32);

impl<const MAX: u32> Scalar for Count<MAX> {
    fn expecting() -> Cow<'static, str> {
        format!("a number from 1 to {MAX}").into()
    }

    fn parse(text: &str) -> Result<Self, String> {
        match text.trim().parse::<u32>() {
            Ok(count) if (1..=MAX).contains(&count) => Ok(Count(count)),
            _ => Err(format!("`{text}` is not a number from 1 to {MAX}")),
        }
    }
}

/// `settings.dns.listen_port`.
struct ListenPort(u16);

impl Scalar for ListenPort {
    fn expecting() -> Cow<'static, str> {
        "a port for the DNS proxy".into()
    }

    fn parse(text: &str) -> Result<Self, String> {
        match text.trim().parse::<u16>() {
            Ok(0) | Err(_) => Err(format!("`{text}` is not a port for the DNS proxy; ports are 1-65535")),
            Ok(53) => Err("the DNS proxy cannot listen on port 53: that is the port steered to it".to_owned()),
            Ok(port) => Ok(ListenPort(port)),
        }
    }
}

/// One of `settings.dns.upstream`: `ADDRESS` (port 53) or `ADDRESS:PORT` (`[V6]:PORT`).
struct Upstream(SocketAddr);

impl Scalar for Upstream {
    fn expecting() -> Cow<'static, str> {
        "a resolver address like 192.0.2.53 or 192.0.2.53:53".into()
    }

    fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if let Ok(addr) = text.parse::<SocketAddr>() {
            return Ok(Upstream(addr));
        }
        if let Ok(ip) = text.parse::<IpAddr>() {
            return Ok(Upstream(SocketAddr::new(ip, 53)));
        }
        Err(format!("`{text}` is not a resolver address like 192.0.2.53 or [2001:db8::53]:53"))
    }
}

/// A duration in whole seconds, at most a day.
struct Seconds(u32);

impl Scalar for Seconds {
    fn expecting() -> Cow<'static, str> {
        "a number of seconds".into()
    }

    fn parse(text: &str) -> Result<Self, String> {
        match text.trim().parse::<u32>() {
            Ok(seconds) if seconds <= 86_400 => Ok(Seconds(seconds)),
            _ => Err(format!("`{text}` is not a number of seconds from 0 to 86400")),
        }
    }
}
