//! System-call hooks: connect(2) for TCP, connected UDP and ping sockets; sendmsg(2) for
//! unconnected UDP; recvmsg(2) to learn which UDP peers spoke first (stateful replies).
//!
//! Returning 0 makes the system call fail with EPERM.

use aya_ebpf::{
    bindings::bpf_sock_addr,
    helpers::generated::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_socket_cookie,
    },
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use egress_common::{family, hook, PeerKey};

use crate::{
    events::{report, Sender},
    maps::UDP_PEERS,
    policy::{judge, normalise_protocol, policy_of, Flow},
};

const ALLOW: i32 = 1;
const REFUSE: i32 = 0;

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    on_send(&ctx, family::INET, hook::CONNECT4, false)
}

#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    on_send(&ctx, family::INET6, hook::CONNECT6, false)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sendmsg4(ctx: SockAddrContext) -> i32 {
    on_send(&ctx, family::INET, hook::SENDMSG4, true)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sendmsg6(ctx: SockAddrContext) -> i32 {
    on_send(&ctx, family::INET6, hook::SENDMSG6, true)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn recvmsg4(ctx: SockAddrContext) -> i32 {
    on_receive(&ctx, family::INET);
    ALLOW
}

#[cgroup_sock_addr(recvmsg6)]
pub fn recvmsg6(ctx: SockAddrContext) -> i32 {
    on_receive(&ctx, family::INET6);
    ALLOW
}

#[inline(always)]
fn on_send(ctx: &SockAddrContext, socket_family: u8, hook: u8, per_datagram: bool) -> i32 {
    let Some(binding) = policy_of(current_ancestor) else {
        return ALLOW;
    };
    let sa = ctx.sock_addr;
    let flow = destination(sa, socket_family);
    let cookie = unsafe { bpf_get_socket_cookie(sa.cast()) };
    let judgement = judge(binding.slot, &flow, || peer_spoke_first(cookie, &flow));
    let sender = Sender {
        // SAFETY: a helper without arguments.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        cookie,
        socket_uid: None,
    };
    report(&binding, &flow, &judgement, hook, &sender, per_datagram);
    if judgement.lets_through() {
        ALLOW
    } else {
        REFUSE
    }
}

#[inline(always)]
fn on_receive(ctx: &SockAddrContext, socket_family: u8) {
    if policy_of(current_ancestor).is_none() {
        return;
    }
    let sa = ctx.sock_addr;
    let peer = destination(sa, socket_family);
    if peer.protocol != egress_common::proto::UDP {
        return;
    }
    let key = PeerKey {
        cookie: unsafe { bpf_get_socket_cookie(sa.cast()) },
        addr: peer.addr,
        port: peer.port,
        family: peer.family,
        _pad: [0; 5],
    };
    let _ = UDP_PEERS.insert(&key, &0, 0);
}

#[inline(always)]
fn peer_spoke_first(cookie: u64, flow: &Flow) -> bool {
    let key = PeerKey {
        cookie,
        addr: flow.addr,
        port: flow.port,
        family: flow.family,
        _pad: [0; 5],
    };
    UDP_PEERS.get_ptr(&key).is_some()
}

#[inline(always)]
fn current_ancestor(level: i32) -> u64 {
    // SAFETY: plain helper call; returns 0 above the current cgroup's depth.
    unsafe { bpf_get_current_ancestor_cgroup_id(level) }
}

/// The address in the system call, with v4-mapped IPv6 (`::ffff:a.b.c.d`) turned into IPv4 so
/// the IPv4 rules judge it.
#[inline(always)]
fn destination(sa: *mut bpf_sock_addr, socket_family: u8) -> Flow {
    // SAFETY: ctx fields are read one u32 at a time; the verifier rejects wider reads.
    unsafe {
        let port = u16::from_be(core::ptr::read_volatile(&raw const (*sa).user_port) as u16);
        let protocol = normalise_protocol(core::ptr::read_volatile(&raw const (*sa).protocol) as u8);
        // Only TCP and UDP flows have ports that rules can match.
        let has_ports = protocol == egress_common::proto::TCP || protocol == egress_common::proto::UDP;
        let port = if has_ports { port } else { 0 };
        let mut addr = [0u8; 16];
        if socket_family == family::INET {
            let ip = core::ptr::read_volatile(&raw const (*sa).user_ip4);
            addr[..4].copy_from_slice(&ip.to_ne_bytes());
            return Flow { family: family::INET, addr, port, protocol };
        }
        let w0 = core::ptr::read_volatile(&raw const (*sa).user_ip6[0]);
        let w1 = core::ptr::read_volatile(&raw const (*sa).user_ip6[1]);
        let w2 = core::ptr::read_volatile(&raw const (*sa).user_ip6[2]);
        let w3 = core::ptr::read_volatile(&raw const (*sa).user_ip6[3]);
        if w0 == 0 && w1 == 0 && w2 == u32::from_be(0x0000_ffff) {
            addr[..4].copy_from_slice(&w3.to_ne_bytes());
            return Flow { family: family::INET, addr, port, protocol };
        }
        addr[0..4].copy_from_slice(&w0.to_ne_bytes());
        addr[4..8].copy_from_slice(&w1.to_ne_bytes());
        addr[8..12].copy_from_slice(&w2.to_ne_bytes());
        addr[12..16].copy_from_slice(&w3.to_ne_bytes());
        Flow { family: family::INET6, addr, port, protocol }
    }
}
