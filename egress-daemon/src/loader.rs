//! The only code that talks to the kernel: loads the embedded programs, attaches them to
//! cgroups, pins what must outlive the daemon, and swaps compiled policies into the maps.

use std::{
    collections::HashMap,
    fs,
    os::fd::AsFd,
    path::{Path, PathBuf},
    time::Duration,
};

use aya::{
    maps::{lpm_trie::Key, Array, HashMap as BpfHashMap, LpmTrie, MapData, MapError, PerCpuArray, RingBuf},
    programs::{
        cgroup_skb::CgroupSkbLinkId,
        cgroup_sock::CgroupSockLinkId,
        cgroup_sock_addr::CgroupSockAddrLinkId,
        links::PinnedLink,
        links::{FdLink, LinkError},
        lsm::LsmLinkId,
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSock, CgroupSockAddr, Lsm, ProgramError,
    },
    Btf, Ebpf, EbpfError, EbpfLoader,
};
use egress_common::{
    counter, dns_names, names, CgroupBinding, Decision, PolicyInfo, PolicyStats, PortTable, RuleKeyV4, RuleKeyV6,
    Settings, GUARD_SLOT, MAX_CGROUPS, MAX_DEEP_GUARDS, MAX_POLICY_SLOTS, MAX_PORT_TABLES,
};
use thiserror::Error;

use crate::{
    cgroup::{Cgroup, CgroupError},
    fault,
    generation::{self, CapacityError, Demand, Generation},
    policy::compile::CompiledSet,
};

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/egress.bpf.o"));

/// The flow hooks, then the DNS hooks that make steered replies look as if they came from the
/// resolver the workload named.
const SOCK_ADDR_PROGRAMS: [&str; 8] =
    ["connect4", "connect6", "sendmsg4", "sendmsg6", "recvmsg4", "recvmsg6", "getpeername4", "getpeername6"];
/// The packet backstop, first with process names in its events, then without: kernels before
/// 6.18 refuse the current-task helpers in packet programs (KERNELS.md).
const EGRESS_PROGRAMS: [&str; 2] = ["egress_packet", "egress_packet_portable"];
const INGRESS_PROGRAM: &str = "ingress_packet";
const SOCK_CREATE_PROGRAM: &str = "sock_create";
const LSM_PROGRAM: &str = "socket_create";
const LSM_HOOK: &str = "socket_create";
/// The kernel's list of active LSMs; the BPF LSM runs programs only when `bpf` is in it.
const ACTIVE_LSMS: &str = "/sys/kernel/security/lsm";
const SECURITYFS: &str = "/sys/kernel/security";

/// Maps that live in bpffs (under `<pin dir>/maps-v2/`) so enforcement survives the daemon.
/// The suffix changes whenever a key or value layout changes.
const PINNED_MAPS: [&str; 16] = [
    names::CGROUP_POLICY,
    names::POLICY_INFO,
    names::RULES_V4,
    names::RULES_V6,
    names::PORT_TABLES,
    names::SETTINGS,
    names::EVENTS,
    names::COUNTERS,
    names::BINDING_STATS,
    names::UDP_PEERS,
    names::FLOWS_SEEN,
    names::DEEP_GUARDS,
    dns_names::DNS_CONFIG,
    dns_names::LEARNED,
    dns_names::STEERED,
    dns_names::QUERY_ORIGINS,
];
/// Where the maps are pinned below the pin directory (tests open them there too).
pub const MAPS_DIR: &str = "maps-v2";
const LINKS_DIR: &str = "links";

/// Time for program runs that read the previous bindings to finish before their slots are
/// cleared (programs run under RCU; a run takes microseconds).
const RETIRE_DELAY: Duration = Duration::from_millis(20);

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
    #[error("pinning {path}: {source}")]
    Pin {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("link: {0}")]
    Link(#[from] LinkError),
    #[error("more than {MAX_CGROUPS} cgroups are bound to policies")]
    TooManyBindings,
    #[error("more than {MAX_DEEP_GUARDS} level-15 cgroups have bound descendants deeper than the kernel walk")]
    TooManyDeepGuards,
    #[error(transparent)]
    Capacity(#[from] CapacityError),
    #[error("generation {generation}: slot or port table {id} lies outside its half")]
    OutsideHalf { generation: u32, id: u32 },
    #[error(
        "switching cgroups to the new policies failed after {switched} of {total} ({source}); \
         they were switched back and the previous policies stay in force"
    )]
    Switch {
        switched: usize,
        total: usize,
        #[source]
        source: std::io::Error,
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

fn pin_error(path: &Path) -> impl FnOnce(std::io::Error) -> LoaderError + '_ {
    move |source| LoaderError::Pin { path: path.to_path_buf(), source }
}

/// What one generation put into the maps, so that it can be removed again.
#[derive(Default)]
struct Installed {
    slots: Vec<u32>,
    v4: Vec<Key<RuleKeyV4>>,
    v6: Vec<Key<RuleKeyV6>>,
    tables: Vec<u32>,
}

