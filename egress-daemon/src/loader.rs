//! The only code that talks to the kernel: loads the embedded programs, attaches them to
//! cgroups, and swaps compiled policies into the maps.

use std::{collections::HashMap, os::fd::AsFd};

use aya::{
    maps::{lpm_trie::Key, Array, HashMap as BpfHashMap, LpmTrie, MapData, MapError, PerCpuArray, RingBuf},
    programs::{
        cgroup_skb::CgroupSkbLinkId, cgroup_sock_addr::CgroupSockAddrLinkId, CgroupAttachMode,
        CgroupSkb, CgroupSkbAttachType, CgroupSockAddr, ProgramError,
    },
    Ebpf, EbpfError,
};
use egress_common::{
    counter, names, Decision, PolicyInfo, PolicyStats, PortTable, RuleKeyV4, RuleKeyV6, Settings,
    MAX_POLICY_SLOTS, MAX_PORT_TABLES,
};
use thiserror::Error;

use crate::{
    cgroup::{Cgroup, CgroupError},
    policy::compile::CompiledSet,
};

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/egress.bpf.o"));

const SOCK_ADDR_PROGRAMS: [&str; 6] =
    ["connect4", "connect6", "sendmsg4", "sendmsg6", "recvmsg4", "recvmsg6"];
const SKB_PROGRAM: &str = "egress_packet";

