//! The kernel's clock: `CLOCK_BOOTTIME`, which event times, flow times and learned-address
//! expiries are stamped with (`bpf_ktime_get_boot_ns`).

/// `CLOCK_BOOTTIME` now, in nanoseconds.
pub fn boot_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid pointer to a timespec; clock_gettime cannot fail for this clock id.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
