//! The flow accounting maps as the flow-record sweeper sees them: the counted flows, the ring of
//! flows that ended, and the datagram sockets released since the last look.

use std::collections::HashMap;

use aya::maps::{Array, HashMap as BpfHashMap, Map, MapData, RingBuf};
use egress_common::{names, FlowEnd, FlowId, FlowState};

use super::KernelError;

pub struct FlowSource {
    flows: BpfHashMap<MapData, FlowId, FlowState>,
    ends: RingBuf<MapData>,
    closed: BpfHashMap<MapData, u64, u64>,
    datagram_epoch: Array<MapData, u32>,
    sock_release: bool,
}

impl FlowSource {
    pub(super) fn new(
        flows: Map,
        ends: Map,
        closed: Map,
        datagram_epoch: Map,
        sock_release: bool,
    ) -> Result<Self, KernelError> {
        Ok(Self {
            flows: BpfHashMap::try_from(flows).map_err(|source| KernelError::Map { name: names::FLOWS, source })?,
            ends: RingBuf::try_from(ends).map_err(|source| KernelError::Map { name: names::FLOW_ENDS, source })?,
            closed: BpfHashMap::try_from(closed)
                .map_err(|source| KernelError::Map { name: names::CLOSED_SOCKETS, source })?,
            datagram_epoch: Array::try_from(datagram_epoch)
                .map_err(|source| KernelError::Map { name: names::DATAGRAM_EPOCH, source })?,
            sock_release,
        })
    }

    /// Whether the kernel ends flows at their socket's release (Linux 5.9+); without it TCP
    /// flows end by idle expiry.
    pub fn ends_at_release(&self) -> bool {
        self.sock_release
    }

    /// The flows that ended since the last call, oldest first.
    pub fn drain_ends(&mut self) -> Vec<FlowEnd> {
        let mut ends = Vec::new();
        while let Some(item) = self.ends.next() {
            if item.len() >= size_of::<FlowEnd>() {
                // SAFETY: FlowEnd is plain old data and the length is checked.
                ends.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) });
            }
        }
        ends
    }

    /// Every flow being counted, with its counters now.
    pub fn snapshot(&self) -> Vec<(FlowId, FlowState)> {
        self.flows.iter().filter_map(Result::ok).collect()
    }

    /// Datagram and raw sockets released since they were last forgotten: cookie -> release time.
    pub fn closed_sockets(&self) -> HashMap<u64, u64> {
        self.closed.iter().filter_map(Result::ok).collect()
    }

    /// Stops counting a flow (it ended); gone already when the kernel ended it meanwhile.
    pub fn remove(&mut self, id: &FlowId) {
        let _ = self.flows.remove(id);
    }

    /// Makes the kernel judge the next datagram of every socket again (decisions it reused per
    /// CPU lapse): called when a datagram flow of a socket still open stops being counted, so
    /// that its next datagram opens it again.
    pub fn renew_datagram_decisions(&mut self) -> Result<(), KernelError> {
        let map_error = |source| KernelError::Map { name: names::DATAGRAM_EPOCH, source };
        let epoch = self.datagram_epoch.get(&0, 0).map_err(map_error)?;
        self.datagram_epoch.set(0, epoch.wrapping_add(1), 0).map_err(map_error)
    }

    pub fn forget_closed(&mut self, cookie: u64) {
        let _ = self.closed.remove(&cookie);
    }
}
