//! `egress check FILE`: validate a policy file without touching the kernel.

use std::path::Path;

use super::{Failure, EXIT_INVALID_CONFIG};
use crate::{output::escaped, policy::validate::validate_policy_file};

pub fn check(path: &Path) -> Result<(), Failure> {
    let set =
        validate_policy_file(path).map_err(|error| Failure { status: EXIT_INVALID_CONFIG, error: error.into() })?;
    for policy in &set.policies {
        println!("{}", escaped(&policy.summary()));
    }
    Ok(())
}
