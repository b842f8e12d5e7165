//! Domain names in policies: the DNS proxy the kernel steers covered cgroups' DNS to, and what
//! it learned. See `egress-ebpf/src/dns.rs` for the kernel side.
//!
//! The proxy runs on a runtime of its own (two threads), so a flood of queries cannot slow the
//! daemon's control socket, reloads or event output, and the map writes it makes never block
//! the daemon's runtime.

pub mod book;
pub mod budget;
pub mod echo;
pub mod message;
pub mod proxy;
pub mod quota;
pub mod shares;
mod state;
pub mod status;
pub mod upstream;
pub mod view;

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{Arc, Mutex},
    thread,
    time::Duration,
};

use anyhow::Context;

pub use self::state::DnsState;
use self::{book::Book, proxy::Proxy, view::View};
use crate::{engine::Engine, kernel::DnsMaps, settings::DnsSettings};

/// How often expired entries are removed and, after a reload, entries re-derived.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// Every this many sweeps the kernel map itself is scanned for expired entries (those an
/// earlier daemon left).
const KERNEL_SWEEP_EVERY: u32 = 30;

/// The running proxy; stops when dropped.
pub struct DnsService {
    pub port: u16,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Drop for DnsService {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            stop.send(()).ok();
        }
        if let Some(thread) = self.thread.take() {
            drop(thread.join());
        }
    }
}

/// The proxy's four sockets, all on one port (std sockets: `start` may be called from inside
/// another runtime, which may not block on the proxy's).
type Listeners = (std::net::UdpSocket, std::net::TcpListener, std::net::UdpSocket, std::net::TcpListener);

fn bind(port: u16) -> anyhow::Result<Listeners> {
    let v4 = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let udp4 = std::net::UdpSocket::bind(v4).with_context(|| format!("UDP {v4}"))?;
    // Port 0: the one the kernel picked for the first socket, for the others too.
    let port = udp4.local_addr()?.port();
    let v4 = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let v6 = SocketAddr::from((Ipv6Addr::LOCALHOST, port));
    let listeners = (
        udp4,
        std::net::TcpListener::bind(v4).with_context(|| format!("TCP {v4}"))?,
        std::net::UdpSocket::bind(v6).with_context(|| format!("UDP {v6}"))?,
        std::net::TcpListener::bind(v6).with_context(|| format!("TCP {v6}"))?,
    );
    listeners.0.set_nonblocking(true)?;
    listeners.1.set_nonblocking(true)?;
    listeners.2.set_nonblocking(true)?;
    listeners.3.set_nonblocking(true)?;
    Ok(listeners)
}

