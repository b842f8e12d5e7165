//! The values of `settings:`, each checked where it is written.

use std::{
    borrow::Cow,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
};

use super::{MAX_EVENT_BUDGET, MAX_FLOW_INTERVAL_SECS, MAX_HISTORY};
use crate::{cgroup, yaml::Scalar};

/// Why a setting's value cannot be used: the message of the error at its position.
#[derive(Debug, thiserror::Error)]
pub enum SettingError {
    #[error(transparent)]
    CgroupPath(#[from] cgroup::PathError),
    #[error("`{0}` is a glob; the programs attach to one cgroup (or / for the cgroup2 root)")]
    AttachGlob(String),
    #[error("`{0}` is not a number of events")]
    NotEvents(String),
    #[error("history {0} is out of range; keep 1 to {MAX_HISTORY} events")]
    History(u64),
    #[error("flow_interval `{0}` is out of range; keep 1s to {MAX_FLOW_INTERVAL_SECS}s")]
    FlowInterval(String),
    #[error("events_per_second `{0}` is out of range; keep 1 to {MAX_EVENT_BUDGET}")]
    EventBudget(String),
    #[error("events_written_per_second `{0}` is out of range; keep 1 to {MAX_EVENT_BUDGET}")]
    WrittenBudget(String),
    #[error("`{0}` is not an absolute path")]
    NotAbsolute(String),
    #[error("path `{0}` must not contain `..`")]
    PathClimbs(String),
    #[error("`{0}` names a directory; give the socket's file name, like /run/egress/control.sock")]
    SocketIsDirectory(String),
    #[error("socket path `{path}` is {len} bytes; a Unix socket path holds at most {MAX_SOCKET_PATH}")]
    SocketTooLong { path: String, len: usize },
    #[error("pin_dir must be a directory in a bpffs, like /sys/fs/bpf/egress, not /")]
    PinDirRoot,
    #[error(
        "`{0}` is not a group name: a letter, digit or `_`, then letters, digits, \
         `_`, `.` or `-` (at most 32)"
    )]
    Group(String),
    #[error("`{0}` is not a listen address like 127.0.0.1:9154 or [::1]:9154")]
    Metrics(String),
    #[error("`{text}` is not a number from 1 to {max}")]
    Count { text: String, max: u32 },
    #[error("`{0}` is not a port for the DNS proxy; ports are 1-65535")]
    ListenPort(String),
    #[error("the DNS proxy cannot listen on port 53: that is the port steered to it")]
    ListenPort53,
    #[error("`{0}` is not a resolver address like 192.0.2.53 or [2001:db8::53]:53")]
    Upstream(String),
    #[error("`{0}` is not a number of seconds from 0 to 86400")]
    Seconds(String),
}

/// `settings.attach`: one cgroup, [`crate::cgroup::ROOT`] for the cgroup2 root.
pub(super) struct AttachPath(pub(super) String);

impl Scalar for AttachPath {
    type Error = SettingError;

    fn expecting() -> Cow<'static, str> {
        "a cgroup path relative to the cgroup2 mount, or / for its root".into()
    }

    fn parse(text: &str) -> Result<Self, SettingError> {
        if text.trim() == "/" || text.is_empty() {
            return Ok(AttachPath(cgroup::ROOT.to_string()));
        }
        let parts = cgroup::relative_components(text)?;
        if cgroup::is_glob(text) {
            return Err(SettingError::AttachGlob(text.to_owned()));
        }
        Ok(AttachPath(parts.join("/")))
    }
}

/// `settings.history`.
pub(super) struct History(pub(super) usize);

impl Scalar for History {
    type Error = SettingError;

    fn expecting() -> Cow<'static, str> {
        "a number of events".into()
    }

    fn parse(text: &str) -> Result<Self, SettingError> {
        let number =
            text.trim().replace('_', "").parse::<u64>().map_err(|_| SettingError::NotEvents(text.to_owned()))?;
        match usize::try_from(number) {
            Ok(n) if (1..=MAX_HISTORY).contains(&n) => Ok(History(n)),
            _ => Err(SettingError::History(number)),
        }
    }
}

