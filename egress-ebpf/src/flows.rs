//! Flow accounting: every flow a covered cgroup opens (a TCP connection; a datagram or raw
//! socket and one destination) gets an entry in `FLOWS` when it is let through; the packet hooks
//! add each packet to it, both ways; `sock_release` ends it. The daemon reads the counters for
//! interim records and gets the ends through the `FLOW_ENDS` ring.
//!
//! A TCP connection whose decision was reused from the workload's cache is opened one step
//! later, at its SYN ([`hand_over`], [`open_at_syn`]): `connect()` then writes no shared map.
//!
//! The entry doubles as a per-socket verdict cache for `sendmsg`: a datagram to a destination
//! this socket was already allowed to reach, under the same policy epoch and from the same
//! cgroup, is let through without judging it again (see [`cached_on_socket`]).

use aya_ebpf::{
    bindings::{__sk_buff, bpf_sock, BPF_NOEXIST, BPF_RB_NO_WAKEUP},
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
        generated::{self, bpf_get_socket_cookie, bpf_get_socket_uid, bpf_ktime_get_boot_ns, bpf_skb_cgroup_id},
    },
    macros::cgroup_sock,
    programs::SockContext,
};
use egress_common::{
    counter, family, log, proto, settings_flags, verdict, CgroupBinding, DestinationSeen, FlowEnd, FlowId, FlowState,
    PendingOpen, WorkloadDestination, NEW_DESTINATION_WINDOW_NS, PENDING_OPEN_SLOTS,
};

use crate::{
    maps::{CLOSED_SOCKETS, COUNTERS, FLOWS, FLOW_ENDS, PENDING_OPENS, SETTINGS, WORKLOAD_DESTINATIONS},
    policy::{Flow, Judgement},
};

/// The policy epoch now: read before the policy lookup, so a decision is never tagged with an
/// epoch newer than the maps it was taken from.
#[inline(always)]
pub fn policy_epoch() -> u32 {
    SETTINGS.get(0).map_or(0, |s| s.policy_epoch)
}

#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: a helper without arguments.
    unsafe { bpf_ktime_get_boot_ns() }
}

#[inline(always)]
pub fn flow_id(cookie: u64, flow: &Flow) -> FlowId {
    FlowId { cookie, addr: flow.addr, port: flow.port, family: flow.family, protocol: flow.protocol, _pad: [0; 4] }
}

/// Whether this socket was already allowed to reach the flow's destination under the current
/// policy epoch, from the same cgroup (a process moved into another cgroup is judged by its
/// new policy; the epoch moves on when any binding changes), by a decision that does not lapse
/// on its own (one through a learned address does, when the address expires).
#[inline(always)]
pub fn cached_on_socket(id: &FlowId, epoch: u32, cgroup_id: u64) -> bool {
    match FLOWS.get_ptr(id) {
        // SAFETY: a map value; fields are read once each.
        Some(state) => unsafe {
            (*state).verdict == verdict::ALLOWED
                && (*state).learned == 0
                && (*state).epoch == epoch
                && (*state).cgroup_id == cgroup_id
        },
        None => false,
    }
}

/// Who opened a flow and under which decision.
pub struct Opener {
    pub cgroup_id: u64,
    pub slot: u32,
    pub epoch: u32,
    /// Owner uid of the socket where the hook knows it better than the current task.
    pub socket_uid: Option<u32>,
}

/// Starts counting a flow that was let through (or retags the one already counted with the new
/// decision, keeping its counters).
#[inline(always)]
pub fn open<const TASK: bool>(id: &FlowId, opener: &Opener, judgement: &Judgement, now: u64) {
    if let Some(state) = FLOWS.get_ptr_mut(id) {
        // SAFETY: a map value; plain stores of independent fields.
        unsafe {
            (*state).policy = opener.slot;
            (*state).rule = judgement.rule;
            (*state).epoch = opener.epoch;
            (*state).verdict = judgement.verdict;
            (*state).learned = u8::from(judgement.learned);
            (*state).cgroup_id = opener.cgroup_id;
        }
        return;
    }
    let (pid_tgid, comm) =
        if TASK { (bpf_get_current_pid_tgid(), bpf_get_current_comm().unwrap_or([0; 16])) } else { (0, [0; 16]) };
    let uid = match opener.socket_uid {
        Some(uid) => uid,
        None if TASK => bpf_get_current_uid_gid() as u32,
        None => u32::MAX,
    };
    let state = FlowState {
        start_ns: now,
        last_ns: now,
        cgroup_id: opener.cgroup_id,
        policy: opener.slot,
        rule: judgement.rule,
        epoch: opener.epoch,
        pid: (pid_tgid >> 32) as u32,
        uid,
        verdict: judgement.verdict,
        learned: u8::from(judgement.learned),
        comm,
        ..FlowState::default()
    };
    let _ = FLOWS.insert(id, &state, u64::from(BPF_NOEXIST));
}

