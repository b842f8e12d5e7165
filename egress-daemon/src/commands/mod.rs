//! Subcommands that are more than a call into the daemon or the control client: `check` and
//! `exec`. Exit statuses are the CLI's (`main.rs`), chosen from the kind of error.

pub mod check;
pub mod exec;
mod exec_guard;
mod exec_signals;
pub mod explain;
