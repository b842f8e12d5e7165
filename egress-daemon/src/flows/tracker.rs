//! Turns the kernel's ever-growing flow counters into flow records: an interim record per
//! flow every interval (when it moved), and a last one when it ends. Pure: the sweeper feeds
//! it snapshots of the `FLOWS` map and the flow ends from the ring.

use std::collections::{HashMap, HashSet};

use egress_common::{proto, FlowId, FlowState};

/// Packets and bytes, both ways.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub packets_out: u64,
    pub bytes_out: u64,
    pub packets_in: u64,
    pub bytes_in: u64,
}

impl Counts {
    pub fn of(state: &FlowState) -> Self {
        Self {
            packets_out: state.packets_out,
            bytes_out: state.bytes_out,
            packets_in: state.packets_in,
            bytes_in: state.bytes_in,
        }
    }

    fn since(self, earlier: Counts) -> Counts {
        Counts {
            packets_out: self.packets_out.saturating_sub(earlier.packets_out),
            bytes_out: self.bytes_out.saturating_sub(earlier.bytes_out),
            packets_in: self.packets_in.saturating_sub(earlier.packets_in),
            bytes_in: self.bytes_in.saturating_sub(earlier.bytes_in),
        }
    }

    pub fn is_zero(&self) -> bool {
        *self == Counts::default()
    }
}

/// A record before names are put on it. Times are `CLOCK_BOOTTIME` ns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawRecord {
    pub id: FlowId,
    pub state: FlowState,
    pub start_ns: u64,
    pub end_ns: u64,
    pub counts: Counts,
    pub ended: bool,
    /// Ended because the kernel's flow table pushed the flow out (LRU), not because it ended:
    /// its counts stop there, though the socket may still send.
    pub evicted: bool,
}

/// When flows count as ended without a word from the kernel.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// Between interim records of a flow that keeps moving.
    pub interval_ns: u64,
    /// A datagram or raw flow with no packet for this long has ended.
    pub datagram_idle_ns: u64,
    /// A TCP flow with no packet for this long has ended (its socket's release was missed:
    /// no `sock_release` program, or its end did not fit in the ring).
    pub stream_idle_ns: u64,
}

struct Open {
    reported: Counts,
    latest: Counts,
    /// Start of the interval not yet reported.
    since_ns: u64,
    /// The last sweep that saw the counters move (the packet hooks read no clock): the flow's
    /// `last_ns` as the records and the idle expiry see it.
    active_ns: u64,
    state: FlowState,
}

/// Sweeps a flow may still show in a snapshot after its end came through the ring.
const ENDED_MEMORY_SWEEPS: u32 = 3;

pub struct Tracker {
    open: HashMap<FlowId, Open>,
    /// Flows ended through the ring: the kernel removes their entry just after, so a snapshot
    /// taken in between must not open them again.
    ended: HashMap<FlowId, u32>,
    timeouts: Timeouts,
}

impl Tracker {
    pub fn new(timeouts: Timeouts) -> Self {
        Self { open: HashMap::new(), ended: HashMap::new(), timeouts }
    }

    pub fn set_timeouts(&mut self, timeouts: Timeouts) {
        self.timeouts = timeouts;
    }

    /// A flow the kernel ended (its socket was released): its last record.
    pub fn end(&mut self, id: FlowId, state: FlowState) -> RawRecord {
        let (reported, since_ns) =
            self.open.remove(&id).map_or((Counts::default(), state.start_ns), |open| (open.reported, open.since_ns));
        self.ended.insert(id, 0);
        RawRecord {
            id,
            state,
            start_ns: since_ns,
            end_ns: state.end_ns.max(state.last_ns),
            counts: Counts::of(&state).since(reported),
            ended: true,
            evicted: false,
        }
    }