/// `settings.flow_interval`: seconds, as a number or with an `s` or `m` suffix.
pub(super) struct FlowInterval(pub(super) std::time::Duration);

impl Scalar for FlowInterval {
    type Error = SettingError;

    fn expecting() -> Cow<'static, str> {
        "a number of seconds like 60, 60s or 1m".into()
    }

    fn parse(text: &str) -> Result<Self, SettingError> {
        let trimmed = text.trim();
        let (number, scale) = match trimmed.strip_suffix('m') {
            Some(minutes) => (minutes, 60),
            None => (trimmed.strip_suffix('s').unwrap_or(trimmed), 1),
        };
        match number.trim().parse::<u64>().ok().and_then(|n| n.checked_mul(scale)) {
            Some(secs) if (1..=MAX_FLOW_INTERVAL_SECS).contains(&secs) => {
                Ok(FlowInterval(std::time::Duration::from_secs(secs)))
            }
            _ => Err(SettingError::FlowInterval(text.to_owned())),
        }
    }
}

/// `settings.events_per_second`.
pub(super) struct EventBudget(pub(super) u32);

impl Scalar for EventBudget {
    type Error = SettingError;

    fn expecting() -> Cow<'static, str> {
        "a number of events per second".into()
    }

    fn parse(text: &str) -> Result<Self, SettingError> {
        match text.trim().replace('_', "").parse::<u32>() {
            Ok(n) if (1..=MAX_EVENT_BUDGET).contains(&n) => Ok(EventBudget(n)),
            _ => Err(SettingError::EventBudget(text.to_owned())),
        }
    }
}

/// `settings.events_written_per_second`.
pub(super) struct WrittenBudget(pub(super) u32);

impl Scalar for WrittenBudget {
    type Error = SettingError;

    fn expecting() -> Cow<'static, str> {
        "a number of events per second".into()
    }

    fn parse(text: &str) -> Result<Self, SettingError> {
        match text.trim().replace('_', "").parse::<u32>() {
            Ok(n) if (1..=MAX_EVENT_BUDGET).contains(&n) => Ok(WrittenBudget(n)),
            _ => Err(SettingError::WrittenBudget(text.to_owned())),
        }
    }
}

/// An absolute path without `..`, normalised (no empty or `.` components, no trailing `/`).
fn absolute_path(text: &str) -> Result<PathBuf, SettingError> {
    if !text.starts_with('/') {
        return Err(SettingError::NotAbsolute(text.to_owned()));
    }
    let parts: Vec<&str> = text.split('/').filter(|p| !p.is_empty() && *p != ".").collect();
    if parts.contains(&"..") {
        return Err(SettingError::PathClimbs(text.to_owned()));
    }
    Ok(PathBuf::from(format!("/{}", parts.join("/"))))
}

/// `settings.control_socket`.
pub(super) struct SocketPath(pub(super) PathBuf);

/// Longest path a Unix socket address holds (`sun_path` less its NUL).
const MAX_SOCKET_PATH: usize = 107;

impl Scalar for SocketPath {
    type Error = SettingError;

    fn expecting() -> Cow<'static, str> {
        "an absolute path for the control socket".into()
    }

    fn parse(text: &str) -> Result<Self, SettingError> {
        let path = absolute_path(text)?;
        if text.ends_with('/') || path == Path::new("/") {
            return Err(SettingError::SocketIsDirectory(text.to_owned()));
        }
        let len = path.as_os_str().len();
        if len > MAX_SOCKET_PATH {
            return Err(SettingError::SocketTooLong { path: path.display().to_string(), len });
        }
        Ok(SocketPath(path))
    }
}

/// `settings.pin_dir`.
pub(super) struct PinDir(pub(super) PathBuf);

impl Scalar for PinDir {
    type Error = SettingError;

    fn expecting() -> Cow<'static, str> {
        "an absolute directory in a bpffs".into()
    }

    fn parse(text: &str) -> Result<Self, SettingError> {
        let path = absolute_path(text)?;
        if path == Path::new("/") {
            return Err(SettingError::PinDirRoot);
        }
        Ok(PinDir(path))
    }
}

