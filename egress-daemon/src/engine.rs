//! The control plane: turns a parsed policy file into enforcement on cgroups (compile, attach,
//! install) and keeps the names events need in step with what is installed.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard},
};

use anyhow::{bail, Context};
use egress_common::MAX_CGROUP_LEVEL;

use crate::{
    cgroup::Cgroup,
    events::{Catalog, SlotNames},
    loader::{Enforcer, Generation},
    policy::{compile::compile_set, model::PolicySet},
};

/// A policy bound to the cgroup it governs.
pub struct Binding {
    pub policy: usize,
    pub cgroup: Cgroup,
}

/// What is enforced where, for status output.
#[derive(Clone, Debug)]
pub struct Enforced {
    pub policy: String,
    pub cgroup: String,
    pub slot: u32,
}

/// Shared handle on the kernel state and the event catalog.
#[derive(Clone)]
pub struct Engine {
    enforcer: Arc<Mutex<Enforcer>>,
    catalog: Arc<Mutex<Catalog>>,
}

impl Engine {
    pub fn new(enforcer: Enforcer, catalog: Catalog) -> Self {
        Self { enforcer: Arc::new(Mutex::new(enforcer)), catalog: Arc::new(Mutex::new(catalog)) }
    }

    pub fn enforcer(&self) -> MutexGuard<'_, Enforcer> {
        self.enforcer.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn catalog(&self) -> MutexGuard<'_, Catalog> {
        self.catalog.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Puts `set` in force on `bindings`, replacing whatever was enforced before. On error the
    /// previous policies stay in force.
    pub fn apply(&self, set: &PolicySet, bindings: &[Binding]) -> anyhow::Result<Vec<Enforced>> {
        if set.policies.len() > Generation::max_policies() {
            bail!("{} policies; at most {} are supported", set.policies.len(), Generation::max_policies());
        }
        for binding in bindings {
            if binding.cgroup.level > MAX_CGROUP_LEVEL {
                bail!("cgroup {} is nested deeper than {MAX_CGROUP_LEVEL} levels", binding.cgroup.relative);
            }
        }
        let mut enforcer = self.enforcer();
        let generation = enforcer.next_generation();
        let slots = generation.slots(set.policies.len());
        let compiled = compile_set(set, &slots, generation.first_table_id()).context("compiling the policies")?;

        for binding in bindings {
            enforcer
                .attach(&binding.cgroup)
                .with_context(|| format!("attaching to cgroup {}", binding.cgroup.relative))?;
        }
        let cgroup_slots: HashMap<u64, u32> =
            bindings.iter().map(|b| (b.cgroup.id, slots[b.policy])).collect();
        let levels = bindings.iter().fold(0u32, |mask, b| mask | 1 << b.cgroup.level);

        // Name the new slots before they can raise events.
        {
            let mut catalog = self.catalog();
            for (policy, slot) in set.policies.iter().zip(&slots) {
                let rules = policy.rules.iter().map(|r| r.text()).collect();
                catalog.name_slot(*slot, SlotNames { policy: policy.name.clone(), rules });
            }
            for binding in bindings {
                catalog.name_cgroup(binding.cgroup.id, binding.cgroup.relative.clone());
            }
        }
        enforcer
            .install(generation, &compiled, &slots, &cgroup_slots, levels)
            .context("writing the policies into the kernel maps")?;
        Ok(bindings
            .iter()
            .map(|b| Enforced {
                policy: set.policies[b.policy].name.clone(),
                cgroup: b.cgroup.relative.clone(),
                slot: slots[b.policy],
            })
            .collect())
    }
}
