//! Flow records as shown to people and machines: one per flow per `settings.flow_interval`,
//! with field names close to AWS VPC Flow Logs.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::SystemTime,
};

use egress_common::{family, verdict};
use serde::{Deserialize, Serialize};

use crate::printable::timestamp;

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
    /// The domain a name rule allowed the flow for (the DNS proxy learned the address from its
    /// answer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
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
