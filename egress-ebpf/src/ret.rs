//! What the programs return to the kernel, in one place.

/// cgroup hooks: let the call or packet through.
pub const PASS: i32 = 1;
/// cgroup hooks: refuse it (`EPERM` for a system call, a drop for a packet).
pub const REFUSE: i32 = 0;
/// The errno the LSM hook returns, negated, to refuse a socket.
pub const EPERM: i32 = 1;