/// `connect()` of a TCP socket whose (allowed) decision was reused: leaves who opened it, on this CPU, for
/// the packet hook that sends its SYN ([`open_at_syn`]) instead of writing the flow here.
#[inline(always)]
pub fn hand_over(cookie: u64, opener: &Opener, rule: u32) {
    let Some(slot) = PENDING_OPENS.get_ptr_mut(pending_slot(cookie)) else {
        return;
    };
    let pid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let uid = bpf_get_current_uid_gid() as u32;
    // SAFETY: a per-CPU map value, written field by field in place (the stack of the connect
    // programs is nearly full). The cookie is cleared first and written last, so a program that
    // runs in between on this CPU never takes a half-written record.
    unsafe {
        use core::ptr::write_volatile;
        write_volatile(&raw mut (*slot).cookie, 0);
        write_volatile(&raw mut (*slot).cgroup_id, opener.cgroup_id);
        write_volatile(&raw mut (*slot).slot, opener.slot);
        write_volatile(&raw mut (*slot).rule, rule);
        write_volatile(&raw mut (*slot).epoch, opener.epoch);
        write_volatile(&raw mut (*slot).pid, pid);
        write_volatile(&raw mut (*slot).uid, uid);
        write_volatile(&raw mut (*slot).verdict, verdict::ALLOWED);
        if generated::bpf_get_current_comm((&raw mut (*slot).comm).cast(), 16) != 0 {
            write_volatile(&raw mut (*slot).comm, [0; 16]);
        }
        write_volatile(&raw mut (*slot).cookie, cookie);
    }
}

#[inline(always)]
fn pending_slot(cookie: u64) -> u32 {
    (cookie as u32) & (PENDING_OPEN_SLOTS - 1)
}

/// The record [`hand_over`] left for this socket on this CPU, taken out.
#[inline(always)]
fn take_pending(cookie: u64) -> Option<PendingOpen> {
    let slot = PENDING_OPENS.get_ptr_mut(pending_slot(cookie))?;
    // SAFETY: a per-CPU map value, read between two reads of its cookie.
    unsafe {
        if core::ptr::read_volatile(&raw const (*slot).cookie) != cookie {
            return None;
        }
        let record = core::ptr::read_volatile(slot);
        if core::ptr::read_volatile(&raw const (*slot).cookie) != cookie {
            return None;
        }
        core::ptr::write_volatile(&raw mut (*slot).cookie, 0);
        Some(record)
    }
}

