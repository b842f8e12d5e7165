//! `egress check FILE`: validate a policy file without touching the kernel.

use std::path::Path;

use super::{load_policies, Failure};
use crate::policy::compile::compile_set;

pub fn check(path: &Path) -> Result<(), Failure> {
    let set = load_policies(path)?;
    let slots: Vec<u32> = (0..set.policies.len() as u32).collect();
    compile_set(&set, &slots, 1).map_err(|error| Failure {
        status: super::EXIT_INVALID_CONFIG,
        error: anyhow::anyhow!("{}: {error}", path.display()),
    })?;
    for policy in &set.policies {
        println!("{}", policy.summary());
    }
    Ok(())
}
