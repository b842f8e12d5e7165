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
    verdict, PeerKey, NEW_DESTINATION_WINDOW_NS,
};

use crate::{
    dns,
    events::{count, report, Sender},
    flows::{cached_for_workload, cached_on_socket, flow_id, now, open, policy_epoch, workload_destination, Opener},
    maps::{POLICY_INFO, UDP_PEERS},
    policy::{bound_of, current_ancestor, judge, Flow, Judgement},
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

#[inline(always)]
fn on_send(ctx: &SockAddrContext, socket_family: u8, hook: u8, per_datagram: bool) -> i32 {
    let epoch = policy_epoch();
    // SAFETY: helper without arguments.
    let Some((bound, binding)) = bound_of(current_ancestor, || unsafe { bpf_get_current_cgroup_id() }) else {
        return ALLOW;
    };
    let sa = ctx.sock_addr;
    let flow = destination(sa, socket_family, per_datagram);
    // SAFETY: helpers on the program's own context, and without arguments.
    let (cookie, cgroup_id) = unsafe { (bpf_get_socket_cookie(sa.cast()), bpf_get_current_cgroup_id()) };
    if dns::steer(sa, socket_family, &flow, binding.slot, bound, cgroup_id) {
        return ALLOW;
    }
    let id = flow_id(cookie, &flow);
    let sender = Sender { cgroup_id, cookie, socket_uid: None };
    let opener = Opener { cgroup_id, slot: binding.slot, epoch, socket_uid: None };
    if per_datagram {
        if cached_on_socket(&id, binding.slot, epoch, cgroup_id) {
            return ALLOW;
        }
    } else if let Some((rule, logged_ns)) =
        cached_for_workload(&workload_destination(cgroup_id, &flow), binding.slot, epoch)
    {
        // A destination this workload was allowed to reach under the same policy and epoch.
        let log = POLICY_INFO.get(binding.slot).map_or(log::ALL, |info| info.log);
        let judgement = Judgement { verdict: verdict::ALLOWED, rule, log, learned: false };
        let now = now();
        let quiet = log == log::BLOCKED || (log == log::NEW && now.wrapping_sub(logged_ns) < NEW_DESTINATION_WINDOW_NS);
        if quiet {
            count(binding.stats, verdict::ALLOWED);
        } else {
            report::<true>(&binding, &flow, &judgement, hook, &sender, false, epoch);
        }
        open::<true>(&id, &opener, &judgement, now);
        return ALLOW;
    }
    let judgement = judge(bound, binding.slot, &flow, || peer_spoke_first(cookie, &flow));
    report::<true>(&binding, &flow, &judgement, hook, &sender, per_datagram, epoch);
    if judgement.lets_through() {
        open::<true>(&id, &opener, &judgement, now());
        ALLOW
    } else {
        REFUSE
    }
}

#[inline(always)]
fn peer_spoke_first(cookie: u64, flow: &Flow) -> bool {
    let key = PeerKey { cookie, addr: flow.addr, port: flow.port, family: flow.family, _pad: [0; 5] };
    UDP_PEERS.get_ptr(&key).is_some()
}

/// The address the kernel will send to, with v4-mapped IPv6 (`::ffff:a.b.c.d`) turned into
/// IPv4 so the IPv4 rules judge it.
///
/// An unspecified destination (`0.0.0.0`, `::`, `::ffff:0.0.0.0`) does not stay unspecified: the
/// kernel sends to the socket's (or the datagram's) source address, or to loopback. Judging
/// `0.0.0.0` would let a policy that denies loopback be walked around, so the hook writes the
/// address the kernel would pick back into the call and judges that.
#[inline(always)]
fn destination(sa: *mut bpf_sock_addr, socket_family: u8, sendmsg: bool) -> Flow {
    // SAFETY: ctx fields are read one u32 at a time; the verifier rejects wider reads.
    unsafe {
        let port = u16::from_be(core::ptr::read_volatile(&raw const (*sa).user_port) as u16);
        let protocol = normalise_protocol(core::ptr::read_volatile(&raw const (*sa).protocol) as u8);
        let mut flow = Flow { family: family::INET, addr: [0u8; 16], port: rule_port(protocol, port), protocol };
        if socket_family == family::INET {
            let mut ip = core::ptr::read_volatile(&raw const (*sa).user_ip4);
            if ip == 0 {
                ip = local_source_v4(sa, sendmsg);
                core::ptr::write_volatile(&raw mut (*sa).user_ip4, ip);
            }
            flow.addr[..4].copy_from_slice(&ip.to_ne_bytes());
            return flow;
        }
        let mut w = [
            core::ptr::read_volatile(&raw const (*sa).user_ip6[0]),
            core::ptr::read_volatile(&raw const (*sa).user_ip6[1]),
            core::ptr::read_volatile(&raw const (*sa).user_ip6[2]),
            core::ptr::read_volatile(&raw const (*sa).user_ip6[3]),
        ];
        let mapped = w[0] == 0 && w[1] == 0 && w[2] == u32::from_be(0x0000_ffff);
        if mapped && w[3] == 0 {
            w[3] = mapped_source_v4(sa);
            core::ptr::write_volatile(&raw mut (*sa).user_ip6[3], w[3]);
        } else if w == [0; 4] {
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
        if w[0] == 0 && w[1] == 0 && w[2] == u32::from_be(0x0000_ffff) {
            flow.addr[..4].copy_from_slice(&w[3].to_ne_bytes());
            return flow;
        }
        flow.family = family::INET6;
        flow.addr[0..4].copy_from_slice(&w[0].to_ne_bytes());
        flow.addr[4..8].copy_from_slice(&w[1].to_ne_bytes());
        flow.addr[8..12].copy_from_slice(&w[2].to_ne_bytes());
        flow.addr[12..16].copy_from_slice(&w[3].to_ne_bytes());
        flow
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
