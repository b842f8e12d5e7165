//! Flow records as shown to people and machines: one per flow per `settings.flow_interval`,
//! with field names close to AWS VPC Flow Logs.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::SystemTime,
};

use egress_common::{family, verdict};
use serde::{Deserialize, Serialize};

use crate::{events::timestamp, printable::escaped};

/// One flow over one interval (or until it ended).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowLogRecord {
    /// RFC 3339, UTC: start of the interval (the flow's start for its first record).
    pub start: String,
    /// End of the interval: the flow's last packet or its end for the last record.
    pub end: String,
    /// The same instant as `end`, for filtering; not part of the wire format.
    #[serde(skip, default = "unix_epoch")]
    pub end_at: SystemTime,
    /// `ACCEPT`, or `AUDIT` for a flow a policy in audit mode would have refused.
    pub action: String,
    /// `interim` while the flow goes on, `end` for its last record.
    pub status: String,
    pub protocol: String,
    /// The local end; `0.0.0.0`/`::` and port 0 until a packet showed it.
    pub srcaddr: IpAddr,
    pub srcport: u16,
    pub dstaddr: IpAddr,
    pub dstport: u16,
    pub packets_out: u64,
    pub bytes_out: u64,
    pub packets_in: u64,
    pub bytes_in: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<String>,
    pub cgroup: String,
    pub policy: String,
    pub rule: String,
    pub comm: String,
    /// 0 when the hook that opened the flow did not know the process.
    pub pid: u32,
    pub uid: u32,
}

fn unix_epoch() -> SystemTime {
    SystemTime::UNIX_EPOCH
}

impl FlowLogRecord {
    /// `2026-11-23T10:00:00.000Z..2026-11-23T10:01:00.000Z ACCEPT tcp 10.0.0.2:40312 -> 10.0.0.1:443 out 12/3400 in 10/51234 curl[42] uid=0 cgroup=web policy=web rule="allow 10.0.0.0/8" end`
    pub fn text_line(&self) -> String {
        format!(
            "{}..{} {:<6} {:<5} {} -> {} out {}/{} in {}/{} {}[{}] uid={} cgroup={}{} policy={} rule=\"{}\" {}",
            self.start,
            self.end,
            self.action,
            self.protocol,
            endpoint(self.srcaddr, self.srcport),
            endpoint(self.dstaddr, self.dstport),
            self.packets_out,
            self.bytes_out,
            self.packets_in,
            self.bytes_in,
            escaped(&self.comm),
            self.pid,
            self.uid,
            escaped(&self.cgroup),
            self.workload.as_deref().map(|w| format!(" workload={}", escaped(w))).unwrap_or_default(),
            escaped(&self.policy),
            escaped(&self.rule),
            self.status,
        )
    }
}

pub fn endpoint(addr: IpAddr, port: u16) -> String {
    match (addr, port) {
        (addr, 0) => addr.to_string(),
        (IpAddr::V6(addr), port) => format!("[{addr}]:{port}"),
        (IpAddr::V4(addr), port) => format!("{addr}:{port}"),
    }
}

pub fn action_name(value: u8) -> &'static str {
    match value {
        verdict::AUDIT => "AUDIT",
        _ => "ACCEPT",
    }
}

pub fn address(fam: u8, bytes: [u8; 16]) -> IpAddr {
    if fam == family::INET6 {
        IpAddr::V6(Ipv6Addr::from(bytes))
    } else {
        let [a, b, c, d, ..] = bytes;
        IpAddr::V4(Ipv4Addr::new(a, b, c, d))
    }
}

/// Formats for `start`/`end`.
pub fn time(at: SystemTime) -> String {
    timestamp(at)
}
