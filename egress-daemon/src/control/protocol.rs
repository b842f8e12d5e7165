//! Messages on the control socket: newline-delimited JSON over a Unix stream socket.
//!
//! The client sends one [`Request`] line and keeps its end open; the server answers with
//! [`Response`] lines, one JSON object each, and closes. `logs` with `follow` streams until the
//! client closes its end, which is how a follower says it is done.
//!
//! ```text
//! → {"request":"logs","follow":true,"blocked_only":true,"policy":null,"since_secs":300}
//! ← {"kind":"event","time":"2026-11-23T10:01:02.345Z","verdict":"blocked",...}
//! ← {"kind":"notice","message":"12 events skipped (client too slow)"}
//! ```

use serde::{Deserialize, Serialize};

use crate::{
    flows::{record::FlowLogRecord, store::TopRow},
    naming::NamedEvent,
};

/// Longest request line the server reads, newline included.
pub const MAX_REQUEST_LINE: usize = 64 * 1024;

/// What a client asks; the fields of `logs` may be left out (`{"request":"logs"}`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case")]
pub enum Request {
    Status,
    Logs {
        #[serde(default)]
        follow: bool,
        #[serde(default)]
        blocked_only: bool,
        #[serde(default)]
        policy: Option<String>,
        /// Only events of the last this many seconds.
        #[serde(default)]
        since_secs: Option<u64>,
    },
    Reload,
    /// Flow records (`egress logs --flows`).
    Flows {
        #[serde(default)]
        follow: bool,
        #[serde(default)]
        policy: Option<String>,
        #[serde(default)]
        since_secs: Option<u64>,
    },
    /// The top talkers by bytes over the last `window_secs` (`egress top`).
    Top {
        #[serde(default = "default_top_window")]
        window_secs: u64,
    },
}

fn default_top_window() -> u64 {
    60
}

/// One line of the server's answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Response {
    Status(StatusReport),
    Event(NamedEvent),
    Flow(FlowLogRecord),
    Top {
        window_secs: u64,
        rows: Vec<TopRow>,
    },
    /// Something the reader should know that is not an event (events it missed).
    Notice {
        message: String,
    },
    Reloaded {
        policies: usize,
        message: String,
    },
    /// The request failed; for a rejected reload, `FILE:LINE:COL: message`.
    Error {
        message: String,
    },
}

/// What is enforced where, right now.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct StatusReport {
    /// The policy file in force.
    pub config: String,
    /// RFC 3339 time the policies in force were loaded.
    pub loaded_at: String,
    /// How many times policies were put in force (1 after start, +1 per successful reload).
    pub generation: u32,
    /// The cgroup the programs are attached to.
    pub attach: String,
    /// Events the kernel could not deliver (ring buffer full or no daemon running).
    pub dropped_events: u64,
    /// Packets refused because the packet hook could not parse them (rule `malformed`).
    pub malformed_packets: u64,
    /// DNS queries answered SERVFAIL and TCP connections closed because their cgroup held its
    /// share of the proxy (queries upstream at once, connections open).
    pub dns_busy: u64,
    /// Upstream DNS answers that did not echo their query (id, question, letter case); each
    /// ended its query with SERVFAIL.
    pub dns_upstream_mismatches: u64,
    /// DNS answers refused with SERVFAIL because their cgroup held its quota of learned
    /// addresses (`settings.dns.max_learned_per_cgroup`); each raised a `dns-quota` event
    /// within the cgroup's event budget.
    pub dns_quota: u64,
    /// What this host's kernel lets egress guarantee, one line each (e.g. whether `AF_PACKET`
    /// sockets are refused).
    pub guarantees: Vec<String>,
    pub policies: Vec<PolicyStatus>,
    pub cgroups: Vec<CgroupStatus>,
    /// Selector matches that do not govern their cgroup: it lies where an unprivileged user could
    /// have made it under that name.
    pub ignored: Vec<IgnoredStatus>,
    /// Fill of the kernel maps that grow with policies and cgroups.
    pub maps: Vec<MapFill>,
    /// Packets and bytes of the flow records since the daemon started, per policy and workload.
    pub flow_totals: Vec<FlowTotal>,
    /// Flows the kernel's full flow table pushed out before they ended (records `evicted`).
    pub flow_evictions: u64,
    /// What the operator should know about the policies in force (a delegated subtree that no
    /// policy holds whole), one line each.
    pub warnings: Vec<String>,
    /// Cgroups a selector matches that are refused everything because they could not be bound
    /// (rule `unbindable`), with why.
    pub unbindable: Vec<UnbindableStatus>,
}

