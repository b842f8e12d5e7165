//! The control plane: puts a parsed policy file in force on cgroups (compile, install) and keeps
//! the bindings and the names events need in step with the cgroups that come and go.

use std::{
    collections::HashMap,
    path::Path,
    sync::{Arc, Mutex, MutexGuard},
    time::SystemTime,
};

use anyhow::{bail, Context};
use egress_common::{DEEP_LEVELS_BIT, MAX_CGROUP_LEVEL};

use crate::{
    cgroup::{Cgroup, Hierarchy},
    generation::Generation,
    kernel::{self, DnsMaps, DropCounter, Enforcer, EventSource, FlowSource, KernelError, Start, Wanted},
    naming::{Catalog, DomainNames, SlotNames},
    policy::{
        compile::compile_set,
        model::{Policy, PolicySet},
    },
};

/// How often the kernel's reused decisions are renewed. The cached path reads no clock (on
/// some machines a clock read costs more than the rest of the path), so `log: new` notices that
/// a destination's event window (an hour) has passed at the first renewal after it.
pub const DECISION_RENEWAL: std::time::Duration = std::time::Duration::from_secs(300);

/// A policy (index into the set) bound to a cgroup it governs.
#[derive(Clone, Debug)]
pub struct Binding {
    pub policy: usize,
    pub cgroup: Cgroup,
}

/// A cgroup bound to a policy of the active set.
#[derive(Clone, Debug)]
pub struct Bound {
    pub relative: String,
    pub policy: usize,
    pub workload: Option<String>,
    /// Deeper than the kernel walk: found by its own id only (see [`deep_guard_of`]).
    pub deep: bool,
}

impl Bound {
    fn of(binding: &Binding) -> Self {
        let relative = binding.cgroup.relative.clone();
        let workload = crate::matching::workload_of(&relative);
        Self { relative, policy: binding.policy, workload, deep: binding.cgroup.level > MAX_CGROUP_LEVEL }
    }
}

/// The policy file in force.
pub struct Active {
    pub set: PolicySet,
    pub slots: Vec<u32>,
    pub source: String,
    pub loaded_at: SystemTime,
    pub bound: HashMap<u64, Bound>,
}

/// Kernel state plus what the daemon knows about it.
pub struct State {
    pub enforcer: Enforcer,
    pub active: Option<Active>,
    /// Cgroups refused everything because they could not be bound (see [`Engine::refuse`]),
    /// by id, with their paths and why.
    pub refused: HashMap<u64, Refusal>,
}

/// A cgroup refused everything (rule `unbindable`), and why.
#[derive(Clone, Debug)]
pub struct Refusal {
    pub relative: String,
    pub reason: String,
    /// Its depth: the kernel walk must look at that level.
    pub level: u32,
}

/// What became of a cgroup [`Engine::bind`] was asked to bind.
#[derive(Debug, PartialEq, Eq)]
pub enum BindOutcome {
    Bound,
    /// The binding table was full: the cgroup is refused everything instead.
    Refused,
}

/// Shared handle on the kernel state and the event catalog.
#[derive(Clone)]
pub struct Engine {
    state: Arc<Mutex<State>>,
    catalog: Arc<Mutex<Catalog>>,
    /// Told of every change of bindings (the DNS proxy's view of which cgroup has which policy).
    watchers: Arc<Mutex<Vec<Arc<dyn BindingWatcher>>>>,
}

/// Something that follows which policy governs which cgroup, told as the engine changes it.
pub trait BindingWatcher: Send + Sync {
    /// A new set is in force with these `(cgroup id, policy index)` bindings.
    fn replaced(&self, policies: &[Policy], bound: &mut dyn Iterator<Item = (u64, usize)>);
    fn bound(&self, cgroup_id: u64, policy: &Policy);
    fn unbound(&self, cgroup_id: u64);
}

/// The programs loaded (nothing attached or enforced yet) and the event path's ends.
pub struct Loaded {
    pub engine: Engine,
    pub start: Start,
    pub events: EventSource,
    pub drops: DropCounter,
    /// The flow accounting maps, for the flow-record sweeper.
    pub flows: FlowSource,
    /// The DNS maps, for the DNS proxy.
    pub dns_maps: DnsMaps,
}

impl Engine {
    /// Loads the kernel programs (the filters, and those `wanted` asks for); with a pin directory
    /// an earlier daemon's maps are adopted.
    pub fn load(pin_dir: Option<&Path>, hierarchy: &Hierarchy, wanted: Wanted) -> anyhow::Result<Loaded> {
        let (mut enforcer, start) = Enforcer::load(pin_dir, wanted).map_err(|error| {
            let what = kernel::missing_helper(&error.to_string()).map_or_else(
                || "loading the kernel programs".to_owned(),
                |m| format!("loading the kernel programs: {m}"),
            );
            anyhow::Error::new(error).context(what)
        })?;
        let (events, drops) = enforcer.take_event_source().context("taking the event ring")?;
        let flows = enforcer.take_flow_source().context("taking the flow accounting maps")?;
        let dns_maps = enforcer.take_dns_maps().context("taking the DNS maps")?;
        let catalog = Arc::new(Mutex::new(Catalog::new(hierarchy.clone())));
        let engine = Self {
            state: Arc::new(Mutex::new(State { enforcer, active: None, refused: HashMap::new() })),
            catalog,
            watchers: Arc::new(Mutex::new(Vec::new())),
        };
        Ok(Loaded { engine, start, events, drops, flows, dns_maps })
    }