/// Opens the flow of an outgoing TCP connection at its SYN. Who opened it: what `connect()`
/// handed over; else, with `TASK` (the SYN leaves from inside `connect()`), the current task
/// when it is in the socket's cgroup; else only the socket's owner. The decision: the one the
/// workload's `connect()` reused.
#[inline(always)]
pub fn open_at_syn<const TASK: bool>(skb: *mut __sk_buff, id: &FlowId, remote: &Flow) {
    let opened = match take_pending(id.cookie) {
        Some(opened) => opened,
        None => {
            // SAFETY: helpers on the program's own context.
            let (cgroup_id, uid) = unsafe { (bpf_skb_cgroup_id(skb.cast()), bpf_get_socket_uid(skb.cast())) };
            // SAFETY: copied out at once.
            let Some(seen) = (unsafe { WORKLOAD_DESTINATIONS.get(&workload_destination(cgroup_id, remote)) }).copied()
            else {
                return;
            };
            let mut opened = PendingOpen {
                cookie: id.cookie,
                cgroup_id,
                slot: seen.slot,
                rule: seen.rule,
                epoch: seen.epoch,
                uid,
                verdict: seen.verdict,
                ..PendingOpen::default()
            };
            // SAFETY: a helper without arguments.
            if TASK && unsafe { generated::bpf_get_current_cgroup_id() } == cgroup_id {
                opened.pid = (bpf_get_current_pid_tgid() >> 32) as u32;
                opened.uid = bpf_get_current_uid_gid() as u32;
                opened.comm = bpf_get_current_comm().unwrap_or([0; 16]);
            }
            opened
        }
    };
    let now = now();
    let state = FlowState {
        start_ns: now,
        last_ns: now,
        cgroup_id: opened.cgroup_id,
        policy: opened.slot,
        rule: opened.rule,
        epoch: opened.epoch,
        pid: opened.pid,
        uid: opened.uid,
        verdict: opened.verdict,
        comm: opened.comm,
        ..FlowState::default()
    };
    let _ = FLOWS.insert(id, &state, u64::from(BPF_NOEXIST));
}

/// Whether the packet hook names who opens TCP connections (`settings_flags::OPENER_AT_SYN`).
#[inline(always)]
pub fn opener_at_syn() -> bool {
    SETTINGS.get(0).is_some_and(|s| s.flags & settings_flags::OPENER_AT_SYN != 0)
}

/// Which way a packet goes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Out,
    In,
}

/// Adds one packet (or one GSO/GRO train of `gso_segs` packets) to its flow, if the flow is
/// counted (then true). Bytes are IP bytes, headers included, as they go on the wire.
/// `local`: the packet's own source going out, where the hook parsed it (an unconnected
/// socket's address is unspecified); taken from the socket when `local.2` is false. (A flag,
/// not an `Option`: the verifier refuses code that copies the undefined payload of a `None`.)
#[inline(always)]
pub fn count_packet(
    skb: *mut __sk_buff,
    id: &FlowId,
    direction: Direction,
    local: ([u8; 16], u16, bool),
    header_len: impl FnOnce() -> u32,
) -> bool {
    let Some(state) = FLOWS.get_ptr_mut(id) else {
        return false;
    };
    // SAFETY: context reads.
    let (len, segs) = unsafe { ((*skb).len, (*skb).gso_segs) };
    let (packets, bytes) = if segs > 1 {
        // The train's headers are written once per segment on the wire.
        (u64::from(segs), u64::from(len) + u64::from(segs - 1) * u64::from(header_len()))
    } else {
        (1, u64::from(len))
    };
    // SAFETY: pointers into a map value; the counters are only ever added to, atomically.
    unsafe {
        match direction {
            Direction::Out => {
                atomic_add(&raw mut (*state).packets_out, packets);
                atomic_add(&raw mut (*state).bytes_out, bytes);
                if (*state).local_port == 0 {
                    if local.2 {
                        (*state).local_addr = local.0;
                        (*state).local_port = local.1;
                    } else {
                        note_local(skb, state, id.family);
                    }
                }
            }
            Direction::In => {
                atomic_add(&raw mut (*state).packets_in, packets);
                atomic_add(&raw mut (*state).bytes_in, bytes);
            }
        }
    }
    true
}

