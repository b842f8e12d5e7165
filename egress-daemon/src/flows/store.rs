//! Recent flow records kept in memory for `egress logs --flows`, the live fan-out for `-f`,
//! the open flows' counts for `egress top`, and the totals the metrics export.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    net::IpAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex, MutexGuard, PoisonError,
    },
    time::{Duration, SystemTime},
};

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use super::record::FlowLogRecord;

/// Records a follower may fall behind by before it is told how many it missed.
const FOLLOW_BUFFER: usize = 4096;

/// Bytes and packets out (and in) of one policy and workload, for the metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub packets_out: u64,
    pub bytes_out: u64,
    pub packets_in: u64,
    pub bytes_in: u64,
}

/// One line of `egress top`: what a workload sent to one destination.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopRow {
    /// The workload (container or unit), else the cgroup.
    pub workload: String,
    pub protocol: String,
    pub dstaddr: Option<IpAddr>,
    pub dstport: u16,
    pub bytes_out: u64,
    pub packets_out: u64,
    pub bytes_in: u64,
    pub packets_in: u64,
    /// Flows (connections, socket-destination pairs) it sums.
    pub flows: u64,
}

pub struct FlowLog {
    inner: Mutex<Inner>,
    capacity: usize,
    live: broadcast::Sender<FlowLogRecord>,
    interval_secs: AtomicU64,
    /// Records of flows pushed out of the kernel's full flow table (status `evicted`).
    evictions: AtomicU64,
}

/// The record status of a flow the kernel's flow table pushed out (LRU) before it ended.
pub const EVICTED: &str = "evicted";

#[derive(Default)]
struct Inner {
    records: VecDeque<FlowLogRecord>,
    /// (policy, workload or cgroup) -> totals since the daemon started.
    totals: BTreeMap<(String, String), Totals>,
    /// The open flows' counts not yet in a record, as of the last sweep.
    open: Vec<FlowLogRecord>,
}

impl FlowLog {
    pub fn new(capacity: usize, interval: Duration) -> Self {
        let (live, _) = broadcast::channel(FOLLOW_BUFFER);
        Self {
            inner: Mutex::new(Inner::default()),
            capacity,
            live,
            interval_secs: AtomicU64::new(interval.as_secs().max(1)),
            evictions: AtomicU64::new(0),
        }
    }

    /// `settings.flow_interval`, changed by a reload.
    pub fn interval(&self) -> Duration {
        Duration::from_secs(self.interval_secs.load(Ordering::Relaxed))
    }

    pub fn set_interval(&self, interval: Duration) {
        self.interval_secs.store(interval.as_secs().max(1), Ordering::Relaxed);
    }

    /// Flows pushed out of the kernel's flow table while the daemon tracked them.
    pub fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
    }

    pub fn push(&self, record: FlowLogRecord) {
        if record.status == EVICTED {
            self.evictions.fetch_add(1, Ordering::Relaxed);
        }
        let mut inner = self.lock();
        if self.live.receiver_count() > 0 {
            let _ = self.live.send(record.clone());
        }
        let owner = record.workload.clone().unwrap_or_else(|| record.cgroup.clone());
        let totals = inner.totals.entry((record.policy.clone(), owner)).or_default();
        totals.packets_out += record.packets_out;
        totals.bytes_out += record.bytes_out;
        totals.packets_in += record.packets_in;
        totals.bytes_in += record.bytes_in;
        if self.capacity == 0 {
            return;
        }
        let evicted = if inner.records.len() >= self.capacity { inner.records.pop_front() } else { None };
        inner.records.push_back(record);
        drop(inner);
        drop(evicted);
    }

    pub fn set_open(&self, open: Vec<FlowLogRecord>) {
        let previous = std::mem::replace(&mut self.lock().open, open);
        drop(previous);
    }

    /// The kept records newer than `since` of `policy` (all when `None`), and, when following,
    /// a receiver of every record pushed from now on (taken under the same lock: none is missed
    /// or seen twice).
    pub fn follow(
        &self,
        policy: Option<&str>,
        since: Option<SystemTime>,
        follow: bool,
    ) -> (Vec<FlowLogRecord>, Option<broadcast::Receiver<FlowLogRecord>>) {
        let inner = self.lock();
        let kept = inner.records.iter().filter(|r| matches(r, policy, since)).cloned().collect();
        (kept, follow.then(|| self.live.subscribe()))
    }

    /// Totals per (policy, workload) since the daemon started.
    pub fn totals(&self) -> BTreeMap<(String, String), Totals> {
        self.lock().totals.clone()
    }

    /// The top talkers over the last `window`: records that ended in it plus what open flows
    /// sent since their last record, summed per workload and destination, by bytes out.
    pub fn top(&self, window: Duration, limit: usize) -> Vec<TopRow> {
        let since = SystemTime::now().checked_sub(window).unwrap_or(SystemTime::UNIX_EPOCH);
        let inner = self.lock();
        let mut rows: HashMap<(String, String, Option<IpAddr>, u16), TopRow> = HashMap::new();
        let recent = inner.records.iter().rev().take_while(|r| r.end_at >= since);
        for record in recent.chain(inner.open.iter()) {
            let workload = record.workload.clone().unwrap_or_else(|| record.cgroup.clone());
            let key = (workload.clone(), record.protocol.clone(), Some(record.dstaddr), record.dstport);
            let row = rows.entry(key).or_insert_with(|| TopRow {
                workload,
                protocol: record.protocol.clone(),
                dstaddr: Some(record.dstaddr),
                dstport: record.dstport,
                ..TopRow::default()
            });
            row.bytes_out += record.bytes_out;
            row.packets_out += record.packets_out;
            row.bytes_in += record.bytes_in;
            row.packets_in += record.packets_in;
            if record.status != "interim" {
                row.flows += 1;
            }
        }
        drop(inner);
        let mut rows: Vec<TopRow> = rows.into_values().collect();
        rows.sort_by(|a, b| {
            (b.bytes_out + b.bytes_in).cmp(&(a.bytes_out + a.bytes_in)).then(a.workload.cmp(&b.workload))
        });
        rows.truncate(limit);
        rows
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn matches(record: &FlowLogRecord, policy: Option<&str>, since: Option<SystemTime>) -> bool {
    policy.is_none_or(|p| p == record.policy) && since.is_none_or(|since| record.end_at >= since)
}
