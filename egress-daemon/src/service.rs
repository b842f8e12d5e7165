//! Running under systemd: readiness notifications (`Type=notify`) and journal priorities.
//! Both are no-ops when the daemon is not started by systemd.

use std::os::unix::net::{SocketAddr, UnixDatagram};

/// Whether stdout/stderr go to the journal (systemd sets `JOURNAL_STREAM` for services).
pub fn under_journal() -> bool {
    std::env::var_os("JOURNAL_STREAM").is_some()
}

/// Every policy is enforced.
pub fn notify_ready() {
    notify("READY=1\nSTATUS=enforcing");
}

pub fn notify_reloading() {
    notify("RELOADING=1\nSTATUS=reloading");
}

pub fn notify_stopping() {
    notify("STOPPING=1");
}

fn notify(message: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let path = path.to_string_lossy().into_owned();
    let address = match path.strip_prefix('@') {
        Some(abstract_name) => {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(abstract_name.as_bytes())
        }
        None => SocketAddr::from_pathname(&path),
    };
    let sent = address.and_then(|address| {
        let socket = UnixDatagram::unbound()?;
        socket.send_to_addr(message.as_bytes(), &address)
    });
    if let Err(error) = sent {
        tracing::warn!(%error, socket = %path, "notifying systemd");
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
