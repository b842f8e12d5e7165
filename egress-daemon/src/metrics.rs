//! Prometheus metrics over HTTP (opt-in with `settings.metrics`): a view of the same snapshot
//! `egress status` shows, taken at scrape time, so scrapes cost nothing in between.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

use http_body_util::Full;
use hyper::{
    body::Bytes, header::CONTENT_TYPE, server::conn::http1, service::service_fn, Request, Response, StatusCode,
};
use hyper_util::rt::TokioIo;
use prometheus_client::{
    encoding::{text::encode, EncodeLabelSet},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio::{net::TcpListener, task::JoinHandle};

use crate::control::protocol::StatusReport;

static RELOADS: AtomicU64 = AtomicU64::new(0);
static RELOAD_FAILURES: AtomicU64 = AtomicU64::new(0);

const CONTENT: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

pub fn count_reload(ok: bool) {
    RELOADS.fetch_add(1, Ordering::Relaxed);
    if !ok {
        RELOAD_FAILURES.fetch_add(1, Ordering::Relaxed);
    }
}

/// Takes the snapshot a scrape reports; it may block (it reads the kernel maps under the
/// engine's lock), so it runs off the runtime.
pub type Snapshot = Arc<dyn Fn() -> StatusReport + Send + Sync>;

/// Stops serving when dropped.
pub struct MetricsServer(JoinHandle<()>);

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.0.abort();
    }
}

pub async fn serve(address: SocketAddr, snapshot: Snapshot) -> std::io::Result<MetricsServer> {
    let listener = TcpListener::bind(address).await?;
    tracing::info!(%address, "serving Prometheus metrics at /metrics");
    Ok(MetricsServer(tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let snapshot = snapshot.clone();
            let service = service_fn(move |request: Request<hyper::body::Incoming>| {
                let snapshot = snapshot.clone();
                async move { Ok::<_, Infallible>(answer(request.uri().path(), snapshot).await) }
            });
            tokio::spawn(async move {
                if let Err(error) = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await {
                    tracing::debug!(%error, "metrics connection");
                }
            });
        }
    })))
}

