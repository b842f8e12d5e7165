//! The flow log on disk (`settings.flow_log`): flow records appended as JSON lines, rotated by
//! size, in the default record format or in ECS names, and read back by `egress replay` and
//! `egress suggest`.

pub mod community_id;
pub mod ecs;
pub mod file;
pub mod read;
mod sha1;

use std::path::PathBuf;

/// How records are written: `records` (the default: the objects `egress logs --flows --json`
/// prints) or `ecs` (Elastic Common Schema names, see [`ecs`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Format {
    #[default]
    Records,
    Ecs,
}

impl Format {
    /// The keyword in policy files and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Records => "records",
            Format::Ecs => "ecs",
        }
    }
}

/// Default of [`FlowLogSettings::max_size`]: 100 MiB.
pub const DEFAULT_MAX_SIZE: u64 = 100 << 20;
/// Default of [`FlowLogSettings::keep`].
pub const DEFAULT_KEEP: u32 = 5;
/// Largest [`FlowLogSettings::keep`].
pub const MAX_KEEP: u32 = 1000;
/// Smallest [`FlowLogSettings::max_size`]: a few records.
pub const MIN_MAX_SIZE: u64 = 4096;

/// `settings.flow_log`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlowLogSettings {
    /// Absolute path of the current file; rotated files are `PATH.1` (newest) to `PATH.KEEP`.
    pub path: PathBuf,
    /// The current file is rotated before a record would take it past this many bytes.
    pub max_size: u64,
    /// Rotated files kept (0: the current file is truncated instead).
    pub keep: u32,
    pub format: Format,
}
