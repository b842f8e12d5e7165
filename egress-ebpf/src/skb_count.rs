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
    flows::{count_packet, flow_id, remote_of_socket, Direction},
    policy::Flow,
    skb::{parse, socket_kind, ETH_P_IP},
};

const PASS: i32 = 1;

#[cgroup_skb(egress)]
pub fn egress_count(ctx: SkBuffContext) -> i32 {
    count(&ctx, Direction::Out);
    PASS
}

#[cgroup_skb(ingress)]
pub fn ingress_count(ctx: SkBuffContext) -> i32 {
    count(&ctx, Direction::In);
    PASS
}

#[inline(always)]
fn count(ctx: &SkBuffContext, direction: Direction) {
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
        let Some(packet) = parse(ctx) else {
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
    count_packet(skb, &flow_id(cookie, &remote), direction, local, || header_len(ctx, skb));
}

/// IP plus transport header length of a packet (for the headers of a GSO/GRO train).
#[inline(always)]
fn header_len(ctx: &SkBuffContext, skb: *mut __sk_buff) -> u32 {
    // SAFETY: reading a context field.
    let ethertype = u16::from_be(unsafe { (*skb).protocol } as u16);
    let (ip_len, protocol) = if ethertype == ETH_P_IP {
        let first: u8 = ctx.load(0).unwrap_or(0x45);
        (u32::from(first & 0x0f) * 4, ctx.load::<u8>(9).unwrap_or(0))
    } else {
        (40, ctx.load::<u8>(6).unwrap_or(0))
    };
    let transport = match protocol {
        proto::TCP => ctx.load::<u8>(ip_len as usize + 12).map_or(20, |offset| u32::from(offset >> 4) * 4),
        proto::UDP => 8,
        _ => 0,
    };
    ip_len + transport
}
