//! The values of a policy (its name, selectors, destinations, ports), each checked where it is
//! written.

use std::{borrow::Cow, net::IpAddr};

use ipnet::{IpNet, Ipv4Net};

use super::{
    domain::PatternError,
    model::{DomainPattern, PortRange},
};
use crate::{cgroup, yaml::Scalar};

/// Why a policy's value cannot be used: the message of the error at its position.
#[derive(Debug, thiserror::Error)]
pub enum ValueError {
    #[error("port range {text} is reversed; did you mean {hi}-{lo}?")]
    ReversedRange { text: String, lo: u16, hi: u16 },
    #[error("port 0 in `{0}` is not a port; ports are 1-65535")]
    PortZero(String),
    #[error("port {port} in `{whole}` is out of range; ports are 1-65535")]
    PortOutOfRange { port: u32, whole: String },
    #[error("`{0}` is not a port or a port range like 8000-8080")]
    NotAPort(String),
    #[error("`{0}` is not an IPv4 or IPv6 address or CIDR")]
    NotAnAddress(String),
    #[error("{text} has host bits set; did you mean {network}?")]
    HostBits { text: String, network: IpNet },
    #[error("the policy name is empty")]
    EmptyName,
    #[error(transparent)]
    CgroupPath(#[from] cgroup::PathError),
    #[error("the cgroup path is empty; name a cgroup below the cgroup2 mount")]
    EmptyCgroup,
    #[error(
        "cgroup glob `{text}`: `**` must be a whole path component (as in `a/**/b`), \
         not part of `{part}`; use `*` within a component"
    )]
    PartialDoubleStar { text: String, part: String },
    #[error("`{0}` is a path, not a systemd unit name; use `cgroup:` for cgroup paths")]
    UnitIsPath(String),
    #[error("`{0}`: systemd_unit takes one unit name; use a `cgroup:` glob to match several")]
    UnitIsGlob(String),
    #[error(
        "`{0}` is not a .service, .scope, .slice or .socket unit; policies select \
         the units that run workloads"
    )]
    UnitType(String),
    #[error("`{0}` is not a systemd unit name: letters, digits and `:-_.\\@` before the suffix")]
    UnitCharacters(String),
    #[error("unit name `{0}` is longer than 255 characters")]
    UnitTooLong(String),
    #[error("`{text}` is a template; name an instance like {prefix}NAME{suffix}")]
    UnitTemplate { text: String, prefix: String, suffix: String },
    #[error(
        "`{0}` is not a container id or name: a letter or digit, then letters, digits, \
         `_`, `.` or `-` (at most 255)"
    )]
    ContainerRef(String),
    #[error("{0}; expected an IP address, a CIDR or a domain name like api.example.com or *.example.com")]
    Domain(PatternError),
}

impl Scalar for PortRange {
    type Error = ValueError;

    fn expecting() -> Cow<'static, str> {
        "a port or a port range like 8000-8080".into()
    }

    fn parse(text: &str) -> Result<Self, ValueError> {
        let (lo, hi) = match text.split_once('-') {
            Some((lo, hi)) => (port(lo, text)?, port(hi, text)?),
            None => (port(text, text)?, port(text, text)?),
        };
        if lo > hi {
            return Err(ValueError::ReversedRange { text: text.to_owned(), lo, hi });
        }
        Ok(PortRange { lo, hi })
    }
}

/// One port of `whole` (a port or a range).
fn port(text: &str, whole: &str) -> Result<u16, ValueError> {
    match text.trim().parse::<u32>() {
        Ok(0) => Err(ValueError::PortZero(whole.to_owned())),
        Ok(port) => u16::try_from(port).map_err(|_| ValueError::PortOutOfRange { port, whole: whole.to_owned() }),
        Err(_) => Err(ValueError::NotAPort(whole.to_owned())),
    }
}

impl Scalar for IpNet {
    type Error = ValueError;

    fn expecting() -> Cow<'static, str> {
        "an IP address or CIDR".into()
    }

    fn parse(text: &str) -> Result<Self, ValueError> {
        let net =
            if text.contains('/') { text.parse::<IpNet>().ok() } else { text.parse::<IpAddr>().ok().map(IpNet::from) };
        let net = net.ok_or_else(|| ValueError::NotAnAddress(text.to_owned()))?;
        if net != net.trunc() {
            return Err(ValueError::HostBits { text: text.to_owned(), network: net.trunc() });
        }
        Ok(unmap(net))
    }
}

