//! The CLI side of the control socket: `egress status`, `egress logs`, `egress reload`.

use std::{io::Write, path::Path, time::Duration};

use anyhow::{anyhow, bail, Context};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::UnixStream,
};

use super::protocol::{Request, Response, StatusReport};
use crate::output::text_line;

/// What `egress logs` asks for.
pub struct LogsArgs {
    pub follow: bool,
    pub blocked_only: bool,
    pub policy: Option<String>,
    pub since: Option<Duration>,
}

pub async fn status(socket: &Path, json: bool) -> anyhow::Result<()> {
    let mut responses = ask(socket, &Request::Status).await?;
    match responses.next().await? {
        Some(Response::Status(report)) if json => println!("{}", serde_json::to_string_pretty(&report)?),
        Some(Response::Status(report)) => print!("{}", status_text(&report)),
        other => bail!(unexpected(other)),
    }
    Ok(())
}

pub async fn reload(socket: &Path) -> anyhow::Result<()> {
    let mut responses = ask(socket, &Request::Reload).await?;
    match responses.next().await? {
        Some(Response::Reloaded { message }) => {
            println!("{message}");
            Ok(())
        }
        other => Err(unexpected(other)),
    }
}

pub async fn logs(socket: &Path, args: LogsArgs, json: bool) -> anyhow::Result<()> {
    let request = Request::Logs {
        follow: args.follow,
        blocked_only: args.blocked_only,
        policy: args.policy,
        since_secs: args.since.map(|d| d.as_secs()),
    };
    let mut responses = ask(socket, &request).await?;
    let mut stdout = std::io::stdout();
    while let Some(response) = responses.next().await? {
        match response {
            Response::Event(record) => {
                let line = if json { serde_json::to_string(&record)? } else { text_line(&record) };
                if writeln!(stdout, "{line}").and_then(|()| stdout.flush()).is_err() {
                    return Ok(()); // the reader went away (`egress logs | head`)
                }
            }
            Response::Notice { message } => eprintln!("egress: {message}"),
            other => bail!(unexpected(Some(other))),
        }
    }
    Ok(())
}

/// `30s`, `5m`, `2h`, `1d`, `500ms`, or plain seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: u64 = number.parse().map_err(|_| format!("`{text}` is not a duration like 30s, 5m, 2h or 1d"))?;
    let seconds = match unit {
        "" | "s" => value,
        "ms" => return Ok(Duration::from_millis(value)),
        "m" => value * 60,
        "h" => value * 3600,
        "d" => value * 86_400,
        _ => return Err(format!("unknown unit `{unit}` in `{text}` (use ms, s, m, h or d)")),
    };
    Ok(Duration::from_secs(seconds))
}

fn status_text(report: &StatusReport) -> String {
    let mut out = format!(
        "config: {}\nloaded: {}\nattached at: {}\ndropped events: {}\n\n",
        report.config, report.loaded_at, report.attach, report.dropped_events
    );
    out.push_str(&format!("{:<48} {:<16} {:<8} {:>9} {:>9} {:>9}\n", "CGROUP", "POLICY", "MODE", "ALLOWED", "BLOCKED", "AUDIT"));
    for row in &report.cgroups {
        let cgroup = match &row.workload {
            Some(workload) => format!("{} ({workload})", row.cgroup),
            None => row.cgroup.clone(),
        };
        out.push_str(&format!(
            "{cgroup:<48} {:<16} {:<8} {:>9} {:>9} {:>9}\n",
            row.policy, row.mode, row.allowed, row.blocked, row.audited
        ));
    }
    out.push('\n');
    for policy in &report.policies {
        out.push_str(&format!(
            "policy {}: {}, default {}, mode {}, {} rules, {} cgroups\n",
            policy.name, policy.selector, policy.default, policy.mode, policy.rules, policy.cgroups
        ));
    }
    out
}

fn unexpected(response: Option<Response>) -> anyhow::Error {
    match response {
        Some(Response::Error { message }) => anyhow!("{message}"),
        Some(other) => anyhow!("unexpected answer from the daemon: {other:?}"),
        None => anyhow!("the daemon closed the connection without an answer"),
    }
}

/// Response lines of one request.
struct Responses {
    lines: tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>,
}

impl Responses {
    async fn next(&mut self) -> anyhow::Result<Option<Response>> {
        match self.lines.next_line().await? {
            Some(line) => Ok(Some(serde_json::from_str(&line).context("reading the daemon's answer")?)),
            None => Ok(None),
        }
    }
}

async fn ask(socket: &Path, request: &Request) -> anyhow::Result<Responses> {
    let stream = UnixStream::connect(socket)
        .await
        .with_context(|| format!("cannot reach the egress daemon at {}: is it running?", socket.display()))?;
    let (read, mut write) = stream.into_split();
    let mut line = serde_json::to_vec(request)?;
    line.push(b'\n');
    write.write_all(&line).await?;
    Ok(Responses { lines: BufReader::new(read).lines() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("1d"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("12"), Ok(Duration::from_secs(12)));
        assert!(parse_duration("5x").is_err());
        assert!(parse_duration("m").is_err());
    }
}
