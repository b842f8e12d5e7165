//! The event path's sinks: where named events end up. [`stdout`] writes them (stdout for `run`,
//! which the journal reads under systemd; stderr for `exec`); [`history`] keeps the recent ones
//! in memory and fans out live ones for `egress logs`.

pub mod history;
pub mod stdout;
