//! egress: per-cgroup egress filtering on eBPF.
//!
//! Data flows one way: `policy` (file -> model -> compiled map entries) -> `kernel` (programs, maps,
//! pins, probes) -> the kernel judges flows -> the event path, run by `pipeline`: source (the
//! kernel's event ring) -> `naming` (raw events become `NamedEvent`s) -> `pipeline::budget` ->
//! `sinks` (`stdout`, which the journal reads under systemd, and `history`), which `control`
//! serves to clients. Flow records take their own path (`flows`: counters -> records -> the
//! in-memory log). `format` is how events and records look as lines, for the sinks and the CLI.
//! `engine` is the control plane that keeps the kernel in step with the policy file, `discovery`
//! and `matching` decide which cgroups each policy governs, `daemon` runs it all; `commands`
//! (`check`, `exec`) and `client` (every command that talks to the daemon) are the CLI. The
//! policy file is read with `yaml` (positions for every error); its `settings:` are the daemon's
//! configuration, in `settings`.
//!
//! Errors: a module that can fail in its own terms returns its own typed error (`thiserror`),
//! whose message is the one the user reads: `yaml::ConfigError` (`FILE:LINE:COL: message`, built
//! from the values' `policy::values::ValueError`, `settings::SettingError`, ...),
//! `kernel::KernelError`, `cgroup::CgroupError`, `features::Refusal`, `control::ReloadError`,
//! `client::ControlError`. `anyhow`, with `.context(...)` naming the step, is for the
//! code that puts those together and reports them: starting the daemon and its services (`daemon`,
//! `engine::Engine::load`/`apply`, the DNS proxy's and the control socket's start), the commands
//! (`commands`, `control::client`) and `main.rs`, which picks the exit status from the typed
//! error it finds in the chain.

#![cfg_attr(not(test), warn(clippy::unwrap_used))]

pub mod cgroup;
pub mod client;
pub(crate) mod clock;
pub mod commands;
pub mod control;
pub mod daemon;
pub mod discovery;
pub(crate) mod dns;
pub(crate) mod engine;
pub(crate) mod fault;
pub(crate) mod features;
pub mod flowlog;
pub mod flows;
pub mod format;
pub(crate) mod generation;
pub mod kernel;
pub(crate) mod matching;
pub(crate) mod metrics;
pub(crate) mod naming;
pub(crate) mod pipeline;
pub mod policy;
pub mod printable;
pub mod service;
pub mod settings;
pub(crate) mod sinks;
pub(crate) mod yaml;

/// What `egress --version` prints after the name: the release, the build of the embedded kernel
/// programs and the oldest Linux they run on (the preflight's own minimum).
pub fn version() -> String {
    format!(
        "{} (kernel programs {}, Linux {} or later)",
        env!("CARGO_PKG_VERSION"),
        kernel::PROGRAMS_BUILD,
        features::MINIMUM
    )
}