enum LinkId {
    SockAddr(&'static str, CgroupSockAddrLinkId),
    Skb(&'static str, CgroupSkbLinkId),
    Sock(CgroupSockLinkId),
    Lsm(LsmLinkId),
}

/// Whether sockets that leave the IP stack (`AF_PACKET`, ...) are refused to covered cgroups:
/// that needs the BPF LSM, which the kernel runs only when booted with `lsm=...,bpf`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SocketGuard {
    On,
    Off(String),
}

impl SocketGuard {
    /// One line for logs and `egress status`.
    pub fn describe(&self) -> String {
        match self {
            Self::On => "on (BPF LSM socket_create)".to_string(),
            Self::Off(reason) => format!("off: {reason}"),
        }
    }
}

/// How the programs are attached to one cgroup: owned by this process (gone when it exits) or
/// pinned in bpffs (they stay until unpinned).
enum Attachment {
    Owned(Vec<LinkId>),
    Pinned(Vec<PinnedLink>),
}

/// What `load` found in bpffs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// No earlier state: new maps were created.
    Fresh,
    /// The maps (and the links) of an earlier daemon were found and adopted.
    Adopted,
}

/// What to leave behind when the daemon stops cleanly.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OnExit {
    /// Enforcement stays in place (programs, links and maps stay pinned).
    Keep,
    /// Enforcement is removed with the daemon.
    Detach,
}

/// The loaded programs and maps.
pub struct Enforcer {
    ebpf: Ebpf,
    pin_dir: Option<PathBuf>,
    attachments: HashMap<u64, Attachment>,
    bindings: HashMap<u64, CgroupBinding>,
    /// `DEEP_GUARDS` as written: level-`MAX_CGROUP_LEVEL` cgroup id -> its guard binding.
    deep_guards: HashMap<u64, CgroupBinding>,
    free_stats: Vec<u32>,
    next_stats: u32,
    /// What the live generation put in the maps.
    installed: Installed,
    generation: Generation,
    /// The half the next generation goes into may hold entries a failed removal left behind.
    leftovers: bool,
    socket_guard: SocketGuard,
    /// Which of `EGRESS_PROGRAMS` this kernel accepted.
    egress_program: &'static str,
}

impl Enforcer {
    /// Loads the kernel object and verifies every program (nothing is attached yet). With a pin
    /// directory, the maps live in bpffs and an earlier daemon's maps there are adopted.
    pub fn load(pin_dir: Option<&Path>) -> Result<(Self, Start), LoaderError> {
        let mut loader = EbpfLoader::new();
        let mut start = Start::Fresh;
        let map_paths: Vec<(&str, PathBuf)> = match pin_dir {
            Some(dir) => {
                let maps = dir.join(MAPS_DIR);
                fs::create_dir_all(&maps).map_err(pin_error(&maps))?;
                if maps.join(names::CGROUP_POLICY).exists() {
                    start = Start::Adopted;
                }
                PINNED_MAPS.iter().map(|name| (*name, maps.join(name))).collect()
            }
            None => Vec::new(),
        };
        for (name, path) in &map_paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(OBJECT)?;
        for name in SOCK_ADDR_PROGRAMS {
            sock_addr_program(&mut ebpf, name)?.load().map_err(program_error(name))?;
        }
        let egress_program = load_egress_program(&mut ebpf)?;
        skb_program(&mut ebpf, INGRESS_PROGRAM)?.load().map_err(program_error(INGRESS_PROGRAM))?;
        sock_program(&mut ebpf)?.load().map_err(program_error(SOCK_CREATE_PROGRAM))?;
        let socket_guard = load_socket_guard(&mut ebpf);
        let mut enforcer = Self {
            ebpf,
            pin_dir: pin_dir.map(Path::to_path_buf),
            attachments: HashMap::new(),
            bindings: HashMap::new(),
            deep_guards: HashMap::new(),
            free_stats: Vec::new(),
            next_stats: 0,
            installed: Installed::default(),
            generation: Generation::default(),
            leftovers: false,
            socket_guard,
            egress_program,
        };
        if start == Start::Adopted {
            enforcer.adopt_state()?;
        }
        Ok((enforcer, start))
    }

    /// Takes over what an earlier daemon left in the pinned maps. Which generation is live is
    /// read from the maps (the slots bound cgroups point to), never taken from a counter alone;
    /// everything else is garbage of an install or cleanup that did not finish, and is removed
    /// before anything new is written, so the next generation starts in an empty half.
    fn adopt_state(&mut self) -> Result<(), LoaderError> {
        let marker = self.settings()?.generation;
        {
            let cgroups: BpfHashMap<_, u64, CgroupBinding> = self.map_mut(names::CGROUP_POLICY)?;
            self.bindings = cgroups.iter().filter_map(Result::ok).collect();
        }
        {
            let guards: BpfHashMap<_, u64, CgroupBinding> = self.map_mut(names::DEEP_GUARDS)?;
            self.deep_guards = guards.iter().filter_map(Result::ok).collect();
        }
        let all_stats = || self.bindings.values().chain(self.deep_guards.values()).map(|b| b.stats);
        self.next_stats = all_stats().map(|stats| stats + 1).max().unwrap_or(0);
        let used: std::collections::HashSet<u32> = all_stats().collect();
        self.free_stats = (0..self.next_stats).filter(|i| !used.contains(i)).collect();

        let adoption = generation::adopt(self.bindings.iter().map(|(id, b)| (*id, b.slot)), marker);
        if !adoption.stale.is_empty() {
            tracing::info!(cgroups = adoption.stale.len(), "finishing an interrupted reload: unbinding what it left");
            for id in &adoption.stale {
                self.unbind(*id);
            }
            fault::crash_point("adopt-after-unbind");
            std::thread::sleep(RETIRE_DELAY);
        }
        self.generation = adoption.live.unwrap_or(Generation(marker));
        let live = adoption.live;
        let owned_by_live = move |slot: u32| live.is_some_and(|g| g.owns_slot(slot));
        self.installed = self.sweep(owned_by_live)?;
        Ok(())
    }

