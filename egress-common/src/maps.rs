//! Keys and values of the kernel maps. Map *names* live in [`names`] so the loader and the kernel
//! programs cannot drift apart.

/// Names of the maps in the kernel object.
pub mod names {
    pub const CGROUP_POLICY: &str = "CGROUP_POLICY";
    pub const POLICY_INFO: &str = "POLICY_INFO";
    pub const RULES_V4: &str = "RULES_V4";
    pub const RULES_V6: &str = "RULES_V6";
    pub const PORT_TABLES: &str = "PORT_TABLES";
    pub const SETTINGS: &str = "SETTINGS";
    pub const EVENTS: &str = "EVENTS";
    pub const COUNTERS: &str = "COUNTERS";
    pub const BINDING_STATS: &str = "BINDING_STATS";
    pub const UDP_PEERS: &str = "UDP_PEERS";
    pub const FLOWS_SEEN: &str = "FLOWS_SEEN";
    pub const DEEP_GUARDS: &str = "DEEP_GUARDS";
    pub const FLOWS: &str = "FLOWS";
    pub const FLOW_ENDS: &str = "FLOW_ENDS";
    pub const CLOSED_SOCKETS: &str = "CLOSED_SOCKETS";
    pub const WORKLOAD_DESTINATIONS: &str = "WORKLOAD_DESTINATIONS";
    pub const DATAGRAM_EPOCH: &str = "DATAGRAM_EPOCH";

    /// Every map of the kernel object; all are pinned so that enforcement outlives the daemon.
    pub const ALL: [&str; 17] = [
        CGROUP_POLICY,
        POLICY_INFO,
        RULES_V4,
        RULES_V6,
        PORT_TABLES,
        SETTINGS,
        EVENTS,
        COUNTERS,
        BINDING_STATS,
        UDP_PEERS,
        FLOWS_SEEN,
        DEEP_GUARDS,
        FLOWS,
        FLOW_ENDS,
        CLOSED_SOCKETS,
        WORKLOAD_DESTINATIONS,
        DATAGRAM_EPOCH,
    ];
}

/// Capacity of the cgroup id -> policy slot map.
pub const MAX_CGROUPS: u32 = 16_384;
/// Policy slots; twice the number of policies a file may hold, so a reload can fill fresh slots
/// while the old ones still serve traffic.
pub const MAX_POLICY_SLOTS: u32 = 8_192;
/// Capacity of each CIDR trie (all policies together).
pub const MAX_CIDRS_V4: u32 = 1 << 20;
pub const MAX_CIDRS_V6: u32 = 1 << 18;
/// Distinct port tables (all policies together).
pub const MAX_PORT_TABLES: u32 = 65_536;
/// Port-specific rules one destination prefix can be subject to.
pub const MAX_PORT_RULES: usize = 16;
/// Deepest cgroup level the kernel programs look at when searching for a policy. A cgroup
/// deeper than this is found only by its own id, and its level-`MAX_CGROUP_LEVEL` ancestor is
/// put in `DEEP_GUARDS` so that unbound cgroups beside or below it are refused, not let through.
pub const MAX_CGROUP_LEVEL: u32 = 15;
/// Bit of `Settings::policy_levels` set when some bound cgroup is deeper than the walk.
pub const DEEP_LEVELS_BIT: u32 = 1 << 31;
/// Slot of a `DEEP_GUARDS` binding: no policy, every flow refused.
pub const GUARD_SLOT: u32 = u32::MAX;
/// Slot of a cgroup a selector matches but that could not be given its own binding (the
/// binding table was full, or its delegated subtree was over its share): every flow refused.
pub const UNBINDABLE_SLOT: u32 = u32::MAX - 1;
/// Entries of `CGROUP_POLICY` kept for `UNBINDABLE_SLOT` bindings: policy bindings stop short of
/// them, so a cgroup that cannot be bound can still be refused.
pub const RESERVED_BINDINGS: u32 = 256;
/// The `BINDING_STATS` index every `UNBINDABLE_SLOT` binding counts into.
pub const UNBINDABLE_STATS: u32 = MAX_CGROUPS - 1;
/// Capacity of the map of level-`MAX_CGROUP_LEVEL` cgroups that have bound descendants deeper.
pub const MAX_DEEP_GUARDS: u32 = 1_024;
/// Flow events one cgroup may write per second on each CPU when the settings name no budget;
/// the rest are counted in [`PolicyStats::suppressed`].
pub const DEFAULT_EVENT_BUDGET: u32 = 1_000;
/// Stateful UDP: remembered peers that spoke first.
pub const MAX_UDP_PEERS: u32 = 65_536;
/// Flows already reported (sendmsg and packet hooks report a flow once, not per packet).
pub const MAX_FLOWS_SEEN: u32 = 65_536;
/// Ring buffer size in bytes (a power of two multiple of the page size).
pub const EVENTS_RING_BYTES: u32 = 1 << 22;
/// Pending event bytes past which a program wakes the daemon at once; below it the daemon's
/// drain timer (`pipeline::DRAIN_INTERVAL`) picks events up.
pub const EVENTS_WAKEUP_BACKLOG_BYTES: u64 = 1 << 18;

/// Data part of an IPv4 trie key: the policy slot (big endian) then the address.
/// The trie prefix length is `32 + cidr_prefix_len`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RuleKeyV4 {
    pub policy: [u8; 4],
    pub addr: [u8; 4],
}

/// Data part of an IPv6 trie key; prefix length `32 + cidr_prefix_len`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RuleKeyV6 {
    pub policy: [u8; 4],
    pub addr: [u8; 16],
}

