//! Domain-name rules in the kernel: DNS of covered cgroups steered to the daemon's proxy,
//! replies made to look as if they came from the resolver the workload named, and the addresses
//! the proxy learned from answers.
//!
//! Steering rewrites the destination of port-53 TCP and UDP (connect and sendmsg) to the proxy
//! on loopback, and remembers the original per socket (`STEERED`). The packet hook records the
//! source address and port of each steered packet (`QUERY_ORIGINS`): the proxy looks its peer
//! up there to learn which bound cgroup asked. recvmsg and getpeername put the original resolver
//! back, so resolvers that check the reply's source (musl, glibc) accept it.

use aya_ebpf::{
    bindings::{__sk_buff, bpf_sock_addr},
    helpers::generated::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_boot_ns},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use egress_common::{
    action, family, lookup, policy_flags, Decision, LearnedKey, Origin, OriginKey, SteeredSocket, DNS_PORT, DOT_PORT,
};

use crate::{
    destination::Flow,
    maps::{DNS_CONFIG, LEARNED, POLICY_INFO, QUERY_ORIGINS, STEERED},
    ret::PASS,
};

/// What a learned entry's table falls back to when none of its rules match: not allowed.
const NO_MATCH: Decision = Decision {
    fallback_rule: egress_common::rule_id::DEFAULT,
    port_table: 0,
    fallback_action: action::DENY,
    _pad: [0; 3],
};

/// 127.0.0.1 in network byte order.
const LOOPBACK_V4: u32 = u32::from_ne_bytes([127, 0, 0, 1]);
/// The words of `::1` and of the v4-mapped `::ffff:127.0.0.1`, network byte order.
const LOOPBACK_V6: [u32; 4] = [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])];
const MAPPED_LOOPBACK: [u32; 4] = [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff]), LOOPBACK_V4];

/// The rule id of a live learned entry of `bound` for the flow's address whose name rule
/// matches its protocol and port.
#[inline(always)]
pub fn learned_rule(bound: u64, flow: &Flow) -> Option<u32> {
    let key = LearnedKey { cgroup: bound, addr: mapped(flow) };
    // SAFETY: the entry is read once; the daemon replaces values whole.
    let learned = unsafe { LEARNED.get(&key) }?;
    // SAFETY: a helper without arguments.
    if learned.expires_ns <= unsafe { bpf_ktime_get_boot_ns() } {
        return None;
    }
    let (decided, rule) = lookup::resolve(&NO_MATCH, Some(&learned.rules), flow.protocol, flow.port);
    (decided == action::ALLOW).then_some(rule)
}

/// DNS over TLS, or HTTPS to a well-known DNS-over-HTTPS resolver.
#[inline(always)]
pub fn is_bypass(flow: &Flow) -> bool {
    lookup::is_dns_bypass(flow.family, &flow.addr, flow.protocol, flow.port)
}

/// The flow's address as a `LEARNED` key holds it (IPv4 v4-mapped).
#[inline(always)]
fn mapped(flow: &Flow) -> [u8; 16] {
    if flow.family == family::INET6 {
        return flow.addr;
    }
    let mut addr = [0u8; 16];
    addr[10] = 0xff;
    addr[11] = 0xff;
    addr[12] = flow.addr[0];
    addr[13] = flow.addr[1];
    addr[14] = flow.addr[2];
    addr[15] = flow.addr[3];
    addr
}

/// Rewrites a port-53 TCP or UDP destination of a policy with name rules to the proxy, and
/// remembers the original; true when it did. Sockets of other network namespaces are left alone
/// (loopback there is not the daemon's): they are judged by the CIDR rules as any other flow.
#[inline(always)]
pub fn steer(sa: *mut bpf_sock_addr, socket_family: u8, flow: &Flow, slot: u32, bound: u64, cgroup: u64) -> bool {
    if flow.port != DNS_PORT || !flow.has_ports() {
        return false;
    }
    let Some(info) = POLICY_INFO.get(slot) else { return false };
    if info.flags & policy_flags::NAME_RULES == 0 {
        return false;
    }
    let Some(config) = DNS_CONFIG.get(0) else { return false };
    if config.proxy_port == 0 {
        return false;
    }
    // SAFETY: helpers on the program's own context.
    let (netns, cookie) = unsafe { (bpf_get_netns_cookie(sa.cast()), bpf_get_socket_cookie(sa.cast())) };
    if netns != config.host_netns {
        return false;
    }
    let proxy_port = u32::from(config.proxy_port.to_be());
    // SAFETY: ctx fields are read and written one u32 at a time.
    unsafe {
        let port = core::ptr::read_volatile(&raw const (*sa).user_port);
        let mut original = SteeredSocket { bound, cgroup, addr: [0; 4], port, family: u32::from(socket_family) };
        if socket_family == family::INET {
            original.addr[0] = core::ptr::read_volatile(&raw const (*sa).user_ip4);
            core::ptr::write_volatile(&raw mut (*sa).user_ip4, LOOPBACK_V4);
        } else {
            let mut i = 0;
            while i < 4 {
                original.addr[i] = core::ptr::read_volatile(&raw const (*sa).user_ip6[i]);
                i += 1;
            }
            // A v4-mapped resolver goes to the IPv4 listener, any other to the IPv6 one.
            let target = if flow.family == family::INET { MAPPED_LOOPBACK } else { LOOPBACK_V6 };
            let mut i = 0;
            while i < 4 {
                core::ptr::write_volatile(&raw mut (*sa).user_ip6[i], target[i]);
                i += 1;
            }
        }
        core::ptr::write_volatile(&raw mut (*sa).user_port, proxy_port);
        let _ = STEERED.insert(&cookie, &original, 0);
    }
    true
}

