//! Flow records: the kernel counts every flow of a covered cgroup (packets and bytes, both
//! ways) in the `FLOWS` map and reports a flow's end (its socket's release) through the
//! `FLOW_ENDS` ring. The sweeper, on a thread of its own, turns both into records: a record
//! per flow every `settings.flow_interval` while it moves, and one when it ends.
//!
//! Interim records come from the daemon reading the map rather than from the kernel writing
//! them as a packet crosses the interval: the kernel only ever adds to the counters (an atomic
//! add on every kernel; resetting them from the packet path would race between CPUs without
//! the compare-and-swap older kernels lack), the packet path stays one lookup and two adds, and
//! a flow that went quiet still gets its record on time. Datagram flows end when their socket is
//! released (the kernel marks the socket closed) or after two intervals without a packet.

pub mod record;
pub mod store;
pub mod tracker;

use std::{
    collections::HashMap,
    io,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use egress_common::{proto, FlowId, FlowState};

use self::{
    record::{action_name, address, FlowLogRecord},
    store::FlowLog,
    tracker::{RawRecord, Timeouts, Tracker},
};
use crate::{
    kernel::FlowSource,
    naming::{comm_name, protocol_name, Catalog},
};

/// Default of `settings.flow_interval`, as VPC Flow Logs.
pub const DEFAULT_FLOW_INTERVAL: Duration = Duration::from_secs(60);
/// How often the ring of flow ends is read.
const DRAIN_INTERVAL: Duration = Duration::from_millis(250);
/// A TCP flow whose socket's release was not seen ends after this long without a packet.
const STREAM_IDLE: Duration = Duration::from_secs(3600);
/// The same without `sock_release` (Linux < 5.9).
const STREAM_IDLE_WITHOUT_RELEASE: Duration = Duration::from_secs(600);

/// The running sweeper; stops (after a last sweep) when dropped or stopped.
pub struct Sweeper {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Sweeper {
    pub async fn stop(mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

impl Drop for Sweeper {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

pub fn spawn(maps: FlowSource, catalog: Arc<Mutex<Catalog>>, log: Arc<FlowLog>) -> io::Result<Sweeper> {
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = stop.clone();
    let thread = thread::Builder::new().name("egress-flows".into()).spawn(move || {
        let mut sweeper = Sweep { tracker: Tracker::new(timeouts(&log, maps.ends_at_release())), maps, catalog, log };
        sweeper.run(&stopped);
    })?;
    Ok(Sweeper { stop, thread: Some(thread) })
}

fn timeouts(log: &FlowLog, sock_release: bool) -> Timeouts {
    let interval = log.interval();
    Timeouts {
        interval_ns: interval.as_nanos() as u64,
        datagram_idle_ns: 2 * interval.as_nanos() as u64,
        stream_idle_ns: if sock_release { STREAM_IDLE } else { STREAM_IDLE_WITHOUT_RELEASE }.as_nanos() as u64,
    }
}

/// How often the flow map is read: often enough that an interim record is at most a quarter of
/// an interval late, at most every second, at least every 15 s.
fn sweep_period(interval: Duration) -> Duration {
    (interval / 4).clamp(Duration::from_secs(1), Duration::from_secs(15))
}

struct Sweep {
    tracker: Tracker,
    maps: FlowSource,
    catalog: Arc<Mutex<Catalog>>,
    log: Arc<FlowLog>,
}

impl Sweep {
    fn run(&mut self, stop: &AtomicBool) {
        let mut next_sweep = Instant::now();
        loop {
            let stopping = stop.load(Ordering::Acquire);
            self.drain_ends();
            if stopping || Instant::now() >= next_sweep {
                self.tracker.set_timeouts(timeouts(&self.log, self.maps.ends_at_release()));
                self.sweep();
                next_sweep = Instant::now() + sweep_period(self.log.interval());
            }
            if stopping {
                return;
            }
            thread::sleep(DRAIN_INTERVAL);
        }
    }

    fn drain_ends(&mut self) {
        let raw = self.maps.drain_ends().into_iter().map(|end| self.tracker.end(end.id, end.state)).collect();
        self.publish(raw);
    }

    fn sweep(&mut self) {
        // Closed sockets first: every flow of a socket released before this read is in the
        // snapshot taken after it.
        let closed: HashMap<u64, u64> = self.maps.closed_sockets();
        let snapshot: Vec<(FlowId, FlowState)> = self.maps.snapshot();
        let (raw, remove) = self.tracker.sweep(snapshot, &closed, crate::clock::boot_ns());
        for id in &remove {
            self.maps.remove(id);
        }
        // A datagram flow ended while its socket lives on (idle, or pushed out of the map): the
        // socket's next datagram must not be let through on a decision reused per CPU, which
        // would leave it uncounted, but judged and counted again.
        if raw.iter().any(|r| r.ended && r.id.protocol != proto::TCP && !closed.contains_key(&r.id.cookie)) {
            if let Err(error) = self.maps.renew_datagram_decisions() {
                tracing::warn!(%error, "renewing datagram decisions: some datagrams may go uncounted");
            }
        }
        for cookie in closed.keys() {
            self.maps.forget_closed(*cookie);
        }
        self.publish(raw);
        let open: Vec<RawRecord> = self
            .tracker
            .unreported()
            .filter(|(_, _, counts)| !counts.is_zero())
            .map(|(id, state, counts)| RawRecord {
                id: *id,
                state: *state,
                start_ns: state.start_ns,
                end_ns: state.last_ns,
                counts,
                ended: false,
                evicted: false,
            })
            .collect();
        let open = self.name(open, "open");
        self.log.set_open(open);
    }

    fn publish(&mut self, raw: Vec<RawRecord>) {
        if raw.is_empty() {
            return;
        }
        for record in self.name(raw, "") {
            self.log.push(record);
        }
    }

    /// Puts names on records (one hold of the catalog's lock for the batch).
    fn name(&self, raw: Vec<RawRecord>, status: &str) -> Vec<FlowLogRecord> {
        let mut catalog = self.catalog.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        raw.into_iter()
            .map(|r| {
                let names = catalog.names(r.state.policy, r.state.rule, r.state.cgroup_id);
                let end_at = catalog.wall_time(r.end_ns);
                let dstaddr = address(r.id.family, r.id.addr);
                let domain = catalog.domain(r.state.policy, r.state.rule, &names.policy, dstaddr);
                FlowLogRecord {
                    start: record::time(catalog.wall_time(r.start_ns)),
                    end: record::time(end_at),
                    end_at,
                    action: action_name(r.state.verdict).to_string(),
                    status: match status {
                        "" if r.evicted => store::EVICTED.to_string(),
                        "" if r.ended => "end".to_string(),
                        "" => "interim".to_string(),
                        other => other.to_string(),
                    },
                    protocol: protocol_name(r.id.protocol, r.id.family),
                    srcaddr: address(r.id.family, r.state.local_addr),
                    srcport: r.state.local_port,
                    dstaddr,
                    dstport: r.id.port,
                    domain,
                    packets_out: r.counts.packets_out,
                    bytes_out: r.counts.bytes_out,
                    packets_in: r.counts.packets_in,
                    bytes_in: r.counts.bytes_in,
                    workload: names.workload,
                    cgroup: names.cgroup,
                    policy: names.policy,
                    rule: names.rule,
                    comm: comm_name(&r.state.comm),
                    pid: r.state.pid,
                    uid: r.state.uid,
                }
            })
            .collect()
    }
}
