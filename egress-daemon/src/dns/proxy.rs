//! The DNS proxy: answers the queries the kernel steered to it, for the cgroup that sent them.
//!
//! A query for a name the cgroup's policy does not allow is never forwarded: it gets REFUSED
//! (or NXDOMAIN) and a `blocked` event. An allowed one is forwarded upstream, and the answer's
//! addresses along the CNAME chain are written into the cgroup's learned map before a byte of
//! the answer goes back; if that fails, or no upstream answers, the client gets SERVFAIL.
//!
//! The proxy is shared by every covered cgroup, so no cgroup may take what another one's
//! queries need: each has a share of the queries forwarded at once and of the TCP connections
//! held open, is answered SERVFAIL (or its connection closed) at once beyond it, and a TCP
//! connection is checked for its sender when accepted and closed after a refusal.
//!
//! The learned-address map is shared too: an answer teaches at most `max_addresses_per_answer`
//! addresses (the rest leave the answer), and a cgroup at its quota of learned entries gets
//! SERVFAIL and a `dns-quota` event for answers that would teach it more (see `quota.rs`).

use std::{
    net::{IpAddr, Ipv6Addr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use egress_common::{proto, Origin};
use hickory_proto::op::ResponseCode;
use tokio::{
    net::{TcpListener, TcpStream, UdpSocket},
    sync::Semaphore,
    time::timeout,
};

use super::{
    echo,
    message::{format_error, keep_learned, read_answer, Query, CANARY},
    quota::{capped, OverQuota, Quota},
    shares::Shares,
    state::{Counters, DnsState},
    upstream::{self, read_framed, write_framed, UpstreamError},
};
use crate::{
    clock::boot_ns,
    kernel::DnsMaps,
    naming::{Catalog, NamedEvent},
    settings::{DnsSettings, RefuseWith},
};

/// Datagrams handled at once; datagrams beyond this are dropped (clients retry). Only queries
/// forwarded upstream stay in flight for long, and those are capped per cgroup.
const MAX_UDP_IN_FLIGHT: usize = 512;
/// Queries of one bound cgroup forwarded upstream at once (UDP and TCP together).
pub const MAX_FORWARDED_PER_CGROUP: usize = 64;
/// TCP connections held open at once; further ones are closed when accepted.
const MAX_TCP_CONNECTIONS: usize = 128;
/// TCP connections one bound cgroup holds open at once.
pub const MAX_TCP_PER_CGROUP: usize = 16;
/// A TCP client that sends nothing for this long is dropped.
const TCP_IDLE: Duration = Duration::from_secs(10);
/// How old the kernel's record of a query's sender may be: it is refreshed by every packet, so
/// an older one belongs to an earlier socket that had the same port.
const ORIGIN_MAX_AGE_NS: u64 = 10_000_000_000;
/// Longest TTL honoured (a day): an address is re-learned at least this often.
const MAX_TTL: u32 = 86_400;

/// Everything a query needs.
pub struct Proxy {
    pub state: Arc<DnsState>,
    pub maps: Arc<Mutex<DnsMaps>>,
    /// Where events are named and queued for output.
    pub catalog: Arc<Mutex<Catalog>>,
    pub settings: DnsSettings,
    pub resolvers: Vec<SocketAddr>,
    /// Per bound cgroup: queries forwarded upstream now.
    pub forwarded: Shares,
    /// Per bound cgroup: TCP connections held open now.
    pub connections: Shares,
    /// Per bound cgroup: learned entries held at once.
    pub quota: Quota,
}

/// Why an answer's addresses were not learned (the query then gets SERVFAIL).
#[derive(Debug, thiserror::Error)]
enum LearnError {
    #[error(transparent)]
    Map(#[from] crate::kernel::DnsMapError),
    #[error(transparent)]
    Quota(#[from] OverQuota),
}

/// Who sent a query, as the kernel recorded it.
struct Sender {
    origin: Origin,
    transport: u8,
}

/// An answer, and whether the proxy answered it itself to refuse (a TCP connection then closes).
struct Reply {
    bytes: Vec<u8>,
    refused: bool,
}

impl Reply {
    fn answered(bytes: Vec<u8>) -> Self {
        Self { bytes, refused: false }
    }

    fn refused(bytes: Vec<u8>) -> Self {
        Self { bytes, refused: true }
    }
}

impl Proxy {
    pub async fn serve_udp(self: Arc<Self>, socket: UdpSocket) {
        let socket = Arc::new(socket);
        let limit = Arc::new(Semaphore::new(MAX_UDP_IN_FLIGHT));
        let mut buffer = vec![0u8; upstream::MAX_MESSAGE];
        loop {
            let (len, peer) = match socket.recv_from(&mut buffer).await {
                Ok(received) => received,
                Err(error) => {
                    tracing::debug!(%error, "DNS proxy: receiving");
                    continue;
                }
            };
            let Ok(permit) = limit.clone().try_acquire_owned() else {
                tracing::debug!(%peer, "DNS proxy: too many queries in flight; datagram dropped");
                continue;
            };
            let datagram = buffer[..len].to_vec();
            let (proxy, socket) = (self.clone(), socket.clone());
            tokio::spawn(async move {
                if let Some(reply) = proxy.answer(&datagram, peer, proto::UDP).await {
                    drop(socket.send_to(&reply.bytes, peer).await);
                }
                drop(permit);
            });
        }
    }

    pub async fn serve_tcp(self: Arc<Self>, listener: TcpListener) {
        let limit = Arc::new(Semaphore::new(MAX_TCP_CONNECTIONS));
        loop {
            // Accepted at once and checked, never left waiting in the backlog behind
            // connections another cgroup holds open.
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::debug!(%error, "DNS proxy: accepting");
                    continue;
                }
            };
            let Ok(permit) = limit.clone().try_acquire_owned() else {
                tracing::debug!(%peer, "DNS proxy: too many TCP connections; closed");
                Counters::count(&self.state.counters.busy);
                continue;
            };
            let proxy = self.clone();
            tokio::spawn(async move {
                proxy.serve_connection(stream, peer).await;
                drop(permit);
            });
        }
    }

    async fn serve_connection(&self, mut stream: TcpStream, peer: SocketAddr) {
        let Some(sender) = self.sender(peer, proto::TCP) else {
            tracing::debug!(%peer, "DNS proxy: TCP connection from a socket the kernel did not steer; closed");
            return;
        };
        let bound = sender.origin.socket.bound;
        if self.state.view.names_of(bound).is_none() {
            return;
        }
        let Some(_slot) = self.connections.take(bound) else {
            tracing::debug!(%peer, cgroup = bound, "DNS proxy: the cgroup holds its share of TCP connections; closed");
            Counters::count(&self.state.counters.busy);
            return;
        };
        while let Ok(Ok(query)) = timeout(TCP_IDLE, read_framed(&mut stream)).await {
            let Some(reply) = self.answer(&query, peer, proto::TCP).await else { return };
            if write_framed(&mut stream, &reply.bytes).await.is_err() || reply.refused {
                return;
            }
        }
    }

    /// The answer to one query from `peer`; `None` when the datagram deserves no answer.
    async fn answer(&self, bytes: &[u8], peer: SocketAddr, transport: u8) -> Option<Reply> {
        let Ok(query) = Query::parse(bytes) else { return format_error(bytes).map(Reply::refused) };
        let Some(sender) = self.sender(peer, transport) else {
            tracing::debug!(%peer, "DNS proxy: query from a socket the kernel did not steer; refused");
            return Some(Reply::refused(query.answer_with(ResponseCode::Refused)));
        };
        let bound = sender.origin.socket.bound;
        let Some(names) = self.state.view.names_of(bound) else {
            return Some(Reply::refused(query.answer_with(ResponseCode::Refused)));
        };
        if query.name == CANARY || query.name.ends_with(&format!(".{CANARY}")) {
            return Some(Reply::answered(query.answer_with(ResponseCode::NXDomain)));
        }
        if !names.allows(&query.name) {
            self.report(&sender, &names.policy, &query.name, if names.audit { "audit" } else { "blocked" }, "dns");
            if !names.audit {
                let code = match self.settings.refuse_with {
                    RefuseWith::Refused => ResponseCode::Refused,
                    RefuseWith::NxDomain => ResponseCode::NXDomain,
                };
                return Some(Reply::refused(query.answer_with(code)));
            }
        }
        let Some(_slot) = self.forwarded.take(bound) else {
            tracing::debug!(%peer, cgroup = bound, "DNS proxy: the cgroup has its share of queries upstream; SERVFAIL");
            Counters::count(&self.state.counters.busy);
            return Some(Reply::refused(query.answer_with(ResponseCode::ServFail)));
        };
        self.resolve(&query, bytes, &sender, &names).await.map(Reply::answered)
    }

    /// Forwards an allowed query upstream and learns the answer's addresses before returning it.
    async fn resolve(
        &self,
        query: &Query,
        bytes: &[u8],
        sender: &Sender,
        names: &super::view::PolicyNames,
    ) -> Option<Vec<u8>> {
        // A fresh id and random letter case upstream: the client's id is not trusted to be
        // unpredictable, and the case adds guessing to the id's 16 bits.
        let Some(mut forwarded) = echo::scramble(bytes) else {
            return Some(query.answer_with(ResponseCode::FormErr));
        };
        let client_id = [bytes[0], bytes[1]];
        echo::fill_random(&mut forwarded[..2]);
        let mut answer = match upstream::forward(&self.resolvers, &forwarded, sender.transport == proto::TCP).await {
            Ok(answer) => answer,
            Err(error) => {
                if matches!(error, UpstreamError::Mismatch { .. }) {
                    Counters::count(&self.state.counters.mismatched);
                }
                tracing::debug!(name = %query.name, %error, "DNS proxy: no upstream answer; SERVFAIL");
                return Some(query.answer_with(ResponseCode::ServFail));
            }
        };
        echo::restore(&mut answer, bytes);
        answer[..2].copy_from_slice(&client_id);
        let Some((_, mut learned)) = read_answer(query, &answer) else {
            return Some(query.answer_with(ResponseCode::ServFail));
        };
        let now = boot_ns();
        if !learned.addresses.is_empty() && names.allows(&query.name) {
            let cap = self.settings.max_addresses_per_answer;
            if learned.addresses.len() > capped(&learned.addresses, cap).len() {
                tracing::debug!(name = %query.name, count = learned.addresses.len(), cap, "DNS proxy: answer cut to the per-answer cap");
                learned.addresses = capped(&learned.addresses, cap).to_vec();
                let Some(kept) = keep_learned(&answer, &query.name, &learned) else {
                    return Some(query.answer_with(ResponseCode::ServFail));
                };
                answer = kept;
            }
            let ttl = learned.ttl.clamp(self.settings.min_ttl, MAX_TTL.max(self.settings.min_ttl));
            let expires = now + (u64::from(ttl) + u64::from(self.settings.grace)) * 1_000_000_000;
            match self.learn(sender.origin.socket.bound, names, &query.name, &learned.addresses, expires, now) {
                Ok(()) => {}
                Err(LearnError::Quota(over)) => {
                    Counters::count(&self.state.counters.quota);
                    tracing::debug!(name = %query.name, cgroup = sender.origin.socket.bound, %over, "DNS proxy: learned-address quota; SERVFAIL");
                    self.report(sender, &names.policy, &query.name, "blocked", "dns-quota");
                    return Some(query.answer_with(ResponseCode::ServFail));
                }
                Err(LearnError::Map(error)) => {
                    tracing::warn!(name = %query.name, %error, "DNS proxy: the learned addresses could not be written; SERVFAIL");
                    return Some(query.answer_with(ResponseCode::ServFail));
                }
            }
        }
        self.state.book().saw(&names.policy, &query.name, now);
        Some(answer)
    }

    /// Writes every address, then records them; the first failure stops and fails the query.
    /// Nothing is written when the new entries do not fit the cgroup's quota, even after its
    /// expired entries are reclaimed.
    fn learn(
        &self,
        cgroup: u64,
        names: &super::view::PolicyNames,
        name: &str,
        addresses: &[Ipv6Addr],
        expires: u64,
        now: u64,
    ) -> Result<(), LearnError> {
        let cgroups = self.state.view.cgroups();
        let mut maps = self.maps.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut book = self.state.book();
        let updates = book.merge(cgroup, names, name, addresses, expires, now);
        let new = updates.iter().filter(|update| !book.has(update.key)).count();
        if self.quota.check(book.held(cgroup), new, cgroups).is_err() {
            for (owner, addr) in book.take_expired_of(cgroup, now) {
                maps.remove(owner, addr);
            }
            self.quota.check(book.held(cgroup), new, cgroups)?;
        }
        for update in updates {
            maps.write(cgroup, update.key.1, &update.entry.value())?;
            book.commit(update, name);
        }
        Ok(())
    }

    fn sender(&self, peer: SocketAddr, transport: u8) -> Option<Sender> {
        let addr = match peer.ip() {
            IpAddr::V4(v4) => v4.to_ipv6_mapped(),
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(v6, |v4| v4.to_ipv6_mapped()),
        };
        let origin =
            self.maps.lock().unwrap_or_else(std::sync::PoisonError::into_inner).origin(transport, addr, peer.port())?;
        if boot_ns().saturating_sub(origin.seen_ns) > ORIGIN_MAX_AGE_NS {
            return None;
        }
        Some(Sender { origin, transport })
    }

    /// A flow event for a query the proxy refused (`rule` `dns`: the policy does not allow the
    /// name; `dns-quota`: the cgroup holds all the learned addresses it may), within the
    /// cgroup's event budget.
    fn report(&self, sender: &Sender, policy: &str, name: &str, verdict: &str, rule: &str) {
        let socket = &sender.origin.socket;
        if !self.state.events.admit(socket.bound, std::time::Instant::now()) {
            return;
        }
        let resolver = original_resolver(socket);
        let mut catalog = self.catalog.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let (cgroup, workload) = catalog.cgroup_names(socket.cgroup);
        let at = std::time::SystemTime::now();
        let record = NamedEvent {
            time: crate::printable::timestamp(at),
            at,
            verdict: verdict.to_string(),
            policy: policy.to_string(),
            rule: rule.to_string(),
            cgroup,
            pid: 0,
            comm: String::new(),
            uid: 0,
            protocol: if sender.transport == proto::TCP { "tcp" } else { "udp" }.to_string(),
            dst: resolver,
            dport: u16::from_be(socket.port as u16),
            workload,
            domain: Some(name.to_string()),
        };
        if !catalog.inject(record) {
            tracing::debug!("DNS proxy: event queue full; event dropped");
        }
    }
}

/// The resolver a steered socket named.
fn original_resolver(socket: &egress_common::SteeredSocket) -> IpAddr {
    let words = socket.addr;
    if socket.family == u32::from(egress_common::family::INET) {
        return IpAddr::V4(words[0].to_ne_bytes().into());
    }
    let mut bytes = [0u8; 16];
    for (chunk, word) in bytes.chunks_mut(4).zip(words) {
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    let v6 = Ipv6Addr::from(bytes);
    v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
}
