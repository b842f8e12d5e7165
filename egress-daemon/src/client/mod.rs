//! The CLI's side of the control socket, for every command that talks to the running daemon:
//! `egress status`, `egress logs`, `egress reload` here, `egress logs --flows` and `egress top`
//! in [`flows`]. Lines look as the daemon's own output does ([`crate::format`]).

pub mod flows;
#[cfg(test)]
mod round_trip;

use std::{
    fmt::Write as _,
    io::{self, Write},
    path::{Path, PathBuf},
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines},
    net::{
        unix::{OwnedReadHalf, OwnedWriteHalf},
        UnixStream,
    },
};

use crate::{
    control::protocol::{Request, Response, StatusReport},
    format::event_line,
    printable::{escaped, json_bytes},
};

/// How long `status` and `reload` wait for the daemon's answer (a reload may query container
/// runtimes, so it is generous).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(120);

/// What went wrong talking to the daemon. [`Daemon`](ControlError::Daemon) is the daemon's own
/// refusal (a rejected reload: `FILE:LINE:COL: message`); the CLI exits 2 for a rejected reload.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot reach the egress daemon at {socket}: is it running? ({cause})")]
    Unreachable { socket: PathBuf, cause: io::Error },
    #[error("permission denied on {socket}: the control socket is for root and settings.control_group")]
    NotPermitted { socket: PathBuf },
    #[error("{0}")]
    Daemon(String),
    #[error("talking to the egress daemon at {socket}: {reason}")]
    Protocol { socket: PathBuf, reason: String },
}

/// What `egress logs` asks for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LogsArgs {
    pub follow: bool,
    pub blocked_only: bool,
    pub policy: Option<String>,
    pub since: Option<Duration>,
}

/// `egress status`: a table of what is enforced where, or the report as JSON.
pub async fn status(socket: &Path, json: bool) -> anyhow::Result<()> {
    let report = fetch_status(socket).await?;
    let text = if json { String::from_utf8(json_bytes(&report, true)?)? + "\n" } else { status_text(&report) };
    print_stdout(&text)
}

/// `egress reload`: prints the daemon's summary; a rejected file is a [`ControlError::Daemon`]
/// with the daemon's message.
pub async fn reload(socket: &Path) -> anyhow::Result<()> {
    let (_, message) = request_reload(socket).await?;
    print_stdout(&format!("{message}\n"))
}

/// `egress logs`: the matching kept events, then, with `follow`, live ones until the daemon
/// stops. Events go to stdout, as text or JSON lines; notices go to stderr.
pub async fn logs(socket: &Path, args: LogsArgs, json: bool) -> anyhow::Result<()> {
    logs_to(socket, args, json, &mut io::stdout()).await
}

/// `30s`, `5m`, `2h`, `1d`, `500ms` (any humantime duration), or plain seconds.
pub fn parse_duration(text: &str) -> Result<Duration, DurationError> {
    let text = text.trim();
    if let Ok(seconds) = text.parse::<u64>() {
        return Ok(Duration::from_secs(seconds));
    }
    humantime::parse_duration(text).map_err(|source| DurationError { text: text.to_owned(), source })
}

/// A `--since` or `--window` that is not a duration.
#[derive(Debug, thiserror::Error)]
#[error("`{text}` is not a duration like 30s, 5m, 2h, 1d: {source}")]
pub struct DurationError {
    text: String,
    source: humantime::DurationError,
}

/// Asks the daemon for its status report.
pub async fn fetch_status(socket: &Path) -> anyhow::Result<StatusReport> {
    let mut connection = Connection::open(socket, &Request::Status).await?;
    match connection.answer().await? {
        Response::Status(report) => Ok(report),
        other => Err(connection.unexpected(other).into()),
    }
}

/// Asks the daemon to reload its file: the number of policies in force and its summary.
pub async fn request_reload(socket: &Path) -> anyhow::Result<(usize, String)> {
    let mut connection = Connection::open(socket, &Request::Reload).await?;
    match connection.answer().await? {
        Response::Reloaded { policies, message } => Ok((policies, message)),
        other => Err(connection.unexpected(other).into()),
    }
}

/// `--since` as the request carries it, rounded up: `--since 500ms` means the last second, not
/// nothing.
fn since_secs(since: Option<Duration>) -> Option<u64> {
    since.map(|d| d.as_secs() + u64::from(d.subsec_nanos() > 0))
}

