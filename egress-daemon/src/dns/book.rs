//! The daemon's record of what the proxy wrote into `LEARNED`: per (bound cgroup, address) the
//! names that led to it, its expiry and its allow entries. It names domains in events and
//! status, and re-derives the entries when the policies change.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, Ipv6Addr},
    time::Duration,
};

use egress_common::{Learned, PortRule, PortTable, MAX_PORT_RULES};

use super::view::{merge_entries, PolicyNames};

/// Names remembered per policy for status (the most recent ones).
const MAX_SEEN_PER_POLICY: usize = 1_000;

/// One learned address of one bound cgroup.
#[derive(Clone, Debug)]
pub struct Entry {
    pub policy: String,
    pub expires_ns: u64,
    pub names: BTreeSet<String>,
    pub rules: Vec<PortRule>,
}

impl Entry {
    /// The kernel's value for this entry.
    pub fn value(&self) -> Learned {
        let mut table = PortTable { len: 0, rules: [PortRule::default(); MAX_PORT_RULES] };
        for (slot, rule) in table.rules.iter_mut().zip(&self.rules) {
            *slot = *rule;
            table.len += 1;
        }
        Learned { expires_ns: self.expires_ns, rules: table }
    }
}

/// What status shows of one policy.
#[derive(Default)]
pub struct PolicyReport {
    /// Names allowed and answered, most recent first.
    pub seen: Vec<String>,
    /// Live addresses, their names and the time left.
    pub learned: Vec<(IpAddr, Vec<String>, Duration)>,
}

/// What the proxy learned, as written into the kernel.
#[derive(Default)]
pub struct Book {
    entries: HashMap<(u64, Ipv6Addr), Entry>,
    /// (policy, address) -> the name most recently learned for it, for events.
    domains: HashMap<(String, Ipv6Addr), String>,
    /// Per policy: names allowed and answered, with when they were last asked (boot ns).
    seen: HashMap<String, BTreeMap<String, u64>>,
    /// Per bound cgroup: its entries (expired ones until they are swept), for its quota.
    held: HashMap<u64, usize>,
}

/// An entry to write: the merge of an answer into what is there.
pub struct Update {
    pub key: (u64, Ipv6Addr),
    pub entry: Entry,
}

impl Book {
    /// The entries that learning `addresses` for `name` (allowed by `names`) in `cgroup` until
    /// `expires_ns` makes: the existing entries extended, never shortened.
    pub fn merge(
        &self,
        cgroup: u64,
        names: &PolicyNames,
        name: &str,
        addresses: &[Ipv6Addr],
        expires_ns: u64,
        now_ns: u64,
    ) -> Vec<Update> {
        let rules = names.entries_for(name);
        addresses
            .iter()
            .map(|addr| {
                let key = (cgroup, *addr);
                let mut entry = match self.entries.get(&key) {
                    Some(old) if old.expires_ns > now_ns && old.policy == names.policy => old.clone(),
                    _ => Entry { policy: names.policy.clone(), expires_ns: 0, names: BTreeSet::new(), rules: Vec::new() },
                };
                entry.expires_ns = entry.expires_ns.max(expires_ns);
                entry.names.insert(name.to_string());
                if !merge_entries(&mut entry.rules, &rules) {
                    tracing::warn!(%name, %addr, "more port rules apply to one learned address than fit; some are left out");
                }
                Update { key, entry }
            })
            .collect()
    }

    /// Records an update the kernel accepted.
    pub fn commit(&mut self, update: Update, name: &str) {
        self.domains.insert((update.entry.policy.clone(), update.key.1), name.to_string());
        self.insert(update.key, update.entry);
    }

    /// Whether `key` has an entry (live or not yet swept): writing it takes no new room.
    pub fn has(&self, key: (u64, Ipv6Addr)) -> bool {
        self.entries.contains_key(&key)
    }

    /// The entries `cgroup` holds.
    pub fn held(&self, cgroup: u64) -> usize {
        self.held.get(&cgroup).copied().unwrap_or(0)
    }

    /// Entries of all cgroups together (as in the kernel map, which the book mirrors).
    pub fn total(&self) -> usize {
        self.entries.len()
    }

    /// Removes and returns the keys of `cgroup`'s entries expired at `now_ns`: room for its
    /// quota before the next sweep.
    pub fn take_expired_of(&mut self, cgroup: u64, now_ns: u64) -> Vec<(u64, Ipv6Addr)> {
        let expired: Vec<_> = self
            .entries
            .iter()
            .filter(|((owner, _), e)| *owner == cgroup && e.expires_ns <= now_ns)
            .map(|(k, _)| *k)
            .collect();
        for key in &expired {
            self.forget(*key);
        }
        expired
    }

