//! Which policy governs which cgroup: policy selectors evaluated against cgroup paths.
//!
//! A cgroup matched by several policies takes the most specific selector: `container`, then
//! `systemd_unit`, then an exact `cgroup` path, then a `cgroup` glob; among equals, the policy
//! that comes first in the file.

use crate::{
    discovery::{container_of, enclosing_container, unit_of, ContainerNames},
    policy::model::{cgroup_glob_matches, PolicySet, Selector},
};

/// Index of the policy that governs the cgroup at `relative` (relative to the cgroup2 mount,
/// `""` or `"/"` for the root), if any.
pub fn policy_for(set: &PolicySet, relative: &str, names: &ContainerNames) -> Option<usize> {
    let path = relative.trim_matches('/');
    set.policies
        .iter()
        .enumerate()
        .filter(|(_, policy)| selects(&policy.selector, path, names))
        .min_by_key(|(index, policy)| (specificity(&policy.selector), *index))
        .map(|(index, _)| index)
}

fn specificity(selector: &Selector) -> u8 {
    match selector {
        Selector::Container(_) => 0,
        Selector::SystemdUnit(_) => 1,
        Selector::Cgroup(_) if !selector.is_glob() => 2,
        Selector::Cgroup(_) => 3,
    }
}

fn selects(selector: &Selector, path: &str, names: &ContainerNames) -> bool {
    match selector {
        Selector::Cgroup(pattern) => cgroup_glob_matches(pattern, path),
        Selector::SystemdUnit(unit) => path.rsplit('/').next() == Some(unit.as_str()),
        // An id prefix that fits several containers selects none of them.
        Selector::Container(wanted) => {
            container_of(path).is_some_and(|found| names.ids_for(wanted) == [found.id])
        }
    }
}

/// What runs in a cgroup (or the container or unit it lies in), for events and status:
/// `docker:3f2a9c1b0d4e` or `nginx.service`.
pub fn workload_of(relative: &str) -> Option<String> {
    let path = relative.trim_matches('/');
    if let Some(container) = enclosing_container(path) {
        let short: String = container.id.chars().take(12).collect();
        return Some(format!("{}:{short}", container.runtime.as_str()));
    }
    unit_of(path)
}