/// [`logs`] writing events to `out`.
pub async fn logs_to<W: Write + Send>(socket: &Path, args: LogsArgs, json: bool, out: &mut W) -> anyhow::Result<()> {
    let request = Request::Logs {
        follow: args.follow,
        blocked_only: args.blocked_only,
        policy: args.policy,
        since_secs: since_secs(args.since),
    };
    let mut connection = Connection::open(socket, &request).await?;
    let mut out = io::BufWriter::new(out);
    while let Some(response) = connection.next().await? {
        let line = match response {
            Response::Event(record) if json => String::from_utf8(json_bytes(&record, false)?)?,
            Response::Event(record) => event_line(&record),
            Response::Notice { message } => {
                eprintln!("egress: {message}");
                continue;
            }
            other => return Err(connection.unexpected(other).into()),
        };
        let written = writeln!(out, "{line}").and_then(|()| {
            // Flush whenever the next read may wait, so a follower sees each event at once.
            if connection.line_pending() {
                Ok(())
            } else {
                out.flush()
            }
        });
        match written {
            Ok(()) => {}
            // The reader went away (`egress logs | head`): done, not an error.
            Err(error) if error.kind() == io::ErrorKind::BrokenPipe => return Ok(()),
            Err(error) => return Err(error.into()),
        }
    }
    match out.flush() {
        Err(error) if error.kind() != io::ErrorKind::BrokenPipe => Err(error.into()),
        _ => Ok(()),
    }
}

/// The readable form of a status report.
pub fn status_text(report: &StatusReport) -> String {
    let mut out = String::new();
    let attach = &report.attach;
    let _ = writeln!(out, "config:         {}", escaped(&report.config));
    let _ = writeln!(out, "loaded at:      {} (generation {})", report.loaded_at, report.generation);
    let _ = writeln!(out, "attached at:    {}", escaped(attach));
    let _ = writeln!(out, "dropped events: {}", report.dropped_events);
    if report.flow_evictions > 0 {
        let _ = writeln!(out, "evicted flows:  {} (the kernel's flow table was full)", report.flow_evictions);
    }
    if report.malformed_packets > 0 {
        let _ = writeln!(out, "malformed:      {} packets refused (rule `malformed`)", report.malformed_packets);
    }
    for warning in &report.warnings {
        let _ = writeln!(out, "warning:        {}", escaped(warning));
    }
    if report.dns_busy > 0 {
        let _ = writeln!(out, "dns busy:       {} queries or connections over their cgroup's share", report.dns_busy);
    }
    if report.dns_upstream_mismatches > 0 {
        let _ = writeln!(
            out,
            "dns upstream:   {} answers that did not echo their query (SERVFAIL)",
            report.dns_upstream_mismatches
        );
    }
    if report.dns_quota > 0 {
        let _ = writeln!(
            out,
            "dns quota:      {} answers over their cgroup's quota of learned addresses (SERVFAIL)",
            report.dns_quota
        );
    }
    for guarantee in &report.guarantees {
        let _ = writeln!(out, "guarantee:      {guarantee}");
    }
    out.push('\n');

    let names: Vec<String> = report
        .cgroups
        .iter()
        .map(|row| {
            let name = match &row.workload {
                Some(workload) => format!("{} ({})", escaped(&row.cgroup), escaped(workload)),
                None => escaped(&row.cgroup).into_owned(),
            };
            if row.deep {
                name + " [deep]"
            } else {
                name
            }
        })
        .collect();
    let policies: Vec<String> = report.cgroups.iter().map(|row| escaped(&row.policy).into_owned()).collect();
    let width = |header: &str, cells: &mut dyn Iterator<Item = usize>| cells.fold(header.len(), usize::max);
    let cgroup_width = width("CGROUP", &mut names.iter().map(|n| n.chars().count()));
    let policy_width = width("POLICY", &mut policies.iter().map(|p| p.chars().count()));
    let mode_width = width("MODE", &mut report.cgroups.iter().map(|row| row.mode.len()));
    if report.cgroups.is_empty() {
        out.push_str("no cgroup is bound to a policy\n");
    } else {
        let _ = writeln!(
            out,
            "{:<cgroup_width$}  {:<policy_width$}  {:<mode_width$}  {:>9}  {:>9}  {:>9}  {:>10}",
            "CGROUP", "POLICY", "MODE", "ALLOWED", "BLOCKED", "AUDITED", "SUPPRESSED"
        );
        for ((row, name), policy) in report.cgroups.iter().zip(&names).zip(&policies) {
            let _ = writeln!(
                out,
                "{name:<cgroup_width$}  {policy:<policy_width$}  {:<mode_width$}  {:>9}  {:>9}  {:>9}  {:>10}",
                row.mode, row.allowed, row.blocked, row.audited, row.suppressed
            );
        }
    }
    out.push('\n');
    for policy in &report.policies {
        let _ = writeln!(
            out,
            "policy {}: {}, default {}, mode {}, {} rule{}, {} cgroup{}",
            escaped(&policy.name),
            escaped(&policy.selector),
            policy.default,
            policy.mode,
            policy.rules,
            plural(policy.rules),
            policy.cgroups,
            plural(policy.cgroups),
        );
        if !policy.names_seen.is_empty() {
            let names: Vec<String> = policy.names_seen.iter().map(|n| escaped(n).into_owned()).collect();
            let _ = writeln!(out, "  names seen: {}", names.join(", "));
        }
        for learned in &policy.learned {
            let names: Vec<String> = learned.names.iter().map(|n| escaped(n).into_owned()).collect();
            let _ = writeln!(
                out,
                "  learned {} ({}) expires in {} s",
                learned.address,
                names.join(", "),
                learned.expires_in
            );
        }
    }
    if !report.unbindable.is_empty() {
        out.push_str("\nrefused everything, for want of a binding (rule unbindable):\n");
        for row in &report.unbindable {
            let _ = writeln!(out, "  {}: {}", escaped(&row.cgroup), escaped(&row.reason));
        }
    }
    if !report.ignored.is_empty() {
        out.push_str(
            "\nignored matches (named where unprivileged users make cgroups; their ancestors' policy applies):\n",
        );
        for ignored in &report.ignored {
            let _ = writeln!(
                out,
                "  {}: policy {} ({}): {}",
                escaped(&ignored.cgroup),
                escaped(&ignored.policy),
                escaped(&ignored.selector),
                escaped(&ignored.reason)
            );
        }
    }
    out
}

