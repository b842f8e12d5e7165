//! Test hook for crash and failure injection in the install path (used by
//! `tests/crash_safety.rs`; not meant for production use).
//!
//! `EGRESS_FAULT_POINT=<point>[@<n>]` makes the daemon act at the n-th time (default: the first)
//! it reaches `<point>`: at a crash point it kills itself with SIGKILL on the spot (no cleanup,
//! like the OOM killer or a power cut of the process); at a `fail-*` point the step fails as if
//! the kernel had refused it. The points are named where [`crash_point`] and [`fails`] are called.

use std::sync::{
    atomic::{AtomicU32, Ordering},
    OnceLock,
};

pub const ENV: &str = "EGRESS_FAULT_POINT";

struct Fault {
    point: String,
    at: u32,
    reached: AtomicU32,
}

fn configured() -> Option<&'static Fault> {
    static FAULT: OnceLock<Option<Fault>> = OnceLock::new();
    FAULT
        .get_or_init(|| {
            let spec = std::env::var(ENV).ok()?;
            let (point, at) = parse(&spec)?;
            Some(Fault { point, at, reached: AtomicU32::new(0) })
        })
        .as_ref()
}

fn parse(spec: &str) -> Option<(String, u32)> {
    let (point, at) = match spec.split_once('@') {
        Some((point, at)) => (point, at.parse().ok()?),
        None => (spec, 1),
    };
    (!point.is_empty() && at > 0).then(|| (point.to_string(), at))
}

/// True when this is the configured time `point` is reached.
fn hit(point: &str) -> bool {
    match configured() {
        Some(fault) if fault.point == point => fault.reached.fetch_add(1, Ordering::SeqCst) + 1 == fault.at,
        _ => false,
    }
}

/// Dies here (SIGKILL to itself) when the test hook names this point.
pub fn crash_point(point: &str) {
    if hit(point) {
        eprintln!("{ENV}: killed at {point}");
        // SAFETY: signalling this process; SIGKILL cannot be caught, so nothing runs after it.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    }
}

/// True when the test hook makes the step at this point fail.
pub fn fails(point: &str) -> bool {
    let failing = hit(point);
    if failing {
        tracing::warn!("{ENV}: injected failure at {point}");
    }
    failing
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn parses_point_and_occurrence() {
        assert_eq!(parse("after-switch"), Some(("after-switch".to_string(), 1)));
        assert_eq!(parse("mid-cleanup@2"), Some(("mid-cleanup".to_string(), 2)));
        assert_eq!(parse("x@0"), None);
        assert_eq!(parse("@2"), None);
        assert_eq!(parse("x@y"), None);
    }
}
