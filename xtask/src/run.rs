//! `cargo xtask run`: the demo. Builds the daemon and runs it on the `egress-demo` cgroup.

use std::{fs, os::unix::process::CommandExt, process::Command};

use anyhow::{Context, Result};

use crate::{
    build,
    setup::{self, Scope, Verbosity},
    sys, workspace,
};

/// The cgroup config/egress.yaml names; created here, never the shell's own cgroup.
const DEMO_CGROUP: &str = "egress-demo";

/// `cargo xtask run [ARGS...]`: ARGS go to `egress run`.
pub fn run_command(extra: &[String]) -> Result<()> {
    sys::require_root("`cargo xtask run` (it loads BPF programs and creates a cgroup)")?;
    let toolchain = setup::ensure(Scope::Test, Verbosity::Summary)?;
    let bin = build::build_daemon(&toolchain)?;

    let mount = sys::cgroup2_mount()?;
    let cgroup = mount.join(DEMO_CGROUP);
    if cgroup.is_dir() {
        println!("ok: cgroup {} exists", cgroup.display());
    } else {
        fs::create_dir(&cgroup).with_context(|| format!("create the demo cgroup {}", cgroup.display()))?;
        println!("created cgroup {}", cgroup.display());
    }
    println!(
        "hint: to put a shell under the policy, run this in it as root:\n  \
         echo $$ > {}\n\
         then `curl http://127.0.0.1:8000/` is allowed and `curl http://127.0.0.2:8000/` is denied",
        cgroup.join("cgroup.procs").display()
    );

    let mut cmd = Command::new(&bin);
    cmd.arg("run");
    // Let `cargo xtask run --config other.yaml` replace the demo policy instead of clashing.
    if !extra.iter().any(|arg| arg == "--config" || arg.starts_with("--config=")) {
        cmd.arg("--config").arg(workspace::demo_config());
    }
    // The demo removes its enforcement when stopped, unless asked otherwise.
    if !extra.iter().any(|arg| arg.starts_with("--on-exit")) {
        cmd.args(["--on-exit", "detach"]);
    }
    cmd.args(extra);
    println!("running {}", sys::describe(&cmd));
    // exec: signals (Ctrl-C, SIGTERM) go straight to the daemon, and its exit status is ours.
    let err = cmd.exec();
    Err(err).with_context(|| format!("could not start {}", bin.display()))
}
