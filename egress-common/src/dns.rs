//! Maps and constants of domain-name rules: DNS steered to the daemon's proxy, and the addresses
//! the proxy learned from answers for names a policy allows.

use crate::PortTable;

/// Names of the DNS maps in the kernel object.
pub mod dns_names {
    pub const DNS_CONFIG: &str = "DNS_CONFIG";
    pub const LEARNED: &str = "LEARNED";
    pub const STEERED: &str = "STEERED";
    pub const QUERY_ORIGINS: &str = "QUERY_ORIGINS";
    /// Every DNS map (all pinned: learned addresses outlive a daemon restart).
    pub const ALL: [&str; 4] = [DNS_CONFIG, LEARNED, STEERED, QUERY_ORIGINS];
}

/// Learned (bound cgroup, address) entries, all cgroups together.
pub const MAX_LEARNED: u32 = 65_536;
/// Sockets whose DNS traffic was steered to the proxy (least recently used go first).
pub const MAX_STEERED: u32 = 65_536;
/// Source addresses of packets steered to the proxy (least recently used go first).
pub const MAX_QUERY_ORIGINS: u32 = 65_536;

/// The DNS port the kernel steers to the proxy.
pub const DNS_PORT: u16 = 53;
/// DNS over TLS: refused to policies with name rules unless a rule allows it explicitly.
pub const DOT_PORT: u16 = 853;
/// DNS over HTTPS runs on the HTTPS port.
pub const HTTPS_PORT: u16 = 443;

/// Well-known public DNS-over-HTTPS resolvers (IPv4): HTTPS to them is refused to policies with
/// name rules unless a rule allows the address explicitly.
pub const DOH_RESOLVERS_V4: [[u8; 4]; 12] = [
    [8, 8, 8, 8],
    [8, 8, 4, 4],
    [1, 1, 1, 1],
    [1, 0, 0, 1],
    [9, 9, 9, 9],
    [149, 112, 112, 112],
    [208, 67, 222, 222],
    [208, 67, 220, 220],
    [94, 140, 14, 14],
    [94, 140, 15, 15],
    [185, 228, 168, 9],
    [76, 76, 2, 0],
];

/// The same for IPv6.
pub const DOH_RESOLVERS_V6: [[u8; 16]; 6] = [
    [0x20, 0x01, 0x48, 0x60, 0x48, 0x60, 0, 0, 0, 0, 0, 0, 0, 0, 0x88, 0x88],
    [0x20, 0x01, 0x48, 0x60, 0x48, 0x60, 0, 0, 0, 0, 0, 0, 0, 0, 0x88, 0x44],
    [0x26, 0x06, 0x47, 0x00, 0x47, 0x00, 0, 0, 0, 0, 0, 0, 0, 0, 0x11, 0x11],
    [0x26, 0x06, 0x47, 0x00, 0x47, 0x00, 0, 0, 0, 0, 0, 0, 0, 0, 0x10, 0x01],
    [0x26, 0x20, 0x00, 0xfe, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xfe],
    [0x26, 0x20, 0x00, 0xfe, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x09],
];

/// Bits of `PolicyInfo::flags`.
pub mod policy_flags {
    /// The policy has domain-name rules: its DNS is steered to the proxy, learned addresses
    /// apply, and DNS bypasses (DoT, DoH to well-known resolvers) are refused by default.
    pub const NAME_RULES: u8 = 1 << 0;
}

/// Index 0 of `DNS_CONFIG`, written by the daemon.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DnsConfig {
    /// `bpf_get_netns_cookie` of the daemon's network namespace: only sockets there reach the
    /// proxy on loopback, so only they are steered.
    pub host_netns: u64,
    /// The proxy's port on 127.0.0.1 and ::1 (host byte order); 0: steering off.
    pub proxy_port: u16,
    pub _pad: [u8; 6],
}

/// Key of `LEARNED`: the bound cgroup whose policy allowed the name, and an address of the
/// answer (IPv4 as v4-mapped IPv6).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LearnedKey {
    pub cgroup: u64,
    pub addr: [u8; 16],
}

/// Value of `LEARNED`: until when the address is allowed (`CLOCK_BOOTTIME` ns), and the name
/// rules that allowed it, as a port table of allow rules (rule ids, protocols, ports).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Learned {
    pub expires_ns: u64,
    pub rules: PortTable,
}

/// Value of `STEERED` (key: socket cookie): where the socket's DNS was meant to go.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SteeredSocket {
    /// The bound cgroup whose policy applies to the socket (see `LearnedKey::cgroup`).
    pub bound: u64,
    /// The sending cgroup.
    pub cgroup: u64,
    /// The original destination as the system call named it: `user_ip4` in word 0, or the four
    /// `user_ip6` words (network byte order).
    pub addr: [u32; 4],
    /// `user_port` as the system call named it (network byte order in the low 16 bits).
    pub port: u32,
    /// The socket's family (`family::INET` or `family::INET6`).
    pub family: u32,
}

/// Key of `QUERY_ORIGINS`: a packet's source as the proxy sees it as the peer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct OriginKey {
    /// IPv4 as v4-mapped IPv6.
    pub addr: [u8; 16],
    /// Host byte order.
    pub port: u16,
    pub protocol: u8,
    pub _pad: [u8; 5],
}

/// Value of `QUERY_ORIGINS`: who sent the latest packet from that source, and when.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Origin {
    pub seen_ns: u64,
    pub socket: SteeredSocket,
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    unsafe impl aya::Pod for DnsConfig {}
    unsafe impl aya::Pod for LearnedKey {}
    unsafe impl aya::Pod for Learned {}
    unsafe impl aya::Pod for SteeredSocket {}
    unsafe impl aya::Pod for OriginKey {}
    unsafe impl aya::Pod for Origin {}
}
