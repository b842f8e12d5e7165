//! The control socket: `egress status`, `egress logs` and `egress reload` talk to the running
//! daemon over a Unix socket, one JSON object per line each way. The CLI's side is
//! [`crate::client`].
//!
//! - `protocol`: the messages;
//! - `server`: the daemon's side (socket setup, access control, one task per client);
//! - `stream`: answers that send what is kept, then what comes live.

pub mod protocol;
pub mod server;
mod stream;

pub use protocol::{CgroupStatus, PolicyStatus, Request, Response, StatusReport};
pub use server::{serve, ControlHandler, ReloadError, ServerHandle};
