//! The resolvers allowed queries are forwarded to, and forwarding itself (UDP and TCP).
//!
//! Every query gets a socket of its own, from a random port, connected to the resolver (the
//! kernel drops datagrams from any other source). The first answer that comes back must echo
//! the query exactly ([`super::echo`]); one that does not ends the query instead of being
//! waited past, so a process that can send from the resolver's address gets one guess per query.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use super::echo::{self, Mismatch};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpStream, UdpSocket},
    time::timeout,
};

/// How long one upstream gets to answer before the next is tried.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest DNS message (TCP length prefix).
pub const MAX_MESSAGE: usize = 65_535;
const RESOLV_CONF: &str = "/etc/resolv.conf";

/// Why no upstream answered.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("no upstream resolver is configured (settings.dns.upstream or /etc/resolv.conf)")]
    NoneConfigured,
    #[error("no upstream resolver answered")]
    NoAnswer,
    #[error("{resolver} answered with something other than an answer to the query: {mismatch}")]
    Mismatch { resolver: SocketAddr, mismatch: Mismatch },
}

/// Why one resolver gave no usable answer.
#[derive(Debug, thiserror::Error)]
enum AttemptError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Mismatch(#[from] Mismatch),
}

/// `configured`, or the host's resolvers from `/etc/resolv.conf`. The daemon's own queries are
/// never steered (it runs outside the cgroups it covers), so a local stub resolver is fine.
pub fn resolvers(configured: &[SocketAddr]) -> Vec<SocketAddr> {
    if !configured.is_empty() {
        return configured.to_vec();
    }
    std::fs::read_to_string(RESOLV_CONF).map(|text| parse_resolv_conf(&text)).unwrap_or_default()
}

fn parse_resolv_conf(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            if words.next()? != "nameserver" {
                return None;
            }
            let address = words.next()?;
            // A scoped IPv6 address (`fe80::1%eth0`) keeps only its address here.
            let ip: IpAddr = address.split('%').next()?.parse().ok()?;
            Some(SocketAddr::new(ip, 53))
        })
        .collect()
}

/// Sends `query` (already carrying the id and question the answer must echo) to each resolver
/// in turn until one answers; an answer that does not echo them ends the query.
pub async fn forward(resolvers: &[SocketAddr], query: &[u8], tcp: bool) -> Result<Vec<u8>, UpstreamError> {
    if resolvers.is_empty() {
        return Err(UpstreamError::NoneConfigured);
    }
    for resolver in resolvers {
        let attempt = if tcp { over_tcp(*resolver, query).await } else { over_udp(*resolver, query).await };
        match attempt {
            Ok(answer) => return Ok(answer),
            Err(AttemptError::Mismatch(mismatch)) => {
                return Err(UpstreamError::Mismatch { resolver: *resolver, mismatch })
            }
            Err(AttemptError::Io(error)) => tracing::debug!(%resolver, %error, "upstream resolver did not answer"),
        }
    }
    Err(UpstreamError::NoAnswer)
}

async fn over_udp(resolver: SocketAddr, query: &[u8]) -> Result<Vec<u8>, AttemptError> {
    // Port 0: the kernel picks a random free port for every query.
    let local = if resolver.is_ipv4() {
        SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))
    } else {
        SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0))
    };
    let socket = UdpSocket::bind(local).await?;
    socket.connect(resolver).await?;
    socket.send(query).await?;
    let mut buffer = vec![0u8; MAX_MESSAGE];
    let len = timeout(UPSTREAM_TIMEOUT, socket.recv(&mut buffer))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    buffer.truncate(len);
    echo::check(query, &buffer)?;
    Ok(buffer)
}

async fn over_tcp(resolver: SocketAddr, query: &[u8]) -> Result<Vec<u8>, AttemptError> {
    let exchange = async {
        let mut stream = TcpStream::connect(resolver).await?;
        write_framed(&mut stream, query).await?;
        read_framed(&mut stream).await
    };
    let answer =
        timeout(UPSTREAM_TIMEOUT, exchange).await.map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    echo::check(query, &answer)?;
    Ok(answer)
}

/// Writes one length-prefixed DNS message (RFC 1035 4.2.2).
pub async fn write_framed<W: AsyncWriteExt + Unpin>(stream: &mut W, message: &[u8]) -> std::io::Result<()> {
    let len = u16::try_from(message.len()).map_err(|_| std::io::Error::other("DNS message over 65535 bytes"))?;
    let mut framed = Vec::with_capacity(message.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(message);
    stream.write_all(&framed).await
}

/// Reads one length-prefixed DNS message.
pub async fn read_framed<R: AsyncReadExt + Unpin>(stream: &mut R) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 2];
    stream.read_exact(&mut len).await?;
    let mut message = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut message).await?;
    Ok(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_nameservers_in_order() {
        let text = "# comment\nsearch example\nnameserver 10.0.0.1\nnameserver fe80::1%eth0\noptions ndots:2\n";
        assert_eq!(
            parse_resolv_conf(text),
            vec!["10.0.0.1:53".parse::<SocketAddr>().unwrap(), "[fe80::1]:53".parse().unwrap()]
        );
    }
}
