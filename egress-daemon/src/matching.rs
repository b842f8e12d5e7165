//! Which policy governs which cgroup: policy selectors evaluated against cgroup paths.
//!
//! A cgroup matched by several policies takes the most specific selector: `container`, then
//! `systemd_unit`, then an exact `cgroup` path, then a `cgroup` glob; among equals, the policy
//! that comes first in the file.
//!
//! A name proves something only where root put the cgroup: any user can make `nginx.service` or
//! `docker-<id>.scope` in a subtree delegated to them. So a `systemd_unit` or `container` match,
//! and the part of a `cgroup` glob the wildcards matched, count only when the placement check
//! passes; an exact `cgroup` path is the operator's own word and always counts. A match that does
//! not count is reported as ignored, and the cgroup falls to whatever policy its ancestors have.

use std::collections::{BTreeMap, HashMap};

use crate::{
    cgroup::is_glob,
    discovery::{container_of, enclosing_container, unit_of, ContainerNames, Untrusted},
    policy::model::{cgroup_glob_matches, PolicySet, Selector},
    printable::escaped,
};

/// What governs one cgroup.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Match {
    /// Index of the policy that governs it, if any.
    pub policy: Option<usize>,
    /// Policies whose selector names it but whose match does not count there, and why.
    pub ignored: Vec<(usize, Untrusted)>,
}

/// What governs the cgroup at `relative` (relative to the cgroup2 mount, `""` or `"/"` for the
/// root). `placed_by_root(depth)` says whether only root could have made children of the
/// cgroup's ancestors from that depth on (`discovery::check_placement`); it is asked only about
/// cgroups a selector names.
pub fn policy_for(
    set: &PolicySet,
    relative: &str,
    names: &ContainerNames,
    placed_by_root: impl Fn(usize) -> Result<(), Untrusted>,
) -> Match {
    let path = relative.trim_matches('/');
    let mut found = Match::default();
    let mut best: Option<(u8, usize)> = None;
    for (index, policy) in set.policies.iter().enumerate() {
        if !selects(&policy.selector, path, names) {
            continue;
        }
        if let Some(depth) = examine_from(&policy.selector) {
            if let Err(untrusted) = placed_by_root(depth) {
                found.ignored.push((index, untrusted));
                continue;
            }
        }
        let rank = (specificity(&policy.selector), index);
        if best.is_none_or(|best| rank < best) {
            best = Some(rank);
        }
    }
    found.policy = best.map(|(_, index)| index);
    found
}

/// The matches that did not count, for the policy set in force.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IgnoredMatches(BTreeMap<(String, String), IgnoredMatch>);

/// One selector match that did not count.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IgnoredMatch {
    pub cgroup: String,
    pub policy: String,
    /// The selector as `egress status` shows it (`systemd_unit nginx.service`).
    pub selector: String,
    pub reason: String,
}

impl IgnoredMatches {
    /// Records the ignored matches of one cgroup (quietly: [`Self::replace_with`] warns).
    pub fn add(&mut self, set: &PolicySet, relative: &str, found: &Match) {
        for (index, untrusted) in &found.ignored {
            if let Some(policy) = set.policies.get(*index) {
                let ignored = IgnoredMatch {
                    cgroup: relative.to_string(),
                    policy: policy.name.clone(),
                    selector: policy.selector.to_string(),
                    reason: untrusted.to_string(),
                };
                self.0.insert((ignored.cgroup.clone(), ignored.policy.clone()), ignored);
            }
        }
    }

    /// Takes `next`'s matches, warning once about each that is not already known.
    pub fn replace_with(&mut self, next: IgnoredMatches) {
        for (key, ignored) in &next.0 {
            if !self.0.contains_key(key) {
                // Cgroup names here are chosen by whoever may create cgroups: escaped.
                tracing::warn!(
                    cgroup = %escaped(&ignored.cgroup),
                    policy = %escaped(&ignored.policy),
                    "{} names this cgroup but does not govern it, because {}: whoever may create cgroups \
                     there can choose any name. The policy of its nearest governed ancestor applies",
                    escaped(&ignored.selector),
                    escaped(&ignored.reason)
                );
            }
        }
        *self = next;
    }

    /// Forgets a cgroup that went away.
    pub fn forget(&mut self, relative: &str) {
        self.0.retain(|(cgroup, _), _| cgroup != relative);
    }