/// The IPv4 CIDR equal to a CIDR inside `::ffff:0:0/96`, other CIDRs as they are: the kernel
/// judges v4-mapped destinations with the IPv4 rules.
pub(crate) fn unmap(net: IpNet) -> IpNet {
    let IpNet::V6(v6) = net else { return net };
    match (v6.prefix_len().checked_sub(96), v6.network().to_ipv4_mapped()) {
        (Some(len), Some(addr)) => Ipv4Net::new(addr, len).map_or(net, IpNet::V4),
        _ => net,
    }
}

/// A policy's name: anything but empty.
pub(super) struct Name(pub(super) String);

impl Scalar for Name {
    type Error = ValueError;

    fn expecting() -> Cow<'static, str> {
        "a policy name".into()
    }

    fn parse(text: &str) -> Result<Self, ValueError> {
        if text.trim().is_empty() {
            return Err(ValueError::EmptyName);
        }
        Ok(Name(text.to_owned()))
    }
}

/// A `cgroup:` selector: a path or glob relative to the cgroup2 mount, normalised to `a/b/c`.
pub(super) struct CgroupPattern(pub(super) String);

impl Scalar for CgroupPattern {
    type Error = ValueError;

    fn expecting() -> Cow<'static, str> {
        "a cgroup path or glob relative to the cgroup2 mount".into()
    }

    fn parse(text: &str) -> Result<Self, ValueError> {
        let mut parts = cgroup::relative_components(text)?;
        if parts.is_empty() {
            return Err(ValueError::EmptyCgroup);
        }
        if let Some(part) = parts.iter().find(|p| p.contains("**") && **p != "**") {
            return Err(ValueError::PartialDoubleStar { text: text.to_owned(), part: (*part).to_owned() });
        }
        // `**/**` means the same as `**`.
        parts.dedup_by(|a, b| *a == "**" && *b == "**");
        Ok(CgroupPattern(parts.join("/")))
    }
}

/// A `systemd_unit:` selector.
pub(super) struct UnitName(pub(super) String);

impl Scalar for UnitName {
    type Error = ValueError;

    fn expecting() -> Cow<'static, str> {
        "a systemd unit name like nginx.service".into()
    }

    fn parse(text: &str) -> Result<Self, ValueError> {
        if text.contains('/') {
            return Err(ValueError::UnitIsPath(text.to_owned()));
        }
        if cgroup::is_glob(text) {
            return Err(ValueError::UnitIsGlob(text.to_owned()));
        }
        let Some(prefix) = cgroup::SELECTABLE_UNIT_SUFFIXES.iter().find_map(|s| text.strip_suffix(s)) else {
            return Err(ValueError::UnitType(text.to_owned()));
        };
        let valid = |c: char| c.is_ascii_alphanumeric() || ":-_.\\@".contains(c);
        if prefix.is_empty() || prefix.starts_with(['.', '@']) || !prefix.chars().all(valid) {
            return Err(ValueError::UnitCharacters(text.to_owned()));
        }
        if text.len() > 255 {
            return Err(ValueError::UnitTooLong(text.to_owned()));
        }
        if prefix.ends_with('@') {
            return Err(ValueError::UnitTemplate {
                text: text.to_owned(),
                prefix: prefix.to_owned(),
                suffix: text[prefix.len()..].to_owned(),
            });
        }
        Ok(UnitName(text.to_owned()))
    }
}

/// A `container:` selector: an id, an id prefix of at least 4 hex digits, or a name.
pub(super) struct ContainerRef(pub(super) String);

impl Scalar for ContainerRef {
    type Error = ValueError;

    fn expecting() -> Cow<'static, str> {
        "a container id, id prefix or name".into()
    }

    fn parse(text: &str) -> Result<Self, ValueError> {
        let valid_first = text.starts_with(|c: char| c.is_ascii_alphanumeric());
        let valid_rest = text.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
        if !valid_first || !valid_rest || text.len() > 255 {
            return Err(ValueError::ContainerRef(text.to_owned()));
        }
        Ok(ContainerRef(text.to_owned()))
    }
}

/// What a rule's `allow` or `deny` names: addresses, or a domain.
pub(super) enum Destination {
    Net(IpNet),
    Name(DomainPattern),
}

impl Scalar for Destination {
    type Error = ValueError;

    fn expecting() -> Cow<'static, str> {
        "an IP address, a CIDR or a domain name".into()
    }

    fn parse(text: &str) -> Result<Self, ValueError> {
        // Digits, dots, colons and slashes only: meant as an address, so its error is an address's.
        let looks_numeric = text.trim().chars().all(|c| c.is_ascii_digit() || ".:/".contains(c));
        if looks_numeric || text.contains(':') || text.contains('/') {
            return IpNet::parse(text).map(Destination::Net);
        }
        DomainPattern::parse(text).map(Destination::Name).map_err(ValueError::Domain)
    }
}
