//! Flow accounting on `cgroup_skb`: programs of their own, attached after the filters of `skb`
//! on the same hooks. The filters stay as cheap (and as quick to verify) as they were, and the
//! accounting's cost per packet shows by itself in the kernel's run-time statistics.
//!
//! Each packet of a socket of the cgroup is added to its flow, if that flow is counted (it was
//! let through at connect/sendmsg, or by the packet filter for raw and ping sockets): the flow
//! is the socket's connected remote end, else the packet's far end.

use aya_ebpf::{
    bindings::__sk_buff, helpers::generated::bpf_get_socket_cookie, macros::cgroup_skb, programs::SkBuffContext,
};
use egress_common::{lookup::normalise_protocol, proto};

use crate::{
    flows::{count_packet, flow_id, open_at_syn, remote_of_socket, Direction},
    policy::Flow,
    ret::PASS,
    skb::{parse, socket_kind, ETH_P_IP},
};

/// Counts packets out; opens the flow of a TCP connection at its SYN, naming the process from
/// the current task (the SYN leaves from inside `connect()`).
#[cgroup_skb(egress)]
pub fn egress_count(ctx: SkBuffContext) -> i32 {
    count::<true>(&ctx, Direction::Out);
    PASS
}

/// `egress_count` for kernels that refuse the task helpers in packet programs: who opened a
/// connection is then handed over by `connect()` (`flows::hand_over`).
#[cgroup_skb(egress)]
pub fn egress_count_portable(ctx: SkBuffContext) -> i32 {
    count::<false>(&ctx, Direction::Out);
    PASS
}

#[cgroup_skb(ingress)]
pub fn ingress_count(ctx: SkBuffContext) -> i32 {
    count::<false>(&ctx, Direction::In);
    PASS
}

#[inline(always)]
fn count<const TASK: bool>(ctx: &SkBuffContext, direction: Direction) {
    let skb = ctx.skb.skb;
    // Mini sockets (a listener's SYN-ACKs, TIME_WAIT) and packets without a socket are no flow.
    let Some((kind, protocol)) = socket_kind(skb) else {
        return;
    };
    if kind == 0 {
        return;
    }
    let mut remote = remote_of_socket(skb, normalise_protocol(protocol as u8));
    let mut local = ([0u8; 16], 0u16, false);
    if remote.port == 0 {
        let Ok(packet) = parse(ctx) else {
            return;
        };
        let (addr, port) = match direction {
            Direction::Out => (packet.destination, packet.destination_port),
            Direction::In => (packet.source, packet.source_port),
        };
        remote = Flow { family: packet.family, addr, port, protocol: normalise_protocol(packet.protocol) };
        if direction == Direction::Out {
            local = (packet.source, packet.source_port, true);
        }
    }
    // SAFETY: helper on the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(skb.cast()) };
    let id = flow_id(cookie, &remote);
    if count_packet(skb, &id, direction, local, || header_len(ctx, skb)) {
        return;
    }
    if direction == Direction::Out && remote.protocol == proto::TCP && opens_connection(ctx, skb) {
        open_at_syn::<TASK>(skb, &id, &remote);
        count_packet(skb, &id, direction, local, || header_len(ctx, skb));
    }
}

/// A TCP SYN without ACK: the first packet of a connection this socket opens.
#[inline(always)]
fn opens_connection(ctx: &SkBuffContext, skb: *mut __sk_buff) -> bool {
    const SYN: u8 = 0x02;
    const ACK: u8 = 0x10;
    let (ip_len, _) = ip_header(ctx, skb);
    ctx.load::<u8>(ip_len as usize + 13).is_ok_and(|flags| flags & (SYN | ACK) == SYN)
}

/// IP header length and upper-layer protocol of a packet (IPv6 extension headers not walked).
#[inline(always)]
fn ip_header(ctx: &SkBuffContext, skb: *mut __sk_buff) -> (u32, u8) {
    // SAFETY: reading a context field.
    let ethertype = u16::from_be(unsafe { (*skb).protocol } as u16);
    if ethertype == ETH_P_IP {
        let first: u8 = ctx.load(0).unwrap_or(0x45);
        (u32::from(first & 0x0f) * 4, ctx.load::<u8>(9).unwrap_or(0))
    } else {
        (40, ctx.load::<u8>(6).unwrap_or(0))
    }
}

/// IP plus transport header length of a packet (for the headers of a GSO/GRO train).
#[inline(always)]
fn header_len(ctx: &SkBuffContext, skb: *mut __sk_buff) -> u32 {
    let (ip_len, protocol) = ip_header(ctx, skb);
    let transport = match protocol {
        proto::TCP => ctx.load::<u8>(ip_len as usize + 12).map_or(20, |offset| u32::from(offset >> 4) * 4),
        proto::UDP => 8,
        _ => 0,
    };
    ip_len + transport
}
