//! Prometheus metrics over HTTP (opt-in with `settings.metrics`), in the text exposition format.
//! Values are read from the kernel maps at scrape time, so scrapes cost nothing in between.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::SocketAddr,
    sync::atomic::{AtomicU64, Ordering},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
    task::JoinHandle,
};

use crate::daemon::Daemon;

static RELOADS: AtomicU64 = AtomicU64::new(0);
static RELOAD_FAILURES: AtomicU64 = AtomicU64::new(0);

pub fn count_reload(ok: bool) {
    RELOADS.fetch_add(1, Ordering::Relaxed);
    if !ok {
        RELOAD_FAILURES.fetch_add(1, Ordering::Relaxed);
    }
}

/// Stops serving when dropped.
pub struct MetricsServer(JoinHandle<()>);

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.0.abort();
    }
}

pub async fn serve(address: SocketAddr, daemon: Daemon) -> std::io::Result<MetricsServer> {
    let listener = TcpListener::bind(address).await?;
    tracing::info!(%address, "serving Prometheus metrics at /metrics");
    Ok(MetricsServer(tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let daemon = daemon.clone();
            tokio::spawn(async move {
                let mut request = [0u8; 1024];
                let n = stream.read(&mut request).await.unwrap_or(0);
                let head = String::from_utf8_lossy(&request[..n]);
                let response = if head.starts_with("GET /metrics") {
                    // Reading the counters waits for the engine's lock: off the runtime.
                    let Ok(body) = tokio::task::spawn_blocking(move || render(&daemon)).await else { return };
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    )
                } else {
                    "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_string()
                };
                let _ = stream.write_all(response.as_bytes()).await;
            });
        }
    })))
}

/// The metrics text, e.g. `egress_flows_total{policy="web",verdict="blocked"} 3`.
pub fn render(daemon: &Daemon) -> String {
    let mut flows: BTreeMap<(String, &str), u64> = BTreeMap::new();
    let mut bound: BTreeMap<String, u64> = BTreeMap::new();
    let mut suppressed: BTreeMap<String, u64> = BTreeMap::new();
    let mut state = daemon.engine.state();
    let bindings: Vec<(u64, String)> = state
        .active
        .as_ref()
        .map(|active| {
            active
                .bound
                .iter()
                .filter_map(|(id, b)| active.set.policies.get(b.policy).map(|p| (*id, p.name.clone())))
                .collect()
        })
        .unwrap_or_default();
    for (cgroup_id, policy) in bindings {
        *bound.entry(policy.clone()).or_default() += 1;
        if let Ok(stats) = state.enforcer.cgroup_stats(cgroup_id) {
            *flows.entry((policy.clone(), "allowed")).or_default() += stats.allowed;
            *flows.entry((policy.clone(), "blocked")).or_default() += stats.blocked;
            *flows.entry((policy.clone(), "audit")).or_default() += stats.audited;
            *suppressed.entry(policy).or_default() += stats.suppressed;
        }
    }
    let dropped = state.enforcer.dropped_events().map(|(total, _)| total).unwrap_or(0);
    let fill = state.enforcer.map_fill();
    drop(state);

    let mut out = String::new();
    header(&mut out, "egress_flows_total", "counter", "Flow decisions per policy and verdict.");
    for ((policy, verdict), value) in &flows {
        let _ = writeln!(out, "egress_flows_total{{policy=\"{}\",verdict=\"{verdict}\"}} {value}", escape(policy));
    }
    header(
        &mut out,
        "egress_events_suppressed_total",
        "counter",
        "Flow events not written because a cgroup was over its event budget (per cgroup: egress status).",
    );
    for (policy, value) in &suppressed {
        let _ = writeln!(out, "egress_events_suppressed_total{{policy=\"{}\"}} {value}", escape(policy));
    }
    header(&mut out, "egress_cgroups_bound", "gauge", "Cgroups bound to each policy.");
    for (policy, value) in &bound {
        let _ = writeln!(out, "egress_cgroups_bound{{policy=\"{}\"}} {value}", escape(policy));
    }
    header(&mut out, "egress_events_dropped_total", "counter", "Flow events the ring buffer had to drop.");
    let _ = writeln!(out, "egress_events_dropped_total {dropped}");
    header(&mut out, "egress_map_entries", "gauge", "Entries in use in each kernel map.");
    for (map, used, _) in &fill {
        let _ = writeln!(out, "egress_map_entries{{map=\"{map}\"}} {used}");
    }
    header(&mut out, "egress_map_capacity", "gauge", "Capacity of each kernel map.");
    for (map, _, capacity) in &fill {
        let _ = writeln!(out, "egress_map_capacity{{map=\"{map}\"}} {capacity}");
    }
    let totals = daemon.flows.totals();
    let counters = [
        ("egress_flow_bytes_out_total", "IP bytes sent, headers included, per policy and workload (flow records).", 0),
        ("egress_flow_packets_out_total", "Packets sent per policy and workload (flow records).", 1),
        ("egress_flow_bytes_in_total", "IP bytes received per policy and workload (flow records).", 2),
        ("egress_flow_packets_in_total", "Packets received per policy and workload (flow records).", 3),
    ];
    for (name, help, which) in counters {
        header(&mut out, name, "counter", help);
        for ((policy, workload), t) in &totals {
            let value = [t.bytes_out, t.packets_out, t.bytes_in, t.packets_in][which];
            let _ = writeln!(out, "{name}{{policy=\"{}\",workload=\"{}\"}} {value}", escape(policy), escape(workload));
        }
    }
    header(&mut out, "egress_reloads_total", "counter", "Policy reloads attempted.");
    let _ = writeln!(out, "egress_reloads_total {}", RELOADS.load(Ordering::Relaxed));
    header(&mut out, "egress_reload_failures_total", "counter", "Policy reloads rejected.");
    let _ = writeln!(out, "egress_reload_failures_total {}", RELOAD_FAILURES.load(Ordering::Relaxed));
    out
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}
