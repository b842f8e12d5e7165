//! Waiting until every program run that may still read what a reload is about to remove has
//! finished: a grace period, not a guess at how long a run takes.
//!
//! The programs run under RCU (the cgroup hooks take `rcu_read_lock` around the whole program
//! array), so a run that started before a change may still see the old bindings until an RCU
//! grace period has passed; on a preemptible kernel such a run can be preempted for as long as
//! the scheduler pleases. The kernel waits for that grace period (`synchronize_rcu`) on every
//! update of a map-of-maps from user space, so that user space knows no running program holds
//! the inner map it replaced (`maybe_wait_bpf_programs` in kernel/bpf/syscall.c, since 4.14).
//! The barrier is such an update, on a one-slot array of maps no program uses.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_MAP_TYPE_ARRAY_OF_MAPS: u32 = 12;
/// Large enough for every command's part of `union bpf_attr` used here; the rest stays zero.
const ATTR_SIZE: usize = 64;

/// A map-of-maps whose update waits for running programs.
pub struct ProgramBarrier {
    outer: OwnedFd,
    inner: OwnedFd,
}

impl ProgramBarrier {
    pub fn new() -> io::Result<Self> {
        let inner = create_map(BPF_MAP_TYPE_ARRAY, None)?;
        let outer = create_map(BPF_MAP_TYPE_ARRAY_OF_MAPS, Some(&inner))?;
        Ok(Self { outer, inner })
    }

    /// Returns once every program run that started before the call has ended.
    pub fn wait(&self) -> io::Result<()> {
        let key: u32 = 0;
        let value: u32 = fd_u32(&self.inner);
        let mut attr = [0u8; ATTR_SIZE];
        put_u32(&mut attr, 0, fd_u32(&self.outer));
        put_u64(&mut attr, 8, std::ptr::from_ref(&key) as u64);
        put_u64(&mut attr, 16, std::ptr::from_ref(&value) as u64);
        bpf(BPF_MAP_UPDATE_ELEM, &mut attr).map(drop)
    }
}

fn create_map(map_type: u32, inner: Option<&OwnedFd>) -> io::Result<OwnedFd> {
    let mut attr = [0u8; ATTR_SIZE];
    put_u32(&mut attr, 0, map_type);
    put_u32(&mut attr, 4, 4); // key_size
    put_u32(&mut attr, 8, 4); // value_size (a map fd, for the outer map)
    put_u32(&mut attr, 12, 1); // max_entries
    if let Some(inner) = inner {
        put_u32(&mut attr, 20, fd_u32(inner)); // inner_map_fd
    }
    let fd = bpf(BPF_MAP_CREATE, &mut attr)?;
    let fd = i32::try_from(fd).map_err(|_| io::Error::other("bpf(BPF_MAP_CREATE) returned no fd"))?;
    // SAFETY: the kernel returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn bpf(command: libc::c_long, attr: &mut [u8; ATTR_SIZE]) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a zero-filled `union bpf_attr` prefix of the size passed, valid for the
    // command; pointers in it point at live locals of the caller.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, command, attr.as_mut_ptr(), ATTR_SIZE as libc::c_uint) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc)
}

fn fd_u32(fd: &OwnedFd) -> u32 {
    // An open fd is never negative.
    fd.as_raw_fd().unsigned_abs()
}

fn put_u32(attr: &mut [u8; ATTR_SIZE], at: usize, value: u32) {
    attr[at..at + 4].copy_from_slice(&value.to_ne_bytes());
}

fn put_u64(attr: &mut [u8; ATTR_SIZE], at: usize, value: u64) {
    attr[at..at + 8].copy_from_slice(&value.to_ne_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_barrier_is_a_map_of_maps_update_the_kernel_accepts() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 && std::env::var_os("CI").is_none() {
            return;
        }
        let barrier = ProgramBarrier::new().expect("creating the barrier's maps");
        for _ in 0..3 {
            barrier.wait().expect("waiting for running programs");
        }
    }
}
