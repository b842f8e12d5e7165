//! Running under systemd: readiness notifications (`Type=notify`) and journal priorities.
//! Both are no-ops when the daemon is not started by systemd.

use sd_notify::NotifyState;

/// Whether stdout/stderr go to the journal (systemd sets `JOURNAL_STREAM` for services).
pub fn under_journal() -> bool {
    std::env::var_os("JOURNAL_STREAM").is_some()
}

/// Every policy is enforced.
pub fn notify_ready() {
    notify(&[NotifyState::Ready, NotifyState::Status("enforcing")]);
}

pub fn notify_reloading() {
    // systemd wants the reload's start time with RELOADING=1 (Type=notify-reload insists on it).
    let mut states = vec![NotifyState::Reloading, NotifyState::Status("reloading")];
    states.extend(NotifyState::monotonic_usec_now().ok());
    notify(&states);
}

pub fn notify_stopping() {
    notify(&[NotifyState::Stopping]);
}

fn notify(states: &[NotifyState]) {
    // The socket stays in the environment: the daemon notifies again at every reload.
    if let Err(error) = sd_notify::notify(false, states) {
        tracing::warn!(%error, "notifying systemd");
    }
}

/// Syslog priority prefix the journal understands on a service's stdout (`SyslogLevelPrefix=`).
pub fn journal_priority(verdict: &str) -> &'static str {
    match verdict {
        "blocked" => "<4>",
        "audit" => "<5>",
        _ => "<6>",
    }
}
