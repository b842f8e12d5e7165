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
use egress_common::{counter, family, hook, proto, rule_id, PeerKey};

use crate::{
    destination::Flow,
    dns,
    events::{bump, report, Sender},
    flows::{flow_id, now, open, policy_epoch, Opener},
    maps::UDP_PEERS,
    policy::{bound_of, carries_unsteered_dns, judge, mode_of, policy_of, refused},
    ret::{PASS, REFUSE},
};

const SOCK_STREAM: u32 = 1;
pub(crate) const SOCK_DGRAM: u32 = 2;
pub(crate) const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
/// The loopback device is ifindex 1 in every network namespace.
const LOOPBACK_IFINDEX: u32 = 1;

const IPV6_HOP_BY_HOP: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_AUTH: u8 = 51;
const IPV6_DEST_OPTS: u8 = 60;
const IPV6_MOBILITY: u8 = 135;
const IPV6_HIP: u8 = 139;
const IPV6_SHIM6: u8 = 140;
const IPV6_EXPERIMENT_1: u8 = 253;
const IPV6_EXPERIMENT_2: u8 = 254;
/// Extension headers walked before the upper-layer header. A chain longer than this is refused
/// as malformed, never taken for the transport: a routing header could hide behind it. Real
/// stacks send at most a handful (RFC 8200 section 4.1 names six kinds, each once but
/// destination options twice); 16 keeps the program well inside every verifier's limits.
const MAX_EXTENSION_HEADERS: u32 = 16;

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
            if let Ok(packet) = parse(ctx) {
                dns::record_origin(socket, packet.protocol, &packet.source, packet.family, packet.source_port);
            }
        }
    }
    if judged && !may_name_its_route(ctx) {
        return PASS;
    }
    let parsed = parse(ctx);
    if let Ok(packet) = &parsed {
        if judged && !packet.routed {
            return PASS;
        }
    }
    let epoch = policy_epoch();
    let Some((bound, binding)) = bound_of(|level| skb_ancestor(skb, level), || skb_cgroup(skb)) else {
        return PASS;
    };
    // SAFETY: helpers on the program's own context.
    let sender = unsafe {
        Sender {
            cgroup_id: bpf_skb_cgroup_id(skb.cast()),
            cookie: bpf_get_socket_cookie(skb.cast()),
            socket_uid: Some(bpf_get_socket_uid(skb.cast())),
        }
    };
    let packet = match parsed {
        Ok(packet) => packet,
        // Decided apart from the judging path, which the verifier then walks once, for whole
        // packets only.
        Err(partial) => {
            bump(counter::MALFORMED_PACKETS);
            let flow = Flow { family: partial.family, addr: partial.destination, port: 0, protocol: UNPARSED };
            let judgement = refused(mode_of(binding.slot), rule_id::MALFORMED);
            report::<TASK>(&binding, &flow, &judgement, hook::SKB, &sender, true, epoch);
            return if judgement.lets_through() { PASS } else { REFUSE };
        }
    };
    let flow = Flow {
        family: packet.family,
        addr: packet.destination,
        port: packet.destination_port,
        protocol: egress_common::lookup::normalise_protocol(packet.protocol),
    };
    let judgement = if packet.routed {
        refused(mode_of(binding.slot), rule_id::SOURCE_ROUTED)
    } else if !judged && carries_unsteered_dns(binding.slot, &flow) {
        refused(mode_of(binding.slot), rule_id::DNS_BYPASS)
    } else {
        judge(bound, binding.slot, &flow, || false)
    };
    report::<TASK>(&binding, &flow, &judgement, hook::SKB, &sender, true, epoch);
    if !judgement.lets_through() {
        return REFUSE;
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
    let Ok(packet) = parse(&ctx) else {
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

/// The protocol a [`parse`] error leaves in its partial packet: no rule names it.
const UNPARSED: u8 = 255;

/// Reads the packet's addresses, route and ports. A packet that cannot be read to its
/// destination port comes back as `Err`, holding what could be read (the destination, when the
/// IP header was whole) with the protocol [`UNPARSED`]: the egress hook refuses it.
#[inline(always)]
pub(crate) fn parse(ctx: &SkBuffContext) -> Result<Packet, Packet> {
    // SAFETY: reading a context field.
    let ethertype = u16::from_be(unsafe { (*ctx.skb.skb).protocol } as u16);
    let mut packet = Packet {
        family: family::INET,
        protocol: UNPARSED,
        source: [0; 16],
        destination: [0; 16],
        source_port: 0,
        destination_port: 0,
        routed: false,
    };
    macro_rules! read {
        ($offset:expr) => {
            match ctx.load($offset) {
                Ok(value) => value,
                Err(_) => return Err(packet),
            }
        };
    }
    let mut later_fragment = false;
    let protocol;
    let l4_offset = if ethertype == ETH_P_IP {
        let destination: [u8; 4] = read!(16);
        packet.destination[..4].copy_from_slice(&destination);
        let first: u8 = read!(0);
        let fragment: [u8; 2] = read!(6);
        protocol = read!(9);
        let source: [u8; 4] = read!(12);
        packet.source[..4].copy_from_slice(&source);
        let header_len = usize::from(first & 0x0f) * 4;
        if first >> 4 != 4 || header_len < 20 {
            return Err(packet);
        }
        packet.routed = header_len > 20;
        later_fragment = (u16::from_be_bytes(fragment) & 0x1fff) != 0;
        header_len
    } else if ethertype == ETH_P_IPV6 {
        packet.family = family::INET6;
        packet.destination = read!(24);
        packet.source = read!(8);
        let mut next: u8 = read!(6);
        let mut offset = 40usize;
        let mut i = 0;
        while i < MAX_EXTENSION_HEADERS {
            if !is_extension_header(next) {
                break;
            }
            let len = if next == IPV6_FRAGMENT {
                let header: [u8; 4] = read!(offset);
                next = header[0];
                later_fragment = (u16::from_be_bytes([header[2], header[3]]) & 0xfff8) != 0;
                8
            } else {
                let header: [u8; 2] = read!(offset);
                let units = usize::from(header[1]);
                packet.routed |= next == IPV6_ROUTING;
                // AH counts 4-octet units less two, the others 8-octet units less one.
                let len = if next == IPV6_AUTH { (units + 2) * 4 } else { (units + 1) * 8 };
                next = header[0];
                len
            };
            offset += len;
            i += 1;
        }
        if is_extension_header(next) {
            // Deeper than the walk: what follows was never seen.
            return Err(packet);
        }
        protocol = next;
        offset
    } else {
        return Err(packet);
    };
    // A later fragment has no transport header: its "port" stays 0, which no rule allows.
    if (protocol == proto::TCP || protocol == proto::UDP) && !later_fragment {
        let ports: [u8; 4] = read!(l4_offset);
        packet.source_port = u16::from_be_bytes([ports[0], ports[1]]);
        packet.destination_port = u16::from_be_bytes([ports[2], ports[3]]);
    } else if protocol != proto::TCP && protocol != proto::UDP && !later_fragment {
        // The header chain must end inside the packet even where no port is read.
        // (No branch on the offset here: the verifier would then track every offset apart.)
        let _: u8 = read!(l4_offset.wrapping_sub(1));
    }
    packet.protocol = protocol;
    Ok(packet)
}

/// The IPv6 extension headers of RFC 7045's list that the walk steps over (ESP aside: what
/// follows it is encrypted, so it is judged as the transport).
///
/// A bit test rather than a comparison per value: each comparison would split the verifier's
/// walk into one path per header kind, at every step of the loop.
#[inline(always)]
fn is_extension_header(next: u8) -> bool {
    const fn bits(values: &[u8], base: u8) -> u64 {
        let mut mask = 0u64;
        let mut i = 0;
        while i < values.len() {
            if values[i] >= base && values[i] - base < 64 {
                mask |= 1 << (values[i] - base);
            }
            i += 1;
        }
        mask
    }
    const HEADERS: [u8; 10] = [
        IPV6_HOP_BY_HOP,
        IPV6_ROUTING,
        IPV6_FRAGMENT,
        IPV6_AUTH,
        IPV6_DEST_OPTS,
        IPV6_MOBILITY,
        IPV6_HIP,
        IPV6_SHIM6,
        IPV6_EXPERIMENT_1,
        IPV6_EXPERIMENT_2,
    ];
    const MASKS: [u64; 4] = [bits(&HEADERS, 0), bits(&HEADERS, 64), bits(&HEADERS, 128), bits(&HEADERS, 192)];
    let next = u64::from(next);
    let mask = match next >> 6 {
        0 => MASKS[0],
        1 => MASKS[1],
        2 => MASKS[2],
        _ => MASKS[3],
    };
    (mask >> (next & 63)) & 1 != 0
}