/// `settings.control_group`: a group name (or number).
pub(super) struct GroupName(pub(super) String);

impl Scalar for GroupName {
    type Error = SettingError;

    fn expecting() -> Cow<'static, str> {
        "a group name".into()
    }

    fn parse(text: &str) -> Result<Self, SettingError> {
        let body = text.strip_suffix('$').unwrap_or(text);
        let valid_first = body.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_');
        let valid_rest = body.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
        if !valid_first || !valid_rest || text.len() > 32 {
            return Err(SettingError::Group(text.to_owned()));
        }
        Ok(GroupName(text.to_owned()))
    }
}

/// `settings.metrics`: `ADDRESS:PORT`, or a port alone for 127.0.0.1.
pub(super) struct MetricsAddr(pub(super) SocketAddr);

impl Scalar for MetricsAddr {
    type Error = SettingError;

    fn expecting() -> Cow<'static, str> {
        "a listen address like 127.0.0.1:9154".into()
    }

    fn parse(text: &str) -> Result<Self, SettingError> {
        let text = text.trim();
        if let Ok(addr) = text.parse::<SocketAddr>() {
            return Ok(MetricsAddr(addr));
        }
        if let Ok(port) = text.parse::<u16>() {
            return Ok(MetricsAddr(SocketAddr::from((Ipv4Addr::LOCALHOST, port))));
        }
        Err(SettingError::Metrics(text.to_owned()))
    }
}

/// Largest `settings.dns.max_addresses_per_answer` (more do not fit a 64 KiB message anyway).
pub(super) const MAX_ADDRESSES_PER_ANSWER: u32 = 4_096;

/// A count from 1 to `MAX`.
pub(super) struct Count<const MAX: u32>(pub(super) u32);

impl<const MAX: u32> Scalar for Count<MAX> {
    type Error = SettingError;

    fn expecting() -> Cow<'static, str> {
        format!("a number from 1 to {MAX}").into()
    }

    fn parse(text: &str) -> Result<Self, SettingError> {
        match text.trim().parse::<u32>() {
            Ok(count) if (1..=MAX).contains(&count) => Ok(Count(count)),
            _ => Err(SettingError::Count { text: text.to_owned(), max: MAX }),
        }
    }
}

/// `settings.dns.listen_port`.
pub(super) struct ListenPort(pub(super) u16);

impl Scalar for ListenPort {
    type Error = SettingError;

    fn expecting() -> Cow<'static, str> {
        "a port for the DNS proxy".into()
    }

    fn parse(text: &str) -> Result<Self, SettingError> {
        match text.trim().parse::<u16>() {
            Ok(0) | Err(_) => Err(SettingError::ListenPort(text.to_owned())),
            Ok(53) => Err(SettingError::ListenPort53),
            Ok(port) => Ok(ListenPort(port)),
        }
    }
}

/// One of `settings.dns.upstream`: `ADDRESS` (port 53) or `ADDRESS:PORT` (`[V6]:PORT`).
pub(super) struct Upstream(pub(super) SocketAddr);

impl Scalar for Upstream {
    type Error = SettingError;

    fn expecting() -> Cow<'static, str> {
        "a resolver address like 192.0.2.53 or 192.0.2.53:53".into()
    }

    fn parse(text: &str) -> Result<Self, SettingError> {
        let text = text.trim();
        if let Ok(addr) = text.parse::<SocketAddr>() {
            return Ok(Upstream(addr));
        }
        if let Ok(ip) = text.parse::<IpAddr>() {
            return Ok(Upstream(SocketAddr::new(ip, 53)));
        }
        Err(SettingError::Upstream(text.to_owned()))
    }
}

/// A duration in whole seconds, at most a day.
pub(super) struct Seconds(pub(super) u32);

impl Scalar for Seconds {
    type Error = SettingError;

    fn expecting() -> Cow<'static, str> {
        "a number of seconds".into()
    }

    fn parse(text: &str) -> Result<Self, SettingError> {
        match text.trim().parse::<u32>() {
            Ok(seconds) if seconds <= 86_400 => Ok(Seconds(seconds)),
            _ => Err(SettingError::Seconds(text.to_owned())),
        }
    }
}
