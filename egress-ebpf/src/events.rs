//! Flow events into the ring buffer, and the counters that make losses visible.

use aya_ebpf::bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP};
use aya_ebpf::helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid};
use egress_common::{
    counter, log, verdict, CgroupBinding, FlowEvent, FlowKey, PolicyStats, DEFAULT_EVENT_BUDGET,
    EVENTS_WAKEUP_BACKLOG_BYTES as WAKEUP_BACKLOG_BYTES,
};

use crate::{
    flows::{first_in_window, now, workload_destination},
    maps::{BINDING_STATS, COUNTERS, EVENTS, FLOWS_SEEN, SETTINGS},
    policy::{Flow, Judgement},
};

/// Who sent the flow, as far as the hook can tell.
pub struct Sender {
    pub cgroup_id: u64,
    /// Socket cookie, 0 when none.
    pub cookie: u64,
    /// Owner uid of the socket where the hook knows it better than the current task.
    pub socket_uid: Option<u32>,
}

/// Counts the flow and reports it, unless `once` is set and the same socket already reported
/// the same decision for this destination (sendmsg and packet hooks run per datagram), or the
/// flow is allowed and its policy's `log` setting wants no event for it.
///
/// `TASK`: whether the hook may call the current-task helpers (pid, uid, comm). `cgroup_skb`
/// programs may not on older kernels, and the verifier then refuses the whole program (seen by
/// `cargo xtask vm-test`: 5.10 and 6.1 refuse `bpf_get_current_pid_tgid`, 6.12
/// `bpf_get_current_uid_gid`; 6.18 accepts both), so packet-hook events carry the socket's uid
/// and no pid or process name.
#[inline(always)]
pub fn report<const TASK: bool>(
    binding: &CgroupBinding,
    flow: &Flow,
    judgement: &Judgement,
    hook: u8,
    sender: &Sender,
    once: bool,
    epoch: u32,
) {
    if once {
        let key = FlowKey {
            cookie: sender.cookie,
            policy: binding.slot,
            rule: judgement.rule,
            addr: flow.addr,
            port: flow.port,
            protocol: flow.protocol,
            verdict: judgement.verdict,
            _pad: [0; 4],
        };
        if FLOWS_SEEN.get_ptr(&key).is_some() {
            return;
        }
        let _ = FLOWS_SEEN.insert(&key, &0, 0);
    }
    let now = now();
    count(binding.stats, judgement.verdict);
    if judgement.verdict == verdict::ALLOWED {
        let first = first_in_window(&workload_destination(sender.cgroup_id, flow), binding, epoch, judgement, now);
        let wanted = match judgement.log {
            log::ALL => true,
            log::BLOCKED => false,
            _ => first,
        };
        if !wanted {
            return;
        }
    }
    if !within_budget(binding.stats, now) {
        return;
    }

    let Some(mut entry) = EVENTS.reserve::<FlowEvent>(0) else {
        bump(counter::EVENTS_DROPPED);
        return;
    };
    let (pid_tgid, comm) =
        if TASK { (bpf_get_current_pid_tgid(), bpf_get_current_comm().unwrap_or([0; 16])) } else { (0, [0; 16]) };
    let uid = match sender.socket_uid {
        Some(uid) => uid,
        None if TASK => bpf_get_current_uid_gid() as u32,
        None => u32::MAX,
    };
    let event = FlowEvent {
        boot_ns: now,
        cgroup_id: sender.cgroup_id,
        policy: binding.slot,
        rule: judgement.rule,
        pid: (pid_tgid >> 32) as u32,
        uid,
        daddr: flow.addr,
        dport: flow.port,
        family: flow.family,
        protocol: flow.protocol,
        verdict: judgement.verdict,
        hook,
        _pad: [0; 2],
        comm,
    };
    entry.write(event);
    entry.submit(wakeup_flag());
}

/// Waking the reader on every event costs microseconds per flow (an irq_work and a reschedule);
/// the daemon also drains on a short timer, so wake it only once a backlog builds up.
#[inline(always)]
fn wakeup_flag() -> u64 {
    if EVENTS.query(u64::from(BPF_RB_AVAIL_DATA)) >= WAKEUP_BACKLOG_BYTES {
        u64::from(BPF_RB_FORCE_WAKEUP)
    } else {
        u64::from(BPF_RB_NO_WAKEUP)
    }
}

/// Counts a flow decision for its cgroup.
#[inline(always)]
pub fn count(index: u32, verdict: u8) {
    let Some(stats) = BINDING_STATS.get_ptr_mut(index) else {
        return;
    };
    // SAFETY: per-CPU value, no other writer on this CPU while the program runs.
    let stats: &mut PolicyStats = unsafe { &mut *stats };
    match verdict {
        verdict::ALLOWED => stats.allowed += 1,
        verdict::AUDIT => stats.audited += 1,
        _ => stats.blocked += 1,
    }
}

/// False when the cgroup has used up this second's event budget on this CPU (the event is then
/// counted as suppressed, not written), so one workload cannot fill the ring buffer and blind the
/// daemon to the others.
#[inline(always)]
fn within_budget(index: u32, now: u64) -> bool {
    let Some(stats) = BINDING_STATS.get_ptr_mut(index) else {
        return true;
    };
    // SAFETY: per-CPU value, no other writer on this CPU while the program runs.
    let stats: &mut PolicyStats = unsafe { &mut *stats };
    if now.wrapping_sub(stats.window_start_ns) >= 1_000_000_000 {
        stats.window_start_ns = now;
        stats.window_events = 0;
    }
    let budget = match SETTINGS.get(0).map_or(0, |s| s.event_budget) {
        0 => DEFAULT_EVENT_BUDGET,
        budget => budget,
    };
    if stats.window_events >= u64::from(budget) {
        stats.suppressed += 1;
        return false;
    }
    stats.window_events += 1;
    true
}

/// Adds one to a kernel-wide counter (`counter::*`).
#[inline(always)]
pub fn bump(index: u32) {
    if let Some(value) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU value, no other writer on this CPU while the program runs.
        unsafe { *value += 1 };
    }
}
