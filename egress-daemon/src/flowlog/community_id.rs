//! Community ID v1 (corelight/community-id-spec): a hash of a flow's endpoints that other tools
//! (Zeek, Suricata, Elastic, Vector) compute the same way, so a record here joins theirs.
//!
//! The hash input: the seed (2 bytes, big-endian), the lower endpoint's address, the higher's,
//! the protocol, one zero byte, then the lower's port and the higher's (big-endian) for
//! protocols with ports. Endpoints are ordered by address, then port, so both directions of a
//! flow get the same id. Output: `1:` and the base64 of the SHA-1 digest.

use std::net::IpAddr;

use egress_common::proto;

use super::sha1;

/// SCTP carries ports the spec hashes like TCP's and UDP's.
const SCTP: u8 = 132;

/// The Community ID v1 of a flow with `seed` (0 by default in every tool), or `None` for ICMP:
/// the spec hashes ICMP's type and code, which flow records do not keep.
pub fn community_id(seed: u16, src: (IpAddr, u16), dst: (IpAddr, u16), protocol: u8) -> Option<String> {
    if protocol == proto::ICMP || protocol == proto::ICMPV6 {
        return None;
    }
    let (src_addr, dst_addr) = match (src.0.to_canonical(), dst.0.to_canonical()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => (s.octets().to_vec(), d.octets().to_vec()),
        (s, d) => (v6_bytes(s), v6_bytes(d)),
    };
    let mut low = (src_addr, src.1);
    let mut high = (dst_addr, dst.1);
    if high < low {
        std::mem::swap(&mut low, &mut high);
    }
    let mut input = Vec::with_capacity(2 + 32 + 2 + 4);
    input.extend_from_slice(&seed.to_be_bytes());
    input.extend_from_slice(&low.0);
    input.extend_from_slice(&high.0);
    input.push(protocol);
    input.push(0);
    if matches!(protocol, proto::TCP | proto::UDP | SCTP) {
        input.extend_from_slice(&low.1.to_be_bytes());
        input.extend_from_slice(&high.1.to_be_bytes());
    }
    Some(format!("1:{}", base64(&sha1::digest(&input))))
}

fn v6_bytes(addr: IpAddr) -> Vec<u8> {
    match addr {
        IpAddr::V4(a) => a.to_ipv6_mapped().octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// Standard base64 (RFC 4648 section 4) with padding.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], chunk.get(1).copied().unwrap_or(0), chunk.get(2).copied().unwrap_or(0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(src: &str, sport: u16, dst: &str, dport: u16, protocol: u8) -> Option<String> {
        community_id(0, (src.parse().unwrap(), sport), (dst.parse().unwrap(), dport), protocol)
    }

    /// The spec's baseline flows (also in its reference implementations' tests).
    #[test]
    fn spec_vectors() {
        let tcp = "1:LQU9qZlK+B5F3KDmev6m5PMibrg=";
        assert_eq!(id("128.232.110.120", 34855, "66.35.250.204", 80, proto::TCP).as_deref(), Some(tcp));
        // Either direction of a flow has the same id.
        assert_eq!(id("66.35.250.204", 80, "128.232.110.120", 34855, proto::TCP).as_deref(), Some(tcp));
        let udp = "1:d/FP5EW3wiY1vCndhwleRRKHowQ=";
        assert_eq!(id("192.168.1.52", 54585, "8.8.8.8", 53, proto::UDP).as_deref(), Some(udp));
        let v6 = "1:/qFaeAR+gFe1KYjMzVDsMv+wgU4=";
        let (src, dst) = ("2001:470:e5bf:dead:4957:2174:e82c:4887", "2607:f8b0:400c:c03::1a");
        assert_eq!(id(src, 63943, dst, 25, proto::TCP).as_deref(), Some(v6));
        let sctp = "1:MP2EtRCAUIZvTw6MxJHLV7N7JDs=";
        assert_eq!(id("192.168.170.8", 7, "192.168.170.56", 7, SCTP).as_deref(), Some(sctp));
    }

    #[test]
    fn icmp_has_no_id_without_type_and_code() {
        assert_eq!(id("10.0.0.1", 0, "10.0.0.2", 0, proto::ICMP), None);
    }

    #[test]
    fn base64_pads() {
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foob"), "Zm9vYg==");
    }
}
