//! Types shared by the kernel programs (`egress-ebpf`) and the daemon (`egress-daemon`).
//!
//! Everything here is `#[repr(C)]` without implicit padding: the kernel writes these bytes and
//! userspace reads them back, so both sides must agree on every offset.
#![no_std]

pub mod event;
pub mod maps;

pub use event::*;
pub use maps::*;

/// What the kernel does with a flow.
pub mod action {
    pub const DENY: u8 = 0;
    pub const ALLOW: u8 = 1;
}

/// How a policy applies its verdicts.
pub mod mode {
    /// Blocked flows are refused.
    pub const ENFORCE: u8 = 0;
    /// Blocked flows are only reported (`audit` verdict) and let through.
    pub const AUDIT: u8 = 1;
}

/// IP protocol numbers as the kernel programs normalise them.
pub mod proto {
    /// Rule value meaning "any protocol".
    pub const ANY: u8 = 0;
    /// ICMP for IPv4 destinations, ICMPv6 for IPv6 ones (both normalised to 1).
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const ICMPV6: u8 = 58;
}

/// Rule ids with a special meaning; real rules are numbered from 0 in file order.
pub mod rule_id {
    /// No rule matched: the policy's default decided.
    pub const DEFAULT: u32 = u32::MAX;
    /// A UDP reply to a peer that sent to this socket first (stateful).
    pub const REPLY: u32 = u32::MAX - 1;
}
