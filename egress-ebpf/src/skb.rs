//! Per-packet hooks on `cgroup_skb`.
//!
//! Egress is the backstop: TCP and UDP sockets were judged at connect/sendmsg (and a TCP
//! server's replies must pass), so their packets go through unless the packet names its own
//! route (an IPv6 routing header, IPv4 options), which would take it to addresses nobody judged.
//! Everything else a covered socket sends - raw IP, raw and unprivileged ICMP, SCTP - is judged
//! here, per packet, on the packet's own destination, and reported once per flow.
//!
//! Ingress learns which peers spoke first to a covered UDP socket (stateful replies), from the
//! datagram as it arrives, where the device it came in on is known.

use aya_ebpf::{
    bindings::{__sk_buff, bpf_sock},
    helpers::generated::{
        bpf_get_socket_cookie, bpf_get_socket_uid, bpf_sk_fullsock, bpf_skb_ancestor_cgroup_id, bpf_skb_cgroup_id,
    },
    macros::cgroup_skb,
    programs::SkBuffContext,
};
use egress_common::{family, hook, proto, rule_id, PeerKey};

use crate::{
    dns,
    events::{report, Sender},
    flows::{flow_id, now, open, policy_epoch, Opener},
    maps::UDP_PEERS,
    policy::{bound_of, judge, mode_of, policy_of, refused, Flow},
};

const PASS: i32 = 1;
const DROP: i32 = 0;

const SOCK_STREAM: u32 = 1;
pub(crate) const SOCK_DGRAM: u32 = 2;
pub(crate) const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
/// The loopback device is ifindex 1 in every network namespace.
const LOOPBACK_IFINDEX: u32 = 1;

const IPV6_HOP_BY_HOP: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_DEST_OPTS: u8 = 60;
/// Extension headers walked before the upper-layer header; more is treated as unparsable.
const MAX_EXTENSION_HEADERS: u32 = 4;

#[cgroup_skb(egress)]
pub fn egress_packet(ctx: SkBuffContext) -> i32 {
    on_egress::<true>(&ctx)
}

/// `egress_packet` without the current-task helpers (its events name no process), for kernels
/// whose verifier refuses them in packet programs; the daemon loads it when the other fails.
#[cgroup_skb(egress)]
pub fn egress_packet_portable(ctx: SkBuffContext) -> i32 {
    on_egress::<false>(&ctx)
}

#[inline(always)]
fn on_egress<const TASK: bool>(ctx: &SkBuffContext) -> i32 {
    let skb = ctx.skb.skb;
    let judged = judged_at_syscall(skb);
    if judged && dns::steering_on() {
        if let Some(socket) = dns::steered_socket(skb) {
            if let Some(packet) = parse(ctx) {
                dns::record_origin(socket, packet.protocol, &packet.source, packet.family, packet.source_port);
            }
        }
    }
    if judged && !may_name_its_route(ctx) {
        return PASS;
    }
    let Some(packet) = parse(ctx) else {
        return PASS;
    };
    if judged && !packet.routed {
        return PASS;
    }
    let epoch = policy_epoch();
    let Some((bound, binding)) = bound_of(|level| skb_ancestor(skb, level), || skb_cgroup(skb)) else {
        return PASS;
    };
    let flow = Flow {
        family: packet.family,
        addr: packet.destination,
        port: packet.destination_port,
        protocol: egress_common::lookup::normalise_protocol(packet.protocol),
    };
    let judgement = if packet.routed {
        refused(mode_of(binding.slot), rule_id::SOURCE_ROUTED)
    } else {
        judge(bound, binding.slot, &flow, || false)
    };
    // SAFETY: helpers on the program's own context.
    let sender = unsafe {
        Sender {
            cgroup_id: bpf_skb_cgroup_id(skb.cast()),
            cookie: bpf_get_socket_cookie(skb.cast()),
            socket_uid: Some(bpf_get_socket_uid(skb.cast())),
        }
    };
    report::<TASK>(&binding, &flow, &judgement, hook::SKB, &sender, true, epoch);
    if !judgement.lets_through() {
        return DROP;
    }
    if !judged {
        // Raw, ping and other sockets: their flows start here (`skb_count` counts the packets).
        let opener = Opener { cgroup_id: sender.cgroup_id, slot: binding.slot, epoch, socket_uid: sender.socket_uid };
        open::<TASK>(&flow_id(sender.cookie, &flow), &opener, &judgement, now());
    }
    PASS
}

