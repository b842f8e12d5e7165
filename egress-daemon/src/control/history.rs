//! Recent flow events kept in memory for `egress logs`, and live fan-out for `egress logs -f`.

use std::{
    collections::VecDeque,
    sync::Mutex,
    time::SystemTime,
};

use tokio::sync::broadcast;

use crate::events::FlowRecord;

/// Events a follower may fall behind by before it is told it missed some.
const FOLLOW_BUFFER: usize = 4096;

pub struct EventHistory {
    recent: Mutex<VecDeque<FlowRecord>>,
    capacity: usize,
    live: broadcast::Sender<FlowRecord>,
}

/// Which events a client asked for.
#[derive(Clone, Debug, Default)]
pub struct LogFilter {
    pub blocked_only: bool,
    pub policy: Option<String>,
    pub since: Option<SystemTime>,
}

impl LogFilter {
    pub fn matches(&self, record: &FlowRecord) -> bool {
        (!self.blocked_only || record.verdict == "blocked")
            && self.policy.as_ref().is_none_or(|p| *p == record.policy)
            && self.since.is_none_or(|since| record.at >= since)
    }
}

impl EventHistory {
    pub fn new(capacity: usize) -> Self {
        let (live, _) = broadcast::channel(FOLLOW_BUFFER);
        Self { recent: Mutex::new(VecDeque::with_capacity(capacity.min(65_536))), capacity: capacity.max(1), live }
    }

    pub fn push(&self, record: FlowRecord) {
        let mut recent = self.recent.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if self.live.receiver_count() > 0 {
            let _ = self.live.send(record.clone());
        }
        if recent.len() == self.capacity {
            recent.pop_front();
        }
        recent.push_back(record);
    }

    /// The kept events matching `filter`, and a subscription to every later one: taken under
    /// one lock, so no event is missed or delivered twice in between.
    pub fn snapshot_and_follow(&self, filter: &LogFilter) -> (Vec<FlowRecord>, broadcast::Receiver<FlowRecord>) {
        let recent = self.recent.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let live = self.live.subscribe();
        (recent.iter().filter(|r| filter.matches(r)).cloned().collect(), live)
    }

    pub fn snapshot(&self, filter: &LogFilter) -> Vec<FlowRecord> {
        self.snapshot_and_follow(filter).0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn record(verdict: &str, policy: &str, secs: u64) -> FlowRecord {
        FlowRecord {
            time: String::new(),
            at: SystemTime::UNIX_EPOCH + Duration::from_secs(secs),
            verdict: verdict.into(),
            policy: policy.into(),
            rule: "default".into(),
            cgroup: "c".into(),
            pid: 1,
            comm: "x".into(),
            uid: 0,
            protocol: "tcp".into(),
            dst: "127.0.0.1".parse().expect("ip"),
            dport: 1,
            workload: None,
        }
    }

    #[test]
    fn keeps_the_newest_and_filters() {
        let history = EventHistory::new(2);
        history.push(record("allowed", "a", 1));
        history.push(record("blocked", "a", 2));
        history.push(record("blocked", "b", 3));
        assert_eq!(history.snapshot(&LogFilter::default()).len(), 2);
        let blocked_a = LogFilter { blocked_only: true, policy: Some("a".into()), since: None };
        assert_eq!(history.snapshot(&blocked_a).len(), 1);
        let since = LogFilter { since: Some(SystemTime::UNIX_EPOCH + Duration::from_secs(3)), ..LogFilter::default() };
        assert_eq!(history.snapshot(&since).len(), 1);
    }

    #[tokio::test]
    async fn followers_get_live_events() {
        let history = EventHistory::new(10);
        history.push(record("blocked", "a", 1));
        let (kept, mut live) = history.snapshot_and_follow(&LogFilter::default());
        assert_eq!(kept.len(), 1);
        history.push(record("blocked", "a", 2));
        assert_eq!(live.recv().await.expect("event").policy, "a");
    }
}