    /// The names events are reported with, shared with the event pipeline.
    pub fn shared_catalog(&self) -> Arc<Mutex<Catalog>> {
        self.catalog.clone()
    }

    /// Tells `watcher` of every later change of bindings.
    pub fn watch_bindings(&self, watcher: Arc<dyn BindingWatcher>) {
        self.watchers().push(watcher);
    }

    fn watchers(&self) -> MutexGuard<'_, Vec<Arc<dyn BindingWatcher>>> {
        self.watchers.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Lets events name the domains learned addresses were allowed for.
    pub fn name_domains(&self, names: Arc<dyn DomainNames>) {
        self.catalog().set_domains(names);
    }

    pub fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn catalog(&self) -> MutexGuard<'_, Catalog> {
        self.catalog.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Has the kernel judge every flow afresh once (see [`DECISION_RENEWAL`]).
    pub fn renew_decisions(&self) {
        if let Err(error) = self.state().enforcer.invalidate_decisions() {
            tracing::warn!(%error, "renewing the kernel's cached decisions");
        }
    }

    /// Attaches the kernel programs to a cgroup (they then see it and its descendants).
    pub fn attach(&self, cgroup: &Cgroup) -> anyhow::Result<()> {
        self.state().enforcer.attach(cgroup).with_context(|| format!("attaching to cgroup {}", cgroup.relative))
    }

    /// Puts `set` in force on `bindings`, replacing whatever was enforced before. On error the
    /// previous policies stay in force.
    pub fn apply(&self, set: PolicySet, source: &str, bindings: &[Binding]) -> anyhow::Result<()> {
        if set.policies.len() > Generation::max_policies() {
            let (needed, available) = (set.policies.len(), Generation::max_policies());
            bail!("policy slots: {needed} needed, {available} available per generation");
        }
        let guards = deep_guards(bindings.iter().map(|b| &b.cgroup))?;
        // Compiling a large file takes a while: the lock that status, metrics and the event
        // pipeline share is taken only to write the maps.
        let generation = self.state().enforcer.next_generation();
        let slots = generation.slots(set.policies.len());
        let compiled = compile_set(&set, &slots, generation.first_table_id()).context("compiling the policies")?;
        let cgroup_slots: HashMap<u64, u32> = bindings.iter().map(|b| (b.cgroup.id, slots[b.policy])).collect();
        let bound_levels = bindings.iter().fold(0u32, |mask, b| mask | level_bit(b.cgroup.level));

        // Name the new slots before they can raise events.
        self.name_slots(&set, &slots);
        let bound: HashMap<u64, Bound> = bindings.iter().map(|b| (b.cgroup.id, Bound::of(b))).collect();
        self.name_cgroups(&bound);
        let mut state = self.state();
        let levels = state.refused.values().fold(bound_levels, |mask, r| mask | level_bit(r.level));
        if state.enforcer.next_generation() != generation {
            bail!("another set of policies was put in force meanwhile; apply again");
        }
        // Guards first: a deep cgroup's unbound neighbours are refused from the moment the
        // kernel starts looking below the walk.
        state.enforcer.set_deep_guards(&guards).context("writing the deep-cgroup guards")?;
        state.enforcer.set_event_budget(set.settings.events_per_second).context("writing the event budget")?;
        state
            .enforcer
            .install(generation, &compiled, &slots, &cgroup_slots, levels)
            .context("writing the policies into the kernel maps")?;
        for watcher in self.watchers().iter() {
            watcher.replaced(&set.policies, &mut bindings.iter().map(|b| (b.cgroup.id, b.policy)));
        }
        state.active = Some(Active { set, slots, source: source.to_string(), loaded_at: SystemTime::now(), bound });
        Ok(())
    }

    /// Binds one more cgroup (one that appeared after the policies were applied). When the
    /// binding table is full the cgroup is refused everything instead: a cgroup a selector
    /// matches is never left to an ancestor's policy, or none, for want of room.
    pub fn bind(&self, binding: &Binding) -> anyhow::Result<BindOutcome> {
        match self.bind_policy(binding) {
            Ok(()) => Ok(BindOutcome::Bound),
            Err(error)
                if error.downcast_ref::<KernelError>().is_some_and(|e| matches!(e, KernelError::TooManyBindings)) =>
            {
                self.refuse(&binding.cgroup, "the binding table is full")?;
                Ok(BindOutcome::Refused)
            }
            Err(error) => Err(error),
        }
    }

