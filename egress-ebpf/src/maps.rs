//! Every map the kernel programs use. Names must match `egress_common::names`.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
};
use egress_common::{
    CgroupBinding, Decision, DestinationSeen, DnsConfig, FlowId, FlowKey, FlowState, Learned, LearnedKey, Origin,
    OriginKey, PeerKey, PendingOpen, PolicyInfo, PolicyStats, PortTable, RuleKeyV4, RuleKeyV6, Settings, SteeredSocket,
    WorkloadDestination, EVENTS_RING_BYTES, FLOW_ENDS_RING_BYTES, MAX_CGROUPS, MAX_CIDRS_V4, MAX_CIDRS_V6,
    MAX_CLOSED_SOCKETS, MAX_DEEP_GUARDS, MAX_FLOWS, MAX_FLOWS_SEEN, MAX_LEARNED, MAX_POLICY_SLOTS, MAX_PORT_TABLES,
    MAX_QUERY_ORIGINS, MAX_STEERED, MAX_UDP_PEERS, MAX_WORKLOAD_DESTINATIONS, PENDING_OPEN_SLOTS,
};

/// cgroup id -> policy slot.
#[map]
pub static CGROUP_POLICY: HashMap<u64, CgroupBinding> = HashMap::with_max_entries(MAX_CGROUPS, BPF_F_NO_PREALLOC);

/// Level-`MAX_CGROUP_LEVEL` cgroup id -> guard binding (slot `GUARD_SLOT`), for cgroups that
/// have a bound descendant deeper than the walk.
#[map]
pub static DEEP_GUARDS: HashMap<u64, CgroupBinding> = HashMap::with_max_entries(MAX_DEEP_GUARDS, BPF_F_NO_PREALLOC);

#[map]
pub static POLICY_INFO: Array<PolicyInfo> = Array::with_max_entries(MAX_POLICY_SLOTS, 0);

#[map]
pub static RULES_V4: LpmTrie<RuleKeyV4, Decision> = LpmTrie::with_max_entries(MAX_CIDRS_V4, 0);

#[map]
pub static RULES_V6: LpmTrie<RuleKeyV6, Decision> = LpmTrie::with_max_entries(MAX_CIDRS_V6, 0);

#[map]
pub static PORT_TABLES: HashMap<u32, PortTable> = HashMap::with_max_entries(MAX_PORT_TABLES, BPF_F_NO_PREALLOC);

#[map]
pub static SETTINGS: Array<Settings> = Array::with_max_entries(1, 0);

#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_RING_BYTES, 0);

#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(egress_common::counter::COUNT, 0);

#[map]
pub static BINDING_STATS: PerCpuArray<PolicyStats> = PerCpuArray::with_max_entries(MAX_CGROUPS, 0);

#[map]
pub static UDP_PEERS: LruHashMap<PeerKey, u8> = LruHashMap::with_max_entries(MAX_UDP_PEERS, 0);

#[map]
pub static FLOWS_SEEN: LruHashMap<FlowKey, u8> = LruHashMap::with_max_entries(MAX_FLOWS_SEEN, 0);

/// Flows being counted (see `flows`).
#[map]
pub static FLOWS: LruHashMap<FlowId, FlowState> = LruHashMap::with_max_entries(MAX_FLOWS, 0);

/// Flows that ended, for the daemon's flow records.
#[map]
pub static FLOW_ENDS: RingBuf = RingBuf::with_byte_size(FLOW_ENDS_RING_BYTES, 0);

/// Socket cookie -> release time of datagram and raw sockets, whose flows the daemon ends.
#[map]
pub static CLOSED_SOCKETS: LruHashMap<u64, u64> = LruHashMap::with_max_entries(MAX_CLOSED_SOCKETS, 0);

/// Moved on by the flow-record sweeper when it stops counting a datagram flow whose socket is
/// still open (idle, or pushed out of `FLOWS`): datagram decisions reused on this CPU
/// (`recent`) then lapse, and the next datagram opens the flow again.
#[map]
pub static DATAGRAM_EPOCH: Array<u32> = Array::with_max_entries(1, 0);

/// Destinations each workload reached: when they were last logged, and the last decision.
#[map]
pub static WORKLOAD_DESTINATIONS: LruHashMap<WorkloadDestination, DestinationSeen> =
    LruHashMap::with_max_entries(MAX_WORKLOAD_DESTINATIONS, 0);

/// Per CPU: who opened the TCP connections whose flows the SYN's packet hook has still to open
/// (see `flows::hand_over`). Scratch, never pinned: it is only read within a system call.
#[map]
pub static PENDING_OPENS: PerCpuArray<PendingOpen> = PerCpuArray::with_max_entries(PENDING_OPEN_SLOTS, 0);

// The DNS proxy's maps (see dns.rs).

#[map]
pub static DNS_CONFIG: Array<DnsConfig> = Array::with_max_entries(1, 0);

#[map]
pub static LEARNED: HashMap<LearnedKey, Learned> = HashMap::with_max_entries(MAX_LEARNED, BPF_F_NO_PREALLOC);

#[map]
pub static STEERED: LruHashMap<u64, SteeredSocket> = LruHashMap::with_max_entries(MAX_STEERED, 0);

#[map]
pub static QUERY_ORIGINS: LruHashMap<OriginKey, Origin> = LruHashMap::with_max_entries(MAX_QUERY_ORIGINS, 0);

/// Entries per CPU of `RECENT_DECISIONS` (see recent.rs); a power of two.
pub const RECENT_SLOTS: u32 = 256;
/// Words per `RECENT_DECISIONS` entry.
pub const RECENT_WORDS: usize = 8;

#[map]
pub static RECENT_DECISIONS: PerCpuArray<[u64; RECENT_WORDS]> = PerCpuArray::with_max_entries(RECENT_SLOTS, 0);
