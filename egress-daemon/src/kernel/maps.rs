//! One typed accessor per kernel map: each map's key and value types are stated here, once.

use aya::{
    maps::{Array, HashMap, LpmTrie, Map, MapData, MapError, PerCpuArray},
    Ebpf,
};
use egress_common::{
    names, CgroupBinding, Decision, PolicyInfo, PolicyStats, PortTable, RuleKeyV4, RuleKeyV6, Settings,
};

use super::KernelError;

fn typed<'a, M>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<M, KernelError>
where
    M: TryFrom<&'a mut Map, Error = MapError>,
{
    let map = ebpf.map_mut(name).ok_or(KernelError::MissingMap(name))?;
    M::try_from(map).map_err(|source| KernelError::Map { name, source })
}

macro_rules! accessors {
    ($($(#[$doc:meta])* $fn:ident: $name:ident => $($ty:ident)::+ <$($arg:ty),+>;)+) => {
        $(
            $(#[$doc])*
            pub(super) fn $fn(ebpf: &mut Ebpf) -> Result<$($ty)::+<&mut MapData, $($arg),+>, KernelError> {
                typed(ebpf, names::$name)
            }
        )+
    };
}

accessors! {
    /// Bound cgroup id -> its policy slot and stats index.
    cgroup_policy: CGROUP_POLICY => HashMap<u64, CgroupBinding>;
    /// Level-15 cgroup id -> the guard that refuses its unbound deeper descendants.
    deep_guards: DEEP_GUARDS => HashMap<u64, CgroupBinding>;
    /// Policy slot -> default verdict, mode and flags.
    policy_info: POLICY_INFO => Array<PolicyInfo>;
    rules_v4: RULES_V4 => LpmTrie<RuleKeyV4, Decision>;
    rules_v6: RULES_V6 => LpmTrie<RuleKeyV6, Decision>;
    /// Port table id -> the protocol/port rules of one prefix.
    port_tables: PORT_TABLES => HashMap<u32, PortTable>;
    /// The one `Settings` record, at index 0.
    settings: SETTINGS => Array<Settings>;
    /// Per-binding flow counts.
    binding_stats: BINDING_STATS => PerCpuArray<PolicyStats>;
}

/// The `CGROUP_POLICY` map's data, for the one-syscall batch switch that aya has no call for.
pub(super) fn cgroup_policy_data(ebpf: &Ebpf) -> Option<&MapData> {
    match ebpf.map(names::CGROUP_POLICY) {
        Some(Map::HashMap(data)) => Some(data),
        _ => None,
    }
}

/// A rule trie's data (`RULES_V4` or `RULES_V6`), for batched writes.
pub(super) fn rule_trie_data<'a>(ebpf: &'a Ebpf, name: &'static str) -> Option<&'a MapData> {
    match ebpf.map(name) {
        Some(Map::LpmTrie(data)) => Some(data),
        _ => None,
    }
}