/// The local address and port of the socket, once known (TCP picks its port at connect).
#[inline(always)]
unsafe fn note_local(skb: *mut __sk_buff, state: *mut FlowState, flow_family: u8) {
    // SAFETY: context reads and stores into a map value.
    unsafe {
        let port = (*skb).local_port as u16;
        let local = &mut (*state).local_addr;
        if flow_family == family::INET {
            local[..4].copy_from_slice(&(*skb).local_ip4.to_ne_bytes());
        } else {
            let mut i = 0;
            while i < 4 {
                let word = core::ptr::read_volatile(&raw const (*skb).local_ip6[i]);
                local[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
                i += 1;
            }
        }
        (*state).local_port = port;
    }
}

/// `lock *(u64 *)(target) += value`: the counters are added to from every CPU at once.
#[inline(always)]
unsafe fn atomic_add(target: *mut u64, value: u64) {
    // SAFETY: `target` points into a map value, 8-byte aligned.
    unsafe {
        core::arch::asm!("lock *(u64 *)({0} + 0) += {1}", in(reg) target, in(reg) value, options(nostack));
    }
}

/// The remote end of a connected socket, from the packet's socket; port 0 when the socket has
/// no remote port (unconnected datagram sockets, raw and ping sockets: take it from the packet).
#[inline(always)]
pub fn remote_of_socket(skb: *mut __sk_buff, protocol: u8) -> Flow {
    // SAFETY: context reads.
    unsafe {
        let port = ((*skb).remote_port >> 16) as u16;
        let mut flow = Flow { family: family::INET, addr: [0; 16], port: u16::from_be(port), protocol };
        if port == 0 {
            return flow;
        }
        if (*skb).family == u32::from(family::INET) {
            flow.addr[..4].copy_from_slice(&(*skb).remote_ip4.to_ne_bytes());
            return flow;
        }
        let w = [
            core::ptr::read_volatile(&raw const (*skb).remote_ip6[0]),
            core::ptr::read_volatile(&raw const (*skb).remote_ip6[1]),
            core::ptr::read_volatile(&raw const (*skb).remote_ip6[2]),
            core::ptr::read_volatile(&raw const (*skb).remote_ip6[3]),
        ];
        if w[0] == 0 && w[1] == 0 && w[2] == u32::from_be(0x0000_ffff) {
            flow.addr[..4].copy_from_slice(&w[3].to_ne_bytes());
            return flow;
        }
        flow.family = family::INET6;
        let mut i = 0;
        while i < 4 {
            flow.addr[i * 4..i * 4 + 4].copy_from_slice(&w[i].to_ne_bytes());
            i += 1;
        }
        flow
    }
}

/// Whether an allowed decision for `key` should raise an event under `log: new`: the first
/// time the workload reaches the destination within the window. Also remembers the decision
/// (for [`cached_for_workload`]).
#[inline(always)]
pub fn first_in_window(
    key: &WorkloadDestination,
    binding: &CgroupBinding,
    epoch: u32,
    judgement: &Judgement,
    now: u64,
) -> bool {
    if let Some(seen) = WORKLOAD_DESTINATIONS.get_ptr_mut(key) {
        // SAFETY: a map value; plain stores.
        unsafe {
            (*seen).slot = binding.slot;
            (*seen).stats = binding.stats;
            (*seen).epoch = epoch;
            (*seen).rule = judgement.rule;
            (*seen).verdict = judgement.verdict;
            (*seen).log = judgement.log;
            (*seen).reusable = u8::from(!judgement.learned);
            if (*seen).logged_ns != 0 && now.wrapping_sub((*seen).logged_ns) < NEW_DESTINATION_WINDOW_NS {
                return false;
            }
            (*seen).logged_ns = now;
        }
        return true;
    }
    let seen = DestinationSeen {
        logged_ns: now,
        slot: binding.slot,
        epoch,
        rule: judgement.rule,
        stats: binding.stats,
        verdict: judgement.verdict,
        reusable: u8::from(!judgement.learned),
        log: judgement.log,
        _pad: [0; 5],
    };
    let _ = WORKLOAD_DESTINATIONS.insert(key, &seen, 0);
    true
}

/// A workload's allowed decision that a `connect()` may reuse without judging the flow again.
pub struct Reused {
    pub slot: u32,
    pub rule: u32,
    pub stats: u32,
}

/// The workload's last decision for `key`, when it allowed the flow under the current epoch and
/// its policy wants no event for a repeat (`log: all` logs every decision, so it is judged each
/// time; `log: new` looks at its window when the epoch is renewed). Stateful-reply decisions
/// are per socket and never come from here.
#[inline(always)]
pub fn cached_for_workload(key: &WorkloadDestination, epoch: u32) -> Option<Reused> {
    let seen = WORKLOAD_DESTINATIONS.get_ptr(key)?;
    // SAFETY: a map value, fields read once each.
    unsafe {
        let reusable = (*seen).verdict == verdict::ALLOWED
            && (*seen).reusable != 0
            && (*seen).epoch == epoch
            && (*seen).rule != egress_common::rule_id::REPLY;
        if !reusable {
            return None;
        }
        // No clock read here: the daemon renews the epoch often enough for `log: new`.
        ((*seen).log != log::ALL).then(|| Reused { slot: (*seen).slot, rule: (*seen).rule, stats: (*seen).stats })
    }
}

#[inline(always)]
pub fn workload_destination(cgroup_id: u64, flow: &Flow) -> WorkloadDestination {
    WorkloadDestination {
        cgroup_id,
        addr: flow.addr,
        port: flow.port,
        family: flow.family,
        protocol: flow.protocol,
        _pad: [0; 4],
    }
}

/// Ends the flows of a socket as it is released: its connected flow at once (to the ring);
/// datagram and raw sockets are also marked closed, so the daemon ends their other flows.
#[cgroup_sock(sock_release)]
pub fn sock_release(ctx: SockContext) -> i32 {
    let sk = ctx.sock;
    // SAFETY: helper on the program's own socket.
    let cookie = unsafe { bpf_get_socket_cookie(sk.cast()) };
    let now = now();
    // SAFETY: context reads.
    let protocol = unsafe { core::ptr::read_volatile(&raw const (*sk).protocol) } as u8;
    if protocol != proto::TCP {
        let _ = CLOSED_SOCKETS.insert(&cookie, &now, 0);
    }
    if let Some(remote) = remote_of_released(sk, protocol) {
        let id = flow_id(cookie, &remote);
        if let Some(state) = FLOWS.get_ptr_mut(&id) {
            end(&id, state, now);
        }
    }
    1
}

/// Reports the end of a flow and stops counting it; when the ring is full the flow is only
/// marked ended, and the daemon ends it at its next sweep.
#[inline(always)]
fn end(id: &FlowId, state: *mut FlowState, now: u64) {
    let Some(mut entry) = FLOW_ENDS.reserve::<FlowEnd>(0) else {
        // SAFETY: a map value.
        unsafe { (*state).end_ns = now };
        if let Some(dropped) = COUNTERS.get_ptr_mut(counter::FLOW_ENDS_DROPPED) {
            // SAFETY: per-CPU value.
            unsafe { *dropped += 1 };
        }
        return;
    };
    // SAFETY: a map value, copied out.
    let mut copy = unsafe { *state };
    copy.end_ns = now;
    entry.write(FlowEnd { id: *id, state: copy });
    entry.submit(u64::from(BPF_RB_NO_WAKEUP));
    let _ = FLOWS.remove(id);
}

/// The connected remote end of a socket being released, as its flow was keyed.
#[inline(always)]
fn remote_of_released(sk: *mut bpf_sock, protocol: u8) -> Option<Flow> {
    // SAFETY: context reads of u32 fields.
    unsafe {
        let port = core::ptr::read_volatile((&raw const (*sk).dst_port).cast::<u32>()) as u16;
        if port == 0 {
            return None;
        }
        let protocol = egress_common::lookup::normalise_protocol(protocol);
        let mut flow = Flow { family: family::INET, addr: [0; 16], port: u16::from_be(port), protocol };
        let sock_family = core::ptr::read_volatile(&raw const (*sk).family);
        if sock_family == u32::from(family::INET) {
            let ip = core::ptr::read_volatile(&raw const (*sk).dst_ip4);
            flow.addr[..4].copy_from_slice(&ip.to_ne_bytes());
            return Some(flow);
        }
        let w = [
            core::ptr::read_volatile(&raw const (*sk).dst_ip6[0]),
            core::ptr::read_volatile(&raw const (*sk).dst_ip6[1]),
            core::ptr::read_volatile(&raw const (*sk).dst_ip6[2]),
            core::ptr::read_volatile(&raw const (*sk).dst_ip6[3]),
        ];
        if w[0] == 0 && w[1] == 0 && w[2] == u32::from_be(0x0000_ffff) {
            flow.addr[..4].copy_from_slice(&w[3].to_ne_bytes());
            return Some(flow);
        }
        flow.family = family::INET6;
        let mut i = 0;
        while i < 4 {
            flow.addr[i * 4..i * 4 + 4].copy_from_slice(&w[i].to_ne_bytes());
            i += 1;
        }
        Some(flow)
    }
}
