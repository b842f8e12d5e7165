//! Messages on the control socket: one request line from the client, response lines back.

use serde::{Deserialize, Serialize};

use crate::events::FlowRecord;

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case")]
pub enum Request {
    Status,
    Logs { follow: bool, blocked_only: bool, policy: Option<String>, since_secs: Option<u64> },
    Reload,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Response {
    Status(StatusReport),
    Event(FlowRecord),
    Notice { message: String },
    Reloaded { message: String },
    Error { message: String },
}

/// What is enforced where, right now.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StatusReport {
    pub config: String,
    pub loaded_at: String,
    pub attach: String,
    pub dropped_events: u64,
    pub policies: Vec<PolicyStatus>,
    pub cgroups: Vec<CgroupStatus>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PolicyStatus {
    pub name: String,
    pub selector: String,
    pub mode: String,
    pub default: String,
    pub rules: usize,
    pub cgroups: usize,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CgroupStatus {
    pub cgroup: String,
    pub policy: String,
    pub mode: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<String>,
    pub allowed: u64,
    pub blocked: u64,
    pub audited: u64,
}
