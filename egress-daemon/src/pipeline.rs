//! Moves events from the kernel ring buffer to an output sink, and reports drops.
//!
//! The pump runs on a thread of its own, not on the daemon's single-threaded runtime: writing a
//! line blocks when the reader of stdout is slow (the journal, a full pipe), naming a cgroup seen
//! for the first time walks the cgroup tree, and a ring that a workload keeps full would never
//! let the runtime answer the control socket or bind new cgroups. Events are decoded in bounded
//! batches, so the locks the pump shares with the control plane are released between batches.

use std::{
    io::{self, Write},
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{anyhow, Context};
use aya::maps::{MapData, RingBuf};
use egress_common::{FlowEvent, EVENTS_RING_BYTES};

use crate::{control::history::EventHistory, engine::Engine, output::EventWriter};

/// How often the kernel's dropped-event counter is checked.
const DROP_CHECK_INTERVAL: Duration = Duration::from_millis(500);
/// The kernel programs wake the reader only once a backlog builds up (a wakeup per event would
/// cost every connect microseconds), so the ring is also drained on this timer.
pub const DRAIN_INTERVAL: Duration = Duration::from_millis(50);
/// Longest the first drop check waits for the ring to be drained.
const FIRST_DROP_CHECK_LIMIT: Duration = Duration::from_secs(5);
/// Events decoded per hold of the event catalog's lock: binding a new cgroup (which names it in
/// the catalog) waits for one batch at most, however full the ring is.
pub const DRAIN_BATCH: usize = 256;
/// Events still written once the pump is told to stop: one full ring, so a workload that keeps
/// filling it cannot hold the stop up.
const FINAL_DRAIN_LIMIT: usize = EVENTS_RING_BYTES as usize / size_of::<FlowEvent>();

/// The running pump. [`Pump::stop`] drains what is left and returns the pump's result; dropping it
/// tells the pump to stop without waiting for it.
pub struct Pump {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<io::Result<()>>>,
}

/// Starts pumping events from `ring` to `writer` (and `history`) on a thread of its own.
pub fn spawn<W: Write + Send + 'static>(
    ring: RingBuf<MapData>,
    engine: Engine,
    writer: EventWriter<W>,
    history: Option<Arc<EventHistory>>,
) -> io::Result<Pump> {
    let stop = Arc::new(AtomicBool::new(false));
    let wakeups = Wakeups::new(&ring)?;
    let source = Source { ring, wakeups, engine, writer, history };
    let stopped = stop.clone();
    let thread = thread::Builder::new().name("egress-events".into()).spawn(move || {
        let result = source.run(&stopped);
        if let Err(error) = &result {
            tracing::error!(%error, "the event pipeline stopped: flow events are no longer written");
        }
        result
    })?;
    Ok(Pump { stop, thread: Some(thread) })
}

impl Pump {
    /// Stops the pump after it has written the events left in the ring; waits off the runtime.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.stop.store(true, Ordering::Release);
        let Some(thread) = self.thread.take() else { return Ok(()) };
        let joined = tokio::task::spawn_blocking(move || thread.join()).await.context("event pipeline")?;
        joined.map_err(|_| anyhow!("the event pipeline panicked"))?.context("event pipeline")
    }
}

impl Drop for Pump {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

struct Source<W: Write> {
    ring: RingBuf<MapData>,
    wakeups: Wakeups,
    engine: Engine,
    writer: EventWriter<W>,
    history: Option<Arc<EventHistory>>,
}

impl<W: Write> Source<W> {
    fn run(mut self, stop: &AtomicBool) -> io::Result<()> {
        let mut drops = DropWatch::default();
        let started = Instant::now();
        let mut next_drop_check = started;
        let mut backlog = false;
        while !stop.load(Ordering::Acquire) {
            // A full batch means more is waiting: go on at once. Otherwise sleep until the kernel
            // signals a backlog or the drain interval has passed.
            if !backlog {
                self.wakeups.wait(DRAIN_INTERVAL)?;
            }
            backlog = self.drain_batch()? == DRAIN_BATCH;
            // The first check waits until the events an earlier daemon left in the ring are
            // written, so that the notice of what was lost comes after them.
            let first_due = !backlog || started.elapsed() >= FIRST_DROP_CHECK_LIMIT;
            if Instant::now() >= next_drop_check && (drops.started || first_due) {
                drops.check(&self.engine, &mut self.writer)?;
                next_drop_check = Instant::now() + DROP_CHECK_INTERVAL;
            }
        }
        let mut written = 0;
        while written < FINAL_DRAIN_LIMIT {
            let batch = self.drain_batch()?;
            if batch == 0 {
                break;
            }
            written += batch;
        }
        drops.check(&self.engine, &mut self.writer)
    }

