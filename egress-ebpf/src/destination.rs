//! The destination of a flow as the programs judge it: what every hook extracts first, and what
//! the policy lookup, the learned addresses and the decision caches take.

use egress_common::lookup;

/// A destination as the programs see it; IPv4 (also v4-mapped IPv6) uses `addr[..4]`.
pub struct Flow {
    pub family: u8,
    pub addr: [u8; 16],
    /// Host byte order, 0 when the protocol has no ports.
    pub port: u16,
    /// Normalised with [`lookup::normalise_protocol`].
    pub protocol: u8,
}

impl Flow {
    /// TCP and UDP flows carry a destination port that rules can match.
    #[inline(always)]
    pub fn has_ports(&self) -> bool {
        lookup::has_ports(self.protocol)
    }
}
