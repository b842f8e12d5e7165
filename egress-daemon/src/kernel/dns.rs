//! The DNS maps of the kernel programs: the proxy's port (steering on or off), what the proxy
//! learned, and who sent a steered query.

use std::{net::Ipv6Addr, os::fd::AsRawFd};

use aya::{
    maps::{Array, HashMap as BpfHashMap, MapData, MapError},
    Ebpf,
};
use egress_common::{dns_names, DnsConfig, Learned, LearnedKey, Origin, OriginKey};

use super::KernelError;

/// Why a DNS map could not be used.
#[derive(Debug, thiserror::Error)]
pub enum DnsMapError {
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("the daemon's network namespace cookie: {0} (Linux 5.14 or later)")]
    NetnsCookie(std::io::Error),
}

fn map_error(name: &'static str) -> impl FnOnce(MapError) -> DnsMapError {
    move |source| DnsMapError::Map { name, source }
}

/// The DNS maps, taken out of the loaded object.
pub struct DnsMaps {
    config: Array<MapData, DnsConfig>,
    learned: BpfHashMap<MapData, LearnedKey, Learned>,
    origins: BpfHashMap<MapData, OriginKey, Origin>,
}

impl DnsMaps {
    pub(super) fn take(ebpf: &mut Ebpf) -> Result<Self, KernelError> {
        let mut take = |name: &'static str| ebpf.take_map(name).ok_or(KernelError::MissingMap(name));
        let (config, learned, origins) =
            (take(dns_names::DNS_CONFIG)?, take(dns_names::LEARNED)?, take(dns_names::QUERY_ORIGINS)?);
        Ok(Self {
            config: Array::try_from(config).map_err(KernelError::map(dns_names::DNS_CONFIG))?,
            learned: BpfHashMap::try_from(learned).map_err(KernelError::map(dns_names::LEARNED))?,
            origins: BpfHashMap::try_from(origins).map_err(KernelError::map(dns_names::QUERY_ORIGINS))?,
        })
    }

    /// Turns steering on to `port` for sockets in the daemon's network namespace, or off (0).
    pub fn set_proxy_port(&mut self, port: u16) -> Result<(), DnsMapError> {
        let host_netns = if port == 0 { 0 } else { own_netns_cookie().map_err(DnsMapError::NetnsCookie)? };
        let config = DnsConfig { host_netns, proxy_port: port, _pad: [0; 6] };
        self.config.set(0, config, 0).map_err(map_error(dns_names::DNS_CONFIG))
    }

    pub fn write(&mut self, cgroup: u64, addr: Ipv6Addr, value: &Learned) -> Result<(), DnsMapError> {
        let key = LearnedKey { cgroup, addr: addr.octets() };
        self.learned.insert(key, value, 0).map_err(map_error(dns_names::LEARNED))
    }

    pub fn remove(&mut self, cgroup: u64, addr: Ipv6Addr) {
        let key = LearnedKey { cgroup, addr: addr.octets() };
        drop(self.learned.remove(&key));
    }

    /// Every entry in the kernel map (the daemon's own book may lag after a restart).
    pub fn entries(&self) -> Vec<(LearnedKey, Learned)> {
        self.learned.iter().filter_map(Result::ok).collect()
    }

    /// Who sent the latest steered packet from `addr` (v4-mapped for IPv4) port `port`.
    pub fn origin(&self, protocol: u8, addr: Ipv6Addr, port: u16) -> Option<Origin> {
        let key = OriginKey { addr: addr.octets(), port, protocol, _pad: [0; 5] };
        self.origins.get(&key, 0).ok()
    }
}

/// `SO_NETNS_COOKIE` of a fresh socket: the kernel's cookie of the daemon's network namespace.
fn own_netns_cookie() -> std::io::Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let mut cookie = 0u64;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: a valid socket and a buffer of `len` bytes.
    let result = unsafe {
        libc::getsockopt(socket.as_raw_fd(), libc::SOL_SOCKET, SO_NETNS_COOKIE, (&raw mut cookie).cast(), &mut len)
    };
    if result != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cookie)
}
