//! The daemon's settings: the optional top-level `settings:` of a policy file (where programs
//! attach and are pinned, the control socket, history, event budgets, the DNS proxy), with their
//! defaults and limits. [`doc`] reads them from YAML.

use std::{net::SocketAddr, path::PathBuf};

use crate::yaml::Keyword;

pub(crate) mod doc;
mod values;

pub use values::SettingError;

/// Default of [`Settings::history`].
pub const DEFAULT_HISTORY: usize = 10_000;
/// Largest [`Settings::history`].
pub const MAX_HISTORY: usize = 10_000_000;
/// Largest [`Settings::events_per_second`].
pub const MAX_EVENT_BUDGET: u32 = 10_000_000;
/// Default of [`Settings::events_written_per_second`].
pub const DEFAULT_EVENTS_WRITTEN: u32 = 10_000;
/// Default of [`Settings::control_socket`].
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/egress/control.sock";
/// Default of [`Settings::pin_dir`].
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/egress";

/// The daemon's settings: the optional top-level `settings:` of a policy file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// The cgroup the kernel programs are attached to, relative to the cgroup2 mount and
    /// normalised like cgroup selectors; [`crate::cgroup::ROOT`] for the cgroup2 root (the default).
    pub attach: String,
    /// Events kept in memory for `egress logs`, `1..=MAX_HISTORY`.
    pub history: usize,
    /// Absolute, normalised path of the control socket.
    pub control_socket: PathBuf,
    /// A group whose members may use the control socket besides root.
    pub control_group: Option<String>,
    /// Where the Prometheus metrics are served; `None`: not served.
    pub metrics: Option<SocketAddr>,
    /// Absolute, normalised directory in a bpffs where programs, links and maps are pinned.
    pub pin_dir: PathBuf,
    /// Flow events one cgroup may raise per second on each CPU; the kernel counts the rest
    /// as suppressed (`1..=MAX_EVENT_BUDGET`).
    pub events_per_second: u32,
    /// Flow events written to the output (stdout, the journal) per second, all cgroups together;
    /// the rest are counted and reported (`1..=MAX_EVENT_BUDGET`).
    pub events_written_per_second: u32,
    /// Between interim flow records of a long flow (`1..=MAX_FLOW_INTERVAL_SECS` seconds).
    pub flow_interval: std::time::Duration,
    /// The DNS proxy for name rules.
    pub dns: DnsSettings,
}

/// Default of [`DnsSettings::listen_port`].
pub const DEFAULT_DNS_PORT: u16 = 5300;
/// Default of [`DnsSettings::min_ttl`], seconds.
pub const DEFAULT_MIN_TTL: u32 = 5;
/// Default of [`DnsSettings::grace`], seconds.
pub const DEFAULT_GRACE: u32 = 30;
/// Default of [`DnsSettings::max_addresses_per_answer`].
pub const DEFAULT_MAX_ADDRESSES_PER_ANSWER: u32 = 32;
/// Default of [`DnsSettings::max_learned_per_cgroup`]: 16 cgroups at their quota fill the
/// kernel's `MAX_LEARNED` (65,536) entries.
pub const DEFAULT_MAX_LEARNED_PER_CGROUP: u32 = 4_096;

/// What the DNS proxy answers for a name no rule allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum RefuseWith {
    #[default]
    Refused,
    NxDomain,
}

impl Keyword for RefuseWith {
    const KIND: &'static str = "answer";
    const ALL: &'static [Self] = &[RefuseWith::Refused, RefuseWith::NxDomain];
    fn keyword(self) -> &'static str {
        self.as_str()
    }
}

impl RefuseWith {
    /// The keyword used in policy files.
    pub fn as_str(self) -> &'static str {
        match self {
            RefuseWith::Refused => "refused",
            RefuseWith::NxDomain => "nxdomain",
        }
    }
}

/// `settings.dns`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsSettings {
    /// Port of the proxy on 127.0.0.1 and ::1 (UDP and TCP).
    pub listen_port: u16,
    /// Resolvers to forward allowed queries to; empty: the host's `/etc/resolv.conf`.
    pub upstream: Vec<SocketAddr>,
    pub refuse_with: RefuseWith,
    /// Shortest time a learned address stays allowed, whatever the answer's TTL (seconds).
    pub min_ttl: u32,
    /// Time added to the TTL, for clients that cache answers a little longer (seconds).
    pub grace: u32,
    /// Addresses learned from one answer; the answer's further A/AAAA records are removed.
    pub max_addresses_per_answer: u32,
    /// Learned entries one bound cgroup holds at once; beyond them its answers get SERVFAIL.
    pub max_learned_per_cgroup: u32,
}

impl Default for DnsSettings {
    fn default() -> Self {
        DnsSettings {
            listen_port: DEFAULT_DNS_PORT,
            upstream: Vec::new(),
            refuse_with: RefuseWith::Refused,
            min_ttl: DEFAULT_MIN_TTL,
            grace: DEFAULT_GRACE,
            max_addresses_per_answer: DEFAULT_MAX_ADDRESSES_PER_ANSWER,
            max_learned_per_cgroup: DEFAULT_MAX_LEARNED_PER_CGROUP,
        }
    }
}

/// Largest [`Settings::flow_interval`], in seconds.
pub const MAX_FLOW_INTERVAL_SECS: u64 = 3600;

impl Default for Settings {
    fn default() -> Self {
        Settings {
            attach: crate::cgroup::ROOT.to_string(),
            history: DEFAULT_HISTORY,
            control_socket: PathBuf::from(DEFAULT_CONTROL_SOCKET),
            control_group: None,
            metrics: None,
            pin_dir: PathBuf::from(DEFAULT_PIN_DIR),
            events_per_second: egress_common::DEFAULT_EVENT_BUDGET,
            events_written_per_second: DEFAULT_EVENTS_WRITTEN,
            flow_interval: std::time::Duration::from_secs(60),
            dns: DnsSettings::default(),
        }
    }
}
