//! System-call hooks: connect(2) for TCP, connected UDP and ping sockets; sendmsg(2) for
//! unconnected UDP. (Which UDP peers spoke first is learned from arriving packets, in `skb`.)
//!
//! Returning 0 makes the system call fail with EPERM.

use aya_ebpf::{
    bindings::{bpf_sock, bpf_sock_addr},
    helpers::generated::{bpf_get_current_cgroup_id, bpf_get_socket_cookie},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use egress_common::{
    family, hook, log,
    lookup::{normalise_protocol, rule_port},
    proto, verdict, PeerKey, DNS_PORT,
};

use crate::{
    destination::Flow,
    dns,
    events::{count, report, Sender},
    flows::{
        cached_for_workload, cached_on_socket, flow_id, hand_over, now, open, opener_at_syn, policy_epoch,
        workload_destination, Opener, Reused,
    },
    maps::UDP_PEERS,
    policy::{bound_of, current_ancestor, judge, Judgement},
    recent::{datagram_epoch, recall, remember, Kind},
    ret::{PASS, REFUSE},
};

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

#[inline(always)]
fn on_send(ctx: &SockAddrContext, socket_family: u8, hook: u8, per_datagram: bool) -> i32 {
    let epoch = policy_epoch();
    let sa = ctx.sock_addr;
    // SAFETY: helper without arguments.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    let (mut flow, unspecified) = requested(sa, socket_family);
    // DNS may be steered to the proxy, which the full path does.
    if !unspecified && flow.port != DNS_PORT && reuse(sa, &flow, cgroup_id, epoch, per_datagram) {
        return PASS;
    }
    let Some((bound, binding)) = bound_of(current_ancestor, || cgroup_id) else {
        return PASS;
    };
    if unspecified {
        send_target(sa, socket_family, per_datagram, &mut flow);
    }
    // SAFETY: helper on the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(sa.cast()) };
    if dns::steer(sa, socket_family, &flow, binding.slot, bound, cgroup_id) {
        return PASS;
    }
    let sender = Sender { cgroup_id, cookie, socket_uid: None };
    let judgement = judge(bound, binding.slot, &flow, || peer_spoke_first(cookie, &flow));
    report::<true>(&binding, &flow, &judgement, hook, &sender, per_datagram, epoch);
    if !judgement.lets_through() {
        return REFUSE;
    }
    let opener = Opener { cgroup_id, slot: binding.slot, epoch, socket_uid: None };
    open::<true>(&flow_id(cookie, &flow), &opener, &judgement, now());
    PASS
}

/// Lets the flow through on a decision taken before under the current policy epoch, without
/// finding the sender's policy or judging again: a datagram to a destination this socket was
/// allowed to reach, a `connect()` to a destination this cgroup was allowed to reach. The epoch
/// moves on whenever rules or bindings change, so a reused decision is the one the full path
/// would take.
#[inline(always)]
fn reuse(sa: *mut bpf_sock_addr, flow: &Flow, cgroup_id: u64, epoch: u32, per_datagram: bool) -> bool {
    // SAFETY: helper on the program's own context.
    let cookie = || unsafe { bpf_get_socket_cookie(sa.cast()) };
    if per_datagram {
        let cookie = cookie();
        // Also lapses when the flow-record sweeper stops counting a flow of a live socket.
        let stamp = epoch.wrapping_add(datagram_epoch());
        if recall(Kind::Datagram, cookie, cgroup_id, flow, stamp).is_some() {
            return true;
        }
        if !cached_on_socket(&flow_id(cookie, flow), epoch, cgroup_id) {
            return false;
        }
        remember(Kind::Datagram, cookie, cgroup_id, flow, stamp, &Reused { slot: 0, rule: 0, stats: 0 });
        return true;
    }
    let reused = match recall(Kind::Connect, cgroup_id, cgroup_id, flow, epoch) {
        Some(reused) => reused,
        None => {
            let Some(reused) = cached_for_workload(&workload_destination(cgroup_id, flow), epoch) else {
                return false;
            };
            remember(Kind::Connect, cgroup_id, cgroup_id, flow, epoch, &reused);
            reused
        }
    };
    count(reused.stats, verdict::ALLOWED);
    let opener = Opener { cgroup_id, slot: reused.slot, epoch, socket_uid: None };
    if flow.protocol == proto::TCP {
        // The SYN, sent from this system call, opens the flow (`flows::open_at_syn`).
        if !opener_at_syn() {
            hand_over(cookie(), &opener, reused.rule);
        }
    } else {
        let judgement = Judgement { verdict: verdict::ALLOWED, rule: reused.rule, log: log::BLOCKED, learned: false };
        open::<true>(&flow_id(cookie(), flow), &opener, &judgement, now());
    }
    true
}

#[inline(always)]
fn peer_spoke_first(cookie: u64, flow: &Flow) -> bool {
    let key = PeerKey { cookie, addr: flow.addr, port: flow.port, family: flow.family, _pad: [0; 5] };
    UDP_PEERS.get_ptr(&key).is_some()
}

/// The destination the call names, with v4-mapped IPv6 (`::ffff:a.b.c.d`) turned into IPv4 so
/// the IPv4 rules judge it, and whether that address is unspecified (`0.0.0.0`, `::`,
/// `::ffff:0.0.0.0`; see [`send_target`]).
#[inline(always)]
fn requested(sa: *mut bpf_sock_addr, socket_family: u8) -> (Flow, bool) {
    // SAFETY: ctx fields are read one u32 at a time; the verifier rejects wider reads.
    unsafe {
        let port = u16::from_be(core::ptr::read_volatile(&raw const (*sa).user_port) as u16);
        let protocol = normalise_protocol(core::ptr::read_volatile(&raw const (*sa).protocol) as u8);
        let mut flow = Flow { family: family::INET, addr: [0u8; 16], port: rule_port(protocol, port), protocol };
        if socket_family == family::INET {
            let ip = core::ptr::read_volatile(&raw const (*sa).user_ip4);
            flow.addr[..4].copy_from_slice(&ip.to_ne_bytes());
            return (flow, ip == 0);
        }
        let w = user_ip6(sa);
        if is_mapped(&w) {
            flow.addr[..4].copy_from_slice(&w[3].to_ne_bytes());
            return (flow, w[3] == 0);
        }
        set_v6(&mut flow, &w);
        (flow, w == [0; 4])
    }
}

/// An unspecified destination does not stay unspecified: the kernel sends to the socket's (or
/// the datagram's) source address, or to loopback. Judging `0.0.0.0` would let a policy that
/// denies loopback be walked around, so the address the kernel would pick is written back into
/// the call and into `flow`, and judged.
#[inline(always)]
fn send_target(sa: *mut bpf_sock_addr, socket_family: u8, sendmsg: bool, flow: &mut Flow) {
    // SAFETY: ctx fields are read and written one u32 at a time.
    unsafe {
        // The verifier only takes context stores at the context pointer plus a constant: a fresh
        // copy keeps the compiler from reusing a field address it computed for the reads.
        let sa = core::ptr::read_volatile(&raw const sa);
        if socket_family == family::INET {
            let ip = local_source_v4(sa, sendmsg);
            core::ptr::write_volatile(&raw mut (*sa).user_ip4, ip);
            flow.addr[..4].copy_from_slice(&ip.to_ne_bytes());
            return;
        }
        let mut w = user_ip6(sa);
        if is_mapped(&w) {
            w[3] = mapped_source_v4(sa);
            core::ptr::write_volatile(&raw mut (*sa).user_ip6[3], w[3]);
        } else {
            // Like the kernel: a socket bound to a v4-mapped address reaches 127.0.0.1, any
            // other `::1`.
            let source = socket_of(sa);
            let bound_mapped = !source.is_null()
                && core::ptr::read_volatile(&raw const (*source).src_ip6[0]) == 0
                && core::ptr::read_volatile(&raw const (*source).src_ip6[1]) == 0
                && core::ptr::read_volatile(&raw const (*source).src_ip6[2]) == u32::from_be(0x0000_ffff);
            w = if bound_mapped { [0, 0, u32::from_be(0x0000_ffff), LOOPBACK_V4] } else { [0, 0, 0, u32::from_be(1)] };
            let mut i = 0;
            while i < 4 {
                core::ptr::write_volatile(&raw mut (*sa).user_ip6[i], w[i]);
                i += 1;
            }
        }
        if is_mapped(&w) {
            flow.family = family::INET;
            flow.addr = [0; 16];
            flow.addr[..4].copy_from_slice(&w[3].to_ne_bytes());
        } else {
            set_v6(flow, &w);
        }
    }
}

#[inline(always)]
unsafe fn user_ip6(sa: *mut bpf_sock_addr) -> [u32; 4] {
    // SAFETY: ctx fields read one u32 at a time.
    unsafe {
        [
            core::ptr::read_volatile(&raw const (*sa).user_ip6[0]),
            core::ptr::read_volatile(&raw const (*sa).user_ip6[1]),
            core::ptr::read_volatile(&raw const (*sa).user_ip6[2]),
            core::ptr::read_volatile(&raw const (*sa).user_ip6[3]),
        ]
    }
}

/// `::ffff:a.b.c.d`, in network-order words.
#[inline(always)]
fn is_mapped(w: &[u32; 4]) -> bool {
    w[0] == 0 && w[1] == 0 && w[2] == u32::from_be(0x0000_ffff)
}

#[inline(always)]
fn set_v6(flow: &mut Flow, w: &[u32; 4]) {
    flow.family = family::INET6;
    let mut i = 0;
    while i < 4 {
        flow.addr[i * 4..i * 4 + 4].copy_from_slice(&w[i].to_ne_bytes());
        i += 1;
    }
}

/// 127.0.0.1 in network byte order.
const LOOPBACK_V4: u32 = u32::from_ne_bytes([127, 0, 0, 1]);

#[inline(always)]
unsafe fn socket_of(sa: *mut bpf_sock_addr) -> *mut bpf_sock {
    // SAFETY: the context's socket pointer; the caller checks it for null.
    unsafe { core::ptr::read_volatile(&raw const (*sa).__bindgen_anon_1.sk) }
}

/// Where an IPv4 send to `0.0.0.0` goes: the datagram's source (`IP_PKTINFO`), else the
/// socket's bound address, else 127.0.0.1 (`ip_route_output_key_hash_rcu`).
#[inline(always)]
unsafe fn local_source_v4(sa: *mut bpf_sock_addr, sendmsg: bool) -> u32 {
    // SAFETY: ctx reads of u32 fields; `msg_src_ip4` exists only in sendmsg4.
    unsafe {
        if sendmsg {
            let source = core::ptr::read_volatile(&raw const (*sa).msg_src_ip4);
            if source != 0 {
                return source;
            }
        }
        let sk = socket_of(sa);
        if !sk.is_null() {
            let bound = core::ptr::read_volatile(&raw const (*sk).src_ip4);
            if bound != 0 {
                return bound;
            }
        }
    }
    LOOPBACK_V4
}

/// The same for an AF_INET6 socket sending to `::ffff:0.0.0.0` (the IPv4 path): its bound
/// v4-mapped address, else 127.0.0.1.
#[inline(always)]
unsafe fn mapped_source_v4(sa: *mut bpf_sock_addr) -> u32 {
    // SAFETY: reads of the socket's u32 fields after a null check.
    unsafe {
        let sk = socket_of(sa);
        if !sk.is_null() && core::ptr::read_volatile(&raw const (*sk).src_ip6[2]) == u32::from_be(0x0000_ffff) {
            let bound = core::ptr::read_volatile(&raw const (*sk).src_ip6[3]);
            if bound != 0 {
                return bound;
            }
        }
    }
    LOOPBACK_V4
}
