//! Every kernel object egress uses: the embedded programs and their links, the maps and their
//! pins in bpffs, feature probes, and the event ring. Nothing outside this module imports aya.

mod barrier;
mod batch;
mod dns;
mod enforcer;
mod error;
mod event_ring;
mod flows;
mod maps;
mod pins;
mod probe;
mod programs;

pub use dns::{DnsMapError, DnsMaps};
pub use enforcer::{Enforcer, OnExit, Start};
pub use error::KernelError;
pub use event_ring::{DropCounter, Drops, EventSource};
pub use flows::FlowSource;
pub use pins::{pinned_bindings, pinned_maps_exist, pinned_policy_epoch, MAPS_DIR};
pub use probe::{check as preflight, ensure_bpffs, missing_helper, PreflightError};
pub use programs::{SocketGuard, Wanted, PROGRAMS_BUILD};

fn nr_cpus() -> usize {
    aya::util::nr_cpus().unwrap_or(1)
}
