//! What the proxy needs of the policies in force: per bound cgroup, its policy's name rules.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
};

use egress_common::{PortRule, MAX_PORT_RULES};

use crate::policy::{compile::name_rule_entries, model::Mode, DomainPattern, Policy};

/// The name rules of one policy.
#[derive(Debug)]
pub struct PolicyNames {
    pub policy: String,
    pub audit: bool,
    /// Each rule's pattern and the allow entries a learned address of it carries.
    rules: Vec<(DomainPattern, Vec<PortRule>)>,
}

impl PolicyNames {
    /// `None` for a policy without name rules (its DNS is not steered).
    pub fn of(policy: &Policy) -> Option<Self> {
        if policy.names.is_empty() {
            return None;
        }
        let rules = policy
            .names
            .iter()
            .enumerate()
            .map(|(index, rule)| (rule.pattern.clone(), name_rule_entries(rule, policy.name_rule_id(index))))
            .collect();
        Some(Self { policy: policy.name.clone(), audit: policy.mode == Mode::Audit, rules })
    }

    pub fn allows(&self, name: &str) -> bool {
        self.rules.iter().any(|(pattern, _)| pattern.matches(name))
    }

    /// The allow entries of every rule that matches `name`, in file order, each once.
    pub fn entries_for(&self, name: &str) -> Vec<PortRule> {
        let mut entries = Vec::new();
        for (_, rule_entries) in self.rules.iter().filter(|(pattern, _)| pattern.matches(name)) {
            merge_entries(&mut entries, rule_entries);
        }
        entries
    }
}

/// Adds `more` to `entries`, skipping duplicates, up to what one kernel entry holds; false when
/// some did not fit (those flows stay refused: fail closed).
pub fn merge_entries(entries: &mut Vec<PortRule>, more: &[PortRule]) -> bool {
    let mut all_fit = true;
    for entry in more {
        if entries.contains(entry) {
            continue;
        }
        if entries.len() == MAX_PORT_RULES {
            all_fit = false;
            continue;
        }
        entries.push(*entry);
    }
    all_fit
}

/// Bound cgroup id -> name rules of its policy, for the cgroups whose policy has any.
#[derive(Default)]
pub struct View {
    inner: RwLock<Inner>,
}

#[derive(Default)]
struct Inner {
    by_cgroup: HashMap<u64, Arc<PolicyNames>>,
    /// Bumped when the policies change: learned entries are then re-derived.
    generation: u64,
}

impl View {
    /// Replaces everything: `policies` in file order, `bound` cgroup id -> policy index.
    pub fn replace(&self, policies: &[Policy], bound: &mut dyn Iterator<Item = (u64, usize)>) {
        let names: Vec<Option<Arc<PolicyNames>>> = policies.iter().map(|p| PolicyNames::of(p).map(Arc::new)).collect();
        let by_cgroup =
            bound.filter_map(|(id, index)| names.get(index).cloned().flatten().map(|names| (id, names))).collect();
        let mut inner = self.write();
        inner.by_cgroup = by_cgroup;
        inner.generation += 1;
    }

    pub fn bind(&self, cgroup: u64, policy: &Policy) {
        let mut inner = self.write();
        match PolicyNames::of(policy) {
            Some(names) => inner.by_cgroup.insert(cgroup, Arc::new(names)),
            None => inner.by_cgroup.remove(&cgroup),
        };
    }

    pub fn unbind(&self, cgroup: u64) {
        self.write().by_cgroup.remove(&cgroup);
    }

    pub fn names_of(&self, cgroup: u64) -> Option<Arc<PolicyNames>> {
        self.inner.read().unwrap_or_else(std::sync::PoisonError::into_inner).by_cgroup.get(&cgroup).cloned()
    }

    /// Bound cgroups whose policy has name rules (each has a quota of learned entries).
    pub fn cgroups(&self) -> usize {
        self.inner.read().unwrap_or_else(std::sync::PoisonError::into_inner).by_cgroup.len()
    }

    pub fn generation(&self) -> u64 {
        self.inner.read().unwrap_or_else(std::sync::PoisonError::into_inner).generation
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
