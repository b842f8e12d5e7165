//! What `egress status` shows of name rules: per policy the names seen and the addresses
//! learned, and what the proxy refused to spare other cgroups or threw away.

use std::sync::atomic::Ordering;

use egress_common::{dns_names, MAX_LEARNED};

use super::state::DnsState;
use crate::control::protocol::{LearnedStatus, MapFill, StatusReport};

/// Fills the DNS fields of `status` from what the proxy learned and counted.
pub fn fill(state: &DnsState, status: &mut StatusReport) {
    status.dns_busy = state.counters.busy.load(Ordering::Relaxed);
    status.dns_upstream_mismatches = state.counters.mismatched.load(Ordering::Relaxed);
    status.dns_quota = state.counters.quota.load(Ordering::Relaxed);
    let book = state.book();
    let mut report = book.report(crate::clock::boot_ns());
    status.maps.push(MapFill { map: dns_names::LEARNED.to_owned(), used: book.total(), capacity: MAX_LEARNED });
    drop(book);
    for policy in &mut status.policies {
        let Some(found) = report.remove(&policy.name) else { continue };
        policy.names_seen = found.seen;
        policy.learned = found
            .learned
            .into_iter()
            .map(|(address, names, left)| LearnedStatus {
                address: address.to_string(),
                names,
                expires_in: left.as_secs(),
            })
            .collect();
    }
}