    /// Whether non-IP sockets are refused to covered cgroups on this kernel.
    pub fn socket_guard(&self) -> &SocketGuard {
        &self.socket_guard
    }

    /// Removes every entry of the slots `keep` refuses, and every port table no kept entry
    /// refers to; returns what is kept.
    fn sweep(&mut self, keep: impl Fn(u32) -> bool) -> Result<Installed, LoaderError> {
        let slot_of = |policy: [u8; 4]| u32::from_be_bytes(policy);
        let mut kept = Installed::default();
        let mut tables_in_use = std::collections::HashSet::new();
        {
            let mut v4: LpmTrie<_, RuleKeyV4, Decision> = self.map_mut(names::RULES_V4)?;
            let entries: Vec<_> = v4.iter().filter_map(Result::ok).collect();
            for (key, decision) in entries {
                if keep(slot_of(key.data().policy)) {
                    tables_in_use.insert(decision.port_table);
                    kept.v4.push(key);
                } else {
                    drop(v4.remove(&key));
                }
            }
        }
        fault::crash_point("mid-sweep");
        {
            let mut v6: LpmTrie<_, RuleKeyV6, Decision> = self.map_mut(names::RULES_V6)?;
            let entries: Vec<_> = v6.iter().filter_map(Result::ok).collect();
            for (key, decision) in entries {
                if keep(slot_of(key.data().policy)) {
                    tables_in_use.insert(decision.port_table);
                    kept.v6.push(key);
                } else {
                    drop(v6.remove(&key));
                }
            }
        }
        {
            let mut tables: BpfHashMap<_, u32, PortTable> = self.map_mut(names::PORT_TABLES)?;
            let ids: Vec<u32> = tables.keys().filter_map(Result::ok).collect();
            for id in ids {
                if tables_in_use.contains(&id) {
                    kept.tables.push(id);
                } else {
                    drop(tables.remove(&id));
                }
            }
        }
        let mut infos: Array<_, PolicyInfo> = self.map_mut(names::POLICY_INFO)?;
        for slot in 0..MAX_POLICY_SLOTS {
            let Ok(info) = infos.get(&slot, 0) else { continue };
            if keep(slot) {
                if info != PolicyInfo::default() {
                    kept.slots.push(slot);
                }
            } else if info != PolicyInfo::default() {
                drop(infos.set(slot, PolicyInfo::default(), 0));
            }
        }
        Ok(kept)
    }

    /// The generation of the policies in force (counts reloads, also across restarts).
    pub fn generation(&self) -> u32 {
        self.generation.0
    }

    /// The generation the next [`Enforcer::install`] must be compiled for: always the half the
    /// live generation does not use.
    pub fn next_generation(&self) -> Generation {
        self.generation.next()
    }

    /// Attaches every program to `cgroup`; they then see all its traffic and its descendants'.
    /// With a pin directory the links are pinned there, replacing an earlier daemon's links
    /// only once the new ones are in place, so enforcement never lapses.
    pub fn attach(&mut self, cgroup: &Cgroup) -> Result<(), LoaderError> {
        if self.attachments.contains_key(&cgroup.id) {
            return Ok(());
        }
        let file = cgroup.file()?;
        let mut ids = Vec::new();
        if let Err(error) = self.attach_all(file.as_fd(), &mut ids) {
            self.attachments.insert(cgroup.id, Attachment::Owned(ids));
            self.detach(cgroup.id);
            return Err(error);
        }
        let attachment = match self.pin_dir.clone() {
            Some(dir) => Attachment::Pinned(self.pin_links(&dir, cgroup.id, ids)?),
            None => Attachment::Owned(ids),
        };
        self.attachments.insert(cgroup.id, attachment);
        Ok(())
    }

    fn attach_all(&mut self, cgroup: std::os::fd::BorrowedFd<'_>, ids: &mut Vec<LinkId>) -> Result<(), LoaderError> {
        for name in SOCK_ADDR_PROGRAMS {
            let id = sock_addr_program(&mut self.ebpf, name)?
                .attach(cgroup, CgroupAttachMode::Single)
                .map_err(program_error(name))?;
            ids.push(LinkId::SockAddr(name, id));
        }
        let skb_programs =
            [(self.egress_program, CgroupSkbAttachType::Egress), (INGRESS_PROGRAM, CgroupSkbAttachType::Ingress)];
        for (name, attach_type) in skb_programs {
            let id = skb_program(&mut self.ebpf, name)?
                .attach(cgroup, attach_type, CgroupAttachMode::Single)
                .map_err(program_error(name))?;
            ids.push(LinkId::Skb(name, id));
        }
        let id = sock_program(&mut self.ebpf)?
            .attach(cgroup, CgroupAttachMode::Single)
            .map_err(program_error(SOCK_CREATE_PROGRAM))?;
        ids.push(LinkId::Sock(id));
        if self.socket_guard == SocketGuard::On {
            let id = lsm_program(&mut self.ebpf)?.attach().map_err(program_error(LSM_PROGRAM))?;
            ids.push(LinkId::Lsm(id));
        }
        Ok(())
    }

