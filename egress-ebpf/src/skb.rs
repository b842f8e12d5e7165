//! Per-packet backstop on `cgroup_skb/egress`.
//!
//! TCP and UDP sockets were already judged at connect/sendmsg (and a TCP server's replies must
//! pass), so their packets go through. Everything else a covered socket sends - raw IP, raw and
//! unprivileged ICMP - is judged here, per packet, and reported once per flow.

use aya_ebpf::{
    bindings::{__sk_buff, bpf_sock},
    helpers::generated::{
        bpf_get_socket_cookie, bpf_get_socket_uid, bpf_sk_fullsock, bpf_skb_ancestor_cgroup_id,
        bpf_skb_cgroup_id,
    },
    macros::cgroup_skb,
    programs::SkBuffContext,
};
use egress_common::{family, hook, proto};

use crate::{
    events::{report, Sender},
    policy::{judge, normalise_protocol, policy_of, Flow},
};

const PASS: i32 = 1;
const DROP: i32 = 0;

const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;

#[cgroup_skb(egress)]
pub fn egress_packet(ctx: SkBuffContext) -> i32 {
    let skb = ctx.skb.skb;
    if judged_at_syscall(skb) {
        return PASS;
    }
    // SAFETY: helper on the program's own context.
    let Some(binding) = policy_of(|level| unsafe { bpf_skb_ancestor_cgroup_id(skb.cast(), level) })
    else {
        return PASS;
    };
    let Some(flow) = parse(&ctx) else {
        return PASS;
    };
    let judgement = judge(binding.slot, &flow, || false);
    // SAFETY: helpers on the program's own context.
    let sender = unsafe {
        Sender {
            cgroup_id: bpf_skb_cgroup_id(skb.cast()),
            cookie: bpf_get_socket_cookie(skb.cast()),
            socket_uid: Some(bpf_get_socket_uid(skb.cast())),
        }
    };
    report(&binding, &flow, &judgement, hook::SKB, &sender, true);
    if judgement.lets_through() {
        PASS
    } else {
        DROP
    }
}

/// TCP stream and UDP datagram sockets are judged by the `sock_addr` programs; TCP mini sockets
/// (SYN-ACKs of a listener, TIME_WAIT) belong to connections let in from outside.
#[inline(always)]
fn judged_at_syscall(skb: *mut __sk_buff) -> bool {
    // SAFETY: reading the context's socket pointer; checked for null before use.
    let sk: *mut bpf_sock = unsafe { (*skb).__bindgen_anon_2.sk };
    if sk.is_null() {
        return false;
    }
    // SAFETY: helper on a non-null socket from the context.
    let full = unsafe { bpf_sk_fullsock(sk) };
    if full.is_null() {
        return true;
    }
    // SAFETY: a full socket returned by the kernel.
    let (kind, protocol) = unsafe { ((*full).type_, (*full).protocol) };
    (kind == SOCK_STREAM && protocol == u32::from(proto::TCP))
        || (kind == SOCK_DGRAM && protocol == u32::from(proto::UDP))
}

#[inline(always)]
fn parse(ctx: &SkBuffContext) -> Option<Flow> {
    // SAFETY: reading a context field.
    let ethertype = u16::from_be(unsafe { (*ctx.skb.skb).protocol } as u16);
    let mut addr = [0u8; 16];
    let (fam, protocol, l4_offset) = if ethertype == ETH_P_IP {
        let first: u8 = ctx.load(0).ok()?;
        let protocol: u8 = ctx.load(9).ok()?;
        let daddr: [u8; 4] = ctx.load(16).ok()?;
        addr[..4].copy_from_slice(&daddr);
        (family::INET, protocol, usize::from(first & 0x0f) * 4)
    } else if ethertype == ETH_P_IPV6 {
        let next_header: u8 = ctx.load(6).ok()?;
        addr = ctx.load(24).ok()?;
        (family::INET6, next_header, 40)
    } else {
        return None;
    };
    let port = if protocol == proto::TCP || protocol == proto::UDP {
        let ports: [u8; 4] = ctx.load(l4_offset).ok()?;
        u16::from_be_bytes([ports[2], ports[3]])
    } else {
        0
    };
    Some(Flow { family: fam, addr, port, protocol: normalise_protocol(protocol) })
}