#[derive(Debug, Error)]
pub enum LoaderError {
    #[error("loading the kernel object: {0}")]
    Object(#[from] EbpfError),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("program {0} is missing from the kernel object")]
    MissingProgram(&'static str),
    #[error("map {0} is missing from the kernel object")]
    MissingMap(&'static str),
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
}

fn map_error(name: &'static str) -> impl FnOnce(MapError) -> LoaderError {
    move |source| LoaderError::Map { name, source }
}

fn program_error(name: &'static str) -> impl FnOnce(ProgramError) -> LoaderError {
    move |source| LoaderError::Program { name, source }
}

/// Which half of the policy slots and port-table ids a generation of policies uses: a reload
/// fills the other half, then switches cgroups over one map write each, then clears the old half.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Generation(u64);

impl Generation {
    pub fn first_slot(self) -> u32 {
        (self.0 % 2) as u32 * (MAX_POLICY_SLOTS / 2)
    }
    pub fn first_table_id(self) -> u32 {
        1 + (self.0 % 2) as u32 * (MAX_PORT_TABLES / 2)
    }
    pub fn slots(self, count: usize) -> Vec<u32> {
        (0..count as u32).map(|i| self.first_slot() + i).collect()
    }
    pub fn max_policies() -> usize {
        (MAX_POLICY_SLOTS / 2) as usize
    }
    pub fn next(self) -> Self {
        Self(self.0 + 1)
    }
}

/// What one generation put into the maps, so that it can be removed again.
#[derive(Default)]
struct Installed {
    slots: Vec<u32>,
    v4: Vec<Key<RuleKeyV4>>,
    v6: Vec<Key<RuleKeyV6>>,
    tables: Vec<u32>,
}

enum Link {
    SockAddr(&'static str, CgroupSockAddrLinkId),
    Skb(CgroupSkbLinkId),
}

/// The loaded programs and maps.
pub struct Enforcer {
    ebpf: Ebpf,
    links: HashMap<u64, Vec<Link>>,
    bindings: HashMap<u64, u32>,
    installed: Installed,
    generation: Generation,
}

impl Enforcer {
    /// Loads the kernel object and verifies every program (nothing is attached yet).
    pub fn load() -> Result<Self, LoaderError> {
        let mut ebpf = Ebpf::load(OBJECT)?;
        for name in SOCK_ADDR_PROGRAMS {
            sock_addr_program(&mut ebpf, name)?.load().map_err(program_error(name))?;
        }
        skb_program(&mut ebpf)?.load().map_err(program_error(SKB_PROGRAM))?;
        Ok(Self {
            ebpf,
            links: HashMap::new(),
            bindings: HashMap::new(),
            installed: Installed::default(),
            generation: Generation::default(),
        })
    }

    /// The generation the next [`Enforcer::install`] must be compiled for.
    pub fn next_generation(&self) -> Generation {
        if self.installed.slots.is_empty() && self.bindings.is_empty() {
            self.generation
        } else {
            self.generation.next()
        }
    }

    /// Attaches every program to `cgroup`; they then see all its traffic and its descendants'.
    pub fn attach(&mut self, cgroup: &Cgroup) -> Result<(), LoaderError> {
        if self.links.contains_key(&cgroup.id) {
            return Ok(());
        }
        let file = cgroup.file()?;
        let mut links = Vec::new();
        let result = self.attach_all(file.as_fd(), &mut links);
        self.links.insert(cgroup.id, links);
        if result.is_err() {
            self.detach(cgroup.id);
        }
        result
    }

    fn attach_all(&mut self, cgroup: std::os::fd::BorrowedFd<'_>, links: &mut Vec<Link>) -> Result<(), LoaderError> {
        for name in SOCK_ADDR_PROGRAMS {
            let id = sock_addr_program(&mut self.ebpf, name)?
                .attach(cgroup, CgroupAttachMode::Single)
                .map_err(program_error(name))?;
            links.push(Link::SockAddr(name, id));
        }
        let id = skb_program(&mut self.ebpf)?
            .attach(cgroup, CgroupSkbAttachType::Egress, CgroupAttachMode::Single)
            .map_err(program_error(SKB_PROGRAM))?;
        links.push(Link::Skb(id));
        Ok(())
    }

    /// Detaches the programs from a cgroup (best effort: a cgroup that is gone has no links).
    pub fn detach(&mut self, cgroup_id: u64) {
        for link in self.links.remove(&cgroup_id).unwrap_or_default() {
            let result = match link {
                Link::SockAddr(name, id) => {
                    sock_addr_program(&mut self.ebpf, name).and_then(|p| p.detach(id).map_err(program_error(name)))
                }
                Link::Skb(id) => skb_program(&mut self.ebpf)
                    .and_then(|p| p.detach(id).map_err(program_error(SKB_PROGRAM))),
            };
            if let Err(error) = result {
                tracing::warn!(%error, cgroup_id, "detaching");
            }
        }
    }

    /// Puts a compiled generation in force: `bindings` maps cgroup ids to the slots the set was
    /// compiled for, `levels` has bit n set for each bound cgroup at depth n.
    ///
    /// The new rules are written first under fresh slots, then each cgroup is switched with one
    /// map write, then the previous generation is removed: a flow sees the old policy or the new.
    pub fn install(
        &mut self,
        generation: Generation,
        set: &CompiledSet,
        slots: &[u32],
        bindings: &HashMap<u64, u32>,
        levels: u32,
    ) -> Result<(), LoaderError> {
        let mut fresh = Installed::default();
        let written = self.write_generation(set, slots, &mut fresh);
        if let Err(error) = written {
            self.remove_generation(&fresh);
            return Err(error);
        }
        let previous_levels = self.settings()?.policy_levels;
        self.set_levels(previous_levels | levels)?;
        let stale: Vec<u64> =
            self.bindings.keys().filter(|id| !bindings.contains_key(id)).copied().collect();
        {
            let mut cgroups: BpfHashMap<_, u64, u32> = self.map_mut(names::CGROUP_POLICY)?;
            for (cgroup_id, slot) in bindings {
                cgroups.insert(cgroup_id, slot, 0).map_err(map_error(names::CGROUP_POLICY))?;
            }
            for id in &stale {
                let _ = cgroups.remove(id);
            }
        }
        self.set_levels(levels)?;
        let old = std::mem::replace(&mut self.installed, fresh);
        self.remove_generation(&old);
        self.bindings = bindings.clone();
        self.generation = generation;
        Ok(())
    }

    fn write_generation(&mut self, set: &CompiledSet, slots: &[u32], into: &mut Installed) -> Result<(), LoaderError> {
        {
            let mut tables: BpfHashMap<_, u32, PortTable> = self.map_mut(names::PORT_TABLES)?;
            for (id, table) in &set.port_tables {
                tables.insert(id, table, 0).map_err(map_error(names::PORT_TABLES))?;
                into.tables.push(*id);
            }
        }
        {
            let mut v4: LpmTrie<_, RuleKeyV4, Decision> = self.map_mut(names::RULES_V4)?;
            for policy in &set.policies {
                for (prefix, data, decision) in &policy.v4 {
                    let key = Key::new(*prefix, *data);
                    v4.insert(&key, decision, 0).map_err(map_error(names::RULES_V4))?;
                    into.v4.push(key);
                }
            }
        }
        {
            let mut v6: LpmTrie<_, RuleKeyV6, Decision> = self.map_mut(names::RULES_V6)?;
            for policy in &set.policies {
                for (prefix, data, decision) in &policy.v6 {
                    let key = Key::new(*prefix, *data);
                    v6.insert(&key, decision, 0).map_err(map_error(names::RULES_V6))?;
                    into.v6.push(key);
                }
            }
        }
        let mut infos: Array<_, PolicyInfo> = self.map_mut(names::POLICY_INFO)?;
        for (policy, slot) in set.policies.iter().zip(slots) {
            infos.set(*slot, policy.info, 0).map_err(map_error(names::POLICY_INFO))?;
            into.slots.push(*slot);
        }
        Ok(())
    }

    fn remove_generation(&mut self, old: &Installed) {
        if let Ok(mut v4) = self.map_mut::<LpmTrie<_, RuleKeyV4, Decision>>(names::RULES_V4) {
            for key in &old.v4 {
                let _ = v4.remove(key);
            }
        }
        if let Ok(mut v6) = self.map_mut::<LpmTrie<_, RuleKeyV6, Decision>>(names::RULES_V6) {
            for key in &old.v6 {
                let _ = v6.remove(key);
            }
        }
        if let Ok(mut tables) = self.map_mut::<BpfHashMap<_, u32, PortTable>>(names::PORT_TABLES) {
            for id in &old.tables {
                let _ = tables.remove(id);
            }
        }
        if let Ok(mut infos) = self.map_mut::<Array<_, PolicyInfo>>(names::POLICY_INFO) {
            for slot in &old.slots {
                let _ = infos.set(*slot, PolicyInfo::default(), 0);
            }
        }
    }

    fn settings(&mut self) -> Result<Settings, LoaderError> {
        let settings: Array<_, Settings> = self.map_mut(names::SETTINGS)?;
        settings.get(&0, 0).map_err(map_error(names::SETTINGS))
    }

    fn set_levels(&mut self, levels: u32) -> Result<(), LoaderError> {
        let mut settings: Array<_, Settings> = self.map_mut(names::SETTINGS)?;
        settings
            .set(0, Settings { policy_levels: levels, _pad: 0 }, 0)
            .map_err(map_error(names::SETTINGS))
    }

    /// The event ring buffer; can be taken once.
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>, LoaderError> {
        let map = self.ebpf.take_map(names::EVENTS).ok_or(LoaderError::MissingMap(names::EVENTS))?;
        RingBuf::try_from(map).map_err(map_error(names::EVENTS))
    }

    /// Events the kernel could not put in the ring buffer since the programs were loaded.
    pub fn dropped_events(&mut self) -> Result<u64, LoaderError> {
        let counters: PerCpuArray<_, u64> = self.map_mut(names::COUNTERS)?;
        let values = counters.get(&counter::EVENTS_DROPPED, 0).map_err(map_error(names::COUNTERS))?;
        Ok(values.iter().sum())
    }

    /// Flow counts of one policy slot, summed over CPUs.
    pub fn policy_stats(&mut self, slot: u32) -> Result<PolicyStats, LoaderError> {
        let stats: PerCpuArray<_, PolicyStats> = self.map_mut(names::POLICY_STATS)?;
        let values = stats.get(&slot, 0).map_err(map_error(names::POLICY_STATS))?;
        Ok(values.iter().fold(PolicyStats::default(), |sum, v| PolicyStats {
            allowed: sum.allowed + v.allowed,
            blocked: sum.blocked + v.blocked,
            audited: sum.audited + v.audited,
        }))
    }

    fn map_mut<'a, M>(&'a mut self, name: &'static str) -> Result<M, LoaderError>
    where
        M: TryFrom<&'a mut aya::maps::Map, Error = MapError>,
    {
        let map = self.ebpf.map_mut(name).ok_or(LoaderError::MissingMap(name))?;
        M::try_from(map).map_err(map_error(name))
    }
}

fn sock_addr_program<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut CgroupSockAddr, LoaderError> {
    let program = ebpf.program_mut(name).ok_or(LoaderError::MissingProgram(name))?;
    program.try_into().map_err(program_error(name))
}

fn skb_program(ebpf: &mut Ebpf) -> Result<&mut CgroupSkb, LoaderError> {
    let program = ebpf.program_mut(SKB_PROGRAM).ok_or(LoaderError::MissingProgram(SKB_PROGRAM))?;
    program.try_into().map_err(program_error(SKB_PROGRAM))
}
