//! The control socket: `egress status`, `egress logs` and `egress reload` talk to the running
//! daemon over a Unix socket, one JSON object per line each way.

pub mod client;
pub mod history;
pub mod protocol;
pub mod server;