    fn pin_links(&mut self, dir: &Path, cgroup_id: u64, ids: Vec<LinkId>) -> Result<Vec<PinnedLink>, LoaderError> {
        let links_dir = dir.join(LINKS_DIR);
        fs::create_dir_all(&links_dir).map_err(pin_error(&links_dir))?;
        let previous: Vec<PathBuf> = fs::read_dir(&links_dir)
            .map_err(pin_error(&links_dir))?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .collect();
        let stamp = next_link_serial(&previous);
        let mut pinned = Vec::new();
        for id in ids {
            let (name, link) = self.take_link(id)?;
            let path = links_dir.join(format!("{cgroup_id}-{name}-{stamp}"));
            let link = link
                .pin(&path)
                .map_err(|e| LoaderError::Pin { path: path.clone(), source: std::io::Error::other(e.to_string()) })?;
            pinned.push(link);
        }
        // The earlier daemon's links: unpinning and closing them detaches them.
        for old in previous {
            match PinnedLink::from_pin(&old) {
                Ok(link) => drop(link.unpin()),
                Err(_) => drop(fs::remove_file(&old)),
            }
        }
        Ok(pinned)
    }

    /// Takes a link out of the program that owns it, as a plain fd link that can be pinned.
    fn take_link(&mut self, id: LinkId) -> Result<(&'static str, FdLink), LoaderError> {
        Ok(match id {
            LinkId::SockAddr(name, id) => {
                let link = sock_addr_program(&mut self.ebpf, name)?.take_link(id).map_err(program_error(name))?;
                (name, FdLink::try_from(link)?)
            }
            LinkId::Skb(name, id) => {
                let link = skb_program(&mut self.ebpf, name)?.take_link(id).map_err(program_error(name))?;
                (name, FdLink::try_from(link)?)
            }
            LinkId::Sock(id) => {
                let link = sock_program(&mut self.ebpf)?.take_link(id).map_err(program_error(SOCK_CREATE_PROGRAM))?;
                (SOCK_CREATE_PROGRAM, FdLink::try_from(link)?)
            }
            LinkId::Lsm(id) => {
                let link = lsm_program(&mut self.ebpf)?.take_link(id).map_err(program_error(LSM_PROGRAM))?;
                (LSM_PROGRAM, link.into())
            }
        })
    }

    /// Detaches the programs from a cgroup (best effort: a cgroup that is gone has no links).
    pub fn detach(&mut self, cgroup_id: u64) {
        match self.attachments.remove(&cgroup_id) {
            Some(Attachment::Owned(ids)) => {
                for id in ids {
                    let result =
                        match id {
                            LinkId::SockAddr(name, id) => sock_addr_program(&mut self.ebpf, name)
                                .and_then(|p| p.detach(id).map_err(program_error(name))),
                            LinkId::Skb(name, id) => skb_program(&mut self.ebpf, name)
                                .and_then(|p| p.detach(id).map_err(program_error(name))),
                            LinkId::Sock(id) => sock_program(&mut self.ebpf)
                                .and_then(|p| p.detach(id).map_err(program_error(SOCK_CREATE_PROGRAM))),
                            LinkId::Lsm(id) => lsm_program(&mut self.ebpf)
                                .and_then(|p| p.detach(id).map_err(program_error(LSM_PROGRAM))),
                        };
                    if let Err(error) = result {
                        tracing::warn!(%error, cgroup_id, "detaching");
                    }
                }
            }
            Some(Attachment::Pinned(links)) => {
                for link in links {
                    drop(link.unpin());
                }
            }
            None => {}
        }
    }

    /// Stops as asked: with `Keep`, pinned enforcement stays; with `Detach`, links and map pins
    /// are removed and enforcement ends with this process.
    pub fn shut_down(&mut self, on_exit: OnExit) {
        if on_exit == OnExit::Keep {
            return;
        }
        let ids: Vec<u64> = self.attachments.keys().copied().collect();
        for id in ids {
            self.detach(id);
        }
        if let Some(dir) = &self.pin_dir {
            drop(fs::remove_dir_all(dir.join(MAPS_DIR)));
            drop(fs::remove_dir_all(dir.join(LINKS_DIR)));
            drop(fs::remove_dir(dir));
        }
    }