/// The steering record of the packet's socket, when its DNS was steered.
#[inline(always)]
pub fn steered_socket(skb: *mut __sk_buff) -> Option<SteeredSocket> {
    // SAFETY: helper on the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(skb.cast()) };
    // SAFETY: copied out at once.
    unsafe { STEERED.get(&cookie) }.copied()
}

/// Packet hook: records who sent a packet of a steered socket, by the source the proxy will see
/// as its peer.
#[inline(always)]
pub fn record_origin(socket: SteeredSocket, protocol: u8, source: &[u8; 16], fam: u8, source_port: u16) {
    let mut addr = *source;
    if fam == family::INET {
        addr = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, source[0], source[1], source[2], source[3]];
    }
    let key = OriginKey { addr, port: source_port, protocol, _pad: [0; 5] };
    // SAFETY: a helper without arguments.
    let origin = Origin { seen_ns: unsafe { bpf_ktime_get_boot_ns() }, socket };
    let _ = QUERY_ORIGINS.insert(&key, &origin, 0);
}

/// Whether steering is on at all (the packet hook skips its lookups otherwise).
#[inline(always)]
pub fn steering_on() -> bool {
    DNS_CONFIG.get(0).is_some_and(|config| config.proxy_port != 0)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn recvmsg4(ctx: SockAddrContext) -> i32 {
    restore_source(ctx.sock_addr, family::INET);
    PASS
}

#[cgroup_sock_addr(recvmsg6)]
pub fn recvmsg6(ctx: SockAddrContext) -> i32 {
    restore_source(ctx.sock_addr, family::INET6);
    PASS
}

#[cgroup_sock_addr(getpeername4)]
pub fn getpeername4(ctx: SockAddrContext) -> i32 {
    restore_source(ctx.sock_addr, family::INET);
    PASS
}

#[cgroup_sock_addr(getpeername6)]
pub fn getpeername6(ctx: SockAddrContext) -> i32 {
    restore_source(ctx.sock_addr, family::INET6);
    PASS
}

/// On a steered socket, an address that is the proxy becomes the resolver the socket named.
#[inline(always)]
fn restore_source(sa: *mut bpf_sock_addr, socket_family: u8) {
    let Some(config) = DNS_CONFIG.get(0) else { return };
    if config.proxy_port == 0 {
        return;
    }
    // SAFETY: ctx fields are read and written one u32 at a time.
    unsafe {
        let port = core::ptr::read_volatile(&raw const (*sa).user_port);
        if port != u32::from(config.proxy_port.to_be()) {
            return;
        }
        let cookie = bpf_get_socket_cookie(sa.cast());
        let Some(original) = STEERED.get(&cookie).copied() else { return };
        if socket_family == family::INET {
            if core::ptr::read_volatile(&raw const (*sa).user_ip4) != LOOPBACK_V4 {
                return;
            }
            core::ptr::write_volatile(&raw mut (*sa).user_ip4, original.addr[0]);
        } else {
            let w = [
                core::ptr::read_volatile(&raw const (*sa).user_ip6[0]),
                core::ptr::read_volatile(&raw const (*sa).user_ip6[1]),
                core::ptr::read_volatile(&raw const (*sa).user_ip6[2]),
                core::ptr::read_volatile(&raw const (*sa).user_ip6[3]),
            ];
            if w != LOOPBACK_V6 && w != MAPPED_LOOPBACK {
                return;
            }
            let mut i = 0;
            while i < 4 {
                core::ptr::write_volatile(&raw mut (*sa).user_ip6[i], original.addr[i]);
                i += 1;
            }
        }
        core::ptr::write_volatile(&raw mut (*sa).user_port, original.port);
    }
}