    /// Refuses every flow of `cgroup` (rule `unbindable`), replacing its binding if it had one.
    pub fn refuse(&self, cgroup: &Cgroup, reason: &str) -> anyhow::Result<()> {
        let mut state = self.state();
        state.enforcer.add_levels(level_bit(cgroup.level))?;
        state.enforcer.refuse(cgroup.id).with_context(|| format!("refusing cgroup {}", cgroup.relative))?;
        if let Some(active) = &mut state.active {
            active.bound.remove(&cgroup.id);
        }
        for watcher in self.watchers().iter() {
            watcher.unbound(cgroup.id);
        }
        let refusal = Refusal { relative: cgroup.relative.clone(), reason: reason.to_string(), level: cgroup.level };
        state.refused.insert(cgroup.id, refusal);
        Ok(())
    }

    /// Makes the refusals exactly `wanted` (with why): refuses those not yet refused and ends the
    /// others (a cgroup bound since keeps its binding).
    pub fn set_refused(&self, wanted: &[(Cgroup, String)]) -> anyhow::Result<()> {
        for (cgroup, reason) in wanted {
            self.refuse(cgroup, reason)?;
        }
        let mut state = self.state();
        // The enforcer's list also holds refusals an earlier daemon left in the pinned maps.
        let stale: Vec<u64> = state
            .enforcer
            .refused()
            .chain(state.refused.keys().copied())
            .filter(|id| !wanted.iter().any(|(c, _)| c.id == *id))
            .collect();
        for id in stale {
            state.enforcer.unrefuse(id);
            state.refused.remove(&id);
        }
        Ok(())
    }

    fn bind_policy(&self, binding: &Binding) -> anyhow::Result<()> {
        let guard = deep_guard_of(&binding.cgroup)?;
        let mut state = self.state();
        let State { enforcer, active, .. } = &mut *state;
        let Some(active) = active else { bail!("no policies are loaded") };
        let slot = *active.slots.get(binding.policy).context("policy index out of range")?;
        let bound = Bound::of(binding);
        self.name_cgroups([(&binding.cgroup.id, &bound)]);
        if let Some(guard) = guard {
            enforcer.add_deep_guard(guard).context("writing a deep-cgroup guard")?;
        }
        enforcer.add_levels(level_bit(binding.cgroup.level))?;
        enforcer.bind(binding.cgroup.id, slot)?;
        if let Some(policy) = active.set.policies.get(binding.policy) {
            for watcher in self.watchers().iter() {
                watcher.bound(binding.cgroup.id, policy);
            }
        }
        active.bound.insert(binding.cgroup.id, bound);
        Ok(())
    }

    /// Removes the binding of a cgroup that went away; returns what it was bound to.
    pub fn unbind(&self, cgroup_id: u64) -> Option<Bound> {
        let mut state = self.state();
        state.enforcer.unbind(cgroup_id);
        state.refused.remove(&cgroup_id);
        for watcher in self.watchers().iter() {
            watcher.unbound(cgroup_id);
        }
        state.active.as_mut().and_then(|active| active.bound.remove(&cgroup_id))
    }

    fn name_slots(&self, set: &PolicySet, slots: &[u32]) {
        let mut catalog = self.catalog();
        for (policy, slot) in set.policies.iter().zip(slots) {
            let names_from = policy.rules.len();
            catalog.name_slot(*slot, SlotNames { policy: policy.name.clone(), rules: policy.rule_texts(), names_from });
        }
    }

    fn name_cgroups<'a>(&self, cgroups: impl IntoIterator<Item = (&'a u64, &'a Bound)>) {
        let mut catalog = self.catalog();
        for (id, bound) in cgroups {
            catalog.name_cgroup(*id, bound.relative.clone(), bound.workload.clone());
        }
    }
}

/// The `policy_levels` bit that makes the kernel look at a cgroup of this depth.
fn level_bit(level: u32) -> u32 {
    if level > MAX_CGROUP_LEVEL {
        DEEP_LEVELS_BIT
    } else {
        1 << level
    }
}

/// For a cgroup deeper than the kernel walk: the id of its ancestor at the deepest walked level.
/// The kernel finds the deep cgroup by its own id, and refuses every other sender deeper than
/// the walk below that ancestor (fail closed: it cannot tell which deep policy would apply).
fn deep_guard_of(cgroup: &Cgroup) -> anyhow::Result<Option<u64>> {
    if cgroup.level <= MAX_CGROUP_LEVEL {
        return Ok(None);
    }
    let ancestor = cgroup
        .ancestor_at(MAX_CGROUP_LEVEL)
        .with_context(|| format!("finding the level-{MAX_CGROUP_LEVEL} ancestor of deep cgroup {}", cgroup.relative))?;
    Ok(Some(ancestor))
}

fn deep_guards<'a>(cgroups: impl Iterator<Item = &'a Cgroup>) -> anyhow::Result<std::collections::HashSet<u64>> {
    let mut guards = std::collections::HashSet::new();
    for cgroup in cgroups {
        guards.extend(deep_guard_of(cgroup)?);
    }
    Ok(guards)
}
