//! The proxy's event budget: per bound cgroup, at most `events_per_second` refused-query events
//! a second; the rest are counted as suppressed, as the kernel counts its own (one workload
//! flooding refused names cannot flush the history or push other cgroups' events out).
//!
//! The kernel's budget is per CPU and cgroup; the proxy's is per cgroup, with the same number.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU32, Ordering},
        Mutex, PoisonError,
    },
    time::{Duration, Instant},
};

use egress_common::DEFAULT_EVENT_BUDGET;

/// One budget window.
const WINDOW: Duration = Duration::from_secs(1);

/// Events written and suppressed per bound cgroup.
#[derive(Default)]
pub struct EventBudget {
    /// Events a second per cgroup; 0 until set: [`DEFAULT_EVENT_BUDGET`].
    per_second: AtomicU32,
    cgroups: Mutex<HashMap<u64, Window>>,
}

struct Window {
    started: Instant,
    used: u32,
    suppressed: u64,
}

impl EventBudget {
    /// `settings.events_per_second`, after every load and reload.
    pub fn set(&self, per_second: u32) {
        self.per_second.store(per_second, Ordering::Relaxed);
    }

    /// True when `cgroup` may raise one more event now; false counts it as suppressed.
    pub fn admit(&self, cgroup: u64, now: Instant) -> bool {
        let budget = match self.per_second.load(Ordering::Relaxed) {
            0 => DEFAULT_EVENT_BUDGET,
            budget => budget,
        };
        let mut cgroups = self.cgroups.lock().unwrap_or_else(PoisonError::into_inner);
        let window = cgroups.entry(cgroup).or_insert(Window { started: now, used: 0, suppressed: 0 });
        if now.saturating_duration_since(window.started) >= WINDOW {
            window.started = now;
            window.used = 0;
        }
        if window.used >= budget {
            window.suppressed += 1;
            return false;
        }
        window.used += 1;
        true
    }

    /// Events of `cgroup` suppressed so far.
    pub fn suppressed(&self, cgroup: u64) -> u64 {
        self.cgroups.lock().unwrap_or_else(PoisonError::into_inner).get(&cgroup).map_or(0, |w| w.suppressed)
    }

    /// Forgets a cgroup that is no longer bound (its kernel counts go with its binding too).
    pub fn forget(&self, cgroup: u64) {
        self.cgroups.lock().unwrap_or_else(PoisonError::into_inner).remove(&cgroup);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_cgroup_gets_its_own_budget_per_second() {
        let budget = EventBudget::default();
        budget.set(3);
        let start = Instant::now();
        let admitted = (0..10).filter(|_| budget.admit(1, start)).count();
        assert_eq!(admitted, 3);
        assert_eq!(budget.suppressed(1), 7);
        assert!(budget.admit(2, start), "another cgroup is not held back");
        assert_eq!(budget.suppressed(2), 0);
        assert!(budget.admit(1, start + WINDOW), "a new second, a new budget");
        budget.forget(1);
        assert_eq!(budget.suppressed(1), 0);
    }
}
