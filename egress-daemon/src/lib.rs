//! egress: per-cgroup egress filtering on eBPF.
//!
//! Data flows one way: `policy` (file -> model -> compiled map entries) -> `loader` (kernel maps
//! and program attachment) -> kernel -> `pipeline`/`events` (ring buffer -> records) -> `output`.
//! `engine` is the control plane tying them together; `commands` are the CLI's subcommands.

pub mod cgroup;
pub mod commands;
pub mod engine;
pub mod events;
pub mod loader;
pub mod output;
pub mod pipeline;
pub mod policy;
pub mod preflight;
