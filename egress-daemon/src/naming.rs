//! The naming stage of the event path: raw [`FlowEvent`]s from the kernel's ring become
//! [`NamedEvent`]s with names (policy, rule, cgroup, workload) and wall-clock time, ready for
//! the sinks. The [`Catalog`] holds the names the engine gives it.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
    time::{Duration, SystemTime},
};

use egress_common::{family, hook, proto, verdict, FlowEvent};
use serde::{Deserialize, Serialize};

use crate::cgroup::Hierarchy;

/// One flow decision, as shown to people and machines (and sent over the control socket).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NamedEvent {
    /// RFC 3339, UTC.
    pub time: String,
    /// The same instant, for filtering; not part of the wire format.
    #[serde(skip, default = "unix_epoch")]
    pub at: SystemTime,
    pub verdict: String,
    pub policy: String,
    pub rule: String,
    pub cgroup: String,
    pub pid: u32,
    pub comm: String,
    pub uid: u32,
    pub protocol: String,
    pub dst: IpAddr,
    pub dport: u16,
    /// The container (`docker:3f2a9c1b0d4e`) or systemd unit of the cgroup, where known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<String>,
    /// The domain name a name rule allowed the flow for, or the name a DNS query asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
}

/// A cgroup's path and what runs in it.
#[derive(Clone, Debug)]
struct CgroupName {
    relative: String,
    workload: Option<String>,
}

impl CgroupName {
    fn new(relative: String) -> Self {
        let workload = crate::matching::workload_of(&relative);
        Self { relative, workload }
    }
}

fn unix_epoch() -> SystemTime {
    SystemTime::UNIX_EPOCH
}

/// The names of a decision: its policy, rule and cgroup (with the workload running there).
pub struct Names {
    pub policy: String,
    pub rule: String,
    pub cgroup: String,
    pub workload: Option<String>,
}

/// Names of what one policy slot holds.
#[derive(Clone, Debug)]
pub struct SlotNames {
    pub policy: String,
    /// Indexed by kernel rule id: the CIDR rules, then the name rules.
    pub rules: Vec<String>,
    /// Rule id of the first name rule.
    pub names_from: usize,
}

/// Which domain a policy learned an address for (the DNS proxy knows), to name it in events.
pub trait DomainNames: Send + Sync {
    fn domain_of(&self, policy: &str, addr: IpAddr) -> Option<String>;
}

/// Everything needed to name the ids an event carries. Slots of earlier generations stay known
/// so that events raised just before a reload still get their names.
pub struct Catalog {
    slots: HashMap<u32, SlotNames>,
    cgroups: HashMap<u64, CgroupName>,
    hierarchy: Hierarchy,
    boot_to_wall: Duration,
    /// Which domain a policy learned an address for (the DNS proxy's), to name it in events.
    domains: Option<std::sync::Arc<dyn DomainNames>>,
    /// Records raised outside the kernel (the DNS proxy's), written with the next batch.
    injected: std::collections::VecDeque<NamedEvent>,
}

/// Records waiting in [`Catalog::inject`] beyond which new ones are dropped.
const MAX_INJECTED: usize = 10_000;

impl Catalog {
    pub fn new(hierarchy: Hierarchy) -> Self {
        Self {
            slots: HashMap::new(),
            cgroups: HashMap::new(),
            hierarchy,
            boot_to_wall: boot_epoch(),
            domains: None,
            injected: std::collections::VecDeque::new(),
        }
    }

    /// Where events of name rules find their domain.
    pub fn set_domains(&mut self, domains: std::sync::Arc<dyn DomainNames>) {
        self.domains = Some(domains);
    }

    /// Queues a record for the event output; false when the queue is full and it was dropped.
    pub fn inject(&mut self, record: NamedEvent) -> bool {
        if self.injected.len() >= MAX_INJECTED {
            return false;
        }
        self.injected.push_back(record);
        true
    }

    /// The queued records, oldest first.
    pub fn take_injected(&mut self) -> Vec<NamedEvent> {
        self.injected.drain(..).collect()
    }

    /// A cgroup's path and workload, for records raised outside the kernel.
    pub fn cgroup_names(&mut self, id: u64) -> (String, Option<String>) {
        let name = self.cgroup_name(id);
        (name.relative, name.workload)
    }

    pub fn name_slot(&mut self, slot: u32, names: SlotNames) {
        self.slots.insert(slot, names);
    }

    /// Names a bound cgroup (the engine already knows what runs in it).
    pub fn name_cgroup(&mut self, id: u64, relative: String, workload: Option<String>) {
        self.cgroups.insert(id, CgroupName { relative, workload });
    }

    /// The domain a name rule (`rule` of `slot`, policy `policy`) allowed `addr` for, `None`
    /// when another rule decided or the proxy forgot it.
    pub fn domain(&self, slot: u32, rule: u32, policy: &str, addr: IpAddr) -> Option<String> {
        let by_name =
            self.slots.get(&slot).is_some_and(|n| (rule as usize) >= n.names_from && (rule as usize) < n.rules.len());
        match (&self.domains, by_name) {
            (Some(domains), true) => domains.domain_of(policy, addr),
            _ => None,
        }
    }

