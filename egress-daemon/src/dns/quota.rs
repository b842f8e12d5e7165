//! Per-cgroup quotas of the kernel's learned-address map, which every bound cgroup shares
//! (`MAX_LEARNED` entries): one answer teaches at most `max_addresses_per_answer` addresses, and
//! one bound cgroup holds at most `max_learned_per_cgroup` entries, or its equal share of the
//! map when more cgroups with name rules are bound than the map holds quotas for. A cgroup at
//! its limit gets SERVFAIL for answers that would teach it anything new; the others keep
//! resolving, and it recovers as its entries expire.

use std::net::Ipv6Addr;

use egress_common::MAX_LEARNED;

/// An answer that would take a cgroup past its limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the cgroup holds {held} learned addresses and the answer brings {new} more; its limit is {limit}")]
pub struct OverQuota {
    pub held: usize,
    pub new: usize,
    pub limit: usize,
}

/// The learned entries one bound cgroup may hold.
#[derive(Clone, Copy, Debug)]
pub struct Quota {
    per_cgroup: usize,
}

impl Quota {
    /// `settings.dns.max_learned_per_cgroup`.
    pub fn new(per_cgroup: u32) -> Self {
        Self { per_cgroup: usize::try_from(per_cgroup).unwrap_or(usize::MAX) }
    }

    /// One cgroup's limit while `cgroups` bound cgroups have name rules: its quota, or its
    /// equal share of the kernel map if that is smaller.
    pub fn limit(&self, cgroups: usize) -> usize {
        let share = MAX_LEARNED as usize / cgroups.max(1);
        self.per_cgroup.min(share).max(1)
    }

    /// Whether a cgroup holding `held` entries may learn `new` more. Refreshing what it holds
    /// (`new` 0) is always allowed, even above a limit that shrank since.
    pub fn check(&self, held: usize, new: usize, cgroups: usize) -> Result<(), OverQuota> {
        let limit = self.limit(cgroups);
        if new == 0 || held.saturating_add(new) <= limit {
            return Ok(());
        }
        Err(OverQuota { held, new, limit })
    }
}

/// The addresses of an answer that are learned: the first `cap`, in the answer's order.
pub fn capped(addresses: &[Ipv6Addr], cap: u32) -> &[Ipv6Addr] {
    let cap = usize::try_from(cap).unwrap_or(usize::MAX);
    &addresses[..addresses.len().min(cap)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cgroup_learns_up_to_its_quota_and_refreshes_beyond_it() {
        let quota = Quota::new(100);
        assert_eq!(quota.check(0, 100, 1), Ok(()));
        assert_eq!(quota.check(90, 10, 1), Ok(()));
        assert_eq!(quota.check(90, 11, 1), Err(OverQuota { held: 90, new: 11, limit: 100 }));
        assert_eq!(quota.check(100, 1, 1).map_err(|e| e.limit), Err(100));
        assert_eq!(quota.check(100, 0, 1), Ok(()), "refreshing held entries needs no room");
        assert_eq!(quota.check(usize::MAX, 1, 1).map_err(|e| e.held), Err(usize::MAX), "no overflow");
    }

    #[test]
    fn the_default_quota_lets_sixteen_cgroups_fill_the_map_and_more_share_it_equally() {
        let quota = Quota::new(crate::settings::DEFAULT_MAX_LEARNED_PER_CGROUP);
        assert_eq!(quota.limit(1), 4_096);
        assert_eq!(quota.limit(16) * 16, MAX_LEARNED as usize, "16 cgroups at quota fill the map");
        assert_eq!(quota.limit(64), 1_024, "more cgroups: an equal share each");
        assert_eq!(quota.limit(0), 4_096);
        assert_eq!(Quota::new(10).limit(1_000_000), 1, "never zero");
        assert_eq!(Quota::new(u32::MAX).limit(1), MAX_LEARNED as usize, "never more than the map");
    }

    #[test]
    fn an_answer_teaches_its_first_addresses_only() {
        let addresses: Vec<Ipv6Addr> = (0..40u16).map(|i| Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, i)).collect();
        assert_eq!(capped(&addresses, 32), &addresses[..32]);
        assert_eq!(capped(&addresses[..3], 32).len(), 3);
        assert!(capped(&addresses, 0).is_empty());
    }
}
