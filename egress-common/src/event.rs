//! The flow event the kernel programs write into the `EVENTS` ring buffer.

/// Which kernel hook decided a flow.
pub mod hook {
    pub const CONNECT4: u8 = 1;
    pub const CONNECT6: u8 = 2;
    pub const SENDMSG4: u8 = 3;
    pub const SENDMSG6: u8 = 4;
    pub const SKB: u8 = 5;
    /// `cgroup/sock_create`: an MPTCP socket refused or allowed.
    pub const SOCK_CREATE: u8 = 6;
    /// BPF LSM `socket_create`: a socket of a non-IP family. The event's `family` is the
    /// socket's `AF_*` and its address is empty.
    pub const SOCKET_LSM: u8 = 7;
}

/// Verdicts as carried by an event.
pub mod verdict {
    pub const BLOCKED: u8 = 0;
    pub const ALLOWED: u8 = 1;
    /// Would have been blocked, but the policy is in audit mode.
    pub const AUDIT: u8 = 2;
}

/// Address families as carried by an event (the kernel's `AF_*` values).
pub mod family {
    pub const INET: u8 = 2;
    pub const INET6: u8 = 10;
}

/// One flow decision.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowEvent {
    /// `CLOCK_BOOTTIME` nanoseconds.
    pub boot_ns: u64,
    /// cgroup v2 id (inode number) of the cgroup that sent.
    pub cgroup_id: u64,
    pub policy: u32,
    pub rule: u32,
    /// Thread group id (what userspace calls the pid); 0 when not known.
    pub pid: u32,
    pub uid: u32,
    /// IPv4 addresses take the first 4 bytes.
    pub daddr: [u8; 16],
    /// Host byte order; 0 for protocols without ports.
    pub dport: u16,
    pub family: u8,
    pub protocol: u8,
    pub verdict: u8,
    pub hook: u8,
    pub _pad: [u8; 2],
    pub comm: [u8; 16],
}

#[cfg(feature = "user")]
unsafe impl aya::Pod for FlowEvent {}
