//! Types shared by the kernel programs (`egress-ebpf`) and the daemon (`egress-daemon`).
//!
//! Everything here is `#[repr(C)]` without implicit padding: the kernel writes these bytes and
//! userspace reads them back, so both sides must agree on every offset.
#![no_std]

#[cfg(feature = "mountinfo")]
extern crate std;

pub mod dns;
pub mod event;
pub mod flow;
pub mod lookup;
pub mod maps;
#[cfg(feature = "mountinfo")]
pub mod mountinfo;

pub use dns::*;
pub use event::*;
pub use flow::*;
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

/// Kinds of sockets whose traffic the per-flow hooks cannot judge; a covered cgroup may open
/// them only when its policy allows the kind (`PolicyInfo::allowed_sockets`).
pub mod socket_kind {
    /// `AF_PACKET`: whole frames that bypass the IP stack and every cgroup network hook.
    pub const PACKET: u32 = 1 << 0;
    /// MPTCP: the path manager opens further subflows from a kernel worker, whose cgroup is not
    /// the workload's, to addresses the peer announces.
    pub const MPTCP: u32 = 1 << 1;
    /// Any other family that leaves the host outside IP (`AF_XDP`, `AF_VSOCK`, `AF_TIPC`,
    /// Bluetooth, CAN, ...).
    pub const OTHER: u32 = 1 << 2;

    const AF_UNIX: u32 = 1;
    const AF_INET: u32 = 2;
    const AF_INET6: u32 = 10;
    const AF_NETLINK: u32 = 16;
    const AF_PACKET: u32 = 17;
    const AF_ALG: u32 = 38;
    const IPPROTO_MPTCP: u32 = 262;

    /// The kind of `socket(family, _, protocol)`; 0 for sockets that stay on this host (unix,
    /// netlink, crypto) or whose every flow the IP hooks judge.
    #[inline(always)]
    pub const fn of(family: u32, protocol: u32) -> u32 {
        match family {
            AF_INET | AF_INET6 => {
                if protocol == IPPROTO_MPTCP {
                    MPTCP
                } else {
                    0
                }
            }
            AF_UNIX | AF_NETLINK | AF_ALG => 0,
            AF_PACKET => PACKET,
            _ => OTHER,
        }
    }
}

/// Rule ids with a special meaning; real rules are numbered from 0 in file order.
pub mod rule_id {
    /// No rule matched: the policy's default decided.
    pub const DEFAULT: u32 = u32::MAX;
    /// A UDP reply to a peer that sent to this socket first (stateful).
    pub const REPLY: u32 = u32::MAX - 1;
    /// A TCP or UDP flow to destination port 0: reserved, never a service, refused whatever
    /// the rules say.
    pub const PORT_ZERO: u32 = u32::MAX - 2;
    /// A packet that names its own route (an IPv6 routing header, IPv4 options such as source
    /// routes): it would reach addresses the hooks never judged, so it is refused.
    pub const SOURCE_ROUTED: u32 = u32::MAX - 3;
    /// A socket that leaves the IP stack (`AF_PACKET`, `AF_XDP`, ...) or escapes the per-flow
    /// hooks (MPTCP, whose extra subflows a kernel worker opens): refused at `socket()`.
    pub const SOCKET_KIND: u32 = u32::MAX - 4;
    /// The sender's cgroup is deeper than the kernel walk and not bound itself, below a level
    /// where a deeper cgroup has a policy: refused rather than judged by the wrong policy.
    pub const TOO_DEEP: u32 = u32::MAX - 5;
    /// DNS over TLS, or HTTPS to a well-known DNS-over-HTTPS resolver, from a policy with name
    /// rules that no rule allows explicitly: it would bypass the name filter.
    pub const DNS_BYPASS: u32 = u32::MAX - 6;
    /// A packet the hook cannot read to its destination port: truncated, an IPv6 extension
    /// header that runs past the packet's end, or a header chain longer than the hook walks.
    /// What cannot be judged is refused.
    pub const MALFORMED: u32 = u32::MAX - 7;
    /// The sender's cgroup matched a selector but could not be bound (the binding table was
    /// full, or its delegated subtree had used up its share): refused rather than left to an
    /// ancestor's policy or none.
    pub const UNBINDABLE: u32 = u32::MAX - 8;
    /// Lowest special id; rule numbers of a file stay below it.
    pub const FIRST_SPECIAL: u32 = UNBINDABLE;
}
