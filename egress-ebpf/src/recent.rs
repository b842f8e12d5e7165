//! Decisions reused lately, per CPU: a small direct-mapped array in front of the hash maps that
//! hold them (`WORKLOAD_DESTINATIONS` for `connect()`, `FLOWS` for datagrams). A repeated
//! `connect()` or datagram then finds its decision without hashing its key into a shared map,
//! which costs about as much as the rest of the hook.
//!
//! An entry is eight words: `owner` (the cgroup for `connect()`, the socket cookie for a
//! datagram), the sending cgroup, the address (two words), port, family and protocol with the
//! epoch, slot and rule, stats index and kind, and a sequence count. It is valid while its epoch
//! is the policy epoch (so everything that invalidates the maps behind it invalidates it too; for
//! datagrams plus `DATAGRAM_EPOCH`, since `FLOWS` entries also go when the daemon stops counting
//! a flow) and it was read whole.
//!
//! Why a sequence count is enough: the array is per CPU, so only programs on this CPU touch an
//! entry, and they interleave only by preemption, which nests (a program that preempts another
//! runs to its end before the other resumes). A writer makes the count odd, writes, and makes
//! it even again; it leaves an entry alone while the count is odd (it preempted a writer). A
//! reader takes the entry only if the count was even before and unchanged after its reads: a
//! writer it preempted left the count odd, and a writer that preempted it moved the count on.
//! So a read never mixes words of two writes, whatever the words hold (an attacker chooses the
//! addresses, so a check that hashes the words would have to be keyed and collision-free).

use crate::{
    destination::Flow,
    flows::Reused,
    maps::{DATAGRAM_EPOCH, RECENT_DECISIONS, RECENT_SLOTS as SLOTS, RECENT_WORDS as WORDS},
};

/// What a `connect()` reused ([`Kind::Connect`]) or a datagram ([`Kind::Datagram`]).
#[derive(Clone, Copy)]
#[repr(u32)]
pub enum Kind {
    Connect = 1,
    Datagram = 2,
}

/// The entry's key words: owner, cgroup, address, and port/family/protocol with the epoch.
#[inline(always)]
fn key_words(owner: u64, cgroup_id: u64, flow: &Flow, epoch: u32) -> [u64; 5] {
    let a = &flow.addr;
    let addr_low = u64::from_ne_bytes([a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]]);
    let addr_high = u64::from_ne_bytes([a[8], a[9], a[10], a[11], a[12], a[13], a[14], a[15]]);
    let ports = u64::from(flow.port) | u64::from(flow.family) << 16 | u64::from(flow.protocol) << 24;
    [owner, cgroup_id, addr_low, addr_high, ports | u64::from(epoch) << 32]
}

#[inline(always)]
fn index(key: &[u64; 5], kind: Kind) -> u32 {
    let folded = key[0] ^ key[2] ^ key[3] ^ key[4] ^ u64::from(kind as u32);
    (folded.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56) as u32 & (SLOTS - 1)
}

/// The word of an entry that holds its sequence count.
const SEQUENCE: usize = 7;

#[inline(always)]
fn read_word(entry: *const u64, i: usize) -> u64 {
    // SAFETY: callers pass a per-CPU map value of `WORDS` words and i < WORDS; read whole.
    unsafe { core::ptr::read_volatile(entry.add(i)) }
}

/// See `maps::DATAGRAM_EPOCH`.
#[inline(always)]
pub fn datagram_epoch() -> u32 {
    DATAGRAM_EPOCH.get(0).copied().unwrap_or(0)
}

/// The decision this CPU remembered for the key under the current epoch.
#[inline(always)]
pub fn recall(kind: Kind, owner: u64, cgroup_id: u64, flow: &Flow, epoch: u32) -> Option<Reused> {
    let key = key_words(owner, cgroup_id, flow, epoch);
    let entry = RECENT_DECISIONS.get_ptr(index(&key, kind))?.cast::<u64>();
    let before = read_word(entry, SEQUENCE);
    if before & 1 != 0 {
        return None;
    }
    let words: [u64; 7] = [
        read_word(entry, 0),
        read_word(entry, 1),
        read_word(entry, 2),
        read_word(entry, 3),
        read_word(entry, 4),
        read_word(entry, 5),
        read_word(entry, 6),
    ];
    if read_word(entry, SEQUENCE) != before {
        return None;
    }
    if words[0] != key[0]
        || words[1] != key[1]
        || words[2] != key[2]
        || words[3] != key[3]
        || words[4] != key[4]
        || (words[6] >> 32) as u32 != kind as u32
    {
        return None;
    }
    Some(Reused { slot: words[5] as u32, rule: (words[5] >> 32) as u32, stats: words[6] as u32 })
}

/// Remembers an allowed decision on this CPU (replacing whatever shared its entry), unless this
/// program preempted another one writing the same entry.
#[inline(always)]
pub fn remember(kind: Kind, owner: u64, cgroup_id: u64, flow: &Flow, epoch: u32, decision: &Reused) {
    let key = key_words(owner, cgroup_id, flow, epoch);
    let Some(entry) = RECENT_DECISIONS.get_ptr_mut(index(&key, kind)) else {
        return;
    };
    let entry = entry.cast::<u64>();
    let sequence = read_word(entry, SEQUENCE);
    if sequence & 1 != 0 {
        return;
    }
    let words = [
        key[0],
        key[1],
        key[2],
        key[3],
        key[4],
        u64::from(decision.slot) | u64::from(decision.rule) << 32,
        u64::from(decision.stats) | u64::from(kind as u32) << 32,
    ];
    // SAFETY: a per-CPU map value of `WORDS` words, written one word at a time.
    unsafe {
        core::ptr::write_volatile(entry.add(SEQUENCE), sequence.wrapping_add(1));
        let mut i = 0;
        while i < 7 {
            core::ptr::write_volatile(entry.add(i), words[i]);
            i += 1;
        }
        core::ptr::write_volatile(entry.add(SEQUENCE), sequence.wrapping_add(2));
    }
}
