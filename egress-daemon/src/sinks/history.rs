//! Recent flow events kept in memory for `egress logs`, and the live fan-out for `egress logs -f`.

use std::{
    collections::VecDeque,
    sync::{Mutex, MutexGuard, PoisonError},
    time::SystemTime,
};

use tokio::sync::broadcast;

use crate::naming::NamedEvent;

/// Events a follower may fall behind by before it is told how many it missed.
pub const FOLLOW_BUFFER: usize = 4096;

/// Ring slots allocated up front; a larger history grows as it fills.
const PREALLOCATED: usize = 65_536;

/// The newest `capacity` events, and a channel that hands every new one to live followers.
pub struct EventHistory {
    ring: Mutex<Ring>,
    capacity: usize,
    live: broadcast::Sender<NamedEvent>,
}

struct Ring {
    records: VecDeque<NamedEvent>,
    /// Sequence number of `records[0]`; events are numbered from 0 in push order.
    first: u64,
}

impl Ring {
    fn end(&self) -> u64 {
        self.first + self.records.len() as u64
    }
}

/// Which events a client asked for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LogFilter {
    pub blocked_only: bool,
    pub policy: Option<String>,
    pub since: Option<SystemTime>,
}

impl LogFilter {
    pub fn matches(&self, record: &NamedEvent) -> bool {
        (!self.blocked_only || record.verdict == "blocked")
            && self.policy.as_ref().is_none_or(|policy| *policy == record.policy)
            && self.since.is_none_or(|since| record.at >= since)
    }
}

/// The kept events a client has still to read: a range of sequence numbers, read in chunks
/// with [`EventHistory::read_backlog`] so that a large history is never copied under one lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backlog {
    next: u64,
    end: u64,
}

impl Backlog {
    pub fn is_done(&self) -> bool {
        self.next >= self.end
    }
}

/// One chunk of a backlog.
#[derive(Debug, Default)]
pub struct BacklogChunk {
    /// The matching events of the chunk, oldest first.
    pub records: Vec<NamedEvent>,
    /// Events of the backlog pushed out of the history before they could be read.
    pub evicted: u64,
}

impl EventHistory {
    /// Keeps the newest `capacity` events; 0 keeps none (live followers still get them).
    pub fn new(capacity: usize) -> Self {
        let (live, _) = broadcast::channel(FOLLOW_BUFFER);
        let records = VecDeque::with_capacity(capacity.min(PREALLOCATED));
        Self { ring: Mutex::new(Ring { records, first: 0 }), capacity, live }
    }

    /// Records one event. Called for every flow (100k+ a second under load): a short critical
    /// section, no allocation unless someone follows, and the evicted record freed after unlocking.
    pub fn push(&self, record: NamedEvent) {
        let mut ring = self.lock();
        // Sent under the lock: see `follow`.
        if self.live.receiver_count() > 0 {
            // Err only means the last follower left in between.
            let _ = self.live.send(record.clone());
        }
        if self.capacity == 0 {
            ring.first += 1;
            return;
        }
        let evicted = if ring.records.len() >= self.capacity {
            ring.first += 1;
            ring.records.pop_front()
        } else {
            None
        };
        ring.records.push_back(record);
        drop(ring);
        drop(evicted);
    }

    /// The kept events that match `filter`, oldest first, copied under one lock (see
    /// [`read_backlog`](Self::read_backlog) for large histories).
    pub fn snapshot(&self, filter: &LogFilter) -> Vec<NamedEvent> {
        self.lock().records.iter().filter(|r| filter.matches(r)).cloned().collect()
    }

    /// A receiver of every event pushed from now on. A receiver more than [`FOLLOW_BUFFER`]
    /// events behind gets `RecvError::Lagged(n)` and then the oldest events still buffered.
    pub fn subscribe(&self) -> broadcast::Receiver<NamedEvent> {
        self.live.subscribe()
    }

    /// The events kept now, to read with [`read_backlog`](Self::read_backlog).
    pub fn backlog(&self) -> Backlog {
        let ring = self.lock();
        Backlog { next: ring.first, end: ring.end() }
    }

