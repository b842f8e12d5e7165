//! What `egress status` shows of name rules: per policy the names seen and the addresses learned.

use super::DnsState;
use crate::control::protocol::{LearnedStatus, PolicyStatus};

/// Fills the DNS fields of `policies` from what the proxy learned.
pub fn fill(state: &DnsState, policies: &mut [PolicyStatus]) {
    let mut report = state.book().report(super::book::boot_ns());
    for policy in policies {
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
