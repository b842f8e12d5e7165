//! `egress check FILE`: validate a policy file without touching the kernel.

use std::path::Path;

use crate::{
    policy::{delegation::uncovered_delegations, validate::validate_policy_file},
    printable::escaped,
};

/// Prints one summary line per policy, and warnings (which do not reject the file) on stderr;
/// a rejected file is a [`crate::policy::ConfigError`].
pub fn check(path: &Path) -> anyhow::Result<()> {
    let set = validate_policy_file(path)?;
    for policy in &set.policies {
        println!("{}", escaped(&policy.summary()));
    }
    for warning in uncovered_delegations(&set) {
        eprintln!("{}: warning: {}", path.display(), escaped(&warning));
    }
    Ok(())
}