    /// [`backlog`](Self::backlog) and [`subscribe`](Self::subscribe) in one step, for
    /// `logs -f`: every event is in exactly one of the two, in push order. The receiver is
    /// created and the backlog's end is marked under the ring's lock, which `push` also holds
    /// while it both sends and stores: an event pushed before is in the backlog and was sent
    /// before the receiver existed; one pushed after is past the backlog's end and is received.
    /// Nothing is missed in between and nothing is seen twice, so no dedupe is needed.
    pub fn follow(&self) -> (Backlog, broadcast::Receiver<NamedEvent>) {
        let ring = self.lock();
        let live = self.live.subscribe();
        (Backlog { next: ring.first, end: ring.end() }, live)
    }

    /// The next chunk of `backlog`: the matching events among at most `max` kept ones.
    pub fn read_backlog(&self, backlog: &mut Backlog, filter: &LogFilter, max: usize) -> BacklogChunk {
        let ring = self.lock();
        let mut chunk = BacklogChunk::default();
        if backlog.next < ring.first {
            let resume = ring.first.min(backlog.end);
            chunk.evicted = resume - backlog.next;
            backlog.next = resume;
        }
        if backlog.is_done() {
            return chunk;
        }
        let start = usize::try_from(backlog.next - ring.first).unwrap_or(usize::MAX);
        let count = usize::try_from(backlog.end - backlog.next).unwrap_or(usize::MAX).min(max.max(1));
        let examined = ring.records.range(start.min(ring.records.len())..).take(count);
        chunk.records = examined.filter(|r| filter.matches(r)).cloned().collect();
        backlog.next += count as u64;
        chunk
    }

