//! The CLI side of flow records: `egress logs --flows` and `egress top`.

use std::{
    fmt::Write as _,
    io::{self, IsTerminal, Write},
    path::Path,
    time::Duration,
};

use super::{Connection, ControlError, LogsArgs};
use crate::{
    control::protocol::{Request, Response},
    flows::store::TopRow,
    format::{endpoint, flow_line},
    printable::{escaped, json_bytes},
};

/// How often `egress top` redraws.
const TOP_REFRESH: Duration = Duration::from_secs(2);

/// `egress logs --flows`: the kept flow records, then, with `follow`, live ones.
pub async fn flow_logs<W: Write + Send>(socket: &Path, args: LogsArgs, json: bool, out: &mut W) -> anyhow::Result<()> {
    let request =
        Request::Flows { follow: args.follow, policy: args.policy, since_secs: super::since_secs(args.since) };
    let mut connection = Connection::open(socket, &request).await?;
    while let Some(response) = connection.next().await? {
        let line = match response {
            Response::Flow(record) if json => String::from_utf8(json_bytes(&record, false)?)?,
            Response::Flow(record) => flow_line(&record),
            Response::Notice { message } => {
                eprintln!("egress: {message}");
                continue;
            }
            Response::Error { message } => return Err(ControlError::Daemon(message).into()),
            other => anyhow::bail!("unexpected answer from the daemon: {other:?}"),
        };
        match writeln!(out, "{line}").and_then(|()| out.flush()) {
            Ok(()) => {}
            Err(error) if error.kind() == io::ErrorKind::BrokenPipe => return Ok(()),
            Err(error) => return Err(error.into()),
        }
    }
    Ok(())
}

/// `egress top`: the top talkers by bytes per workload and destination over the last
/// `window`, redrawn every two seconds on a terminal until interrupted; once with `once` (or
/// when stdout is not a terminal... it still refreshes, appending tables), as JSON with `json`.
pub async fn top(socket: &Path, window: Duration, once: bool, json: bool) -> anyhow::Result<()> {
    let terminal = io::stdout().is_terminal();
    loop {
        let rows = fetch_top(socket, window).await?;
        let text = if json {
            String::from_utf8(json_bytes(&rows, false)?)? + "\n"
        } else {
            let clear = if terminal && !once { "\x1b[H\x1b[2J" } else { "" };
            format!("{clear}{}", top_text(&rows, window))
        };
        let mut stdout = io::stdout().lock();
        match stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush()) {
            Err(error) if error.kind() == io::ErrorKind::BrokenPipe => return Ok(()),
            other => other?,
        }
        drop(stdout);
        if once {
            return Ok(());
        }
        tokio::time::sleep(TOP_REFRESH).await;
    }
}

async fn fetch_top(socket: &Path, window: Duration) -> anyhow::Result<Vec<TopRow>> {
    let mut connection = Connection::open(socket, &Request::Top { window_secs: window.as_secs().max(1) }).await?;
    match connection.next().await? {
        Some(Response::Top { rows, .. }) => Ok(rows),
        Some(Response::Error { message }) => Err(ControlError::Daemon(message).into()),
        other => anyhow::bail!("unexpected answer from the daemon: {other:?}"),
    }
}

/// The readable table of `egress top`.
pub fn top_text(rows: &[TopRow], window: Duration) -> String {
    let mut out = String::new();
    let _ =
        writeln!(out, "top talkers, last {} s (bytes and packets both ways; flows ended or open)", window.as_secs());
    if rows.is_empty() {
        out.push_str("no flows\n");
        return out;
    }
    let workloads: Vec<String> = rows.iter().map(|r| escaped(&r.workload).into_owned()).collect();
    let destinations: Vec<String> = rows
        .iter()
        .map(|r| format!("{} {}", r.protocol, r.dstaddr.map(|a| endpoint(a, r.dstport)).unwrap_or_default()))
        .collect();
    let w = workloads.iter().map(|s| s.chars().count()).fold("WORKLOAD".len(), usize::max);
    let d = destinations.iter().map(String::len).fold("DESTINATION".len(), usize::max);
    let _ = writeln!(
        out,
        "{:<w$}  {:<d$}  {:>12}  {:>10}  {:>12}  {:>10}  {:>7}",
        "WORKLOAD", "DESTINATION", "BYTES OUT", "PKTS OUT", "BYTES IN", "PKTS IN", "FLOWS"
    );
    for ((row, workload), destination) in rows.iter().zip(&workloads).zip(&destinations) {
        let _ = writeln!(
            out,
            "{workload:<w$}  {destination:<d$}  {:>12}  {:>10}  {:>12}  {:>10}  {:>7}",
            row.bytes_out, row.packets_out, row.bytes_in, row.packets_in, row.flows
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_is_a_table_with_escaped_names() {
        let rows = vec![TopRow {
            workload: "web\n1".into(),
            protocol: "tcp".into(),
            dstaddr: Some("10.0.0.1".parse().expect("addr")),
            dstport: 443,
            bytes_out: 1200,
            packets_out: 10,
            bytes_in: 52000,
            packets_in: 40,
            flows: 3,
        }];
        let text = top_text(&rows, Duration::from_secs(60));
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[1].starts_with("WORKLOAD  DESTINATION "), "{text}");
        assert!(lines[2].starts_with("web\\n1    tcp 10.0.0.1:443"), "{text}");
        assert!(lines[2].ends_with("      3"), "{text}");
    }
}