/// Remembers the source of a datagram arriving at a covered UDP socket: the socket may then
/// answer it even where its policy denies that address.
///
/// A datagram that came in over loopback proves nothing about its source address (any user can
/// bind a foreign IPv6 address with `IPV6_FREEBIND` and send from it locally), so over loopback
/// only a loopback source, or the datagram's own local destination, counts as a peer.
#[cgroup_skb(ingress)]
pub fn ingress_packet(ctx: SkBuffContext) -> i32 {
    let skb = ctx.skb.skb;
    if !is_udp_socket(skb) {
        return PASS;
    }
    if policy_of(|level| skb_ancestor(skb, level), || skb_cgroup(skb)).is_none() {
        return PASS;
    }
    let Some(packet) = parse(&ctx) else {
        return PASS;
    };
    if packet.protocol != proto::UDP {
        return PASS;
    }
    // SAFETY: reading a context field.
    let ingress_ifindex = unsafe { (*skb).ingress_ifindex };
    if ingress_ifindex == LOOPBACK_IFINDEX
        && !is_loopback(packet.family, &packet.source)
        && packet.source != packet.destination
    {
        return PASS;
    }
    let key = PeerKey {
        // SAFETY: helper on the program's own context (the receiving socket's cookie).
        cookie: unsafe { bpf_get_socket_cookie(skb.cast()) },
        addr: packet.source,
        port: packet.source_port,
        family: packet.family,
        _pad: [0; 5],
    };
    let _ = UDP_PEERS.insert(&key, &0, 0);
    PASS
}

#[inline(always)]
fn skb_ancestor(skb: *mut __sk_buff, level: i32) -> u64 {
    // SAFETY: helper on the program's own context.
    unsafe { bpf_skb_ancestor_cgroup_id(skb.cast(), level) }
}

#[inline(always)]
fn skb_cgroup(skb: *mut __sk_buff) -> u64 {
    // SAFETY: helper on the program's own context.
    unsafe { bpf_skb_cgroup_id(skb.cast()) }
}

/// `(type, protocol)` of the packet's full socket; `None` for mini sockets (SYN-ACKs of a
/// listener, TIME_WAIT), `Some((0, 0))` when there is no socket.
#[inline(always)]
pub(crate) fn socket_kind(skb: *mut __sk_buff) -> Option<(u32, u32)> {
    // SAFETY: reading the context's socket pointer; checked for null before use.
    let sk: *mut bpf_sock = unsafe { (*skb).__bindgen_anon_2.sk };
    if sk.is_null() {
        return Some((0, 0));
    }
    // SAFETY: helper on a non-null socket from the context.
    let full = unsafe { bpf_sk_fullsock(sk) };
    if full.is_null() {
        return None;
    }
    // SAFETY: a full socket returned by the kernel.
    Some(unsafe { ((*full).type_, (*full).protocol) })
}

/// TCP stream and UDP datagram sockets are judged by the `sock_addr` programs; TCP mini sockets
/// belong to connections let in from outside.
#[inline(always)]
fn judged_at_syscall(skb: *mut __sk_buff) -> bool {
    match socket_kind(skb) {
        None => true,
        Some((kind, protocol)) => {
            (kind == SOCK_STREAM && protocol == u32::from(proto::TCP))
                || (kind == SOCK_DGRAM && protocol == u32::from(proto::UDP))
        }
    }
}

#[inline(always)]
fn is_udp_socket(skb: *mut __sk_buff) -> bool {
    socket_kind(skb) == Some((SOCK_DGRAM, u32::from(proto::UDP)))
}

#[inline(always)]
fn is_loopback(fam: u8, addr: &[u8; 16]) -> bool {
    if fam == family::INET {
        return addr[0] == 127;
    }
    let mut i = 0;
    while i < 15 {
        if addr[i] != 0 {
            return false;
        }
        i += 1;
    }
    addr[15] == 1
}

