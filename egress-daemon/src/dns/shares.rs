//! Per-cgroup shares of the proxy's work: queries forwarded upstream at once, and TCP
//! connections held open. A cgroup over its share is answered at once (SERVFAIL, or its
//! connection closed) instead of taking what other cgroups' queries need.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
};

/// Slots per bound cgroup, taken and given back by [`Slot`].
pub struct Shares {
    per_cgroup: usize,
    taken: Arc<Mutex<HashMap<u64, usize>>>,
}

/// One slot of one cgroup; given back when dropped.
pub struct Slot {
    cgroup: u64,
    taken: Arc<Mutex<HashMap<u64, usize>>>,
}

impl Shares {
    pub fn new(per_cgroup: usize) -> Self {
        Self { per_cgroup, taken: Arc::default() }
    }

    /// A slot for `cgroup`, or `None` when it holds all of its share.
    pub fn take(&self, cgroup: u64) -> Option<Slot> {
        let mut taken = self.taken.lock().unwrap_or_else(PoisonError::into_inner);
        let count = taken.entry(cgroup).or_insert(0);
        if *count >= self.per_cgroup {
            return None;
        }
        *count += 1;
        Some(Slot { cgroup, taken: self.taken.clone() })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut taken = self.taken.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = taken.get_mut(&self.cgroup) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                taken.remove(&self.cgroup);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cgroup_gets_its_share_and_no_more_and_slots_come_back() {
        let shares = Shares::new(2);
        let first = shares.take(1).expect("first slot");
        let _second = shares.take(1).expect("second slot");
        assert!(shares.take(1).is_none(), "over its share");
        assert!(shares.take(2).is_some(), "another cgroup has its own share");
        drop(first);
        assert!(shares.take(1).is_some(), "a slot given back can be taken again");
    }
}