    /// Ordered by cgroup, then policy.
    pub fn iter(&self) -> impl Iterator<Item = &IgnoredMatch> {
        self.0.values()
    }
}

/// The shallowest ancestor whose placement matters, as a depth (0: the root cgroup); `None` when
/// none does. Ancestors a glob spells out literally were chosen by the operator whoever owns them,
/// so a glob that names a delegated subtree (`user.slice/user@1000.service/app.slice/*`) governs
/// what the user makes there, while `**/*.service` does not reach into it.
fn examine_from(selector: &Selector) -> Option<usize> {
    match selector {
        Selector::Cgroup(pattern) if is_glob(pattern) => {
            Some(pattern.split('/').filter(|c| !c.is_empty()).take_while(|c| !is_glob(c)).count() + 1)
        }
        Selector::Cgroup(_) => None,
        Selector::SystemdUnit(_) | Selector::Container(_) => Some(0),
    }
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
        Selector::Container(wanted) => container_of(path).is_some_and(|found| names.ids_for(wanted) == [found.id]),
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

/// Cgroups one delegated subtree may have bound to policies. Its user can create cgroups a
/// selector matches as fast as they like; without a share they could fill the binding table
/// (16,384) and leave cgroups created afterwards, anywhere, without the policy meant for them.
pub const MAX_BINDINGS_PER_DELEGATED_SUBTREE: usize = 1_024;

/// The root of the subtree an unprivileged user may create cgroups in (owned by them, writable
/// by them, or delegated by systemd) that `relative` lies inside, if any. Reads the tree.
pub fn delegation_root(mount: &std::path::Path, relative: &str) -> Option<String> {
    use crate::discovery::UntrustedReason;
    let untrusted = crate::discovery::check_placement(mount, relative, 1).err()?;
    matches!(untrusted.reason, UntrustedReason::Owner(_) | UntrustedReason::Writable(_) | UntrustedReason::Delegated)
        .then_some(untrusted.ancestor)
}

/// [`delegation_root`] over many cgroups: the answer depends only on a cgroup's ancestors, so
/// siblings share it and each parent's ancestors are examined once.
pub struct DelegationRoots<'a> {
    mount: &'a std::path::Path,
    by_parent: HashMap<String, Option<String>>,
}

impl<'a> DelegationRoots<'a> {
    pub fn new(mount: &'a std::path::Path) -> Self {
        Self { mount, by_parent: HashMap::new() }
    }

    pub fn of(&mut self, relative: &str) -> Option<String> {
        let parent = relative.rsplit_once('/').map_or("", |(parent, _)| parent);
        if let Some(known) = self.by_parent.get(parent) {
            return known.clone();
        }
        let root = delegation_root(self.mount, relative);
        self.by_parent.insert(parent.to_owned(), root.clone());
        root
    }
}

/// Whether `path` lies strictly below `root`.
pub fn is_below(path: &str, root: &str) -> bool {
    path.strip_prefix(root).is_some_and(|rest| rest.starts_with('/'))
}

