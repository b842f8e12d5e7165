//! Socket creation: sockets whose traffic the per-flow hooks cannot judge are refused to covered
//! cgroups unless their policy allows the kind (`egress_common::socket_kind`).
//!
//! `cgroup/sock_create` sees AF_INET/AF_INET6 sockets on every kernel (MPTCP); only the BPF LSM
//! `socket_create` hook sees other families (`AF_PACKET`, ...), and only where the kernel runs
//! the BPF LSM (`lsm=...,bpf`): the daemon says whether that guard is in force.

use aya_ebpf::{
    helpers::generated::bpf_get_current_cgroup_id,
    macros::{cgroup_sock, lsm},
    programs::{LsmContext, SockContext},
};
use egress_common::{hook, socket_kind, CgroupBinding};

use crate::{
    destination::Flow,
    events::{report, Sender},
    maps::POLICY_INFO,
    policy::{current_ancestor, policy_of, refused, Judgement},
    ret::EPERM,
};

#[cgroup_sock(sock_create)]
pub fn sock_create(ctx: SockContext) -> i32 {
    // SAFETY: reading context fields.
    let (family, protocol) = unsafe { ((*ctx.sock).family, (*ctx.sock).protocol) };
    if may_open(family, protocol, hook::SOCK_CREATE) {
        1
    } else {
        0
    }
}

#[lsm(hook = "socket_create")]
pub fn socket_create(ctx: LsmContext) -> i32 {
    // int socket_create(int family, int type, int protocol, int kern), then the previous
    // LSM's verdict.
    let family: i32 = unsafe { ctx.arg(0) };
    let protocol: i32 = unsafe { ctx.arg(2) };
    let kernel: i32 = unsafe { ctx.arg(3) };
    let previous: i32 = unsafe { ctx.arg(4) };
    if previous != 0 {
        return previous;
    }
    // Kernel-internal sockets, and the IP families that `sock_create` and the flow hooks cover.
    let kind = socket_kind::of(family as u32, protocol as u32);
    if kernel != 0 || kind == 0 || kind == socket_kind::MPTCP {
        return 0;
    }
    if may_open(family as u32, protocol as u32, hook::SOCKET_LSM) {
        0
    } else {
        -EPERM
    }
}

#[inline(always)]
fn may_open(family: u32, protocol: u32, hook: u8) -> bool {
    let kind = socket_kind::of(family, protocol);
    if kind == 0 {
        return true;
    }
    // SAFETY: helper without arguments.
    let Some(binding) = policy_of(current_ancestor, || unsafe { bpf_get_current_cgroup_id() }) else {
        return true;
    };
    let judgement = judge_socket(&binding, kind);
    let flow = Flow { family: family as u8, addr: [0; 16], port: 0, protocol: protocol as u8 };
    // SAFETY: helper without arguments.
    let sender = Sender { cgroup_id: unsafe { bpf_get_current_cgroup_id() }, cookie: 0, socket_uid: None };
    report::<true>(&binding, &flow, &judgement, hook, &sender, false, crate::flows::policy_epoch());
    judgement.lets_through()
}

#[inline(always)]
fn judge_socket(binding: &CgroupBinding, kind: u32) -> Judgement {
    match POLICY_INFO.get(binding.slot) {
        Some(info) if info.allowed_sockets & kind != 0 => Judgement {
            verdict: egress_common::verdict::ALLOWED,
            rule: egress_common::rule_id::SOCKET_KIND,
            log: info.log,
            learned: false,
        },
        Some(info) => refused(info.mode, egress_common::rule_id::SOCKET_KIND),
        None => refused(egress_common::mode::ENFORCE, egress_common::rule_id::SOCKET_KIND),
    }
}