/// Cheap first look for sockets judged at the system call: a plain IPv4 header (no options)
/// or an IPv6 header followed directly by TCP or UDP cannot carry a route of its own.
#[inline(always)]
fn may_name_its_route(ctx: &SkBuffContext) -> bool {
    // SAFETY: reading a context field.
    let ethertype = u16::from_be(unsafe { (*ctx.skb.skb).protocol } as u16);
    if ethertype == ETH_P_IP {
        return ctx.load::<u8>(0).map_or(true, |first| first & 0x0f != 5);
    }
    if ethertype == ETH_P_IPV6 {
        return ctx.load::<u8>(6).map_or(true, |next| next != proto::TCP && next != proto::UDP);
    }
    false
}

/// What the hooks need of an IP packet.
pub(crate) struct Packet {
    pub(crate) family: u8,
    /// The upper-layer protocol (after IPv6 extension headers), not normalised.
    pub(crate) protocol: u8,
    pub(crate) source: [u8; 16],
    pub(crate) destination: [u8; 16],
    /// 0 when the protocol has no ports or this is not the first fragment.
    pub(crate) source_port: u16,
    pub(crate) destination_port: u16,
    /// The packet carries its own route: IPv4 options (source routes among them) or an IPv6
    /// routing header.
    pub(crate) routed: bool,
}

#[inline(always)]
pub(crate) fn parse(ctx: &SkBuffContext) -> Option<Packet> {
    // SAFETY: reading a context field.
    let ethertype = u16::from_be(unsafe { (*ctx.skb.skb).protocol } as u16);
    let mut packet = Packet {
        family: family::INET,
        protocol: 0,
        source: [0; 16],
        destination: [0; 16],
        source_port: 0,
        destination_port: 0,
        routed: false,
    };
    let mut later_fragment = false;
    let l4_offset = if ethertype == ETH_P_IP {
        let first: u8 = ctx.load(0).ok()?;
        let fragment: [u8; 2] = ctx.load(6).ok()?;
        packet.protocol = ctx.load(9).ok()?;
        let source: [u8; 4] = ctx.load(12).ok()?;
        let destination: [u8; 4] = ctx.load(16).ok()?;
        packet.source[..4].copy_from_slice(&source);
        packet.destination[..4].copy_from_slice(&destination);
        let header_len = usize::from(first & 0x0f) * 4;
        packet.routed = header_len > 20;
        later_fragment = (u16::from_be_bytes(fragment) & 0x1fff) != 0;
        header_len
    } else if ethertype == ETH_P_IPV6 {
        packet.family = family::INET6;
        packet.source = ctx.load(8).ok()?;
        packet.destination = ctx.load(24).ok()?;
        let mut next: u8 = ctx.load(6).ok()?;
        let mut offset = 40usize;
        let mut i = 0;
        while i < MAX_EXTENSION_HEADERS {
            if next == IPV6_ROUTING {
                packet.routed = true;
                break;
            }
            if next == IPV6_HOP_BY_HOP || next == IPV6_DEST_OPTS {
                let header: [u8; 2] = ctx.load(offset).ok()?;
                next = header[0];
                offset += (usize::from(header[1]) + 1) * 8;
            } else if next == IPV6_FRAGMENT {
                let header: [u8; 4] = ctx.load(offset).ok()?;
                next = header[0];
                later_fragment = (u16::from_be_bytes([header[2], header[3]]) & 0xfff8) != 0;
                offset += 8;
            } else {
                break;
            }
            i += 1;
        }
        packet.protocol = next;
        offset
    } else {
        return None;
    };
    // A later fragment has no transport header: its "port" stays 0, which no rule allows.
    if (packet.protocol == proto::TCP || packet.protocol == proto::UDP) && !later_fragment {
        let ports: [u8; 4] = ctx.load(l4_offset).ok()?;
        packet.source_port = u16::from_be_bytes([ports[0], ports[1]]);
        packet.destination_port = u16::from_be_bytes([ports[2], ports[3]]);
    }
    Some(packet)
}