    /// Puts a compiled generation in force: `cgroups` maps cgroup ids to the slots the set was
    /// compiled for, `levels` has bit n set for each bound cgroup at depth n.
    ///
    /// Every capacity is checked before anything is written. The new rules go into the half the
    /// live generation does not use; then the generation marker is written and every cgroup is
    /// switched in one system call (all or none, also if the daemon is killed); then the cgroups
    /// the new file no longer covers are unbound and the old half is cleared. A flow sees the old
    /// policy or the new one. A daemon killed at any step leaves maps that [`Enforcer::load`]
    /// reads back into one live generation (see `generation::adopt`). On error the previous
    /// generation stays in force, untouched.
    pub fn install(
        &mut self,
        generation: Generation,
        set: &CompiledSet,
        slots: &[u32],
        cgroups: &HashMap<u64, u32>,
        levels: u32,
    ) -> Result<(), LoaderError> {
        self.check_fits(generation, set, slots, cgroups)?;
        if self.leftovers {
            let live = self.generation;
            self.installed = self.sweep(|slot| live.owns_slot(slot))?;
            self.leftovers = false;
        }
        let mut fresh = Installed::default();
        if let Err(error) = self.write_generation(set, slots, &mut fresh) {
            self.remove_generation(&fresh);
            return Err(error);
        }
        fault::crash_point("after-rules");
        let previous = self.settings()?;
        let marked = self.update_settings(|s| {
            s.policy_levels = previous.policy_levels | levels;
            s.generation = generation.0;
        });
        fault::crash_point("after-marker");
        if let Err(error) = marked.and_then(|()| self.switch(cgroups)) {
            let restored = self.update_settings(|s| *s = Settings { dropped_reported: s.dropped_reported, ..previous });
            if let Err(restore) = restored {
                tracing::warn!(error = %restore, "restoring the generation marker");
            }
            std::thread::sleep(RETIRE_DELAY);
            self.remove_generation(&fresh);
            return Err(error);
        }
        fault::crash_point("after-switch");
        let stale: Vec<u64> = self.bindings.keys().filter(|id| !cgroups.contains_key(id)).copied().collect();
        for id in stale {
            self.unbind(id);
            fault::crash_point("mid-unbind");
        }
        if let Err(error) = self.update_settings(|s| s.policy_levels = levels) {
            // The old levels are a superset: the programs only look at more levels than needed.
            tracing::warn!(%error, "narrowing the searched cgroup levels");
        }
        fault::crash_point("before-cleanup");
        std::thread::sleep(RETIRE_DELAY);
        let old = std::mem::replace(&mut self.installed, fresh);
        self.generation = generation;
        self.remove_generation(&old);
        fault::crash_point("after-cleanup");
        Ok(())
    }

    /// Refuses a generation that does not fit beside the live one, naming the limit it hits.
    fn check_fits(
        &self,
        generation: Generation,
        set: &CompiledSet,
        slots: &[u32],
        cgroups: &HashMap<u64, u32>,
    ) -> Result<(), LoaderError> {
        let added_cgroups = cgroups.keys().filter(|id| !self.bindings.contains_key(id)).count();
        generation::check_capacity(&Demand {
            policies: slots.len(),
            port_tables: set.port_tables.len(),
            rules_v4: set.policies.iter().map(|p| p.v4.len()).sum(),
            rules_v6: set.policies.iter().map(|p| p.v6.len()).sum(),
            bindings: self.bindings.len() + added_cgroups,
            running_rules_v4: self.installed.v4.len(),
            running_rules_v6: self.installed.v6.len(),
        })?;
        let outside = |id: u32| LoaderError::OutsideHalf { generation: generation.0, id };
        if generation.half() == self.generation.half() {
            return Err(outside(generation.first_slot()));
        }
        if let Some(slot) = slots.iter().chain(cgroups.values()).find(|slot| !generation.owns_slot(**slot)) {
            return Err(outside(*slot));
        }
        if let Some((id, _)) = set.port_tables.iter().find(|(id, _)| !generation.owns_table(*id)) {
            return Err(outside(*id));
        }
        Ok(())
    }

    /// Binds every cgroup to its new slot in one system call. When the kernel refuses part-way,
    /// those already switched are switched back (and new ones unbound) before the error returns.
    fn switch(&mut self, cgroups: &HashMap<u64, u32>) -> Result<(), LoaderError> {
        let mut entries = Vec::with_capacity(cgroups.len());
        let mut allocated = Vec::new();
        for (cgroup_id, slot) in cgroups {
            let stats = match self.bindings.get(cgroup_id) {
                Some(existing) => existing.stats,
                None => match self.allocate_stats() {
                    Ok(index) => {
                        allocated.push(index);
                        index
                    }
                    Err(error) => {
                        self.free_stats.extend(allocated);
                        return Err(error);
                    }
                },
            };
            entries.push((*cgroup_id, CgroupBinding { slot: *slot, stats }));
        }
        let result = if fault::fails("fail-mid-switch") {
            let half = entries.len().div_ceil(2);
            self.write_bindings(&entries[..half])
                .and(Err((half, std::io::Error::other("injected by EGRESS_FAULT_POINT"))))
        } else {
            self.write_bindings(&entries)
        };
        let Err((switched, source)) = result else {
            self.bindings.extend(entries);
            return Ok(());
        };
        let (restore, added): (Vec<_>, Vec<_>) =
            entries[..switched].iter().partition(|(id, _)| self.bindings.contains_key(id));
        let restore: Vec<(u64, CgroupBinding)> = restore.iter().map(|(id, _)| (*id, self.bindings[id])).collect();
        if let Err((_, error)) = self.write_bindings(&restore) {
            tracing::error!(%error, "switching cgroups back to the previous policies failed; restart the daemon");
        }
        if let Ok(mut map) = self.map_mut::<BpfHashMap<_, u64, CgroupBinding>>(names::CGROUP_POLICY) {
            for (id, _) in &added {
                drop(map.remove(id));
            }
        }
        for index in allocated {
            self.release_stats(index);
        }
        Err(LoaderError::Switch { switched, total: entries.len(), source })
    }

