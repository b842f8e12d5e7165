//! How events and flow records look as text lines, for the daemon's sinks and the CLI alike
//! (JSON is their serde form, through [`crate::printable::json_bytes`]).

use std::net::IpAddr;

use crate::{flows::record::FlowLogRecord, naming::NamedEvent, printable::escaped};

/// How events are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// `2026-11-23T10:01:02.345Z BLOCKED  tcp 127.0.0.2:80 curl[1234] uid=0 cgroup=egress-demo policy=demo rule="deny 127.0.0.0/8"`
pub fn event_line(r: &NamedEvent) -> String {
    let destination = endpoint(r.dst, r.dport);
    format!(
        "{} {:<7} {:<5} {} {}[{}] uid={} cgroup={}{} policy={} rule=\"{}\"{}",
        r.time,
        r.verdict.to_uppercase(),
        r.protocol,
        destination,
        escaped(&r.comm),
        r.pid,
        r.uid,
        escaped(&r.cgroup),
        r.workload.as_deref().map(|w| format!(" workload={}", escaped(w))).unwrap_or_default(),
        escaped(&r.policy),
        escaped(&r.rule),
        r.domain.as_deref().map(|d| format!(" domain={}", escaped(d))).unwrap_or_default()
    )
}

/// `2026-11-23T10:00:00.000Z..2026-11-23T10:01:00.000Z ACCEPT tcp 10.0.0.2:40312 -> 10.0.0.1:443 out 12/3400 in 10/51234 curl[42] uid=0 cgroup=web policy=web rule="allow 10.0.0.0/8" end`
pub fn flow_line(record: &FlowLogRecord) -> String {
    format!(
        "{}..{} {:<6} {:<5} {} -> {} out {}/{} in {}/{} {}[{}] uid={} cgroup={}{} policy={} rule=\"{}\" {}",
        record.start,
        record.end,
        record.action,
        record.protocol,
        endpoint(record.srcaddr, record.srcport),
        endpoint(record.dstaddr, record.dstport),
        record.packets_out,
        record.bytes_out,
        record.packets_in,
        record.bytes_in,
        escaped(&record.comm),
        record.pid,
        record.uid,
        escaped(&record.cgroup),
        record.workload.as_deref().map(|w| format!(" workload={}", escaped(w))).unwrap_or_default(),
        escaped(&record.policy),
        escaped(&record.rule),
        record.status,
    )
}

/// `ADDRESS:PORT` (`[V6]:PORT`), or the address alone for port 0 (protocols without ports).
pub fn endpoint(addr: IpAddr, port: u16) -> String {
    match (addr, port) {
        (addr, 0) => addr.to_string(),
        (IpAddr::V6(addr), port) => format!("[{addr}]:{port}"),
        (IpAddr::V4(addr), port) => format!("{addr}:{port}"),
    }
}
