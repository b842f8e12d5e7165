//! The `settings:` mapping as written: every key optional, each value checked where it is
//! written (see [`super::values`]).

use serde::Deserialize;

use super::{
    values::{
        AttachPath, Count, EventBudget, FlowInterval, GroupName, History, ListenPort, MetricsAddr, PinDir, Seconds,
        SocketPath, Upstream, WrittenBudget, MAX_ADDRESSES_PER_ANSWER,
    },
    DnsSettings, RefuseWith, Settings,
};
use crate::yaml::{Checked, OneOrMany};

/// `settings:`; every key optional.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SettingsDoc {
    #[serde(default)]
    attach: Option<Checked<AttachPath>>,
    #[serde(default)]
    history: Option<Checked<History>>,
    #[serde(default)]
    control_socket: Option<Checked<SocketPath>>,
    #[serde(default)]
    control_group: Option<Checked<GroupName>>,
    #[serde(default)]
    metrics: Option<Checked<MetricsAddr>>,
    #[serde(default)]
    pin_dir: Option<Checked<PinDir>>,
    #[serde(default)]
    events_per_second: Option<Checked<EventBudget>>,
    #[serde(default)]
    events_written_per_second: Option<Checked<WrittenBudget>>,
    #[serde(default)]
    flow_interval: Option<Checked<FlowInterval>>,
    dns: Option<DnsDoc>,
}

impl SettingsDoc {
    pub(crate) fn into_settings(self) -> Settings {
        let defaults = Settings::default();
        Settings {
            attach: self.attach.map_or(defaults.attach, |v| v.0 .0),
            history: self.history.map_or(defaults.history, |v| v.0 .0),
            events_per_second: self.events_per_second.map_or(defaults.events_per_second, |v| v.0 .0),
            events_written_per_second: self
                .events_written_per_second
                .map_or(defaults.events_written_per_second, |v| v.0 .0),
            flow_interval: self.flow_interval.map_or(defaults.flow_interval, |v| v.0 .0),
            control_socket: self.control_socket.map_or(defaults.control_socket, |v| v.0 .0),
            control_group: self.control_group.map(|v| v.0 .0).or(defaults.control_group),
            metrics: self.metrics.map(|v| v.0 .0).or(defaults.metrics),
            pin_dir: self.pin_dir.map_or(defaults.pin_dir, |v| v.0 .0),
            dns: self.dns.map_or(defaults.dns, DnsDoc::into_settings),
        }
    }
}

/// `settings.dns`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DnsDoc {
    #[serde(default)]
    listen_port: Option<Checked<ListenPort>>,
    #[serde(default)]
    upstream: Option<OneOrMany<Checked<Upstream>>>,
    #[serde(default)]
    refuse_with: Option<Checked<RefuseWith>>,
    #[serde(default)]
    min_ttl: Option<Checked<Seconds>>,
    #[serde(default)]
    grace: Option<Checked<Seconds>>,
    #[serde(default)]
    max_addresses_per_answer: Option<Checked<Count<MAX_ADDRESSES_PER_ANSWER>>>,
    #[serde(default)]
    max_learned_per_cgroup: Option<Checked<Count<{ egress_common::MAX_LEARNED }>>>,
}

impl DnsDoc {
    fn into_settings(self) -> DnsSettings {
        let defaults = DnsSettings::default();
        DnsSettings {
            listen_port: self.listen_port.map_or(defaults.listen_port, |v| v.0 .0),
            upstream: self.upstream.map_or(defaults.upstream, |list| list.0.into_iter().map(|v| v.0 .0).collect()),
            refuse_with: self.refuse_with.map_or(defaults.refuse_with, |v| v.0),
            min_ttl: self.min_ttl.map_or(defaults.min_ttl, |v| v.0 .0),
            grace: self.grace.map_or(defaults.grace, |v| v.0 .0),
            max_addresses_per_answer: self
                .max_addresses_per_answer
                .map_or(defaults.max_addresses_per_answer, |v| v.0 .0),
            max_learned_per_cgroup: self.max_learned_per_cgroup.map_or(defaults.max_learned_per_cgroup, |v| v.0 .0),
        }
    }
}