/// Bits of the trie key taken by the policy slot.
pub const POLICY_KEY_BITS: u32 = 32;

/// What a trie leaf decides for destinations under its prefix.
///
/// The port-specific rules that can apply (from this prefix and every shorter one of the same
/// policy) are checked first, in priority order, from `PORT_TABLES[port_table]`; if none matches,
/// `fallback_action` with `fallback_rule` decides. `port_table == 0` means there are none.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Decision {
    pub fallback_rule: u32,
    pub port_table: u32,
    pub fallback_action: u8,
    pub _pad: [u8; 3],
}

/// One port-specific rule inside a [`PortTable`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct PortRule {
    pub rule: u32,
    pub port_lo: u16,
    pub port_hi: u16,
    /// `proto::ANY`, `proto::TCP`, `proto::UDP` or `proto::ICMP`.
    pub proto: u8,
    pub action: u8,
    /// 1 when the rule names ports: then only flows that have a port (TCP, UDP) can match.
    pub has_ports: u8,
    pub _pad: u8,
}

/// Port-specific rules checked in order; the first that matches decides.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PortTable {
    pub len: u32,
    pub rules: [PortRule; MAX_PORT_RULES],
}

/// Per policy slot: what happens when no rule contains the destination, and how verdicts apply.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PolicyInfo {
    /// Non-zero when the slot is in use.
    pub active: u8,
    pub default_action: u8,
    pub mode: u8,
    /// `log::*`: which allowed flows raise an event.
    pub log: u8,
    /// `socket_kind` bits this policy lets its cgroups open.
    pub allowed_sockets: u32,
    /// `policy_flags` bits.
    pub flags: u8,
    pub _pad: [u8; 3],
}

/// Global settings written by the daemon (index 0 of `SETTINGS`). `policy_levels`,
/// `event_budget`, `policy_epoch` and `flags` are read by the kernel; the rest is the daemon's own state, kept in the pinned map across restarts.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Settings {
    /// Bit `n` set when some cgroup at level `n` has a policy: the programs skip the other levels.
    pub policy_levels: u32,
    /// Generation of the policies in force (see the daemon's loader).
    pub generation: u32,
    /// `settings_flags::*`. Read by the kernel.
    pub flags: u32,
    /// Unused (once half of the reported drop count, now `counter::DROPS_REPORTED`).
    pub _reserved: u32,
    /// Flow events per second one cgroup may write on each CPU; 0 means
    /// [`DEFAULT_EVENT_BUDGET`]. Read by the kernel.
    pub event_budget: u32,
    /// Bumped by the daemon before it writes policies into a half of the slots: a decision
    /// cached under an older epoch is taken again. Read by the kernel.
    pub policy_epoch: u32,
}

/// Bits of `Settings::flags`.
pub mod settings_flags {
    /// The packet hook that counts a TCP connection's SYN reads who opened it from the current
    /// task (the kernel lets packet programs call the task helpers): `connect()` hands nothing
    /// over (`PendingOpen`).
    pub const OPENER_AT_SYN: u32 = 1;
}

/// Value of `CGROUP_POLICY`: the policy slot of a cgroup, and where its flows are counted.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CgroupBinding {
    pub slot: u32,
    /// Index into `BINDING_STATS`.
    pub stats: u32,
}

/// Indexes of the per-CPU `COUNTERS` array.
pub mod counter {
    /// Events that did not fit in the ring buffer.
    pub const EVENTS_DROPPED: u32 = 0;
    /// Dropped events a daemon has already reported (written by the daemon, on CPU 0's copy).
    pub const DROPS_REPORTED: u32 = 1;
    /// Ends of flows that did not fit in the `FLOW_ENDS` ring (the daemon ends them later).
    pub const FLOW_ENDS_DROPPED: u32 = 2;
    /// Packets of covered sockets refused because the hook could not parse them.
    pub const MALFORMED_PACKETS: u32 = 3;
    pub const COUNT: u32 = 4;
}

/// Per-CPU flow counts of one bound cgroup (`BINDING_STATS[binding.stats]`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PolicyStats {
    pub allowed: u64,
    pub blocked: u64,
    pub audited: u64,
    /// Events not written because the cgroup was over its event budget (the flows themselves
    /// were judged and counted as usual).
    pub suppressed: u64,
    /// Kernel-private rate-limit state: start of the current one-second window and the events
    /// written in it on this CPU.
    pub window_start_ns: u64,
    pub window_events: u64,
}

/// Key of the stateful-UDP peer map: a socket and a peer that sent to it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PeerKey {
    pub cookie: u64,
    pub addr: [u8; 16],
    pub port: u16,
    pub family: u8,
    pub _pad: [u8; 5],
}

/// Key of the map of flows already reported.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub cookie: u64,
    pub policy: u32,
    pub rule: u32,
    pub addr: [u8; 16],
    pub port: u16,
    pub protocol: u8,
    pub verdict: u8,
    pub _pad: [u8; 4],
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    unsafe impl aya::Pod for RuleKeyV4 {}
    unsafe impl aya::Pod for RuleKeyV6 {}
    unsafe impl aya::Pod for Decision {}
    unsafe impl aya::Pod for PortRule {}
    unsafe impl aya::Pod for PortTable {}
    unsafe impl aya::Pod for PolicyInfo {}
    unsafe impl aya::Pod for Settings {}
    unsafe impl aya::Pod for CgroupBinding {}
    unsafe impl aya::Pod for PolicyStats {}
    unsafe impl aya::Pod for PeerKey {}
    unsafe impl aya::Pod for FlowKey {}
}
