//! The event path, one way: source (the kernel's event ring, [`crate::kernel::EventSource`])
//! -> naming ([`crate::naming`]: policy, rule, cgroup, workload, wall-clock time) -> [`budget`]
//! (what the output may write each second) -> sinks ([`crate::sinks`]: stdout, which the journal
//! reads under systemd, and the in-memory history). The pump here moves events along it and
//! reports drops.
//!
//! The pump runs on a thread of its own, not on the daemon's single-threaded runtime: writing a
//! line blocks when the reader of stdout is slow (the journal, a full pipe), naming a cgroup seen
//! for the first time walks the cgroup tree, and a ring that a workload keeps full would never
//! let the runtime answer the control socket or bind new cgroups. Events are decoded in bounded
//! batches, so the locks the pump shares with the control plane are released between batches.
//! What it writes goes through the output's budget ([`budget`]): a backlog is written at the
//! rate live events are, and what is held back is reported as counts.

use std::{
    io::{self, Write},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, PoisonError,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{anyhow, Context};
use egress_common::{FlowEvent, EVENTS_RING_BYTES};

pub mod budget;

use self::budget::{Held, OutputBudget, OutputLimits};
use crate::{
    kernel::{DropCounter, EventSource},
    naming::{self, Catalog},
    sinks::{history::EventHistory, stdout::EventWriter},
};

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

/// What the pump reads from and writes to.
pub struct Ends<W: Write> {
    pub events: EventSource,
    pub drops: DropCounter,
    /// Names events by slot and cgroup; the control plane adds names before it binds.
    pub catalog: Arc<Mutex<Catalog>>,
    pub writer: EventWriter<W>,
    pub history: Option<Arc<EventHistory>>,
    /// What may be written per second (the settings in force).
    pub limits: Arc<OutputLimits>,
}

/// Starts pumping events to the writer (and history) on a thread of its own.
pub fn spawn<W: Write + Send + 'static>(ends: Ends<W>) -> io::Result<Pump> {
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = stop.clone();
    let thread = thread::Builder::new().name("egress-events".into()).spawn(move || {
        let budget = OutputBudget::new(ends.limits.clone());
        let result = ends.run(budget, &stopped);
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

impl<W: Write> Ends<W> {
    fn run(mut self, mut budget: OutputBudget, stop: &AtomicBool) -> io::Result<()> {
        let mut drops = DropWatch::default();
        let started = Instant::now();
        let mut next_drop_check = started;
        let mut backlog = false;
        while !stop.load(Ordering::Acquire) {
            // A full batch means more is waiting: go on at once. Otherwise sleep until the kernel
            // signals a backlog or the drain interval has passed.
            if !backlog {
                self.events.wait(DRAIN_INTERVAL)?;
            }
            backlog = self.drain_batch(&mut budget)? == DRAIN_BATCH;
            self.report(budget.take_held(Instant::now(), false))?;
            // The first check waits until the events an earlier daemon left in the ring are
            // written, so that the notice of what was lost comes after them.
            let first_due = !backlog || started.elapsed() >= FIRST_DROP_CHECK_LIMIT;
            if Instant::now() >= next_drop_check && (drops.started || first_due) {
                drops.check(&self.drops, &mut self.writer)?;
                next_drop_check = Instant::now() + DROP_CHECK_INTERVAL;
            }
        }
        let mut written = 0;
        while written < FINAL_DRAIN_LIMIT {
            let batch = self.drain_batch(&mut budget)?;
            if batch == 0 {
                break;
            }
            written += batch;
        }
        self.report(budget.take_held(Instant::now(), true))?;
        drops.check(&self.drops, &mut self.writer)
    }

    /// Takes at most [`DRAIN_BATCH`] events and writes those the budget admits; returns how many
    /// items it took.
    fn drain_batch(&mut self, budget: &mut OutputBudget) -> io::Result<usize> {
        let now = Instant::now();
        let mut admitted = Vec::with_capacity(DRAIN_BATCH);
        let taken = self.events.drain(DRAIN_BATCH, |bytes| {
            admitted.extend(naming::decode(bytes).filter(|event| budget.admit(event.cgroup_id, now)));
        });
        let records: Vec<_> = {
            let mut catalog = self.catalog.lock().unwrap_or_else(PoisonError::into_inner);
            let named: Vec<_> = admitted.iter().map(|event| catalog.describe(event)).collect();
            named.into_iter().chain(catalog.take_injected()).collect()
        };
        // Written without the catalog's lock: a slow reader of the output blocks the pump only.
        for record in records {
            self.writer.write(&record)?;
            if let Some(history) = &self.history {
                history.push(record);
            }
        }
        Ok(taken)
    }

    /// Writes what the budget held back: a notice per cgroup, one for the total.
    fn report(&mut self, held: Held) -> io::Result<()> {
        if held.is_empty() {
            return Ok(());
        }
        let names: Vec<_> = {
            let mut catalog = self.catalog.lock().unwrap_or_else(PoisonError::into_inner);
            held.suppressed.iter().map(|(cgroup, count)| (catalog.cgroup_names(*cgroup), *count)).collect()
        };
        for ((cgroup, workload), count) in names {
            self.writer.write_suppressed(&cgroup, workload.as_deref(), count)?;
        }
        if held.not_written > 0 {
            self.writer.write_not_written(held.not_written)?;
        }
        Ok(())
    }
}

/// Reports each drop once (the counter remembers what was reported, across restarts).
#[derive(Default)]
struct DropWatch {
    started: bool,
}

impl DropWatch {
    fn check<W: Write>(&mut self, counter: &DropCounter, writer: &mut EventWriter<W>) -> io::Result<()> {
        let (total, reported) = match counter.read() {
            Ok(drops) => (drops.total, drops.reported),
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
            if let Err(error) = counter.mark_reported(total) {
                tracing::warn!(%error, "recording the reported drops");
            }
            writer.write_dropped(dropped, total)?;
        }
        self.started = true;
        Ok(())
    }
}
