//! What the DNS proxy, the event catalog and status share: what the proxy learned (the book),
//! the policies' names by cgroup (the view), the refused-query event budget and the counters.

use std::{
    net::IpAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex, MutexGuard,
    },
};

use super::{book::Book, budget, view::View};

/// What the proxy, the event catalog and status share.
#[derive(Default)]
pub struct DnsState {
    pub view: View,
    book: Mutex<Book>,
    /// The per-cgroup budget of refused-query events.
    pub events: budget::EventBudget,
    /// Queries and connections the proxy refused to spare others, and answers it threw away.
    pub counters: Counters,
}

/// What the proxy counts beside the events, for status and metrics.
#[derive(Default)]
pub struct Counters {
    /// Queries answered SERVFAIL and TCP connections closed because their cgroup held its
    /// whole share (or the proxy all it serves at once).
    pub busy: AtomicU64,
    /// Upstream answers that did not echo their query (id, question, letter case): SERVFAIL.
    pub mismatched: AtomicU64,
    /// Answers refused with SERVFAIL because their cgroup held its quota of learned addresses.
    pub quota: AtomicU64,
}

impl Counters {
    pub fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

impl DnsState {
    pub fn book(&self) -> MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The learned entries `cgroup` holds now.
    pub fn learned(&self, cgroup: u64) -> u64 {
        self.book().held(cgroup) as u64
    }
}

impl crate::engine::BindingWatcher for DnsState {
    fn replaced(&self, policies: &[crate::policy::Policy], bound: &mut dyn Iterator<Item = (u64, usize)>) {
        self.view.replace(policies, bound);
    }

    fn bound(&self, cgroup_id: u64, policy: &crate::policy::Policy) {
        self.view.bind(cgroup_id, policy);
    }

    fn unbound(&self, cgroup_id: u64) {
        self.view.unbind(cgroup_id);
        self.events.forget(cgroup_id);
    }
}

impl crate::naming::DomainNames for DnsState {
    fn domain_of(&self, policy: &str, addr: IpAddr) -> Option<String> {
        self.book().domain_of(policy, addr)
    }
}