    fn insert(&mut self, key: (u64, Ipv6Addr), entry: Entry) {
        if self.entries.insert(key, entry).is_none() {
            *self.held.entry(key.0).or_insert(0) += 1;
        }
    }

    /// Notes a name a policy allowed, for status.
    pub fn saw(&mut self, policy: &str, name: &str, now_ns: u64) {
        let seen = self.seen.entry(policy.to_string()).or_default();
        seen.insert(name.to_string(), now_ns);
        if seen.len() > MAX_SEEN_PER_POLICY {
            if let Some(oldest) = seen.iter().min_by_key(|(_, at)| **at).map(|(n, _)| n.clone()) {
                seen.remove(&oldest);
            }
        }
    }

    /// Removes and returns the keys of entries expired at `now_ns`.
    pub fn take_expired(&mut self, now_ns: u64) -> Vec<(u64, Ipv6Addr)> {
        let expired: Vec<_> = self.entries.iter().filter(|(_, e)| e.expires_ns <= now_ns).map(|(k, _)| *k).collect();
        for key in &expired {
            self.forget(*key);
        }
        expired
    }

    /// Removes one entry.
    pub fn forget(&mut self, key: (u64, Ipv6Addr)) {
        if let Some(entry) = self.entries.remove(&key) {
            if let Some(held) = self.held.get_mut(&key.0) {
                *held = held.saturating_sub(1);
                if *held == 0 {
                    self.held.remove(&key.0);
                }
            }
            let still_learned = self.entries.iter().any(|((_, a), e)| *a == key.1 && e.policy == entry.policy);
            if !still_learned {
                self.domains.remove(&(entry.policy, key.1));
            }
        }
    }

    /// Every entry, to re-derive after the policies changed.
    pub fn all(&self) -> Vec<((u64, Ipv6Addr), Entry)> {
        self.entries.iter().map(|(k, e)| (*k, e.clone())).collect()
    }

    /// Replaces an entry's rules (after a reload).
    pub fn set(&mut self, key: (u64, Ipv6Addr), entry: Entry) {
        self.insert(key, entry);
    }

    /// The domain a policy learned `addr` for.
    pub fn domain_of(&self, policy: &str, addr: IpAddr) -> Option<String> {
        let mapped = match addr {
            IpAddr::V4(v4) => v4.to_ipv6_mapped(),
            IpAddr::V6(v6) => v6,
        };
        self.domains.get(&(policy.to_string(), mapped)).cloned()
    }

    /// Per policy: names seen (most recent first) and live addresses with their names and the
    /// time left.
    pub fn report(&self, now_ns: u64) -> HashMap<String, PolicyReport> {
        let mut out: HashMap<String, PolicyReport> = HashMap::new();
        for (policy, seen) in &self.seen {
            let mut names: Vec<(&String, &u64)> = seen.iter().collect();
            names.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
            out.entry(policy.clone()).or_default().seen = names.into_iter().map(|(n, _)| n.clone()).collect();
        }
        let mut live: Vec<(&(u64, Ipv6Addr), &Entry)> =
            self.entries.iter().filter(|(_, e)| e.expires_ns > now_ns).collect();
        live.sort_by_key(|(key, _)| key.1);
        for ((_, addr), entry) in live {
            let shown = addr.to_ipv4_mapped().map_or(IpAddr::V6(*addr), IpAddr::V4);
            let left = Duration::from_nanos(entry.expires_ns - now_ns);
            out.entry(entry.policy.clone()).or_default().learned.push((
                shown,
                entry.names.iter().cloned().collect(),
                left,
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn learn(book: &mut Book, cgroup: u64, last: u16, expires_ns: u64) {
        for i in 0..last {
            let key = (cgroup, Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, i));
            let entry =
                Entry { policy: "p".into(), expires_ns, names: BTreeSet::from(["a.test".into()]), rules: Vec::new() };
            book.commit(Update { key, entry }, "a.test");
        }
    }

    #[test]
    fn each_cgroup_counts_its_own_entries_and_expired_ones_give_their_room_back() {
        let mut book = Book::default();
        learn(&mut book, 1, 10, 100);
        learn(&mut book, 1, 10, 200);
        learn(&mut book, 2, 3, 100);
        assert_eq!((book.held(1), book.held(2), book.held(3), book.total()), (10, 3, 0, 13), "a refresh takes no room");
        assert!(book.has((1, Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 9))));
        assert!(book.take_expired_of(1, 150).is_empty(), "refreshed until 200");
        assert_eq!(book.take_expired_of(1, 200).len(), 10);
        assert_eq!((book.held(1), book.held(2)), (0, 3), "only that cgroup's entries");
        assert_eq!(book.take_expired(100).len(), 3);
        assert_eq!(book.total(), 0);
        assert!(book.held.is_empty());
    }
}
