//! Selectors that reach into a user's delegated subtree without holding the whole of it.
//!
//! systemd delegates `user@UID.service` to its user: they may create cgroups anywhere below it
//! and move their own processes between them (`systemd-run --user`, `mkdir` + `cgroup.procs`).
//! A policy bound below that root (`.../user@1000.service/app.slice/*`) then holds only the
//! processes the user leaves where the selector looks; the others run under the nearest bound
//! ancestor, or unfiltered. Only a policy at or above the delegation root holds the user. This
//! is the file-level check `egress check` runs (by the systemd naming convention); the daemon
//! checks the live tree by ownership (`egress status`).

use super::model::{cgroup_glob_matches, PolicySet, Selector};

/// One warning per selector whose matches lie inside a delegated subtree that no selector of the
/// file covers at or above its root.
pub fn uncovered_delegations(set: &PolicySet) -> Vec<String> {
    let mut warnings = Vec::new();
    for policy in &set.policies {
        let Selector::Cgroup(pattern) = &policy.selector else { continue };
        let Some(root) = delegation_root(pattern) else { continue };
        if !covered(set, &root) {
            warnings.push(uncovered(&policy.name, pattern, &root));
        }
    }
    warnings
}

/// The warning for a policy bound inside the delegated subtree `root` that nothing covers.
pub fn uncovered(policy: &str, selected: &str, root: &str) -> String {
    format!(
        "policy `{policy}` selects `{selected}` inside `{root}`, a subtree delegated to its user, and no policy \
         is bound at or above `{root}`: the user can move their processes to cgroups there that the selector \
         does not match, and those run unfiltered; bind a policy to `{root}` (or an ancestor) to hold them"
    )
}

/// The `user@UID.service` prefix of a pattern that goes below it.
fn delegation_root(pattern: &str) -> Option<String> {
    let components: Vec<&str> = pattern.split('/').filter(|c| !c.is_empty()).collect();
    let at = components.iter().position(|c| is_user_manager(c))?;
    (at + 1 < components.len()).then(|| components[..=at].join("/"))
}

fn is_user_manager(component: &str) -> bool {
    component
        .strip_prefix("user@")
        .and_then(|rest| rest.strip_suffix(".service"))
        .is_some_and(|uid| !uid.is_empty() && uid.bytes().all(|b| b.is_ascii_digit()))
}

/// Whether some selector binds `root` or one of its ancestors (the root cgroup aside: the
/// attach point is the operator's, and a policy there holds everything below it).
fn covered(set: &PolicySet, root: &str) -> bool {
    let components: Vec<&str> = root.split('/').collect();
    (1..=components.len()).any(|depth| {
        let ancestor = components[..depth].join("/");
        let unit = components[depth - 1];
        set.policies.iter().any(|policy| match &policy.selector {
            Selector::Cgroup(pattern) => cgroup_glob_matches(pattern, &ancestor),
            Selector::SystemdUnit(name) => name == unit,
            Selector::Container(_) => false,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::parse_policy_str;

    fn warnings(policies: &str) -> Vec<String> {
        let set = parse_policy_str(&format!("policies:\n{policies}"), "test.yaml").expect("valid");
        uncovered_delegations(&set)
    }

    const APPS: &str = "  - name: apps\n    cgroup: user.slice/user-1000.slice/user@1000.service/app.slice/*\n";

    #[test]
    fn a_selector_below_a_user_manager_alone_is_warned_about() {
        let found = warnings(APPS);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].contains("inside `user.slice/user-1000.slice/user@1000.service`"), "{}", found[0]);
    }

    #[test]
    fn a_policy_at_or_above_the_root_covers_it() {
        for cover in [
            "  - name: user\n    cgroup: user.slice/user-1000.slice/user@1000.service\n",
            "  - name: users\n    cgroup: user.slice\n",
            "  - name: all\n    cgroup: user.slice/*/user@*.service\n",
            "  - name: unit\n    systemd_unit: user@1000.service\n",
        ] {
            assert!(warnings(&format!("{APPS}{cover}")).is_empty(), "{cover}");
        }
    }

    #[test]
    fn the_root_itself_and_other_paths_are_not_warned_about() {
        assert!(warnings("  - name: user\n    cgroup: user.slice/user-1000.slice/user@1000.service\n").is_empty());
        assert!(warnings("  - name: web\n    cgroup: system.slice/nginx.service\n").is_empty());
        assert!(warnings("  - name: odd\n    cgroup: user.slice/user@x.service/a\n").is_empty());
    }
}
