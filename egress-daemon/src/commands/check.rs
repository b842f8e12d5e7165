//! `egress check FILE`: validate a policy file without touching the kernel.

use std::path::Path;

use crate::{policy::validate::validate_policy_file, printable::escaped};

/// Prints one summary line per policy; a rejected file is a [`crate::policy::ConfigError`].
pub fn check(path: &Path) -> anyhow::Result<()> {
    let set = validate_policy_file(path)?;
    for policy in &set.policies {
        println!("{}", escaped(&policy.summary()));
    }
    Ok(())
}