    /// Writes `entries` into the cgroup map in one `BPF_MAP_UPDATE_BATCH` call. The kernel runs
    /// the whole batch before it returns to userspace, where a fatal signal takes effect, so a
    /// killed daemon leaves all of them written or none. On error: how many were written.
    fn write_bindings(&self, entries: &[(u64, CgroupBinding)]) -> Result<(), (usize, std::io::Error)> {
        if entries.is_empty() {
            return Ok(());
        }
        let map = match self.ebpf.map(names::CGROUP_POLICY) {
            Some(aya::maps::Map::HashMap(data)) => data,
            _ => return Err((0, std::io::Error::other("the cgroup map is missing"))),
        };
        let keys: Vec<u64> = entries.iter().map(|(id, _)| *id).collect();
        let values: Vec<CgroupBinding> = entries.iter().map(|(_, binding)| *binding).collect();
        update_batch(map.fd().as_fd(), &keys, &values)
    }
    /// Binds one cgroup to a policy slot of the generation in force (one map write).
    pub fn bind(&mut self, cgroup_id: u64, slot: u32) -> Result<(), LoaderError> {
        let stats = match self.bindings.get(&cgroup_id) {
            Some(existing) => existing.stats,
            None => self.allocate_stats()?,
        };
        let binding = CgroupBinding { slot, stats };
        let mut cgroups: BpfHashMap<_, u64, CgroupBinding> = self.map_mut(names::CGROUP_POLICY)?;
        cgroups.insert(cgroup_id, binding, 0).map_err(map_error(names::CGROUP_POLICY))?;
        self.bindings.insert(cgroup_id, binding);
        Ok(())
    }

    /// Adds `policy_levels` bits to those the programs search (for a cgroup bound after an
    /// install).
    pub fn add_levels(&mut self, bits: u32) -> Result<(), LoaderError> {
        self.update_settings(|s| s.policy_levels |= bits)
    }

    /// Flow events one cgroup may raise per second on each CPU.
    pub fn set_event_budget(&mut self, per_second: u32) -> Result<(), LoaderError> {
        self.update_settings(|s| s.event_budget = per_second)
    }

    /// Makes `DEEP_GUARDS` hold exactly `ancestors` (new guards are written before stale ones go).
    pub fn set_deep_guards(&mut self, ancestors: &std::collections::HashSet<u64>) -> Result<(), LoaderError> {
        for id in ancestors {
            self.add_deep_guard(*id)?;
        }
        let stale: Vec<u64> = self.deep_guards.keys().filter(|id| !ancestors.contains(id)).copied().collect();
        for id in stale {
            if let Some(guard) = self.deep_guards.remove(&id) {
                if let Ok(mut guards) = self.map_mut::<BpfHashMap<_, u64, CgroupBinding>>(names::DEEP_GUARDS) {
                    drop(guards.remove(&id));
                }
                self.free_stats.push(guard.stats);
            }
        }
        Ok(())
    }

    /// Refuses senders deeper than the walk below `ancestor` unless bound themselves.
    pub fn add_deep_guard(&mut self, ancestor: u64) -> Result<(), LoaderError> {
        if self.deep_guards.contains_key(&ancestor) {
            return Ok(());
        }
        if self.deep_guards.len() >= MAX_DEEP_GUARDS as usize {
            return Err(LoaderError::TooManyDeepGuards);
        }
        let guard = CgroupBinding { slot: GUARD_SLOT, stats: self.allocate_stats()? };
        let mut guards: BpfHashMap<_, u64, CgroupBinding> = self.map_mut(names::DEEP_GUARDS)?;
        guards.insert(ancestor, guard, 0).map_err(map_error(names::DEEP_GUARDS))?;
        self.deep_guards.insert(ancestor, guard);
        Ok(())
    }

    /// Removes a cgroup's binding (the cgroup is gone or no longer matches a policy).
    pub fn unbind(&mut self, cgroup_id: u64) {
        if let Some(binding) = self.bindings.remove(&cgroup_id) {
            if let Ok(mut cgroups) = self.map_mut::<BpfHashMap<_, u64, CgroupBinding>>(names::CGROUP_POLICY) {
                drop(cgroups.remove(&cgroup_id));
            }
            self.release_stats(binding.stats);
        }
    }

    /// Zeroes a binding's counters and makes the index available again.
    fn release_stats(&mut self, index: u32) {
        if let Ok(mut stats) = self.map_mut::<PerCpuArray<_, PolicyStats>>(names::BINDING_STATS) {
            let zero = aya::maps::PerCpuValues::try_from(vec![PolicyStats::default(); nr_cpus()]);
            if let Ok(zero) = zero {
                drop(stats.set(index, zero, 0));
            }
        }
        self.free_stats.push(index);
    }