/// A cgroup refused everything for want of a binding.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct UnbindableStatus {
    pub cgroup: String,
    pub reason: String,
}

/// What the flow records of one policy and workload (else cgroup) add up to.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct FlowTotal {
    pub policy: String,
    pub workload: String,
    pub packets_out: u64,
    pub bytes_out: u64,
    pub packets_in: u64,
    pub bytes_in: u64,
}

/// Entries in use and capacity of one kernel map.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct MapFill {
    pub map: String,
    pub used: usize,
    pub capacity: u32,
}

/// One policy of the file in force.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct PolicyStatus {
    pub name: String,
    /// The selector as written: `cgroup: ...`, `systemd_unit: ...` or `container: ...`.
    pub selector: String,
    pub mode: String,
    pub default: String,
    pub rules: usize,
    /// Cgroups bound to it now.
    pub cgroups: usize,
    /// Names its cgroups asked for and were allowed, most recent first (policies with name
    /// rules only).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub names_seen: Vec<String>,
    /// Addresses its cgroups learned from DNS answers and may reach now.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub learned: Vec<LearnedStatus>,
}

/// One address a policy's cgroups learned from a DNS answer.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct LearnedStatus {
    pub address: String,
    /// The names whose answers held it.
    pub names: Vec<String>,
    /// Seconds until it expires (TTL, at least `settings.dns.min_ttl`, plus the grace).
    pub expires_in: u64,
}

/// One cgroup bound to a policy, with the flows judged there.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct CgroupStatus {
    pub cgroup: String,
    pub policy: String,
    pub mode: String,
    /// The container or systemd unit of the cgroup, where known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workload: Option<String>,
    pub allowed: u64,
    pub blocked: u64,
    pub audited: u64,
    /// Events the kernel did not write because the cgroup was over its event budget; its flows
    /// are still judged and counted above.
    pub suppressed: u64,
    /// Addresses the DNS proxy learned for the cgroup (with everything below it) that it
    /// holds now, against its quota.
    pub learned: u64,
    /// Deeper than the kernel's cgroup walk: found by its own id; unbound cgroups that deep
    /// below the same level-15 ancestor are refused everything.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub deep: bool,
}

/// A cgroup a policy's selector names that the policy does not govern, and why.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct IgnoredStatus {
    pub cgroup: String,
    pub policy: String,
    /// The selector, as in [`PolicyStatus`].
    pub selector: String,
    pub reason: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_have_a_stable_wire_form() {
        let logs = Request::Logs { follow: true, blocked_only: false, policy: Some("web".into()), since_secs: None };
        assert_eq!(
            serde_json::to_string(&logs).expect("serializes"),
            r#"{"request":"logs","follow":true,"blocked_only":false,"policy":"web","since_secs":null}"#
        );
        assert_eq!(serde_json::to_string(&Request::Status).expect("serializes"), r#"{"request":"status"}"#);
        let terse: Request = serde_json::from_str(r#"{"request":"logs"}"#).expect("defaults");
        assert_eq!(terse, Request::Logs { follow: false, blocked_only: false, policy: None, since_secs: None });
        assert!(serde_json::from_str::<Request>(r#"{"request":"reboot"}"#).is_err());
    }

    #[test]
    fn responses_round_trip() {
        let reloaded = Response::Reloaded { policies: 2, message: "2 policies".into() };
        let line = serde_json::to_string(&reloaded).expect("serializes");
        assert_eq!(line, r#"{"kind":"reloaded","policies":2,"message":"2 policies"}"#);
        let status = Response::Status(StatusReport {
            config: "/etc/egress/egress.yaml".into(),
            generation: 3,
            cgroups: vec![CgroupStatus { cgroup: "a".into(), blocked: 1, ..CgroupStatus::default() }],
            ..StatusReport::default()
        });
        let line = serde_json::to_string(&status).expect("serializes");
        assert!(line.starts_with(r#"{"kind":"status","config":"/etc/egress/egress.yaml""#), "{line}");
        match serde_json::from_str(&line).expect("parses") {
            Response::Status(report) => {
                assert_eq!(report.generation, 3);
                assert_eq!(report.cgroups[0].blocked, 1);
            }
            other => panic!("{other:?}"),
        }
    }
}