    /// One look at the kernel's flows at `now_ns`. `closed` holds the cookies (and release
    /// times) of datagram and raw sockets released since the last sweep. Returns the records
    /// due and the flows to remove from the kernel map.
    pub fn sweep(
        &mut self,
        snapshot: Vec<(FlowId, FlowState)>,
        closed: &HashMap<u64, u64>,
        now_ns: u64,
    ) -> (Vec<RawRecord>, Vec<FlowId>) {
        let mut records = Vec::new();
        let mut remove = Vec::new();
        let mut seen = HashSet::with_capacity(snapshot.len());
        for (id, state) in snapshot {
            if self.ended.contains_key(&id) {
                remove.push(id);
                continue;
            }
            seen.insert(id);
            let open = self.open.entry(id).or_insert_with(|| Open {
                reported: Counts::default(),
                latest: Counts::default(),
                since_ns: state.start_ns,
                active_ns: state.start_ns,
                state,
            });
            let counts = Counts::of(&state);
            if counts != open.latest {
                open.active_ns = now_ns;
            }
            open.latest = counts;
            let mut state = state;
            state.last_ns = state.last_ns.max(open.active_ns);
            open.state = state;
            let idle_limit =
                if id.protocol == proto::TCP { self.timeouts.stream_idle_ns } else { self.timeouts.datagram_idle_ns };
            let end_ns = if state.end_ns != 0 {
                Some(state.end_ns)
            } else if let Some(&released) = closed.get(&id.cookie) {
                Some(released)
            } else if now_ns.saturating_sub(state.last_ns) >= idle_limit {
                Some(state.last_ns)
            } else {
                None
            };
            if let Some(end_ns) = end_ns {
                let open = self.open.remove(&id).expect("inserted above");
                records.push(RawRecord {
                    id,
                    state,
                    start_ns: open.since_ns,
                    end_ns: end_ns.max(open.since_ns),
                    counts: open.latest.since(open.reported),
                    ended: true,
                    evicted: false,
                });
                // Removed from the kernel map right after this sweep: if the same socket and
                // destination show up again later, the socket sent again (a datagram flow that
                // went idle) and that is a new flow, not this one.
                remove.push(id);
                continue;
            }
            let moved = open.latest.since(open.reported);
            if now_ns.saturating_sub(open.since_ns) >= self.timeouts.interval_ns && !moved.is_zero() {
                records.push(RawRecord {
                    id,
                    state,
                    start_ns: open.since_ns,
                    end_ns: now_ns,
                    counts: moved,
                    ended: false,
                    evicted: false,
                });
                open.reported = open.latest;
                open.since_ns = now_ns;
            }
        }
        // Gone from the map without an end through the ring: pushed out of the LRU map.
        let vanished: Vec<FlowId> = self.open.keys().filter(|id| !seen.contains(*id)).copied().collect();
        for id in vanished {
            if let Some(open) = self.open.remove(&id) {
                records.push(RawRecord {
                    id,
                    state: open.state,
                    start_ns: open.since_ns,
                    end_ns: open.state.last_ns.max(open.since_ns),
                    counts: open.latest.since(open.reported),
                    ended: true,
                    evicted: true,
                });
            }
        }
        self.ended.retain(|_, sweeps| {
            *sweeps += 1;
            *sweeps <= ENDED_MEMORY_SWEEPS
        });
        (records, remove)
    }