    /// Names an event and stamps it with wall-clock time.
    pub fn describe(&mut self, event: &FlowEvent) -> NamedEvent {
        let names = self.names(event.policy, event.rule, event.cgroup_id);
        let domain = self.domain(event.policy, event.rule, &names.policy, address(event));
        let (policy, rule, cgroup) = (names.policy, names.rule, names.cgroup);
        let at = self.wall_time(event.boot_ns);
        NamedEvent {
            domain,
            time: crate::printable::timestamp(at),
            at,
            verdict: verdict_name(event.verdict).to_string(),
            policy,
            rule,
            cgroup,
            workload: names.workload,
            pid: event.pid,
            comm: comm_name(&event.comm),
            uid: event.uid,
            protocol: if event.hook == hook::SOCK_CREATE || event.hook == hook::SOCKET_LSM {
                socket_name(event.family)
            } else {
                protocol_name(event.protocol, event.family)
            },
            dst: address(event),
            dport: event.dport,
        }
    }

    /// Names of a policy slot, one of its rules and a cgroup, as events show them.
    pub fn names(&mut self, slot: u32, rule: u32, cgroup_id: u64) -> Names {
        let cgroup = self.cgroup_name(cgroup_id);
        let names = self.slots.get(&slot);
        let policy = names.map_or_else(|| format!("slot {slot}"), |n| n.policy.clone());
        let rule = match crate::policy::judge::special_rule_name(rule) {
            Some(special) => special.to_string(),
            None => names.and_then(|n| n.rules.get(rule as usize).cloned()).unwrap_or_else(|| format!("rule {rule}")),
        };
        Names { policy, rule, cgroup: cgroup.relative, workload: cgroup.workload }
    }

    /// Wall-clock time of a `CLOCK_BOOTTIME` stamp from the kernel.
    pub fn wall_time(&self, boot_ns: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + self.boot_to_wall + Duration::from_nanos(boot_ns)
    }

    fn cgroup_name(&mut self, id: u64) -> CgroupName {
        if let Some(name) = self.cgroups.get(&id) {
            return name.clone();
        }
        // A descendant of a bound cgroup: look for it below the bound ones, then remember it.
        let roots: Vec<String> = self.cgroups.values().map(|name| name.relative.clone()).collect();
        let found = roots
            .iter()
            .find_map(|root| find_cgroup_dir(&self.hierarchy.dir(root), id, 8))
            .map(|dir| self.hierarchy.relative(&dir))
            .unwrap_or_else(|| format!("cgroup-id:{id}"));
        let name = CgroupName::new(found);
        self.cgroups.insert(id, name.clone());
        name
    }
}

/// Decodes one ring buffer item; `None` when it is too short to be an event.
pub fn decode(bytes: &[u8]) -> Option<FlowEvent> {
    if bytes.len() < size_of::<FlowEvent>() {
        return None;
    }
    // SAFETY: FlowEvent is plain old data and the length is checked; read_unaligned copes with
    // any alignment of the ring buffer slot.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) })
}

fn find_cgroup_dir(dir: &Path, id: u64, depth: u32) -> Option<std::path::PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let entries = std::fs::read_dir(dir).ok()?;
    for entry in entries.flatten() {
        let Ok(meta) = entry.metadata() else { continue };
        if !meta.is_dir() {
            continue;
        }
        if meta.ino() == id {
            return Some(entry.path());
        }
        if depth > 0 {
            if let Some(found) = find_cgroup_dir(&entry.path(), id, depth - 1) {
                return Some(found);
            }
        }
    }
    None
}

/// Wall-clock time of boot, so `CLOCK_BOOTTIME` stamps convert to real time.
fn boot_epoch() -> Duration {
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    now.saturating_sub(Duration::from_nanos(crate::clock::boot_ns()))
}

pub fn verdict_name(value: u8) -> &'static str {
    match value {
        verdict::ALLOWED => "allowed",
        verdict::AUDIT => "audit",
        _ => "blocked",
    }
}

pub fn protocol_name(protocol: u8, fam: u8) -> String {
    match protocol {
        proto::TCP => "tcp".into(),
        proto::UDP => "udp".into(),
        proto::ICMP if fam == family::INET6 => "icmp6".into(),
        proto::ICMP => "icmp".into(),
        other => format!("ip-proto-{other}"),
    }
}

/// A refused or allowed socket, named by what made it a kind of its own.
fn socket_name(fam: u8) -> String {
    match fam {
        family::INET | family::INET6 => "socket-mptcp".into(),
        17 => "socket-packet".into(),
        40 => "socket-vsock".into(),
        44 => "socket-xdp".into(),
        other => format!("socket-af{other}"),
    }
}

pub fn comm_name(comm: &[u8; 16]) -> String {
    let end = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
    String::from_utf8_lossy(&comm[..end]).into_owned()
}

fn address(event: &FlowEvent) -> IpAddr {
    if event.family == family::INET6 {
        IpAddr::V6(Ipv6Addr::from(event.daddr))
    } else {
        let [a, b, c, d, ..] = event.daddr;
        IpAddr::V4(Ipv4Addr::new(a, b, c, d))
    }
}

/// An event for tests: `seq` goes in `pid`, so tests can follow the order of events.
#[cfg(test)]
pub(crate) fn test_record(seq: u32, verdict: &str, policy: &str, at: std::time::SystemTime) -> NamedEvent {
    NamedEvent {
        time: crate::printable::timestamp(at),
        at,
        verdict: verdict.into(),
        policy: policy.into(),
        rule: "default".into(),
        cgroup: "egress-test".into(),
        pid: seq,
        comm: "curl".into(),
        uid: 0,
        protocol: "tcp".into(),
        dst: std::net::IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2)),
        dport: 8000,
        workload: None,
        domain: None,
    }
}
