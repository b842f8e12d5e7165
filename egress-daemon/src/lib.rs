//! egress: per-cgroup egress filtering on eBPF.
//!
//! Data flows one way: `policy` (file -> model -> compiled map entries) -> `loader` (kernel maps,
//! program attachment, pinning) -> kernel -> `pipeline`/`events` (ring buffer -> records) ->
//! `output` and `control` (history, live logs). `engine` is the control plane that keeps the
//! kernel in step with the policy file, `discovery` and `matching` decide which cgroups each
//! policy governs, `daemon` runs it all, `commands` and `control::client` are the CLI.

pub mod cgroup;
pub mod commands;
pub mod control;
pub mod daemon;
pub mod discovery;
pub mod dns;
pub mod engine;
pub mod events;
pub mod fault;
pub mod generation;
pub mod loader;
pub mod matching;
pub mod metrics;
pub mod output;
pub mod pipeline;
pub mod policy;
pub mod preflight;
pub mod service;
