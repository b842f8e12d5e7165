//! One module per subcommand of the `egress` binary.

pub mod check;
pub mod exec;
mod exec_guard;
mod exec_signals;

use std::path::Path;

use crate::policy::{model::PolicySet, parse::parse_policy_file};

/// Exit status for an invalid policy file (as `egress check` documents).
pub const EXIT_INVALID_CONFIG: i32 = 2;

/// Why a command stopped: an error to print, with the exit status to use.
#[derive(Debug)]
pub struct Failure {
    pub status: i32,
    pub error: anyhow::Error,
}

impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(error: E) -> Self {
        Self { status: 1, error: error.into() }
    }
}

/// Reads and validates a policy file; a bad file is a `FILE:LINE:COL: message` failure.
pub fn load_policies(path: &Path) -> Result<PolicySet, Failure> {
    parse_policy_file(path).map_err(|error| Failure { status: EXIT_INVALID_CONFIG, error: error.into() })
}
