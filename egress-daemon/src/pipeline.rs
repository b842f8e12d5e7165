//! Moves events from the kernel ring buffer to an output sink, and reports drops.

use std::{io::Write, sync::Arc, time::Duration};

use aya::maps::{MapData, RingBuf};
use tokio::{
    io::{unix::AsyncFd, Interest},
    sync::watch,
};

use crate::{control::history::EventHistory, engine::Engine, output::EventWriter};

/// How often the kernel's dropped-event counter is checked.
const DROP_CHECK_INTERVAL: Duration = Duration::from_millis(500);
/// The kernel programs wake the reader only once a backlog builds up (a wakeup per event would
/// cost every connect microseconds), so the ring is also drained on this timer.
pub const DRAIN_INTERVAL: Duration = Duration::from_millis(50);

/// Pumps events until `stop` turns true, then drains what is left and returns.
pub async fn pump<W: Write>(
    ring: RingBuf<MapData>,
    engine: Engine,
    mut writer: EventWriter<W>,
    history: Option<Arc<EventHistory>>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    // SAFETY: the ring buffer owns its map fd, which stays open and unchanged while the AsyncFd
    // owns the ring buffer.
    let mut ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
        .map_err(std::io::Error::from)?;
    let mut drops = DropWatch::default();
    let mut ticker = tokio::time::interval(DROP_CHECK_INTERVAL);
    let mut drain_timer = tokio::time::interval(DRAIN_INTERVAL);
    drain_timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = drain_timer.tick() => drain(ring.get_mut(), &engine, &mut writer, history.as_deref())?,
            ready = ring.readable_mut() => {
                let mut guard = ready?;
                drain(guard.get_inner_mut(), &engine, &mut writer, history.as_deref())?;
                guard.clear_ready();
            }
            _ = ticker.tick() => drops.check(&engine, &mut writer)?,
            changed = stop.changed() => {
                if changed.is_err() || *stop.borrow() {
                    break;
                }
            }
        }
    }
    drain(ring.get_mut(), &engine, &mut writer, history.as_deref())?;
    drops.check(&engine, &mut writer)?;
    Ok(())
}

fn drain<W: Write>(
    ring: &mut RingBuf<MapData>,
    engine: &Engine,
    writer: &mut EventWriter<W>,
    history: Option<&EventHistory>,
) -> std::io::Result<()> {
    let mut catalog = engine.catalog();
    while let Some(item) = ring.next() {
        let record = catalog.record(&item);
        drop(item);
        if let Some(record) = record {
            writer.write(&record)?;
            if let Some(history) = history {
                history.push(record);
            }
        }
    }
    Ok(())
}

/// Reports drops once: the count already reported lives in the (pinned) settings map, so a
/// restarted daemon reports what was lost while none was running, and nothing twice.
#[derive(Default)]
struct DropWatch {
    started: bool,
}

impl DropWatch {
    fn check<W: Write>(&mut self, engine: &Engine, writer: &mut EventWriter<W>) -> std::io::Result<()> {
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
            writer.write_dropped(dropped, total)?;
            if let Err(error) = state.enforcer.mark_dropped_reported(total) {
                tracing::warn!(%error, "recording the reported drops");
            }
        }
        self.started = true;
        Ok(())
    }
}