/// Binds the proxy's listeners on 127.0.0.1 and ::1 (UDP and TCP) and serves them on a thread
/// of its own; then turns steering on in the kernel. `settings.listen_port` 0 (`egress exec`,
/// whose kernel programs are its own): any free port.
pub fn start(
    settings: &DnsSettings,
    state: Arc<DnsState>,
    maps: Arc<Mutex<DnsMaps>>,
    engine: Engine,
) -> anyhow::Result<DnsService> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("egress-dns")
        .enable_all()
        .build()
        .context("starting the DNS proxy's runtime")?;
    let attempts = if settings.listen_port == 0 { 8 } else { 1 };
    let mut bound = bind(settings.listen_port);
    for _ in 1..attempts {
        if bound.is_ok() {
            break;
        }
        bound = bind(settings.listen_port);
    }
    let (udp4, tcp4, udp6, tcp6) = bound.context("settings.dns.listen_port: binding the DNS proxy")?;
    let port = udp4.local_addr().context("the DNS proxy's port")?.port();
    let resolvers = upstream::resolvers(&settings.upstream);
    if resolvers.is_empty() {
        tracing::warn!("no upstream resolver (settings.dns.upstream, /etc/resolv.conf): allowed names get SERVFAIL");
    }
    let proxy = Arc::new(Proxy {
        state: state.clone(),
        maps: maps.clone(),
        catalog: engine.shared_catalog(),
        settings: settings.clone(),
        resolvers,
        forwarded: shares::Shares::new(proxy::MAX_FORWARDED_PER_CGROUP),
        connections: shares::Shares::new(proxy::MAX_TCP_PER_CGROUP),
        quota: quota::Quota::new(settings.max_learned_per_cgroup),
    });
    // Without the namespace cookie (Linux < 5.14) nothing is steered: name rules then allow
    // nothing, and DNS is judged by the CIDR rules like any other flow (fail closed).
    if let Err(error) = maps.lock().unwrap_or_else(std::sync::PoisonError::into_inner).set_proxy_port(port) {
        tracing::error!(%error, "DNS is not steered to the proxy: name rules allow nothing on this kernel");
    }
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let thread = thread::Builder::new()
        .name("egress-dns".into())
        .spawn(move || {
            runtime.block_on(async move {
                for udp in [udp4, udp6] {
                    match tokio::net::UdpSocket::from_std(udp) {
                        Ok(socket) => drop(tokio::spawn(proxy.clone().serve_udp(socket))),
                        Err(error) => tracing::error!(%error, "DNS proxy: UDP listener"),
                    }
                }
                for tcp in [tcp4, tcp6] {
                    match tokio::net::TcpListener::from_std(tcp) {
                        Ok(listener) => drop(tokio::spawn(proxy.clone().serve_tcp(listener))),
                        Err(error) => tracing::error!(%error, "DNS proxy: TCP listener"),
                    }
                }
                tokio::spawn(sweep(state, maps));
                drop(stopped.await);
            });
            runtime.shutdown_background();
        })
        .context("starting the DNS proxy's thread")?;
    tracing::info!(port, "DNS proxy listening on 127.0.0.1 and ::1; DNS of policies with name rules is steered to it");
    Ok(DnsService { port, stop: Some(stop), thread: Some(thread) })
}

/// Removes expired entries, and re-derives entries when the policies change (rule ids, ports,
/// names no longer allowed).
async fn sweep(state: Arc<DnsState>, maps: Arc<Mutex<DnsMaps>>) {
    let mut seen_generation = state.view.generation();
    let mut round = 0u32;
    loop {
        tokio::time::sleep(SWEEP_INTERVAL).await;
        round = round.wrapping_add(1);
        let now = crate::clock::boot_ns();
        let mut maps = maps.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut book = state.book();
        for (cgroup, addr) in book.take_expired(now) {
            maps.remove(cgroup, addr);
        }
        if round.is_multiple_of(KERNEL_SWEEP_EVERY) {
            for (key, value) in maps.entries() {
                if value.expires_ns <= now {
                    maps.remove(key.cgroup, Ipv6Addr::from(key.addr));
                }
            }
        }
        let generation = state.view.generation();
        if generation != seen_generation {
            seen_generation = generation;
            rederive(&state.view, &mut book, &mut maps);
        }
    }
}

/// After a reload: each entry keeps only the names its cgroup's new policy still allows, with
/// that policy's rule ids and ports; entries left with none are removed.
fn rederive(view: &View, book: &mut Book, maps: &mut DnsMaps) {
    for (key, mut entry) in book.all() {
        let Some(names) = view.names_of(key.0) else {
            book.forget(key);
            maps.remove(key.0, key.1);
            continue;
        };
        entry.names.retain(|name| names.allows(name));
        let mut rules = Vec::new();
        for name in &entry.names {
            view::merge_entries(&mut rules, &names.entries_for(name));
        }
        if rules.is_empty() {
            book.forget(key);
            maps.remove(key.0, key.1);
            continue;
        }
        entry.rules = rules;
        entry.policy = names.policy.clone();
        if maps.write(key.0, key.1, &entry.value()).is_ok() {
            book.set(key, entry);
        }
    }
}