async fn answer(path: &str, snapshot: Snapshot) -> Response<Full<Bytes>> {
    let body = match path {
        "/metrics" => tokio::task::spawn_blocking(move || render(&snapshot())).await.ok(),
        _ => None,
    };
    let mut response = Response::new(Full::new(Bytes::from(body.clone().unwrap_or_default())));
    match body {
        Some(_) => drop(response.headers_mut().insert(CONTENT_TYPE, hyper::header::HeaderValue::from_static(CONTENT))),
        None => *response.status_mut() = StatusCode::NOT_FOUND,
    }
    response
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PolicyLabel {
    policy: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VerdictLabels {
    policy: String,
    verdict: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WorkloadLabels {
    policy: String,
    workload: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MapLabel {
    map: String,
}

/// The metrics text (OpenMetrics), e.g. `egress_flows_total{policy="web",verdict="blocked"} 3`.
pub fn render(report: &StatusReport) -> String {
    let mut registry = Registry::default();
    let flows = Family::<VerdictLabels, Counter>::default();
    let suppressed = Family::<PolicyLabel, Counter>::default();
    let bound = Family::<PolicyLabel, Gauge>::default();
    let mut per_policy: BTreeMap<&str, [u64; 4]> = BTreeMap::new();
    for cgroup in &report.cgroups {
        let sums = per_policy.entry(&cgroup.policy).or_default();
        for (sum, value) in sums.iter_mut().zip([cgroup.allowed, cgroup.blocked, cgroup.audited, cgroup.suppressed]) {
            *sum += value;
        }
        bound.get_or_create(&PolicyLabel { policy: cgroup.policy.clone() }).inc();
    }
    for (policy, [allowed, blocked, audited, dropped]) in per_policy {
        for (verdict, value) in [("allowed", allowed), ("blocked", blocked), ("audit", audited)] {
            let labels = VerdictLabels { policy: policy.to_owned(), verdict: verdict.to_owned() };
            flows.get_or_create(&labels).inc_by(value);
        }
        suppressed.get_or_create(&PolicyLabel { policy: policy.to_owned() }).inc_by(dropped);
    }
    registry.register("egress_flows", "Flow decisions per policy and verdict", flows);
    registry.register(
        "egress_events_suppressed",
        "Flow events not written because a cgroup was over its event budget (per cgroup: egress status)",
        suppressed,
    );
    registry.register("egress_cgroups_bound", "Cgroups bound to each policy", bound);
    registry.register(
        "egress_events_dropped",
        "Flow events the ring buffer had to drop",
        counter(report.dropped_events),
    );
    registry.register(
        "egress_flow_evictions",
        "Flows the kernel's full flow table pushed out before they ended (their records say evicted)",
        counter(report.flow_evictions),
    );
    registry.register(
        "egress_cgroups_unbindable",
        "Cgroups a selector matches that are refused everything because they could not be bound",
        gauge(report.unbindable.len()),
    );
    registry.register(
        "egress_malformed_packets",
        "Packets of covered sockets refused because the packet hook could not parse them",
        counter(report.malformed_packets),
    );
    registry.register(
        "egress_dns_busy",
        "DNS queries answered SERVFAIL and TCP connections closed because their cgroup held its share of the proxy",
        counter(report.dns_busy),
    );
    registry.register(
        "egress_dns_upstream_mismatches",
        "Upstream DNS answers that did not echo their query (id, question, letter case); each ended its query",
        counter(report.dns_upstream_mismatches),
    );
    registry.register(
        "egress_dns_quota",
        "DNS answers refused with SERVFAIL because their cgroup held its quota of learned addresses",
        counter(report.dns_quota),
    );
    let entries = Family::<MapLabel, Gauge>::default();
    let capacity = Family::<MapLabel, Gauge>::default();
    for fill in &report.maps {
        let label = MapLabel { map: fill.map.clone() };
        entries.get_or_create(&label).set(i64::try_from(fill.used).unwrap_or(i64::MAX));
        capacity.get_or_create(&label).set(i64::from(fill.capacity));
    }
    registry.register("egress_map_entries", "Entries in use in each kernel map", entries);
    registry.register("egress_map_capacity", "Capacity of each kernel map", capacity);
    let flow_counters = [
        ("egress_flow_bytes_out", "IP bytes sent (headers included) per policy and workload, from flow records"),
        ("egress_flow_packets_out", "Packets sent per policy and workload, from flow records"),
        ("egress_flow_bytes_in", "IP bytes received per policy and workload, from flow records"),
        ("egress_flow_packets_in", "Packets received per policy and workload, from flow records"),
    ];
    for (index, (name, help)) in flow_counters.into_iter().enumerate() {
        let family = Family::<WorkloadLabels, Counter>::default();
        for total in &report.flow_totals {
            let labels = WorkloadLabels { policy: total.policy.clone(), workload: total.workload.clone() };
            let value = [total.bytes_out, total.packets_out, total.bytes_in, total.packets_in][index];
            family.get_or_create(&labels).inc_by(value);
        }
        registry.register(name, help, family);
    }
    registry.register("egress_reloads", "Policy reloads attempted", counter(RELOADS.load(Ordering::Relaxed)));
    registry.register(
        "egress_reload_failures",
        "Policy reloads rejected",
        counter(RELOAD_FAILURES.load(Ordering::Relaxed)),
    );
    let mut out = String::new();
    if let Err(error) = encode(&mut out, &registry) {
        tracing::warn!(%error, "encoding the metrics");
    }
    out
}

fn gauge(value: usize) -> Gauge {
    let gauge = Gauge::default();
    gauge.set(i64::try_from(value).unwrap_or(i64::MAX));
    gauge
}

fn counter(value: u64) -> Counter {
    let counter = Counter::default();
    counter.inc_by(value);
    counter
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::protocol::{CgroupStatus, MapFill};

    #[test]
    fn sums_cgroups_per_policy() {
        let cgroup = |name: &str, policy: &str, blocked| CgroupStatus {
            cgroup: name.into(),
            policy: policy.into(),
            blocked,
            ..CgroupStatus::default()
        };
        let report = StatusReport {
            dropped_events: 4,
            malformed_packets: 6,
            dns_busy: 2,
            dns_upstream_mismatches: 3,
            dns_quota: 4,
            cgroups: vec![cgroup("a", "web", 2), cgroup("b", "web", 3), cgroup("c", "db", 1)],
            maps: vec![MapFill { map: "RULES_V4".into(), used: 7, capacity: 9 }],
            ..StatusReport::default()
        };
        let text = render(&report);
        for line in [
            "egress_flows_total{policy=\"web\",verdict=\"blocked\"} 5",
            "egress_flows_total{policy=\"db\",verdict=\"blocked\"} 1",
            "egress_cgroups_bound{policy=\"web\"} 2",
            "egress_events_dropped_total 4",
            "egress_malformed_packets_total 6",
            "egress_dns_busy_total 2",
            "egress_dns_upstream_mismatches_total 3",
            "egress_dns_quota_total 4",
            "egress_map_entries{map=\"RULES_V4\"} 7",
            "egress_map_capacity{map=\"RULES_V4\"} 9",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
    }
}
