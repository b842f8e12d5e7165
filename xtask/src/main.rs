//! `cargo xtask`: the developer entry point for egress (setup, build, package, test, run, bench,
//! vm-test).
//!
//! Everything here shells out to the same tools a person would type; the value is in doing the
//! steps in the right order with the right environment on a fresh Debian machine.

#![cfg_attr(not(test), warn(clippy::unwrap_used))]

mod bench;
mod build;
mod package;
mod run;
mod setup;
mod sys;
mod test;
mod vm;
mod workspace;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Developer tasks for egress.
#[derive(Debug, Parser)]
#[command(name = "cargo xtask", bin_name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Install what the build and the tests need on Debian 12 (idempotent; needs root).
    Setup {
        /// Also install the tools `cargo xtask bench` compares against.
        #[arg(long)]
        bench: bool,
    },
    /// Check the toolchain, then build target/release/egress.
    Build,
    /// Build, then make the Debian package target/package/egress_VERSION_ARCH.deb (with
    /// dpkg-deb) and check it with lintian.
    Package,
    /// Set up, build, then run the unit and integration tests (integration tests need root).
    Test {
        /// Run only the unit tests (`--lib`); the only way to test without root.
        #[arg(long)]
        unit_only: bool,
        /// Passed to `cargo test` as they are, e.g. `-- connect4 -- --nocapture`.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Set up, build, create the demo cgroup and run the daemon with config/egress.yaml.
    Run {
        /// Passed to `egress run`, e.g. `--log-format json`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Set up, build, then measure egress against no filter, nftables, iptables, ipset and a
    /// reference BPF filter (needs root; writes target/bench/ and, after a full run, BENCH.md).
    Bench {
        /// The smoke subset CI runs (under two minutes): no filter, egress and nftables at N = 0
        /// and 1000, one short run each. Not run by `cargo xtask test`.
        #[arg(long)]
        quick: bool,
    },
    /// Set up, build, then boot each kernel under QEMU with the daemon and a functional suite,
    /// and print a kernel x check table (kernels are fetched from Debian once and cached).
    VmTest {
        /// Kernel series to test (default: 5.10 6.1 6.12 6.18).
        kernels: Vec<String>,
        /// Guests booted at once (default: one per CPU).
        #[arg(long)]
        jobs: Option<usize>,
        /// Seconds one guest may take before it is stopped and its missing checks fail.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
        /// Write the table into KERNELS.md (between its generated-section markers).
        #[arg(long)]
        write_doc: bool,
        /// Skip the systemd guest (a Debian root file system running the README's service steps).
        #[arg(long)]
        no_service: bool,
        /// Boot only the systemd guest: install the Debian package and run the README's service
        /// steps (no kernel matrix).
        #[arg(long, conflicts_with_all = ["no_service", "kernels", "write_doc"])]
        service_only: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Task::Setup { bench } => setup::setup_command(bench),
        Task::Build => build::build_command(),
        Task::Package => package::package_command(),
        Task::Test { unit_only, args } => test::test_command(unit_only, &args),
        Task::Run { args } => run::run_command(&args),
        Task::Bench { quick } => bench::bench_command(quick),
        Task::VmTest { kernels, jobs, timeout, write_doc, no_service, service_only } => {
            vm::vm_test_command(vm::Options {
                kernels,
                jobs,
                timeout: std::time::Duration::from_secs(timeout),
                write_doc,
                service: !no_service,
                service_only,
            })
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