    fn allocate_stats(&mut self) -> Result<u32, LoaderError> {
        if let Some(index) = self.free_stats.pop() {
            return Ok(index);
        }
        if self.next_stats >= MAX_CGROUPS {
            return Err(LoaderError::TooManyBindings);
        }
        self.next_stats += 1;
        Ok(self.next_stats - 1)
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

    /// Removes what a generation wrote; anything that could not be removed is swept before the
    /// next generation is written into the same half.
    fn remove_generation(&mut self, old: &Installed) {
        // Counted, not `any`: every entry is tried even after a failure.
        let mut failures = 0;
        match self.map_mut::<LpmTrie<_, RuleKeyV4, Decision>>(names::RULES_V4) {
            Ok(mut v4) => failures += old.v4.iter().filter(|key| v4.remove(key).is_err()).count(),
            Err(_) => failures += 1,
        }
        fault::crash_point("mid-cleanup");
        match self.map_mut::<LpmTrie<_, RuleKeyV6, Decision>>(names::RULES_V6) {
            Ok(mut v6) => failures += old.v6.iter().filter(|key| v6.remove(key).is_err()).count(),
            Err(_) => failures += 1,
        }
        match self.map_mut::<BpfHashMap<_, u32, PortTable>>(names::PORT_TABLES) {
            Ok(mut tables) => failures += old.tables.iter().filter(|id| tables.remove(id).is_err()).count(),
            Err(_) => failures += 1,
        }
        match self.map_mut::<Array<_, PolicyInfo>>(names::POLICY_INFO) {
            Ok(mut infos) => {
                failures += old.slots.iter().filter(|slot| infos.set(**slot, PolicyInfo::default(), 0).is_err()).count()
            }
            Err(_) => failures += 1,
        }
        if failures > 0 {
            tracing::warn!(failures, "entries of a retired generation could not be removed; swept before next reload");
            self.leftovers = true;
        }
    }

    fn settings(&mut self) -> Result<Settings, LoaderError> {
        let settings: Array<_, Settings> = self.map_mut(names::SETTINGS)?;
        settings.get(&0, 0).map_err(map_error(names::SETTINGS))
    }

    fn update_settings(&mut self, change: impl FnOnce(&mut Settings)) -> Result<(), LoaderError> {
        let mut value = self.settings()?;
        change(&mut value);
        let mut settings: Array<_, Settings> = self.map_mut(names::SETTINGS)?;
        settings.set(0, value, 0).map_err(map_error(names::SETTINGS))
    }

    /// The event ring buffer; can be taken once.
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>, LoaderError> {
        let map = self.ebpf.take_map(names::EVENTS).ok_or(LoaderError::MissingMap(names::EVENTS))?;
        RingBuf::try_from(map).map_err(map_error(names::EVENTS))
    }

    /// The DNS maps (steering, learned addresses, query origins); can be taken once.
    pub fn take_dns_maps(&mut self) -> Result<crate::dns::kernel::DnsMaps, LoaderError> {
        let mut take = |name: &'static str| self.ebpf.take_map(name).ok_or(LoaderError::MissingMap(name));
        let (config, learned, origins) =
            (take(dns_names::DNS_CONFIG)?, take(dns_names::LEARNED)?, take(dns_names::QUERY_ORIGINS)?);
        Ok(crate::dns::kernel::DnsMaps {
            config: Array::try_from(config).map_err(map_error(dns_names::DNS_CONFIG))?,
            learned: BpfHashMap::try_from(learned).map_err(map_error(dns_names::LEARNED))?,
            origins: BpfHashMap::try_from(origins).map_err(map_error(dns_names::QUERY_ORIGINS))?,
        })
    }

    /// Events the kernel could not put in the ring buffer since the maps were created, and how
    /// many of those a daemon already reported (kept in the pinned maps across restarts).
    pub fn dropped_events(&mut self) -> Result<(u64, u64), LoaderError> {
        let counters: PerCpuArray<_, u64> = self.map_mut(names::COUNTERS)?;
        let values = counters.get(&counter::EVENTS_DROPPED, 0).map_err(map_error(names::COUNTERS))?;
        let total = values.iter().sum();
        Ok((total, self.settings()?.dropped_reported))
    }

    pub fn mark_dropped_reported(&mut self, total: u64) -> Result<(), LoaderError> {
        self.update_settings(|s| s.dropped_reported = total)
    }

    /// Flow counts of one bound cgroup, summed over CPUs.
    pub fn cgroup_stats(&mut self, cgroup_id: u64) -> Result<PolicyStats, LoaderError> {
        let Some(binding) = self.bindings.get(&cgroup_id).copied() else {
            return Ok(PolicyStats::default());
        };
        let stats: PerCpuArray<_, PolicyStats> = self.map_mut(names::BINDING_STATS)?;
        let values = stats.get(&binding.stats, 0).map_err(map_error(names::BINDING_STATS))?;
        Ok(values.iter().fold(PolicyStats::default(), |sum, v| PolicyStats {
            allowed: sum.allowed + v.allowed,
            blocked: sum.blocked + v.blocked,
            audited: sum.audited + v.audited,
            suppressed: sum.suppressed + v.suppressed,
            ..PolicyStats::default()
        }))
    }

    /// Entries in use and capacity of the maps that fill up with policies.
    pub fn map_fill(&self) -> Vec<(&'static str, usize, u32)> {
        vec![
            (names::RULES_V4, self.installed.v4.len(), egress_common::MAX_CIDRS_V4),
            (names::RULES_V6, self.installed.v6.len(), egress_common::MAX_CIDRS_V6),
            (names::PORT_TABLES, self.installed.tables.len(), MAX_PORT_TABLES),
            (names::CGROUP_POLICY, self.bindings.len(), MAX_CGROUPS),
        ]
    }

    fn map_mut<'a, M>(&'a mut self, name: &'static str) -> Result<M, LoaderError>
    where
        M: TryFrom<&'a mut aya::maps::Map, Error = MapError>,
    {
        let map = self.ebpf.map_mut(name).ok_or(LoaderError::MissingMap(name))?;
        M::try_from(map).map_err(map_error(name))
    }
}

/// A suffix for link pin names that no pin in `previous` has: one more than the highest there.
/// Unlike the process id (PID 1 again for a daemon restarted in a container) it cannot collide
/// with an earlier daemon's pins, which stay in place until the new links are pinned.
fn next_link_serial(previous: &[PathBuf]) -> u64 {
    previous
        .iter()
        .filter_map(|path| path.file_name()?.to_str()?.rsplit('-').next()?.parse::<u64>().ok())
        .max()
        .map_or(1, |highest| highest.saturating_add(1))
}

/// `union bpf_attr` as the `BPF_MAP_*_BATCH` commands read it.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;

/// One `BPF_MAP_UPDATE_BATCH` call (aya 0.14 has no batch operations). On error: how many of the
/// entries the kernel wrote before it stopped.
fn update_batch<K: aya::Pod, V: aya::Pod>(
    map: std::os::fd::BorrowedFd<'_>,
    keys: &[K],
    values: &[V],
) -> Result<(), (usize, std::io::Error)> {
    use std::os::fd::AsRawFd;
    let count = u32::try_from(keys.len().min(values.len())).map_err(|e| (0, std::io::Error::other(e)))?;
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count,
        map_fd: map.as_raw_fd() as u32,
        ..BatchAttr::default()
    };
    // SAFETY: `attr` points at `count` keys and values that live until the call returns; the
    // kernel writes back only `attr.count`.
    let result = unsafe {
        libc::syscall(libc::SYS_bpf, BPF_MAP_UPDATE_BATCH, &mut attr as *mut BatchAttr, size_of::<BatchAttr>())
    };
    if result < 0 {
        let error = std::io::Error::last_os_error();
        return Err((attr.count.min(count) as usize, error));
    }
    Ok(())
}

