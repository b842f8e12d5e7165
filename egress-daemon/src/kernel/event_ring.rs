//! The event ring as the event path sees it: raw event bytes and a wakeup to wait on, plus the
//! kernel's count of events that did not fit.

use std::{
    io,
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
    sync::{Arc, Mutex},
    time::Duration,
};

use aya::maps::{Map, MapData, MapError, PerCpuArray, PerCpuValues, RingBuf};
use egress_common::{counter, names};

use super::KernelError;

/// The kernel's flow-event ring buffer.
pub struct EventSource {
    ring: RingBuf<MapData>,
    wakeups: Wakeups,
}

impl EventSource {
    pub(super) fn new(map: Map) -> Result<Self, KernelError> {
        let ring = RingBuf::try_from(map).map_err(|source| KernelError::Map { name: names::EVENTS, source })?;
        let wakeups =
            Wakeups::new(&ring).map_err(|source| KernelError::Io { what: "watching the event ring", source })?;
        Ok(Self { ring, wakeups })
    }

    /// Returns when the kernel signals a backlog or after `timeout`, whichever comes first.
    pub fn wait(&self, timeout: Duration) -> io::Result<()> {
        self.wakeups.wait(timeout)
    }

    /// Hands at most `limit` waiting events to `each`, oldest first; returns how many it took.
    pub fn drain(&mut self, limit: usize, mut each: impl FnMut(&[u8])) -> usize {
        let mut taken = 0;
        while taken < limit {
            let Some(item) = self.ring.next() else { break };
            taken += 1;
            each(&item);
        }
        taken
    }
}

/// The ring buffer's wakeups, edge-triggered: the kernel signals only when a program asks for a
/// wakeup (a backlog), not for every event already waiting, which a drain timer collects.
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
        // open as long as the ring, which lives beside this in the same `EventSource`.
        let added =
            unsafe { libc::epoll_ctl(epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, ring.as_fd().as_raw_fd(), &mut interest) };
        if added < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { epoll })
    }

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

/// Events the kernel could not put in the ring, and how many of those a daemon has reported.
/// Both live in the pinned `COUNTERS` map, so a restarted daemon reports what was lost while
/// none was running, and nothing twice. Cheap to clone: status and metrics read the total.
#[derive(Clone)]
pub struct DropCounter {
    counters: Arc<Mutex<PerCpuArray<MapData, u64>>>,
}

/// Dropped events since the maps were created, and how many of those were already reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Drops {
    pub total: u64,
    pub reported: u64,
}

impl DropCounter {
    pub(super) fn new(map: Map) -> Result<Self, KernelError> {
        let counters = PerCpuArray::try_from(map).map_err(map_error)?;
        Ok(Self { counters: Arc::new(Mutex::new(counters)) })
    }

    pub fn read(&self) -> Result<Drops, KernelError> {
        let counters = self.counters.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let sum = |index| counters.get(&index, 0).map(|values| values.iter().sum::<u64>()).map_err(map_error);
        Ok(Drops { total: sum(counter::EVENTS_DROPPED)?, reported: sum(counter::DROPS_REPORTED)? })
    }

    /// Packets of covered sockets the packet hook refused because it could not parse them.
    pub fn malformed_packets(&self) -> Result<u64, KernelError> {
        let counters = self.counters.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        counters.get(&counter::MALFORMED_PACKETS, 0).map(|values| values.iter().sum::<u64>()).map_err(map_error)
    }

    /// Records that every drop up to `total` has been reported.
    pub fn mark_reported(&self, total: u64) -> Result<(), KernelError> {
        let mut counters = self.counters.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut values = vec![0; super::nr_cpus()];
        values[0] = total;
        let values =
            PerCpuValues::try_from(values).map_err(|source| KernelError::Io { what: "per-CPU values", source })?;
        counters.set(counter::DROPS_REPORTED, values, 0).map_err(map_error)
    }
}

fn map_error(source: MapError) -> KernelError {
    KernelError::Map { name: names::COUNTERS, source }
}