    /// Counts of open flows not yet in any record (for `egress top`).
    pub fn unreported(&self) -> impl Iterator<Item = (&FlowId, &FlowState, Counts)> {
        self.open.values().zip(self.open.keys()).map(|(open, id)| (id, &open.state, open.latest.since(open.reported)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn tracker() -> Tracker {
        Tracker::new(Timeouts { interval_ns: 10 * S, datagram_idle_ns: 20 * S, stream_idle_ns: 3600 * S })
    }

    fn id(cookie: u64, protocol: u8) -> FlowId {
        FlowId { cookie, protocol, port: 80, family: 2, ..FlowId::default() }
    }

    fn state(start: u64, last: u64, out: u64) -> FlowState {
        FlowState {
            start_ns: start,
            last_ns: last,
            packets_out: out,
            bytes_out: out * 100,
            packets_in: 1,
            bytes_in: 60,
            ..FlowState::default()
        }
    }

    #[test]
    fn interim_records_cover_each_interval_once_and_the_end_the_rest() {
        let mut t = tracker();
        let flow = id(1, proto::TCP);
        let (records, _) = t.sweep(vec![(flow, state(S, 2 * S, 5))], &HashMap::new(), 5 * S);
        assert!(records.is_empty(), "not an interval yet");
        let (records, _) = t.sweep(vec![(flow, state(S, 11 * S, 8))], &HashMap::new(), 12 * S);
        assert_eq!(records.len(), 1);
        assert_eq!((records[0].start_ns, records[0].end_ns, records[0].ended), (S, 12 * S, false));
        assert_eq!(records[0].counts.packets_out, 8);
        // Quiet interval: nothing.
        let (records, _) = t.sweep(vec![(flow, state(S, 11 * S, 8))], &HashMap::new(), 23 * S);
        assert!(records.is_empty());
        let mut last = state(S, 24 * S, 11);
        last.end_ns = 25 * S;
        let end = t.end(flow, last);
        assert_eq!((end.start_ns, end.end_ns, end.counts.packets_out, end.counts.packets_in), (12 * S, 25 * S, 3, 0));
        // A snapshot taken before the kernel removed the entry does not open it again.
        let (records, remove) = t.sweep(vec![(flow, last)], &HashMap::new(), 26 * S);
        assert!(records.is_empty());
        assert_eq!(remove, [flow]);
    }

    #[test]
    fn datagram_flows_end_when_their_socket_closes_or_they_go_idle() {
        let mut t = tracker();
        let (a, b) = (id(7, proto::UDP), id(8, proto::UDP));
        t.sweep(vec![(a, state(S, S, 1)), (b, state(S, S, 1))], &HashMap::new(), 2 * S);
        let closed = HashMap::from([(7, 3 * S)]);
        let (records, remove) = t.sweep(vec![(a, state(S, S, 2)), (b, state(S, S, 1))], &closed, 4 * S);
        assert_eq!(records.len(), 1);
        assert_eq!((records[0].id, records[0].end_ns, records[0].counts.packets_out), (a, 3 * S, 2));
        assert_eq!(remove, [a]);
        let (records, remove) = t.sweep(vec![(b, state(S, S, 1))], &HashMap::new(), 22 * S);
        assert_eq!((records.len(), remove), (1, vec![b]));
        assert!(records[0].ended);
    }

    #[test]
    fn a_flow_pushed_out_of_the_map_ends_with_what_was_seen() {
        let mut t = tracker();
        let flow = id(3, proto::TCP);
        t.sweep(vec![(flow, state(S, S, 4))], &HashMap::new(), 2 * S);
        let (records, _) = t.sweep(Vec::new(), &HashMap::new(), 3 * S);
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].counts.packets_out, 4);
        assert!(records[0].ended && records[0].evicted, "{:?}", records[0]);
    }

    #[test]
    fn flows_that_end_are_not_evicted() {
        let mut t = tracker();
        let (a, b) = (id(4, proto::TCP), id(5, proto::UDP));
        t.sweep(vec![(a, state(S, S, 1)), (b, state(S, S, 1))], &HashMap::new(), 2 * S);
        let mut last = state(S, 2 * S, 2);
        last.end_ns = 3 * S;
        assert!(!t.end(a, last).evicted);
        let (records, _) = t.sweep(vec![(b, state(S, S, 1))], &HashMap::from([(5, 3 * S)]), 4 * S);
        assert!(records.iter().all(|r| r.ended && !r.evicted), "{records:?}");
    }
}
