//! `cargo xtask test`: setup, build, then every test in the workspace.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{bail, Result};

use crate::{
    build, package,
    setup::{self, Scope, Verbosity},
    sys, workspace,
};

/// `cargo xtask test [--unit-only] [-- CARGO_TEST_ARGS...]`.
pub fn test_command(unit_only: bool, extra: &[String]) -> Result<()> {
    // Fail before minutes of building, not after.
    if !unit_only && !sys::is_root()? {
        bail!(
            "the integration tests (egress-daemon/tests/) load BPF programs and create cgroups, \
             so they need root: run `cargo xtask test` as root, or `cargo xtask test --unit-only` \
             for the unit tests alone"
        );
    }

    let mut summary = Summary::default();
    let result = run_steps(unit_only, extra, &mut summary);
    summary.print();
    result
}

fn run_steps(unit_only: bool, extra: &[String], summary: &mut Summary) -> Result<()> {
    // Unit tests need only the toolchain; the integration tests also need bpffs and the clients.
    let scope = if unit_only { Scope::Build } else { Scope::Test };
    let toolchain = summary.step("setup", || setup::ensure(scope, Verbosity::Summary))?;
    let bin = summary.step("build", || build::build_daemon(&toolchain))?;
    if !unit_only {
        // Seconds: the Debian package is built and checked with lintian, and the Kubernetes
        // manifests against the schemas, on every test run.
        summary.step("package", || {
            package::package(&bin).and_then(|deb| package::lintian(&deb)).and_then(|()| package::validate_manifests())
        })?;
    }

    let label = if unit_only { "unit tests" } else { "tests" };
    summary.step(label, || run_tests(&bin, unit_only, &toolchain, extra))
}

fn run_tests(bin: &Path, unit_only: bool, toolchain: &setup::Toolchain, extra: &[String]) -> Result<()> {
    let mut cmd = workspace::cargo();
    cmd.args(["test", "--workspace", "--release"]);
    if unit_only {
        cmd.arg("--lib");
    }
    cmd.args(extra).env("EGRESS_BIN", bin).env("PATH", toolchain.path_env()?).env("RUST_BACKTRACE", "1");
    sys::run(&mut cmd)
}

/// What ran, how long it took and how it ended, printed once at the end.
#[derive(Default)]
struct Summary {
    steps: Vec<(&'static str, Duration, Option<String>)>,
}

impl Summary {
    fn step<T>(&mut self, name: &'static str, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let started = Instant::now();
        let result = f();
        let error = result.as_ref().err().map(|err| format!("{err:#}"));
        self.steps.push((name, started.elapsed(), error));
        result
    }

    fn print(&self) {
        println!();
        println!("summary:");
        for (name, took, error) in &self.steps {
            let outcome = if error.is_some() { "FAILED" } else { "ok" };
            println!("  {name:<10} {outcome:<6} {:>7.1}s", took.as_secs_f64());
        }
        let failed = self.steps.iter().any(|(_, _, error)| error.is_some());
        println!("  {}", if failed { "FAILED" } else { "all passed" });
    }
}