fn nr_cpus() -> usize {
    aya::util::nr_cpus().unwrap_or(1)
}

fn sock_addr_program<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut CgroupSockAddr, LoaderError> {
    let program = ebpf.program_mut(name).ok_or(LoaderError::MissingProgram(name))?;
    program.try_into().map_err(program_error(name))
}

fn skb_program<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut CgroupSkb, LoaderError> {
    let program = ebpf.program_mut(name).ok_or(LoaderError::MissingProgram(name))?;
    program.try_into().map_err(program_error(name))
}

fn sock_program(ebpf: &mut Ebpf) -> Result<&mut CgroupSock, LoaderError> {
    let program = ebpf.program_mut(SOCK_CREATE_PROGRAM).ok_or(LoaderError::MissingProgram(SOCK_CREATE_PROGRAM))?;
    program.try_into().map_err(program_error(SOCK_CREATE_PROGRAM))
}

fn lsm_program(ebpf: &mut Ebpf) -> Result<&mut Lsm, LoaderError> {
    let program = ebpf.program_mut(LSM_PROGRAM).ok_or(LoaderError::MissingProgram(LSM_PROGRAM))?;
    program.try_into().map_err(program_error(LSM_PROGRAM))
}

/// Loads the first of `EGRESS_PROGRAMS` the verifier accepts.
fn load_egress_program(ebpf: &mut Ebpf) -> Result<&'static str, LoaderError> {
    let [full, portable] = EGRESS_PROGRAMS;
    match skb_program(ebpf, full)?.load() {
        Ok(()) => Ok(full),
        Err(error) => {
            tracing::info!(
                %error,
                "this kernel refuses the current-task helpers in packet programs: events of raw and other \
                 packet-judged flows name no process"
            );
            skb_program(ebpf, portable)?.load().map_err(program_error(portable))?;
            Ok(portable)
        }
    }
}

/// Loads the LSM program where the kernel runs BPF LSM programs; says why not otherwise.
fn load_socket_guard(ebpf: &mut Ebpf) -> SocketGuard {
    if !Path::new(ACTIVE_LSMS).exists() {
        // securityfs is not mounted on every host (nor in every container).
        let _ = std::process::Command::new("mount")
            .args(["-t", "securityfs", "securityfs", SECURITYFS])
            .stderr(std::process::Stdio::null())
            .status();
    }
    match fs::read_to_string(ACTIVE_LSMS) {
        Ok(list) if list.trim().split(',').any(|lsm| lsm == "bpf") => {}
        Ok(list) => {
            return SocketGuard::Off(format!(
                "the BPF LSM is not active (active: {}); boot with lsm={},bpf to refuse AF_PACKET and other \
                 non-IP sockets to covered cgroups",
                list.trim(),
                list.trim()
            ))
        }
        Err(error) => return SocketGuard::Off(format!("cannot read {ACTIVE_LSMS}: {error}")),
    }
    let btf = match Btf::from_sys_fs() {
        Ok(btf) => btf,
        Err(error) => return SocketGuard::Off(format!("no kernel BTF for the LSM program: {error}")),
    };
    match lsm_program(ebpf).and_then(|p| p.load(LSM_HOOK, &btf).map_err(program_error(LSM_PROGRAM))) {
        Ok(()) => SocketGuard::On,
        Err(error) => {
            let error = error.to_string();
            tracing::debug!(%error, "the LSM program did not load");
            match crate::preflight::missing_helper(&error) {
                Some(missing) => {
                    SocketGuard::Off(format!("{missing}; AF_PACKET and other non-IP sockets are not refused"))
                }
                None => SocketGuard::Off(format!("loading the LSM program: {error}{}", lockdown_hint())),
            }
        }
    }
}

/// A locked-down kernel (`/sys/kernel/security/lockdown` not `[none]`) may refuse BPF LSM
/// programs with EPERM; say so next to the error.
fn lockdown_hint() -> String {
    match fs::read_to_string(format!("{SECURITYFS}/lockdown")) {
        Ok(modes) if !modes.contains("[none]") => {
            format!(" (the kernel is locked down: {}; lockdown may refuse BPF LSM programs)", modes.trim())
        }
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