    /// Decodes and writes at most [`DRAIN_BATCH`] events; returns how many items it took.
    fn drain_batch(&mut self) -> io::Result<usize> {
        let mut records = Vec::with_capacity(DRAIN_BATCH);
        let mut taken = 0;
        {
            let mut catalog = self.engine.catalog();
            while taken < DRAIN_BATCH {
                let Some(item) = self.ring.next() else { break };
                taken += 1;
                records.extend(catalog.record(&item));
            }
            records.extend(catalog.take_injected());
        }
        // Written without the catalog's lock: a slow reader of the output blocks the pump only.
        for record in records {
            self.writer.write(&record)?;
            if let Some(history) = &self.history {
                history.push(record);
            }
        }
        Ok(taken)
    }
}

/// The ring buffer's wakeups, edge-triggered: the kernel signals only when a program asks for a
/// wakeup (a backlog), not for every event already waiting, which the drain timer collects.
struct Wakeups {
    epoll: OwnedFd,
}

impl Wakeups {
    fn new(ring: &RingBuf<MapData>) -> io::Result<Self> {
        // SAFETY: epoll_create1 has no preconditions; the result is checked before use.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        let epoll = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut interest = libc::epoll_event { events: (libc::EPOLLIN | libc::EPOLLET) as u32, u64: 0 };
        // SAFETY: both descriptors are open; `interest` is a valid epoll_event. The ring's fd stays
        // open as long as the ring, which lives beside this in the same `Source`.
        let added =
            unsafe { libc::epoll_ctl(epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, ring.as_fd().as_raw_fd(), &mut interest) };
        if added < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { epoll })
    }

    /// Returns when the kernel signals the ring or after `timeout`, whichever comes first.
    fn wait(&self, timeout: Duration) -> io::Result<()> {
        let mut ready = [libc::epoll_event { events: 0, u64: 0 }];
        let millis = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: the epoll fd is open and `ready` has room for the one event asked for.
        let count = unsafe { libc::epoll_wait(self.epoll.as_raw_fd(), ready.as_mut_ptr(), 1, millis) };
        if count < 0 {
            let error = io::Error::last_os_error();
            if error.kind() != io::ErrorKind::Interrupted {
                return Err(error);
            }
        }
        Ok(())
    }
}

/// Reports drops once: the count already reported lives in the (pinned) settings map, so a
/// restarted daemon reports what was lost while none was running, and nothing twice.
#[derive(Default)]
struct DropWatch {
    started: bool,
}

impl DropWatch {
    fn check<W: Write>(&mut self, engine: &Engine, writer: &mut EventWriter<W>) -> io::Result<()> {
        let mut state = engine.state();
        let (total, reported) = match state.enforcer.dropped_events() {
            Ok(counts) => counts,
            Err(error) => {
                tracing::warn!(%error, "reading the dropped-event counter");
                return Ok(());
            }
        };
        if total > reported {
            let dropped = total - reported;
            if self.started {
                tracing::warn!(dropped, total, "flow events dropped: the ring buffer was full");
            } else {
                tracing::warn!(dropped, total, "flow events were lost while no daemon was reading them");
            }
            if let Err(error) = state.enforcer.mark_dropped_reported(total) {
                tracing::warn!(%error, "recording the reported drops");
            }
            drop(state);
            writer.write_dropped(dropped, total)?;
        }
        self.started = true;
        Ok(())
    }
}
