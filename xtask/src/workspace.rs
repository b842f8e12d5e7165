//! Where things are in the repository, and how to call the workspace's cargo.

use std::{
    env,
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
};

/// The repository root (the directory holding the workspace `Cargo.toml`).
pub fn root() -> PathBuf {
    // Prefer the runtime value `cargo run` sets: the compile-time one goes stale if the checkout
    // moves while the xtask binary stays fresh.
    let manifest_dir =
        env::var_os("CARGO_MANIFEST_DIR").map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
    manifest_dir.parent().map_or_else(|| manifest_dir.clone(), Path::to_path_buf)
}

/// Cargo's target directory for the workspace, honouring `CARGO_TARGET_DIR`.
pub fn target_dir() -> PathBuf {
    match env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() {
                dir
            } else {
                env::current_dir().map_or(dir.clone(), |cwd| cwd.join(&dir))
            }
        }
        _ => root().join("target"),
    }
}

/// The daemon binary `cargo build --release -p egress-daemon` produces.
pub fn egress_bin() -> PathBuf {
    target_dir().join("release").join("egress")
}

/// The example policy `cargo xtask run` starts the daemon with.
pub fn demo_config() -> PathBuf {
    root().join("config").join("egress.yaml")
}

/// The cargo that runs this xtask (rustup's), started in the repository root.
pub fn cargo() -> Command {
    let program = env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
    let mut cmd = Command::new(program);
    cmd.current_dir(root());
    cmd
}
