//! Flow records in Elastic Common Schema names (`--log-format ecs`, `settings.flow_log.format:
//! ecs`): what Vector, Fluent Bit, Loki and Elasticsearch take without parsing rules. The same
//! record as [`FlowLogRecord`], nested the ECS way; what ECS has no field for sits under `egress`.
//! Read back by [`from_ecs`], so replay and suggest take either format.

use std::net::IpAddr;

use egress_common::proto;
use serde::{Deserialize, Serialize};

use super::community_id::community_id;
use crate::flows::record::FlowLogRecord;

/// The ECS release whose field names these are.
pub const ECS_VERSION: &str = "8.11.0";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EcsFlow {
    #[serde(rename = "@timestamp")]
    pub timestamp: String,
    pub ecs: EcsVersion,
    pub event: Event,
    pub source: Endpoint,
    pub destination: Endpoint,
    pub network: Network,
    pub rule: RuleField,
    pub process: Process,
    pub user: User,
    pub egress: Extra,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EcsVersion {
    pub version: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub kind: String,
    pub category: Vec<String>,
    #[serde(rename = "type")]
    pub kinds: Vec<String>,
    /// `accept`, or `audit` for a flow a policy in audit mode would have refused.
    pub action: String,
    pub dataset: String,
    pub start: String,
    pub end: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    pub ip: IpAddr,
    pub port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    /// Sent by this end.
    pub bytes: u64,
    pub packets: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Network {
    /// `tcp`, `udp`, `icmp`, `ipv6-icmp`, or the protocol number.
    pub transport: String,
    pub iana_number: String,
    /// `ipv4` or `ipv6`.
    #[serde(rename = "type")]
    pub family: String,
    /// Always `egress`: every record is of a flow a covered workload opened.
    pub direction: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub community_id: Option<String>,
    pub bytes: u64,
    pub packets: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleField {
    /// The deciding rule's text, as `rule` of the default format.
    pub name: String,
    /// The policy.
    pub ruleset: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Process {
    pub pid: u32,
    pub name: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    pub id: String,
}

/// What ECS has no field for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extra {
    pub cgroup: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<String>,
    /// `interim`, `end`, `evicted`, `open`.
    pub status: String,
}

/// The IANA protocol number of a record's `protocol` (`tcp`, `udp`, `icmp`, `icmp6`,
/// `ip-proto-N`), `None` for a name it does not know.
pub fn protocol_number(name: &str) -> Option<u8> {
    match name {
        "tcp" => Some(proto::TCP),
        "udp" => Some(proto::UDP),
        "icmp" => Some(proto::ICMP),
        "icmp6" => Some(proto::ICMPV6),
        other => other.strip_prefix("ip-proto-")?.parse().ok(),
    }
}

/// The record's name of protocol `number` (inverse of [`protocol_number`]).
fn protocol_name(number: u8) -> String {
    match number {
        proto::TCP => "tcp".into(),
        proto::UDP => "udp".into(),
        proto::ICMP => "icmp".into(),
        proto::ICMPV6 => "icmp6".into(),
        other => format!("ip-proto-{other}"),
    }
}

/// ECS spells ICMPv6 as IANA does.
fn transport_name(number: u8) -> String {
    match number {
        proto::ICMPV6 => "ipv6-icmp".into(),
        proto::TCP | proto::UDP | proto::ICMP => protocol_name(number),
        other => other.to_string(),
    }
}

/// `record` in ECS names; `seed` is the Community ID seed (0 unless the other tools use another).
pub fn to_ecs(record: &FlowLogRecord, seed: u16) -> EcsFlow {
    let number = protocol_number(&record.protocol).unwrap_or(0);
    EcsFlow {
        timestamp: record.end.clone(),
        ecs: EcsVersion { version: ECS_VERSION.into() },
        event: Event {
            kind: "event".into(),
            category: vec!["network".into()],
            kinds: vec!["connection".into(), if record.status == "interim" { "info" } else { "end" }.into()],
            action: record.action.to_ascii_lowercase(),
            dataset: "egress.flow".into(),
            start: record.start.clone(),
            end: record.end.clone(),
        },
        source: Endpoint {
            ip: record.srcaddr,
            port: record.srcport,
            domain: None,
            bytes: record.bytes_out,
            packets: record.packets_out,
        },
        destination: Endpoint {
            ip: record.dstaddr,
            port: record.dstport,
            domain: record.domain.clone(),
            bytes: record.bytes_in,
            packets: record.packets_in,
        },
        network: Network {
            transport: transport_name(number),
            iana_number: number.to_string(),
            family: if record.dstaddr.to_canonical().is_ipv4() { "ipv4" } else { "ipv6" }.into(),
            direction: "egress".into(),
            community_id: community_id(
                seed,
                (record.srcaddr, record.srcport),
                (record.dstaddr, record.dstport),
                number,
            ),
            bytes: record.bytes_out.saturating_add(record.bytes_in),
            packets: record.packets_out.saturating_add(record.packets_in),
        },
        rule: RuleField { name: record.rule.clone(), ruleset: record.policy.clone() },
        process: Process { pid: record.pid, name: record.comm.clone() },
        user: User { id: record.uid.to_string() },
        egress: Extra {
            cgroup: record.cgroup.clone(),
            workload: record.workload.clone(),
            status: record.status.clone(),
        },
    }
}

/// The record an ECS line was made from (Community ID and sums dropped: they are derived).
pub fn from_ecs(flow: EcsFlow) -> FlowLogRecord {
    let number = flow.network.iana_number.parse().unwrap_or(0);
    FlowLogRecord {
        end_at: super::read::parse_time(&flow.event.end).unwrap_or(std::time::SystemTime::UNIX_EPOCH),
        start: flow.event.start,
        end: flow.event.end,
        action: flow.event.action.to_ascii_uppercase(),
        status: flow.egress.status,
        protocol: protocol_name(number),
        srcaddr: flow.source.ip,
        srcport: flow.source.port,
        dstaddr: flow.destination.ip,
        dstport: flow.destination.port,
        domain: flow.destination.domain,
        packets_out: flow.source.packets,
        bytes_out: flow.source.bytes,
        packets_in: flow.destination.packets,
        bytes_in: flow.destination.bytes,
        workload: flow.egress.workload,
        cgroup: flow.egress.cgroup,
        policy: flow.rule.ruleset,
        rule: flow.rule.name,
        comm: flow.process.name,
        pid: flow.process.pid,
        uid: flow.user.id.parse().unwrap_or(u32::MAX),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::flowlog::read::parse_time;

    pub(crate) fn sample() -> FlowLogRecord {
        FlowLogRecord {
            start: "2026-11-23T10:00:00.000Z".into(),
            end: "2026-11-23T10:01:00.000Z".into(),
            end_at: parse_time("2026-11-23T10:01:00.000Z").unwrap(),
            action: "ACCEPT".into(),
            status: "end".into(),
            protocol: "tcp".into(),
            srcaddr: "128.232.110.120".parse().unwrap(),
            srcport: 34855,
            dstaddr: "66.35.250.204".parse().unwrap(),
            dstport: 80,
            domain: Some("example.com".into()),
            packets_out: 12,
            bytes_out: 3400,
            packets_in: 10,
            bytes_in: 51234,
            workload: Some("web".into()),
            cgroup: "egress-demo".into(),
            policy: "demo".into(),
            rule: "allow example.com tcp ports 80".into(),
            comm: "curl".into(),
            pid: 42,
            uid: 0,
        }
    }

    #[test]
    fn ecs_names_and_community_id() {
        let value = serde_json::to_value(to_ecs(&sample(), 0)).unwrap();
        assert_eq!(value["source"]["ip"], "128.232.110.120");
        assert_eq!(value["destination"]["ip"], "66.35.250.204");
        assert_eq!(value["destination"]["port"], 80);
        assert_eq!(value["destination"]["domain"], "example.com");
        assert_eq!(value["destination"]["bytes"], 51234);
        assert_eq!(value["source"]["bytes"], 3400);
        assert_eq!(value["network"]["transport"], "tcp");
        assert_eq!(value["network"]["direction"], "egress");
        assert_eq!(value["network"]["community_id"], "1:LQU9qZlK+B5F3KDmev6m5PMibrg=");
        assert_eq!(value["event"]["action"], "accept");
        assert_eq!(value["rule"]["name"], "allow example.com tcp ports 80");
        assert_eq!(value["@timestamp"], "2026-11-23T10:01:00.000Z");
    }

    #[test]
    fn ecs_reads_back_to_the_record() {
        let record = sample();
        let line = serde_json::to_string(&to_ecs(&record, 0)).unwrap();
        let back = from_ecs(serde_json::from_str(&line).unwrap());
        assert_eq!(back, record);
    }
}