    /// Events kept now.
    pub fn len(&self) -> usize {
        self.lock().records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Live followers subscribed now.
    pub fn followers(&self) -> usize {
        self.live.receiver_count()
    }

    /// A panic while holding the lock cannot leave the ring inconsistent, so poison is ignored.
    fn lock(&self) -> MutexGuard<'_, Ring> {
        self.ring.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use std::{sync::Arc, time::Duration};

    use tokio::sync::broadcast::error::{RecvError, TryRecvError};

    use super::*;
    use crate::naming::test_record as record;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    /// The whole backlog's pids, read in chunks of `max`.
    fn drain(history: &EventHistory, backlog: &mut Backlog, max: usize) -> Vec<u32> {
        let mut pids = Vec::new();
        while !backlog.is_done() {
            let chunk = history.read_backlog(backlog, &LogFilter::default(), max);
            assert_eq!(chunk.evicted, 0);
            pids.extend(chunk.records.iter().map(|r| r.pid));
        }
        pids
    }

    #[test]
    fn keeps_the_newest_events_up_to_its_capacity() {
        let history = EventHistory::new(3);
        for seq in 1..=5 {
            history.push(record(seq, "allowed", "a", at(u64::from(seq))));
        }
        let kept: Vec<u32> = history.snapshot(&LogFilter::default()).iter().map(|r| r.pid).collect();
        assert_eq!(kept, [3, 4, 5]);
        assert_eq!(history.len(), 3);

        let none = EventHistory::new(0);
        none.push(record(1, "allowed", "a", at(1)));
        assert!(none.is_empty());
    }

    #[test]
    fn filters_by_verdict_policy_and_time() {
        let history = EventHistory::new(10);
        history.push(record(1, "allowed", "a", at(1)));
        history.push(record(2, "blocked", "a", at(2)));
        history.push(record(3, "blocked", "b", at(3)));
        history.push(record(4, "audit", "b", at(4)));
        let pids = |filter: LogFilter| -> Vec<u32> { history.snapshot(&filter).iter().map(|r| r.pid).collect() };
        assert_eq!(pids(LogFilter::default()), [1, 2, 3, 4]);
        assert_eq!(pids(LogFilter { blocked_only: true, ..LogFilter::default() }), [2, 3]);
        assert_eq!(pids(LogFilter { policy: Some("b".into()), ..LogFilter::default() }), [3, 4]);
        assert_eq!(pids(LogFilter { blocked_only: true, policy: Some("a".into()), since: None }), [2]);
        assert_eq!(pids(LogFilter { since: Some(at(3)), ..LogFilter::default() }), [3, 4]);
        assert_eq!(pids(LogFilter { policy: Some("nope".into()), ..LogFilter::default() }), Vec::<u32>::new());
    }

    #[tokio::test]
    async fn followers_get_each_new_event_once() {
        let history = EventHistory::new(10);
        history.push(record(1, "blocked", "a", at(1)));
        let (mut backlog, mut live) = history.follow();
        assert_eq!(drain(&history, &mut backlog, 10), [1]);
        let mut other = history.subscribe();
        history.push(record(2, "blocked", "a", at(2)));
        assert_eq!(live.recv().await.map(|r| r.pid), Ok(2));
        assert_eq!(other.recv().await.map(|r| r.pid), Ok(2));
        assert_eq!(live.try_recv().map(|r| r.pid), Err(TryRecvError::Empty));
    }

    #[tokio::test]
    async fn a_lagging_follower_learns_how_many_it_missed() {
        let history = EventHistory::new(10);
        let mut live = history.subscribe();
        let total = FOLLOW_BUFFER as u32 + 100;
        for seq in 0..total {
            history.push(record(seq, "allowed", "a", at(1)));
        }
        assert_eq!(live.recv().await.map(|r| r.pid), Err(RecvError::Lagged(100)));
        assert_eq!(live.recv().await.map(|r| r.pid), Ok(100), "then it goes on with the oldest kept");
    }

    #[test]
    fn a_backlog_is_read_in_chunks_and_reports_what_was_pushed_out_meanwhile() {
        let history = EventHistory::new(10);
        for seq in 0..10 {
            history.push(record(seq, if seq % 2 == 0 { "blocked" } else { "allowed" }, "a", at(1)));
        }
        let mut backlog = history.backlog();
        let blocked = LogFilter { blocked_only: true, ..LogFilter::default() };
        let first = history.read_backlog(&mut backlog, &blocked, 3);
        assert_eq!(first.records.iter().map(|r| r.pid).collect::<Vec<_>>(), [0, 2]);
        for seq in 10..15 {
            history.push(record(seq, "blocked", "a", at(1)));
        }
        // 0..=4 are gone; 3 and 4 were still to be read. 10.. came after the backlog.
        let second = history.read_backlog(&mut backlog, &blocked, 3);
        assert_eq!(second.evicted, 2);
        assert_eq!(second.records.iter().map(|r| r.pid).collect::<Vec<_>>(), [6]);
        let third = history.read_backlog(&mut backlog, &blocked, 3);
        assert_eq!(third.records.iter().map(|r| r.pid).collect::<Vec<_>>(), [8]);
        assert!(backlog.is_done());
        assert!(history.read_backlog(&mut backlog, &blocked, 3).records.is_empty());

        // A backlog pushed out entirely.
        let mut stale = history.backlog();
        for seq in 15..40 {
            history.push(record(seq, "blocked", "a", at(1)));
        }
        let chunk = history.read_backlog(&mut stale, &LogFilter::default(), 100);
        assert_eq!((chunk.evicted, chunk.records.len()), (10, 0));
        assert!(stale.is_done());
    }

    /// Pushes from one thread while followers join from others: where each follower's snapshot
    /// ends, its live events begin, with no gap and no repeat.
    #[test]
    fn snapshot_then_follow_misses_nothing_and_repeats_nothing() {
        let history = Arc::new(EventHistory::new(1_000_000));
        let total = 100_000u32;
        let pusher = {
            let history = history.clone();
            std::thread::spawn(move || {
                for seq in 0..total {
                    history.push(record(seq, "allowed", "a", at(1)));
                    if seq % 64 == 0 {
                        std::thread::yield_now();
                    }
                }
            })
        };
        let followers: Vec<_> = (0..16)
            .map(|n| {
                let history = history.clone();
                std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_micros(300 * n));
                    let (mut backlog, mut live) = history.follow();
                    let pids = drain(&history, &mut backlog, 1000);
                    let next = pids.last().map_or(0, |pid| pid + 1);
                    assert_eq!(pids, (0..next).collect::<Vec<_>>(), "the backlog is every event so far");
                    if next == total {
                        return true;
                    }
                    match live.blocking_recv() {
                        Ok(first) => {
                            assert_eq!(first.pid, next, "live events start right after the snapshot");
                            true
                        }
                        Err(_) => false, // lagged before reading: nothing to check
                    }
                })
            })
            .collect();
        pusher.join().expect("pusher");
        let mut checked = 0;
        for follower in followers {
            checked += usize::from(follower.join().expect("a follower saw a gap or a repeat"));
        }
        assert!(checked > 0, "no follower could be checked");
    }
}
