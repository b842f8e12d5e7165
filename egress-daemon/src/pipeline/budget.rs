//! What the event output may write each second. The kernel's per-cgroup budget judges events as
//! they are raised; a backlog (what an earlier daemon left in the pinned ring, or what built up
//! behind a slow reader of the output) is read in one go long after, so the output applies the
//! budget again as it writes: per cgroup, what the kernel lets one cgroup raise in a second on all
//! CPUs, and in total `settings.events_written_per_second`, so that the journal gets a bounded
//! number of lines per second whatever the backlog. What is held back is counted and reported
//! once its second is over.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use crate::settings::Settings;

/// The span each budget counts over.
pub const WINDOW: Duration = Duration::from_secs(1);

/// The limits in force; a reload changes them.
#[derive(Debug)]
pub struct OutputLimits {
    per_cgroup: AtomicU64,
    total: AtomicU64,
}

impl OutputLimits {
    pub fn new(settings: &Settings) -> Self {
        let limits = Self { per_cgroup: AtomicU64::new(0), total: AtomicU64::new(0) };
        limits.set(settings);
        limits
    }

    pub fn set(&self, settings: &Settings) {
        self.set_raw(
            u64::from(settings.events_per_second) * online_cpus(),
            u64::from(settings.events_written_per_second),
        );
    }

    fn set_raw(&self, per_cgroup: u64, total: u64) {
        self.per_cgroup.store(per_cgroup, Ordering::Relaxed);
        self.total.store(total, Ordering::Relaxed);
    }
}

/// The kernel's budget is per CPU: a cgroup may raise that many events on each CPU it runs on.
fn online_cpus() -> u64 {
    // SAFETY: sysconf has no preconditions.
    u64::try_from(unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }).unwrap_or(1).max(1)
}

/// Events written and held back since `start`.
#[derive(Clone, Copy, Debug)]
struct Window {
    start: Instant,
    written: u64,
    held: u64,
}

impl Window {
    fn new(start: Instant) -> Self {
        Self { start, written: 0, held: 0 }
    }

    fn over(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.start) >= WINDOW
    }
}

/// What was held back in windows that are over.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Held {
    /// Per cgroup id: events over the cgroup's budget.
    pub suppressed: Vec<(u64, u64)>,
    /// Events within their cgroup's budget but over the total.
    pub not_written: u64,
}

impl Held {
    pub fn is_empty(&self) -> bool {
        self.suppressed.is_empty() && self.not_written == 0
    }
}

/// Decides, event by event, whether it is written.
pub struct OutputBudget {
    limits: Arc<OutputLimits>,
    cgroups: HashMap<u64, Window>,
    total: Window,
    /// Counts of windows that ended before [`OutputBudget::take_held`] collected them.
    held: Held,
}

impl OutputBudget {
    pub fn new(limits: Arc<OutputLimits>) -> Self {
        Self { limits, cgroups: HashMap::new(), total: Window::new(Instant::now()), held: Held::default() }
    }

    /// True when an event of `cgroup` may be written at `now`; otherwise it is counted.
    pub fn admit(&mut self, cgroup: u64, now: Instant) -> bool {
        let per_cgroup = self.limits.per_cgroup.load(Ordering::Relaxed);
        let total = self.limits.total.load(Ordering::Relaxed);
        let window = self.cgroups.entry(cgroup).or_insert_with(|| Window::new(now));
        if window.over(now) {
            if window.held > 0 {
                self.held.suppressed.push((cgroup, window.held));
            }
            *window = Window::new(now);
        }
        if window.written >= per_cgroup {
            window.held += 1;
            return false;
        }
        if self.total.over(now) {
            self.held.not_written += self.total.held;
            self.total = Window::new(now);
        }
        if self.total.written >= total {
            self.total.held += 1;
            return false;
        }
        window.written += 1;
        self.total.written += 1;
        true
    }

    /// What was held back in the windows over by `now` (all of them with `everything`, when the
    /// output stops); cgroups whose window is over are forgotten.
    pub fn take_held(&mut self, now: Instant, everything: bool) -> Held {
        let mut held = std::mem::take(&mut self.held);
        self.cgroups.retain(|cgroup, window| {
            let over = everything || window.over(now);
            if over && window.held > 0 {
                held.suppressed.push((*cgroup, window.held));
            }
            !over
        });
        if everything || self.total.over(now) {
            held.not_written += self.total.held;
            self.total = Window::new(now);
        }
        held.suppressed.sort_unstable();
        held
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(per_cgroup: u64, total: u64) -> OutputBudget {
        let limits = OutputLimits::new(&Settings::default());
        limits.set_raw(per_cgroup, total);
        OutputBudget::new(Arc::new(limits))
    }

    fn admitted(budget: &mut OutputBudget, cgroup: u64, count: u64, now: Instant) -> u64 {
        (0..count).filter(|_| budget.admit(cgroup, now)).count() as u64
    }

    #[test]
    fn a_backlog_read_at_once_is_held_to_one_window_of_each_cgroups_budget() {
        let mut budget = budget(1_000, 10_000);
        let now = Instant::now();
        assert_eq!(admitted(&mut budget, 7, 50_000, now), 1_000);
        assert_eq!(admitted(&mut budget, 8, 10, now), 10, "another cgroup has a budget of its own");
        assert!(budget.take_held(now, false).is_empty(), "reported once the window is over");
        let later = now + WINDOW;
        assert_eq!(budget.take_held(later, false), Held { suppressed: vec![(7, 49_000)], not_written: 0 });
        assert!(budget.take_held(later, false).is_empty(), "reported once");
        assert_eq!(admitted(&mut budget, 7, 5, later), 5, "a new window, a new budget");
    }

    #[test]
    fn the_total_caps_what_every_cgroup_together_writes() {
        let mut budget = budget(1_000, 2_500);
        let now = Instant::now();
        let written: u64 = (1..=5).map(|cgroup| admitted(&mut budget, cgroup, 1_000, now)).sum();
        assert_eq!(written, 2_500);
        let held = budget.take_held(now + WINDOW, false);
        assert_eq!(held, Held { suppressed: vec![], not_written: 2_500 });
    }

    #[test]
    fn a_window_that_ends_while_events_arrive_is_reported_too() {
        let mut budget = budget(2, 100);
        let now = Instant::now();
        assert_eq!(admitted(&mut budget, 1, 5, now), 2);
        assert_eq!(admitted(&mut budget, 1, 5, now + WINDOW), 2);
        let held = budget.take_held(now + WINDOW, false);
        assert_eq!(held, Held { suppressed: vec![(1, 3)], not_written: 0 }, "the first window's count");
        assert_eq!(budget.take_held(now + WINDOW, true), Held { suppressed: vec![(1, 3)], not_written: 0 });
    }

    #[test]
    fn limits_follow_the_settings() {
        let settings = Settings { events_per_second: 10, events_written_per_second: 30, ..Settings::default() };
        let limits = OutputLimits::new(&settings);
        assert_eq!(limits.per_cgroup.load(Ordering::Relaxed), 10 * online_cpus());
        assert_eq!(limits.total.load(Ordering::Relaxed), 30);
    }
}