fn plural(count: usize) -> &'static str {
    if count == 1 {
        ""
    } else {
        "s"
    }
}

/// One request and the lines of its answer. The write half stays open until the connection
/// is dropped: closing it tells the daemon a follower is done.
pub struct Connection {
    socket: PathBuf,
    lines: Lines<BufReader<OwnedReadHalf>>,
    _request: OwnedWriteHalf,
}

impl Connection {
    /// Connects to the daemon at `socket` and sends `request`.
    pub async fn open(socket: &Path, request: &Request) -> Result<Self, ControlError> {
        let stream = UnixStream::connect(socket).await.map_err(|cause| match cause.kind() {
            io::ErrorKind::PermissionDenied => ControlError::NotPermitted { socket: socket.to_path_buf() },
            _ => ControlError::Unreachable { socket: socket.to_path_buf(), cause },
        })?;
        let (read, mut write) = stream.into_split();
        let mut line = serde_json::to_vec(request).map_err(|error| protocol(socket, error))?;
        line.push(b'\n');
        write.write_all(&line).await.map_err(|error| protocol(socket, error))?;
        Ok(Self { socket: socket.to_path_buf(), lines: BufReader::new(read).lines(), _request: write })
    }

    /// The next response; `None` once the daemon has closed the connection.
    pub async fn next(&mut self) -> Result<Option<Response>, ControlError> {
        match self.lines.next_line().await {
            Ok(Some(line)) => serde_json::from_str(&line).map(Some).map_err(|error| protocol(&self.socket, error)),
            Ok(None) => Ok(None),
            Err(error) => Err(protocol(&self.socket, error)),
        }
    }

    /// The single answer to `status` or `reload`.
    async fn answer(&mut self) -> Result<Response, ControlError> {
        match tokio::time::timeout(ANSWER_TIMEOUT, self.next()).await {
            Ok(Ok(Some(response))) => Ok(response),
            Ok(Ok(None)) => Err(protocol(&self.socket, "the daemon closed the connection without an answer")),
            Ok(Err(error)) => Err(error),
            Err(_) => Err(protocol(&self.socket, format!("no answer within {} s", ANSWER_TIMEOUT.as_secs()))),
        }
    }

    /// Whether a whole response line is already buffered.
    fn line_pending(&mut self) -> bool {
        self.lines.get_mut().buffer().contains(&b'\n')
    }

