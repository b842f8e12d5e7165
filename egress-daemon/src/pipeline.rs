//! Moves events from the kernel ring buffer to an output sink, and reports drops.

use std::{io::Write, time::Duration};

use aya::maps::{MapData, RingBuf};
use tokio::{
    io::{unix::AsyncFd, Interest},
    sync::watch,
};

use crate::{engine::Engine, output::EventWriter};

/// How often the kernel's dropped-event counter is checked.
const DROP_CHECK_INTERVAL: Duration = Duration::from_millis(500);

/// Pumps events until `stop` turns true, then drains what is left and returns.
pub async fn pump<W: Write>(
    ring: RingBuf<MapData>,
    engine: Engine,
    mut writer: EventWriter<W>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    // SAFETY: the ring buffer owns its map fd, which stays open and unchanged while the AsyncFd
    // owns the ring buffer.
    let mut ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
        .map_err(std::io::Error::from)?;
    let mut drops = DropWatch::default();
    let mut ticker = tokio::time::interval(DROP_CHECK_INTERVAL);
    loop {
        tokio::select! {
            ready = ring.readable_mut() => {
                let mut guard = ready?;
                drain(guard.get_inner_mut(), &engine, &mut writer)?;
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
    drain(ring.get_mut(), &engine, &mut writer)?;
    drops.check(&engine, &mut writer)?;
    Ok(())
}

fn drain<W: Write>(ring: &mut RingBuf<MapData>, engine: &Engine, writer: &mut EventWriter<W>) -> std::io::Result<()> {
    while let Some(item) = ring.next() {
        let record = engine.catalog().record(&item);
        drop(item);
        if let Some(record) = record {
            writer.write(&record)?;
        }
    }
    Ok(())
}

#[derive(Default)]
struct DropWatch {
    reported: u64,
}

impl DropWatch {
    fn check<W: Write>(&mut self, engine: &Engine, writer: &mut EventWriter<W>) -> std::io::Result<()> {
        let total = match engine.enforcer().dropped_events() {
            Ok(total) => total,
            Err(error) => {
                tracing::warn!(%error, "reading the dropped-event counter");
                return Ok(());
            }
        };
        if total > self.reported {
            let dropped = total - self.reported;
            tracing::warn!(dropped, total, "flow events dropped: the ring buffer was full");
            writer.write_dropped(dropped, total)?;
            self.reported = total;
        }
        Ok(())
    }
}
