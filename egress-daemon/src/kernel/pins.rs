//! Where enforcement that outlives the daemon lives in bpffs: `<pin dir>/maps-v5/<MAP>` and
//! `<pin dir>/links/<cgroup id>-<program>-<serial>`.

use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
};

use aya::maps::{HashMap as BpfHashMap, MapData};
use egress_common::{names, CgroupBinding, Settings};

use super::KernelError;

/// Where the maps are pinned below the pin directory. The suffix changes whenever a key or value
/// layout changes, so that a daemon never adopts maps it would misread; a unit test holds the
/// layout this name stands for and fails when a layout changes under the same name.
pub const MAPS_DIR: &str = "maps-v5";
const LINKS_DIR: &str = "links";

/// Every map of the object with its pin path (creating the maps directory).
pub(super) fn map_paths(pin_dir: &Path) -> Result<Vec<(&'static str, PathBuf)>, KernelError> {
    let maps = pin_dir.join(MAPS_DIR);
    fs::create_dir_all(&maps).map_err(KernelError::pin(&maps))?;
    Ok(names::ALL.iter().chain(&egress_common::dns_names::ALL).map(|name| (*name, maps.join(name))).collect())
}

/// Whether an earlier daemon left its maps here.
pub(super) fn maps_exist(pin_dir: &Path) -> bool {
    pin_dir.join(MAPS_DIR).join(names::CGROUP_POLICY).exists()
}

pub(super) fn links_dir(pin_dir: &Path) -> Result<PathBuf, KernelError> {
    let links = pin_dir.join(LINKS_DIR);
    fs::create_dir_all(&links).map_err(KernelError::pin(&links))?;
    Ok(links)
}

/// The link pins in `links_dir`.
pub(super) fn existing(links_dir: &Path) -> Result<Vec<PathBuf>, KernelError> {
    Ok(fs::read_dir(links_dir)
        .map_err(KernelError::pin(links_dir))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .collect())
}

pub(super) fn link_path(links_dir: &Path, cgroup_id: u64, program: &str, serial: u64) -> PathBuf {
    links_dir.join(format!("{cgroup_id}-{program}-{serial}"))
}

/// A suffix for link pin names that no pin in `previous` has: one more than the highest there.
/// Unlike the process id (PID 1 again for a daemon restarted in a container) it cannot collide
/// with an earlier daemon's pins, which stay in place until the new links are pinned.
pub(super) fn next_link_serial(previous: &[PathBuf]) -> u64 {
    previous
        .iter()
        .filter_map(|path| path.file_name()?.to_str()?.rsplit('-').next()?.parse::<u64>().ok())
        .max()
        .map_or(1, |highest| highest.saturating_add(1))
}

/// Removes every pin (enforcement ends once this process closes its descriptors).
pub(super) fn remove_all(pin_dir: &Path) {
    drop(fs::remove_dir_all(pin_dir.join(MAPS_DIR)));
    drop(fs::remove_dir_all(pin_dir.join(LINKS_DIR)));
    drop(fs::remove_dir(pin_dir));
}

/// Whether the pinned maps exist at all (a daemon that detached on exit removes them).
pub fn pinned_maps_exist(pin_dir: &Path) -> bool {
    pin_dir.join(MAPS_DIR).exists()
}

/// The cgroup -> policy slot bindings in the pinned maps under `pin_dir`, as a running daemon
/// (or one that left enforcement in place) wrote them.
pub fn pinned_bindings(pin_dir: &Path) -> Result<HashMap<u64, u32>, KernelError> {
    let path = pin_dir.join(MAPS_DIR).join(names::CGROUP_POLICY);
    let data = MapData::from_pin(&path).map_err(|source| KernelError::Map { name: names::CGROUP_POLICY, source })?;
    let map: BpfHashMap<MapData, u64, CgroupBinding> =
        BpfHashMap::try_from(aya::maps::Map::from_map_data(data).map_err(KernelError::map(names::CGROUP_POLICY))?)
            .map_err(KernelError::map(names::CGROUP_POLICY))?;
    Ok(map.iter().filter_map(Result::ok).map(|(id, binding)| (id, binding.slot)).collect())
}

