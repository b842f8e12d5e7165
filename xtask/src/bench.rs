//! `cargo xtask bench`: a placeholder until the benchmarks exist.

use anyhow::{bail, Result};

/// `cargo xtask bench`.
pub fn bench_command() -> Result<()> {
    bail!("`cargo xtask bench` is not yet implemented")
}
