//! The enforcer: the loaded object, its links per cgroup, and the policies in its maps, swapped
//! one generation at a time.

use std::{
    collections::{HashMap, HashSet},
    fs,
    os::fd::AsFd,
    path::{Path, PathBuf},
    time::Duration,
};

use aya::{
    maps::{lpm_trie::Key, LpmTrie, MapData, PerCpuValues},
    programs::links::PinnedLink,
    Ebpf, EbpfLoader,
};
use egress_common::{
    names, settings_flags, CgroupBinding, Decision, PolicyInfo, PolicyStats, RuleKeyV4, RuleKeyV6, Settings,
    GUARD_SLOT, MAX_CGROUPS, MAX_DEEP_GUARDS, MAX_POLICY_SLOTS, MAX_PORT_TABLES, RESERVED_BINDINGS, UNBINDABLE_SLOT,
    UNBINDABLE_STATS,
};

use super::barrier::ProgramBarrier;
use super::{
    batch::update_batch,
    event_ring::{DropCounter, EventSource},
    flows::FlowSource,
    maps, nr_cpus, pins,
    programs::{self, LinkId, Loaded, SocketGuard, Wanted, OBJECT},
    KernelError,
};
use crate::{
    cgroup::Cgroup,
    fault,
    generation::{self, Demand, Generation},
    policy::compile::CompiledSet,
};

/// Time given to program runs that read the previous bindings, where the kernel cannot wait for
/// them (see [`ProgramBarrier`]): a guess, not a grace period, used only if the barrier fails.
const RETIRE_DELAY_WITHOUT_BARRIER: Duration = Duration::from_millis(20);

/// Rule trie entries per `BPF_MAP_UPDATE_BATCH` call: 100,000 CIDRs go in 13 calls instead of
/// 100,000 (the kernel copies the batch in from user memory one entry at a time).
const RULE_BATCH: usize = 8192;

/// Whether a batch call failed because this kernel cannot batch this map type.
fn unsupported(error: &std::io::Error) -> bool {
    const ENOTSUPP: i32 = 524;
    matches!(error.raw_os_error(), Some(libc::EINVAL | libc::EOPNOTSUPP | ENOTSUPP))
}

/// What one generation put into the maps, so that it can be removed again.
#[derive(Default)]
struct Installed {
    slots: Vec<u32>,
    v4: Vec<Key<RuleKeyV4>>,
    v6: Vec<Key<RuleKeyV6>>,
    tables: Vec<u32>,
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
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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
    loaded: Loaded,
    /// Waits for running programs before what they may read is removed.
    barrier: Option<ProgramBarrier>,
    /// Cgroups bound to `UNBINDABLE_SLOT` (see [`Enforcer::refuse`]); not generation bindings,
    /// so a reload's switch leaves them in place.
    refused: HashSet<u64>,
    /// Whether this kernel batches rule trie updates; cleared at the first refusal.
    trie_batches: bool,
}

