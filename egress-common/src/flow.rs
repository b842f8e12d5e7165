//! Flow accounting: what the kernel counts per flow, and the per-workload record of destinations
//! already judged (the "new destination" log filter and the connect verdict cache).

/// How much a policy logs of the flows it allows (`PolicyInfo::log`). Blocked and audited flows
/// always raise an event.
pub mod log {
    /// An event the first time a workload reaches a destination (address, port, protocol)
    /// within [`super::NEW_DESTINATION_WINDOW_NS`]; the default.
    pub const NEW: u8 = 0;
    /// An event per flow decision (each `connect()`, each first datagram per socket and
    /// destination).
    pub const ALL: u8 = 1;
    /// No event for allowed flows: they are only counted into flow records.
    pub const BLOCKED: u8 = 2;
}

/// How long a workload's destination stays "seen" for `log: new`.
pub const NEW_DESTINATION_WINDOW_NS: u64 = 3_600 * 1_000_000_000;
/// Flows counted at once (TCP connections, UDP and raw socket-destination pairs).
pub const MAX_FLOWS: u32 = 65_536;
/// (workload, destination) pairs remembered for `log: new` and the connect verdict cache.
pub const MAX_WORKLOAD_DESTINATIONS: u32 = 65_536;
/// Closed datagram and raw sockets whose flows the daemon has still to end.
pub const MAX_CLOSED_SOCKETS: u32 = 16_384;
/// Ring buffer for records of flows that ended (bytes; a power of two multiple of the page size).
pub const FLOW_ENDS_RING_BYTES: u32 = 1 << 20;

/// One flow: a socket and the remote end it talks to. TCP sockets have one; a datagram or raw
/// socket has one flow per destination.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowId {
    pub cookie: u64,
    /// Remote address; IPv4 (also v4-mapped IPv6) in the first 4 bytes.
    pub addr: [u8; 16],
    /// Remote port, host byte order; 0 for protocols without ports.
    pub port: u16,
    pub family: u8,
    /// Normalised like the rules' protocol (ICMPv6 counts as ICMP).
    pub protocol: u8,
    pub _pad: [u8; 4],
}

/// What the kernel knows and counts of one flow (value of `FLOWS`). The counters only ever grow
/// (atomic adds from every CPU); the daemon reads them and reports the differences.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowState {
    /// `CLOCK_BOOTTIME` ns of the decision that opened the flow.
    pub start_ns: u64,
    /// When the flow was opened: the packet hooks read no clock (a clock read can cost more than
    /// the rest of the hook); the daemon notes when the counters move.
    pub last_ns: u64,
    pub packets_out: u64,
    pub bytes_out: u64,
    pub packets_in: u64,
    pub bytes_in: u64,
    /// The cgroup that sent (the deciding task's at connect/sendmsg, the socket's for packets).
    pub cgroup_id: u64,
    /// Policy slot and rule of the decision.
    pub policy: u32,
    pub rule: u32,
    /// `Settings::policy_epoch` when the decision was taken: a decision counts as cached only
    /// while the epoch (and the cgroup's slot) are still the same.
    pub epoch: u32,
    /// 0 when the hook does not know the process.
    pub pid: u32,
    pub uid: u32,
    /// Host byte order; 0 until a packet showed it.
    pub local_port: u16,
    pub verdict: u8,
    /// 1 when the decision rested on an address a DNS answer taught: it lapses when the address
    /// expires, so the socket must not reuse it for later datagrams.
    pub learned: u8,
    /// 0 until a packet showed it.
    pub local_addr: [u8; 16],
    pub comm: [u8; 16],
    /// Set when the socket was released but its end could not be reported at once; the daemon
    /// ends the flow at its next sweep.
    pub end_ns: u64,
}

/// A flow that ended (its socket was released), as written to the `FLOW_ENDS` ring.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowEnd {
    pub id: FlowId,
    pub state: FlowState,
}

/// Key of `WORKLOAD_DESTINATIONS`: a cgroup and a destination it reached.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct WorkloadDestination {
    pub cgroup_id: u64,
    pub addr: [u8; 16],
    pub port: u16,
    pub family: u8,
    pub protocol: u8,
    pub _pad: [u8; 4],
}

/// The last decision for a workload's destination, and when it was last logged.
///
/// An allowed decision is reused (the flow is not judged again) while `epoch` is still
/// `Settings::policy_epoch`: the daemon moves the epoch on whenever rules, bindings or the
/// searched levels change, so the key's cgroup is still bound to `slot` and counts into `stats`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DestinationSeen {
    /// When an event for it was last written (`log: new`); 0 never.
    pub logged_ns: u64,
    pub slot: u32,
    pub epoch: u32,
    pub rule: u32,
    /// The binding's `BINDING_STATS` index.
    pub stats: u32,
    pub verdict: u8,
    /// Non-zero when the decision may be reused for the next `connect()` under the same epoch;
    /// zero for decisions that can lapse before the epoch changes (a learned address expires).
    pub reusable: u8,
    /// The deciding policy's `log::*`.
    pub log: u8,
    pub _pad: [u8; 5],
}

/// Slots per CPU of `PENDING_OPENS`.
pub const PENDING_OPEN_SLOTS: u32 = 16;

/// Who opened a TCP connection whose decision was reused (`DestinationSeen`), handed from the
/// `connect()` hook to the packet hook that sends its SYN. The SYN leaves from inside the same
/// system call, normally on the same CPU: that hook opens the flow from this record (when the
/// cookie matches), so a `connect()` to a known destination writes no shared map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PendingOpen {
    /// The socket's cookie; cleared first and written last (see the kernel's `flows`).
    pub cookie: u64,
    pub cgroup_id: u64,
    pub slot: u32,
    pub rule: u32,
    pub epoch: u32,
    pub pid: u32,
    pub uid: u32,
    pub verdict: u8,
    pub _pad: [u8; 3],
    pub comm: [u8; 16],
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    unsafe impl aya::Pod for FlowId {}
    unsafe impl aya::Pod for FlowState {}
    unsafe impl aya::Pod for FlowEnd {}
    unsafe impl aya::Pod for WorkloadDestination {}
    unsafe impl aya::Pod for DestinationSeen {}
}