    fn unexpected(&self, response: Response) -> ControlError {
        match response {
            Response::Error { message } => ControlError::Daemon(message),
            other => protocol(&self.socket, format!("unexpected answer {other:?}")),
        }
    }
}

fn protocol(socket: &Path, reason: impl ToString) -> ControlError {
    ControlError::Protocol { socket: socket.to_path_buf(), reason: reason.to_string() }
}

/// Writes to stdout; a closed stdout (`egress status | head -1`) is not an error.
fn print_stdout(text: &str) -> anyhow::Result<()> {
    let mut stdout = io::stdout().lock();
    match stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush()) {
        Err(error) if error.kind() != io::ErrorKind::BrokenPipe => Err(error.into()),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::protocol::{CgroupStatus, IgnoredStatus, PolicyStatus};

    #[test]
    fn parses_durations() {
        assert_eq!(parse_duration("30s").ok(), Some(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m").ok(), Some(Duration::from_secs(300)));
        assert_eq!(parse_duration("2h").ok(), Some(Duration::from_secs(7200)));
        assert_eq!(parse_duration("1d").ok(), Some(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("500ms").ok(), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("12").ok(), Some(Duration::from_secs(12)));
        assert_eq!(parse_duration(" 10 m ").ok(), Some(Duration::from_secs(600)));
        assert_eq!(parse_duration("0").ok(), Some(Duration::ZERO));
        for bad in ["", "m", "5x", "-5s", "5mm", "99999999999999999999", "999999999999999999d"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn status_text_is_a_table() {
        let report = StatusReport {
            config: "/etc/egress/egress.yaml".into(),
            loaded_at: "2026-11-23T10:01:02.345Z".into(),
            generation: 2,
            attach: "/".into(),
            dropped_events: 7,
            policies: vec![PolicyStatus {
                name: "web".into(),
                selector: "systemd_unit: nginx.service".into(),
                mode: "enforce".into(),
                default: "deny".into(),
                rules: 3,
                cgroups: 1,
                ..PolicyStatus::default()
            }],
            cgroups: vec![CgroupStatus {
                cgroup: "system.slice/nginx.service".into(),
                policy: "web".into(),
                mode: "enforce".into(),
                workload: Some("nginx.service".into()),
                allowed: 12,
                blocked: 1,
                audited: 0,
                suppressed: 40,
                ..CgroupStatus::default()
            }],
            ignored: vec![IgnoredStatus {
                cgroup: "user.slice/user@4242.service/x/nginx.service".into(),
                policy: "web".into(),
                selector: "systemd_unit nginx.service".into(),
                reason: "user.slice/user@4242.service is owned by uid 4242 (delegated to that user)".into(),
            }],
            ..StatusReport::default()
        };
        let text = status_text(&report);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "config:         /etc/egress/egress.yaml");
        assert_eq!(lines[1], "loaded at:      2026-11-23T10:01:02.345Z (generation 2)");
        assert_eq!(lines[2], "attached at:    /");
        assert_eq!(lines[3], "dropped events: 7");
        assert_eq!(
            lines[5],
            "CGROUP                                      POLICY  MODE       ALLOWED    BLOCKED    AUDITED  SUPPRESSED"
        );
        assert_eq!(
            lines[6],
            "system.slice/nginx.service (nginx.service)  web     enforce         12          1          0          40"
        );
        assert_eq!(lines[8], "policy web: systemd_unit: nginx.service, default deny, mode enforce, 3 rules, 1 cgroup");
        assert!(lines[10].starts_with("ignored matches"), "{text}");
        assert_eq!(
            lines[11],
            "  user.slice/user@4242.service/x/nginx.service: policy web (systemd_unit nginx.service): \
             user.slice/user@4242.service is owned by uid 4242 (delegated to that user)"
        );
        let mut hostile = report.clone();
        hostile.cgroups[0].cgroup = "evil\nCGROUP  POLICY".into();
        hostile.cgroups[0].workload = Some("\x1b[2K".into());
        hostile.policies[0].name = "w\neb".into();
        let text = status_text(&hostile);
        assert_eq!(text.lines().count(), status_text(&report).lines().count(), "{text}");
        assert!(text.contains("evil\\nCGROUP  POLICY (\\x1b[2K)"), "{text}");
        assert!(text.contains("policy w\\neb: "), "{text}");
        assert!(!text.contains('\x1b'), "{text}");
        let empty = status_text(&StatusReport::default());
        assert!(empty.contains("no cgroup is bound to a policy"), "{empty}");
    }
}