/// The policy epoch in the pinned settings under `pin_dir` (decisions the kernel cached under
/// another epoch are taken again).
pub fn pinned_policy_epoch(pin_dir: &Path) -> Result<u32, KernelError> {
    let path = pin_dir.join(MAPS_DIR).join(names::SETTINGS);
    let data = MapData::from_pin(&path).map_err(|source| KernelError::Map { name: names::SETTINGS, source })?;
    let map: aya::maps::Array<MapData, Settings> =
        aya::maps::Array::try_from(aya::maps::Map::from_map_data(data).map_err(KernelError::map(names::SETTINGS))?)
            .map_err(KernelError::map(names::SETTINGS))?;
    Ok(map.get(&0, 0).map_err(KernelError::map(names::SETTINGS))?.policy_epoch)
}

#[cfg(test)]
mod tests {
    use super::*;
    use egress_common::{
        dns::{DnsConfig, Learned, LearnedKey, Origin, OriginKey, SteeredSocket},
        Decision, DestinationSeen, FlowEnd, FlowEvent, FlowId, FlowKey, FlowState, PeerKey, PolicyInfo, PolicyStats,
        PortTable, RuleKeyV4, RuleKeyV6, Settings, WorkloadDestination,
    };

    /// The sizes and alignments of every type in the pinned maps, and the maps' names.
    fn layout() -> String {
        macro_rules! shapes {
            ($($ty:ty),+) => { [$(format!("{}:{}/{}", stringify!($ty), size_of::<$ty>(), align_of::<$ty>())),+] };
        }
        let types = shapes!(
            CgroupBinding,
            Decision,
            FlowEvent,
            FlowKey,
            PeerKey,
            PolicyInfo,
            PolicyStats,
            PortTable,
            RuleKeyV4,
            RuleKeyV6,
            Settings,
            FlowId,
            FlowState,
            FlowEnd,
            WorkloadDestination,
            DestinationSeen,
            DnsConfig,
            LearnedKey,
            Learned,
            SteeredSocket,
            OriginKey,
            Origin
        );
        let maps: Vec<&str> = names::ALL.iter().chain(&egress_common::dns_names::ALL).copied().collect();
        format!("{} {}", maps.join(","), types.join(","))
    }

    #[test]
    fn the_maps_directory_names_the_layout_it_holds() {
        // When this fails, a map was added or a key or value changed: bump MAPS_DIR (a daemon
        // must not adopt maps it would misread) and record the new layout here.
        let recorded = (
            "maps-v5",
            "CGROUP_POLICY,POLICY_INFO,RULES_V4,RULES_V6,PORT_TABLES,SETTINGS,EVENTS,COUNTERS,BINDING_STATS,\
             UDP_PEERS,FLOWS_SEEN,DEEP_GUARDS,FLOWS,FLOW_ENDS,CLOSED_SOCKETS,WORKLOAD_DESTINATIONS,DATAGRAM_EPOCH,\
             DNS_CONFIG,\
             LEARNED,STEERED,QUERY_ORIGINS \
             CgroupBinding:8/4,Decision:12/4,FlowEvent:72/8,FlowKey:40/8,PeerKey:32/8,PolicyInfo:12/4,\
             PolicyStats:48/8,PortTable:196/4,RuleKeyV4:8/1,RuleKeyV6:20/1,Settings:24/4,FlowId:32/8,\
             FlowState:120/8,FlowEnd:152/8,WorkloadDestination:32/8,DestinationSeen:32/8,DnsConfig:16/8,\
             LearnedKey:24/8,Learned:208/8,SteeredSocket:40/8,OriginKey:24/2,Origin:48/8",
        );
        assert_eq!((MAPS_DIR, layout().as_str()), recorded, "bump MAPS_DIR and record the new layout");
    }

    #[test]
    fn link_serials_never_repeat_an_earlier_daemons() {
        assert_eq!(next_link_serial(&[]), 1);
        let previous: Vec<PathBuf> =
            ["/p/links/77-connect4-1", "/p/links/77-egress_packet-1", "/p/links/77-connect6-41", "/p/links/junk"]
                .iter()
                .map(PathBuf::from)
                .collect();
        assert_eq!(next_link_serial(&previous), 42);
    }
}
