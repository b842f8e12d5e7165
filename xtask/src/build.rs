//! `cargo xtask build`: the release daemon binary, kernel programs embedded.

use std::path::PathBuf;

use anyhow::{bail, Result};

use crate::{
    setup::{self, Scope, Toolchain, Verbosity},
    sys, workspace,
};

/// `cargo xtask build`.
pub fn build_command() -> Result<()> {
    let toolchain = setup::ensure(Scope::Build, Verbosity::Summary)?;
    let bin = build_daemon(&toolchain)?;
    println!("built {}", bin.display());
    Ok(())
}

/// Runs `cargo build --release -p egress-daemon` and returns the path of the binary.
pub fn build_daemon(toolchain: &Toolchain) -> Result<PathBuf> {
    sys::run(
        workspace::cargo()
            .args(["build", "--release", "-p", "egress-daemon"])
            .env("PATH", toolchain.path_env()?)
            .env("RUST_BACKTRACE", "1"),
    )?;
    let bin = workspace::egress_bin();
    if !bin.is_file() {
        bail!("the build succeeded but {} is not there", bin.display());
    }
    Ok(bin)
}