/// The live form of `policy::delegation`: for bound cgroups (path, policy) that lie inside a
/// subtree an unprivileged user may create cgroups in (owned by them, writable by them, or
/// delegated by systemd), one warning per such subtree root that no bound cgroup covers at or
/// above it. Reads the cgroup tree's ownership; call it off the async runtime.
pub fn uncovered_delegations(mount: &std::path::Path, bound: &[(&str, &str)]) -> Vec<String> {
    use std::collections::HashSet;
    let paths: HashSet<&str> = bound.iter().map(|(path, _)| *path).collect();
    let mut reported = HashSet::new();
    let mut warnings = Vec::new();
    let mut roots = DelegationRoots::new(mount);
    for (path, policy) in bound {
        let Some(root) = roots.of(path) else { continue };
        let components: Vec<&str> = root.split('/').collect();
        let covered = (1..=components.len()).any(|depth| paths.contains(components[..depth].join("/").as_str()));
        if !covered && reported.insert(root.clone()) {
            warnings.push(crate::policy::delegation::uncovered(policy, path, &root));
        }
    }
    warnings
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{discovery::UntrustedReason, policy::parse_policy_str};

    const ID: &str = "3f2a9c0d1e2f3a4b5c6d7e8f9a0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b";

    fn set() -> PolicySet {
        let yaml = format!(
            "policies:
  - name: any-nginx
    systemd_unit: nginx.service
    default: deny
  - name: web
    container: {short}
    default: deny
  - name: all-services
    cgroup: '**/*.service'
    default: deny
  - name: user-apps
    cgroup: user.slice/user@4242.service/app.slice/*
    default: deny
  - name: exact
    cgroup: user.slice/user@4242.service/app.slice/nginx.service
    default: deny
",
            short = &ID[..12]
        );
        parse_policy_str(&yaml, "test.yaml").expect("valid policy file")
    }

    fn names() -> ContainerNames {
        let mut names = ContainerNames::new();
        names.note_ids([ID.to_string()]);
        names
    }

    /// The placement check of `path` on a host where the cgroup at depth `delegated` (and so
    /// everything below it) belongs to uid 4242.
    fn delegated_at(path: &str, delegated: usize) -> impl Fn(usize) -> Result<(), Untrusted> {
        let depth = path.split('/').count();
        move |from| {
            if from.max(delegated) < depth {
                Err(Untrusted { ancestor: format!("depth {delegated}"), reason: UntrustedReason::Owner(4242) })
            } else {
                Ok(())
            }
        }
    }

    fn trusted(_: usize) -> Result<(), Untrusted> {
        Ok(())
    }

    fn ignored(found: &Match) -> Vec<usize> {
        found.ignored.iter().map(|(index, _)| *index).collect()
    }

    #[test]
    fn root_placed_cgroups_take_the_most_specific_selector() {
        let (set, names) = (set(), names());
        let nginx = policy_for(&set, "system.slice/nginx.service", &names, trusted);
        assert_eq!(nginx, Match { policy: Some(0), ignored: Vec::new() });
        let docker = policy_for(&set, &format!("system.slice/docker-{ID}.scope"), &names, trusted);
        assert_eq!(docker.policy, Some(1));
        assert_eq!(policy_for(&set, "system.slice/cron.service", &names, trusted).policy, Some(2));
        assert_eq!(policy_for(&set, "system.slice", &names, trusted), Match::default());
    }

    #[test]
    fn names_in_a_delegated_subtree_do_not_count() {
        let (set, names) = (set(), names());
        // user@4242.service (depth 2) is delegated: what lies below it is the user's making
        let path = "user.slice/user@4242.service/evil.slice/nginx.service";
        let forged = policy_for(&set, path, &names, delegated_at(path, 2));
        assert_eq!(forged.policy, None, "{forged:?}");
        assert_eq!(ignored(&forged), [0, 2]);
        assert_eq!(forged.ignored[0].1.reason, UntrustedReason::Owner(4242));
        let path = format!("user.slice/user@4242.service/user.slice/docker-{ID}.scope");
        let forged = policy_for(&set, &path, &names, delegated_at(&path, 2));
        assert_eq!((forged.policy, ignored(&forged)), (None, vec![1]));
        // the delegated unit itself was placed by systemd (its ancestors are root's)
        let path = "user.slice/user@4242.service";
        let unit = policy_for(&set, path, &names, delegated_at(path, 2));
        assert_eq!(unit, Match { policy: Some(2), ignored: Vec::new() });
    }

    #[test]
    fn what_the_operator_spells_out_counts() {
        let (set, names) = (set(), names());
        let path = "user.slice/user@4242.service/app.slice/nginx.service";
        let found = policy_for(&set, path, &names, delegated_at(path, 2));
        // the exact path wins; the unit name and the `**` glob are ignored there
        assert_eq!(found.policy, Some(4));
        assert_eq!(ignored(&found), [0, 2]);
        // a glob that names the delegated subtree governs what the user makes right below it
        let path = "user.slice/user@4242.service/app.slice/other.scope";
        assert_eq!(policy_for(&set, path, &names, delegated_at(path, 2)).policy, Some(3));
        assert_eq!(policy_for(&set, path, &names, delegated_at(path, 3)).policy, Some(3));
    }

    #[test]
    fn ancestors_a_selector_spells_out_are_not_examined() {
        let selector = |s: &str| Selector::Cgroup(s.to_string());
        assert_eq!(examine_from(&selector("a/b/c")), None);
        assert_eq!(examine_from(&selector("a/b/*.scope")), Some(3));
        assert_eq!(examine_from(&selector("a/**/c")), Some(2));
        assert_eq!(examine_from(&selector("**")), Some(1));
        assert_eq!(examine_from(&Selector::SystemdUnit("x.service".into())), Some(0));
        assert_eq!(examine_from(&Selector::Container("web".into())), Some(0));
    }
}