impl Enforcer {
    /// Loads the kernel object and verifies the programs `wanted` asks for besides the filters
    /// (nothing is attached yet). With a pin
    /// directory, the maps live in bpffs and an earlier daemon's maps there are adopted.
    pub fn load(pin_dir: Option<&Path>, wanted: Wanted) -> Result<(Self, Start), KernelError> {
        let mut loader = EbpfLoader::new();
        let mut start = Start::Fresh;
        let map_paths = match pin_dir {
            Some(dir) => {
                if pins::maps_exist(dir) {
                    start = Start::Adopted;
                }
                pins::map_paths(dir)?
            }
            None => Vec::new(),
        };
        for (name, path) in &map_paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(OBJECT)?;
        let loaded = programs::load_all(&mut ebpf, wanted)?;
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
            loaded,
            refused: HashSet::new(),
            trie_batches: true,
            barrier: match ProgramBarrier::new() {
                Ok(barrier) => Some(barrier),
                Err(error) => {
                    tracing::warn!(%error, "no program barrier: reloads wait a fixed 20 ms before retiring the old policies");
                    None
                }
            },
        };
        if start == Start::Adopted {
            enforcer.adopt_state()?;
        }
        let opener_at_syn = enforcer.loaded.opener_at_syn();
        enforcer.update_settings(|s| {
            s.flags &= !settings_flags::OPENER_AT_SYN;
            if opener_at_syn {
                s.flags |= settings_flags::OPENER_AT_SYN;
            }
        })?;
        Ok((enforcer, start))
    }

    /// Returns once no program run that started before the call can still be running, so that
    /// what it may have read can be removed.
    fn wait_for_running_programs(&self) {
        let waited = self.barrier.as_ref().map(ProgramBarrier::wait);
        if !matches!(waited, Some(Ok(()))) {
            if let Some(Err(error)) = waited {
                tracing::warn!(%error, "waiting for running programs; falling back to a fixed delay");
            }
            std::thread::sleep(RETIRE_DELAY_WITHOUT_BARRIER);
        }
    }

    /// Takes over what an earlier daemon left in the pinned maps. Which generation is live is
    /// read from the maps (the slots bound cgroups point to), never taken from a counter alone;
    /// everything else is garbage of an install or cleanup that did not finish, and is removed
    /// before anything new is written, so the next generation starts in an empty half.
    fn adopt_state(&mut self) -> Result<(), KernelError> {
        let marker = self.settings()?.generation;
        {
            let cgroups = maps::cgroup_policy(&mut self.ebpf)?;
            let entries: Vec<(u64, CgroupBinding)> = cgroups.iter().filter_map(Result::ok).collect();
            // An earlier daemon's refusals stay until this one has matched the tree again.
            self.refused = entries.iter().filter(|(_, b)| b.slot == UNBINDABLE_SLOT).map(|(id, _)| *id).collect();
            self.bindings = entries.into_iter().filter(|(_, b)| b.slot != UNBINDABLE_SLOT).collect();
        }
        {
            let guards = maps::deep_guards(&mut self.ebpf)?;
            self.deep_guards = guards.iter().filter_map(Result::ok).collect();
        }
        let all_stats = || self.bindings.values().chain(self.deep_guards.values()).map(|b| b.stats);
        self.next_stats = all_stats().map(|stats| stats + 1).max().unwrap_or(0);
        let used: HashSet<u32> = all_stats().collect();
        self.free_stats = (0..self.next_stats).filter(|i| !used.contains(i)).collect();

        let adoption = generation::adopt(self.bindings.iter().map(|(id, b)| (*id, b.slot)), marker);
        if !adoption.stale.is_empty() {
            tracing::info!(cgroups = adoption.stale.len(), "finishing an interrupted reload: unbinding what it left");
            for id in &adoption.stale {
                self.unbind(*id);
            }
            fault::crash_point("adopt-after-unbind");
            self.wait_for_running_programs();
        }
        self.generation = adoption.live.unwrap_or(Generation(marker));
        let live = adoption.live;
        let owned_by_live = move |slot: u32| live.is_some_and(|g| g.owns_slot(slot));
        self.installed = self.sweep(owned_by_live)?;
        Ok(())
    }

    /// Whether non-IP sockets are refused to covered cgroups on this kernel.
    pub fn socket_guard(&self) -> &SocketGuard {
        &self.loaded.socket_guard
    }

    /// Removes every entry of the slots `keep` refuses, and every port table no kept entry
    /// refers to; returns what is kept.
    fn sweep(&mut self, keep: impl Fn(u32) -> bool) -> Result<Installed, KernelError> {
        let slot_of = |policy: [u8; 4]| u32::from_be_bytes(policy);
        let mut kept = Installed::default();
        let mut tables_in_use = HashSet::new();
        {
            let mut v4 = maps::rules_v4(&mut self.ebpf)?;
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
            let mut v6 = maps::rules_v6(&mut self.ebpf)?;
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
            let mut tables = maps::port_tables(&mut self.ebpf)?;
            let ids: Vec<u32> = tables.keys().filter_map(Result::ok).collect();
            for id in ids {
                if tables_in_use.contains(&id) {
                    kept.tables.push(id);
                } else {
                    drop(tables.remove(&id));
                }
            }
        }
        let mut infos = maps::policy_info(&mut self.ebpf)?;
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
    pub fn attach(&mut self, cgroup: &Cgroup) -> Result<(), KernelError> {
        if self.attachments.contains_key(&cgroup.id) {
            return Ok(());
        }
        let file = cgroup.file()?;
        let mut ids = Vec::new();
        if let Err(error) = programs::attach_all(&mut self.ebpf, &self.loaded, file.as_fd(), &mut ids) {
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

    fn pin_links(&mut self, dir: &Path, cgroup_id: u64, ids: Vec<LinkId>) -> Result<Vec<PinnedLink>, KernelError> {
        let links_dir = pins::links_dir(dir)?;
        let previous = pins::existing(&links_dir)?;
        let stamp = pins::next_link_serial(&previous);
        let mut pinned = Vec::new();
        for id in ids {
            let (name, link) = programs::take_link(&mut self.ebpf, id)?;
            let path = pins::link_path(&links_dir, cgroup_id, name, stamp);
            let link = link
                .pin(&path)
                .map_err(|e| KernelError::Pin { path: path.clone(), source: std::io::Error::other(e.to_string()) })?;
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

    /// Detaches the programs from a cgroup (best effort: a cgroup that is gone has no links).
    pub fn detach(&mut self, cgroup_id: u64) {
        match self.attachments.remove(&cgroup_id) {
            Some(Attachment::Owned(ids)) => {
                for id in ids {
                    if let Err(error) = programs::detach(&mut self.ebpf, id) {
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
            pins::remove_all(dir);
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
    ) -> Result<(), KernelError> {
        self.check_fits(generation, set, slots, cgroups)?;
        // Before any slot's contents change: decisions the kernel cached under the old epoch
        // are taken again, so no cached allow outlives the rules it came from (also when the
        // daemon dies half-way).
        self.invalidate_decisions()?;
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
            // The epoch never goes back: decisions cached under the failed attempt's epoch must
            // stay invalid when a later generation reuses its slots.
            let restored = self.update_settings(|s| *s = Settings { policy_epoch: s.policy_epoch, ..previous });
            if let Err(restore) = restored {
                tracing::warn!(error = %restore, "restoring the generation marker");
            }
            self.wait_for_running_programs();
            self.remove_generation(&fresh);
            return Err(error);
        }
        // Refused cgroups the new generation binds are refused no more.
        self.refused.retain(|id| !cgroups.contains_key(id));
        // Decisions cached since the first epoch may have come from the old bindings.
        self.invalidate_after_switch();
        fault::crash_point("after-switch");
        let stale: Vec<u64> = self.bindings.keys().filter(|id| !cgroups.contains_key(id)).copied().collect();
        for id in stale {
            self.remove_binding(id);
            fault::crash_point("mid-unbind");
        }
        if let Err(error) = self.update_settings(|s| s.policy_levels = levels) {
            // The old levels are a superset: the programs only look at more levels than needed.
            tracing::warn!(%error, "narrowing the searched cgroup levels");
        }
        // And those cached meanwhile by cgroups that were unbound.
        self.invalidate_after_switch();
        fault::crash_point("before-cleanup");
        self.wait_for_running_programs();
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
    ) -> Result<(), KernelError> {
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
        let outside = |id: u32| KernelError::OutsideHalf { generation: generation.0, id };
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
    fn switch(&mut self, cgroups: &HashMap<u64, u32>) -> Result<(), KernelError> {
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
        if let Ok(mut map) = maps::cgroup_policy(&mut self.ebpf) {
            for (id, _) in &added {
                drop(map.remove(id));
            }
        }
        for index in allocated {
            self.release_stats(index);
        }
        Err(KernelError::Switch { switched, total: entries.len(), source })
    }

    /// Writes `entries` into the cgroup map in one `BPF_MAP_UPDATE_BATCH` call. The kernel runs
    /// the whole batch before it returns to userspace, where a fatal signal takes effect, so a
    /// killed daemon leaves all of them written or none. On error: how many were written.
    fn write_bindings(&self, entries: &[(u64, CgroupBinding)]) -> Result<(), (usize, std::io::Error)> {
        if entries.is_empty() {
            return Ok(());
        }
        let Some(map) = maps::cgroup_policy_data(&self.ebpf) else {
            return Err((0, std::io::Error::other("the cgroup map is missing")));
        };
        let keys: Vec<u64> = entries.iter().map(|(id, _)| *id).collect();
        let values: Vec<CgroupBinding> = entries.iter().map(|(_, binding)| *binding).collect();
        update_batch(map.fd().as_fd(), &keys, &values)
    }
    /// Binds one cgroup to a policy slot of the generation in force (one map write). Policy
    /// bindings stop [`RESERVED_BINDINGS`] short of the map's capacity (see [`Enforcer::refuse`]).
    pub fn bind(&mut self, cgroup_id: u64, slot: u32) -> Result<(), KernelError> {
        let stats = match self.bindings.get(&cgroup_id) {
            Some(existing) => existing.stats,
            None if self.bindings.len() + self.refused.len() >= (MAX_CGROUPS - RESERVED_BINDINGS) as usize => {
                return Err(KernelError::TooManyBindings);
            }
            None => self.allocate_stats()?,
        };
        let binding = CgroupBinding { slot, stats };
        let mut cgroups = maps::cgroup_policy(&mut self.ebpf)?;
        cgroups.insert(cgroup_id, binding, 0).map_err(KernelError::map(names::CGROUP_POLICY))?;
        self.bindings.insert(cgroup_id, binding);
        self.refused.remove(&cgroup_id);
        self.invalidate_decisions()
    }

    /// Refuses every flow of a cgroup that a selector matches but that cannot be bound (rule
    /// `unbindable`), or of a delegated subtree's root that went over its share; replaces its
    /// binding, if it had one. Uses the entries policy bindings leave free, and one shared
    /// stats index, so it works when the binding table is full.
    pub fn refuse(&mut self, cgroup_id: u64) -> Result<(), KernelError> {
        if !self.refused.contains(&cgroup_id) && self.bindings.len() + self.refused.len() >= MAX_CGROUPS as usize {
            return Err(KernelError::TooManyBindings);
        }
        let binding = CgroupBinding { slot: UNBINDABLE_SLOT, stats: UNBINDABLE_STATS };
        let mut cgroups = maps::cgroup_policy(&mut self.ebpf)?;
        cgroups.insert(cgroup_id, binding, 0).map_err(KernelError::map(names::CGROUP_POLICY))?;
        if let Some(previous) = self.bindings.remove(&cgroup_id) {
            self.release_stats(previous.stats);
        }
        self.refused.insert(cgroup_id);
        self.invalidate_decisions()
    }

    /// Ends a refusal of [`Enforcer::refuse`] (not a binding the cgroup got since).
    pub fn unrefuse(&mut self, cgroup_id: u64) {
        if self.remove_refusal(cgroup_id) {
            if let Err(error) = self.invalidate_decisions() {
                tracing::error!(%error, cgroup_id, "decisions cached for a cgroup no longer refused stay until the next change");
            }
        }
    }

    fn remove_refusal(&mut self, cgroup_id: u64) -> bool {
        if !self.refused.remove(&cgroup_id) {
            return false;
        }
        if let Ok(mut cgroups) = maps::cgroup_policy(&mut self.ebpf) {
            drop(cgroups.remove(&cgroup_id));
        }
        true
    }

    /// The cgroups refused by [`Enforcer::refuse`].
    pub fn refused(&self) -> impl Iterator<Item = u64> + '_ {
        self.refused.iter().copied()
    }

    /// Adds `policy_levels` bits to those the programs search (for a cgroup bound after an
    /// install).
    pub fn add_levels(&mut self, bits: u32) -> Result<(), KernelError> {
        self.update_settings(|s| {
            s.policy_levels |= bits;
            s.policy_epoch = s.policy_epoch.wrapping_add(1);
        })
    }

    /// Flow events one cgroup may raise per second on each CPU.
    pub fn set_event_budget(&mut self, per_second: u32) -> Result<(), KernelError> {
        self.update_settings(|s| s.event_budget = per_second)
    }

    /// Makes `DEEP_GUARDS` hold exactly `ancestors` (new guards are written before stale ones go).
    pub fn set_deep_guards(&mut self, ancestors: &HashSet<u64>) -> Result<(), KernelError> {
        for id in ancestors {
            self.add_deep_guard(*id)?;
        }
        let stale: Vec<u64> = self.deep_guards.keys().filter(|id| !ancestors.contains(id)).copied().collect();
        for id in stale {
            if let Some(guard) = self.deep_guards.remove(&id) {
                if let Ok(mut guards) = maps::deep_guards(&mut self.ebpf) {
                    drop(guards.remove(&id));
                }
                self.free_stats.push(guard.stats);
            }
        }
        self.invalidate_decisions()
    }

    /// Refuses senders deeper than the walk below `ancestor` unless bound themselves.
    pub fn add_deep_guard(&mut self, ancestor: u64) -> Result<(), KernelError> {
        if self.deep_guards.contains_key(&ancestor) {
            return Ok(());
        }
        if self.deep_guards.len() >= MAX_DEEP_GUARDS as usize {
            return Err(KernelError::TooManyDeepGuards);
        }
        let guard = CgroupBinding { slot: GUARD_SLOT, stats: self.allocate_stats()? };
        let mut guards = maps::deep_guards(&mut self.ebpf)?;
        guards.insert(ancestor, guard, 0).map_err(KernelError::map(names::DEEP_GUARDS))?;
        self.deep_guards.insert(ancestor, guard);
        self.invalidate_decisions()
    }

    /// Removes a cgroup's binding (the cgroup is gone or no longer matches a policy).
    pub fn unbind(&mut self, cgroup_id: u64) {
        let was_refused = self.remove_refusal(cgroup_id);
        if self.remove_binding(cgroup_id) || was_refused {
            if let Err(error) = self.invalidate_decisions() {
                tracing::error!(%error, cgroup_id, "decisions cached for an unbound cgroup stay in force until the next change");
            }
        }
    }

    /// [`Enforcer::unbind`] without moving the epoch on (the caller does, once); true when the
    /// cgroup was bound.
    fn remove_binding(&mut self, cgroup_id: u64) -> bool {
        let Some(binding) = self.bindings.remove(&cgroup_id) else {
            return false;
        };
        if let Ok(mut cgroups) = maps::cgroup_policy(&mut self.ebpf) {
            drop(cgroups.remove(&cgroup_id));
        }
        self.release_stats(binding.stats);
        true
    }

    /// Zeroes a binding's counters and makes the index available again.
    fn release_stats(&mut self, index: u32) {
        if let Ok(mut stats) = maps::binding_stats(&mut self.ebpf) {
            let zero = PerCpuValues::try_from(vec![PolicyStats::default(); nr_cpus()]);
            if let Ok(zero) = zero {
                drop(stats.set(index, zero, 0));
            }
        }
        self.free_stats.push(index);
    }

    fn allocate_stats(&mut self) -> Result<u32, KernelError> {
        if let Some(index) = self.free_stats.pop() {
            return Ok(index);
        }
        // The last index is the shared one of refused cgroups.
        if self.next_stats >= UNBINDABLE_STATS {
            return Err(KernelError::TooManyBindings);
        }
        self.next_stats += 1;
        Ok(self.next_stats - 1)
    }

    fn write_generation(&mut self, set: &CompiledSet, slots: &[u32], into: &mut Installed) -> Result<(), KernelError> {
        {
            let mut tables = maps::port_tables(&mut self.ebpf)?;
            for (id, table) in &set.port_tables {
                tables.insert(id, table, 0).map_err(KernelError::map(names::PORT_TABLES))?;
                into.tables.push(*id);
            }
        }
        let (keys, values): (Vec<Key<RuleKeyV4>>, Vec<Decision>) =
            set.policies.iter().flat_map(|p| &p.v4).map(|(prefix, data, d)| (Key::new(*prefix, *data), *d)).unzip();
        self.write_rules(names::RULES_V4, &keys, &values, &mut into.v4)?;
        let (keys, values): (Vec<Key<RuleKeyV6>>, Vec<Decision>) =
            set.policies.iter().flat_map(|p| &p.v6).map(|(prefix, data, d)| (Key::new(*prefix, *data), *d)).unzip();
        self.write_rules(names::RULES_V6, &keys, &values, &mut into.v6)?;
        let mut infos = maps::policy_info(&mut self.ebpf)?;
        for (policy, slot) in set.policies.iter().zip(slots) {
            infos.set(*slot, policy.info, 0).map_err(KernelError::map(names::POLICY_INFO))?;
            into.slots.push(*slot);
        }
        Ok(())
    }

    /// Writes rule trie entries, [`RULE_BATCH`] per system call where the kernel batches trie
    /// updates (Linux 5.13), one per call where it does not; `written` gets every key that is in
    /// the map, also when a write fails part-way.
    fn write_rules<K: aya::Pod>(
        &mut self,
        name: &'static str,
        keys: &[Key<K>],
        values: &[Decision],
        written: &mut Vec<Key<K>>,
    ) -> Result<(), KernelError> {
        let map = maps::rule_trie_data(&self.ebpf, name).ok_or(KernelError::MissingMap(name))?;
        let mut start = 0;
        while start < keys.len() && self.trie_batches {
            let end = keys.len().min(start + RULE_BATCH);
            match update_batch(map.fd().as_fd(), &keys[start..end], &values[start..end]) {
                Ok(()) => written.extend_from_slice(&keys[start..end]),
                // Kernels before 5.13 have no batched trie updates (and leave the count as it was
                // asked): this chunk and the rest go one entry per call.
                Err((_, error)) if written.is_empty() && unsupported(&error) => {
                    self.trie_batches = false;
                    continue;
                }
                Err((done, source)) => {
                    written.extend_from_slice(&keys[start..start + done]);
                    return Err(KernelError::Batch { name, source });
                }
            }
            start = end;
        }
        let mut trie: LpmTrie<&mut MapData, K, Decision> =
            LpmTrie::try_from(self.ebpf.map_mut(name).ok_or(KernelError::MissingMap(name))?)
                .map_err(KernelError::map(name))?;
        for (key, decision) in keys[start..].iter().zip(&values[start..]) {
            trie.insert(key, decision, 0).map_err(KernelError::map(name))?;
            written.push(*key);
        }
        Ok(())
    }

    /// Removes what a generation wrote; anything that could not be removed is swept before the
    /// next generation is written into the same half.
    fn remove_generation(&mut self, old: &Installed) {
        // Counted, not `any`: every entry is tried even after a failure.
        let mut failures = 0;
        match maps::rules_v4(&mut self.ebpf) {
            Ok(mut v4) => failures += old.v4.iter().filter(|key| v4.remove(key).is_err()).count(),
            Err(_) => failures += 1,
        }
        fault::crash_point("mid-cleanup");
        match maps::rules_v6(&mut self.ebpf) {
            Ok(mut v6) => failures += old.v6.iter().filter(|key| v6.remove(key).is_err()).count(),
            Err(_) => failures += 1,
        }
        match maps::port_tables(&mut self.ebpf) {
            Ok(mut tables) => failures += old.tables.iter().filter(|id| tables.remove(id).is_err()).count(),
            Err(_) => failures += 1,
        }
        match maps::policy_info(&mut self.ebpf) {
            Ok(mut infos) => {
                failures +=
                    old.slots.iter().filter(|slot| infos.set(**slot, PolicyInfo::default(), 0).is_err()).count();
            }
            Err(_) => failures += 1,
        }
        if failures > 0 {
            tracing::warn!(failures, "entries of a retired generation could not be removed; swept before next reload");
            self.leftovers = true;
        }
    }

    /// Moves the policy epoch on: every decision the kernel cached (per workload and
    /// destination, per socket) is taken again by the full path. Called after every change of
    /// rules, bindings, guards or searched levels, since the cached path finds no policy itself,
    /// and every [`DECISION_RENEWAL`](crate::engine::DECISION_RENEWAL), since it reads no clock.
    pub fn invalidate_decisions(&mut self) -> Result<(), KernelError> {
        self.update_settings(|s| s.policy_epoch = s.policy_epoch.wrapping_add(1))
    }

    /// The switch is done and cannot be undone here: a failure is said, not returned.
    fn invalidate_after_switch(&mut self) {
        if let Err(error) = self.invalidate_decisions() {
            tracing::error!(%error, "decisions cached under the previous bindings stay in force until the next change");
        }
    }

    fn settings(&mut self) -> Result<Settings, KernelError> {
        let settings = maps::settings(&mut self.ebpf)?;
        settings.get(&0, 0).map_err(KernelError::map(names::SETTINGS))
    }

    fn update_settings(&mut self, change: impl FnOnce(&mut Settings)) -> Result<(), KernelError> {
        let mut value = self.settings()?;
        change(&mut value);
        let mut settings = maps::settings(&mut self.ebpf)?;
        settings.set(0, value, 0).map_err(KernelError::map(names::SETTINGS))
    }

    /// The event ring and the dropped-event counter; can be taken once. They work without the
    /// enforcer (and its lock), so the event path never waits for the control plane.
    pub fn take_event_source(&mut self) -> Result<(EventSource, DropCounter), KernelError> {
        let mut take = |name: &'static str| self.ebpf.take_map(name).ok_or(KernelError::MissingMap(name));
        let ring = take(names::EVENTS)?;
        let counters = take(names::COUNTERS)?;
        Ok((EventSource::new(ring)?, DropCounter::new(counters)?))
    }

    /// The maps flow records are read from; can be taken once. They work without the enforcer
    /// (and its lock).
    pub fn take_flow_source(&mut self) -> Result<FlowSource, KernelError> {
        let mut take = |name: &'static str| self.ebpf.take_map(name).ok_or(KernelError::MissingMap(name));
        let flows = take(names::FLOWS)?;
        let ends = take(names::FLOW_ENDS)?;
        let closed = take(names::CLOSED_SOCKETS)?;
        let datagram_epoch = take(names::DATAGRAM_EPOCH)?;
        FlowSource::new(flows, ends, closed, datagram_epoch, self.loaded.sock_release)
    }

    /// The DNS maps (steering, learned addresses, query origins); can be taken once.
    pub fn take_dns_maps(&mut self) -> Result<super::DnsMaps, KernelError> {
        super::dns::DnsMaps::take(&mut self.ebpf)
    }

    /// Flow counts of one bound cgroup, summed over CPUs.
    pub fn cgroup_stats(&mut self, cgroup_id: u64) -> Result<PolicyStats, KernelError> {
        let Some(binding) = self.bindings.get(&cgroup_id).copied() else {
            return Ok(PolicyStats::default());
        };
        let stats = maps::binding_stats(&mut self.ebpf)?;
        let values = stats.get(&binding.stats, 0).map_err(KernelError::map(names::BINDING_STATS))?;
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
            (names::CGROUP_POLICY, self.bindings.len() + self.refused.len(), MAX_CGROUPS),
        ]
    }
}
