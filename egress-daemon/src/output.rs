//! Sinks for flow records: one readable line per event, or one JSON object per line.

use std::{
    io::{self, Write},
    net::IpAddr,
    time::SystemTime,
};

use crate::{
    events::FlowRecord,
    printable::{escaped, json_bytes},
};

/// How events are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Writes records to a stream (stdout for `run`, stderr for `exec`).
pub struct EventWriter<W: Write> {
    format: LogFormat,
    out: W,
    journal: bool,
}

impl<W: Write> EventWriter<W> {
    pub fn new(format: LogFormat, out: W) -> Self {
        Self { format, out, journal: false }
    }

    /// Prefixes each line with a syslog priority, so the journal files blocked flows as warnings.
    pub fn with_journal_priorities(mut self, journal: bool) -> Self {
        self.journal = journal;
        self
    }

    pub fn write(&mut self, record: &FlowRecord) -> io::Result<()> {
        let mut line = Vec::with_capacity(256);
        if self.journal {
            line.extend_from_slice(crate::service::journal_priority(&record.verdict).as_bytes());
        }
        match self.format {
            LogFormat::Json => line.extend_from_slice(&json_bytes(record, false)?),
            LogFormat::Text => line.extend_from_slice(text_line(record).as_bytes()),
        }
        line.push(b'\n');
        self.emit(&line)
    }

    /// One write per line, so lines from several writers sharing a stream never interleave.
    fn emit(&mut self, line: &[u8]) -> io::Result<()> {
        self.out.write_all(line)?;
        self.out.flush()
    }

    /// Reports events the kernel had to drop since the last notice.
    pub fn write_dropped(&mut self, dropped: u64, total: u64) -> io::Result<()> {
        self.notice(
            "<3>",
            serde_json::json!({"notice": "events_dropped", "dropped": dropped, "dropped_total": total}),
            format!("DROPPED {dropped} events (ring buffer full; {total} since start)"),
        )
    }

    /// Reports events of one cgroup not written because they were over its budget for a second.
    pub fn write_suppressed(&mut self, cgroup: &str, workload: Option<&str>, suppressed: u64) -> io::Result<()> {
        let mut json = serde_json::json!({"notice": "events_suppressed", "cgroup": cgroup, "suppressed": suppressed});
        if let Some(workload) = workload {
            json["workload"] = workload.into();
        }
        let workload = workload.map(|w| format!(" workload={}", escaped(w))).unwrap_or_default();
        let text = format!(
            "SUPPRESSED {suppressed} events of cgroup={}{workload} (over settings.events_per_second)",
            escaped(cgroup)
        );
        self.notice("<4>", json, text)
    }

    /// Reports events not written because the output had written its total for a second.
    pub fn write_not_written(&mut self, not_written: u64) -> io::Result<()> {
        self.notice(
            "<4>",
            serde_json::json!({"notice": "events_not_written", "not_written": not_written}),
            format!("NOT WRITTEN {not_written} events (over settings.events_written_per_second)"),
        )
    }

    /// One notice line: `json` gains the time; `text` follows the time.
    fn notice(&mut self, priority: &str, mut json: serde_json::Value, text: String) -> io::Result<()> {
        let time = crate::events::timestamp(SystemTime::now());
        let prefix = if self.journal { priority } else { "" };
        let line = match self.format {
            LogFormat::Json => {
                json["time"] = time.into();
                format!("{prefix}{json}\n")
            }
            LogFormat::Text => format!("{prefix}{time} {text}\n"),
        };
        self.emit(line.as_bytes())
    }
}

/// `2026-11-23T10:01:02.345Z BLOCKED  tcp 127.0.0.2:80 curl[1234] uid=0 cgroup=egress-demo policy=demo rule="deny 127.0.0.0/8"`
pub fn text_line(r: &FlowRecord) -> String {
    let destination = match (r.dst, r.dport) {
        (dst, 0) => dst.to_string(),
        (IpAddr::V6(dst), port) => format!("[{dst}]:{port}"),
        (IpAddr::V4(dst), port) => format!("{dst}:{port}"),
    };
    format!(
        "{} {:<7} {:<5} {} {}[{}] uid={} cgroup={}{} policy={} rule=\"{}\"{}",
        r.time,
        r.verdict.to_uppercase(),
        r.protocol,
        destination,
        escaped(&r.comm),
        r.pid,
        r.uid,
        escaped(&r.cgroup),
        r.workload.as_deref().map(|w| format!(" workload={}", escaped(w))).unwrap_or_default(),
        escaped(&r.policy),
        escaped(&r.rule),
        r.domain.as_deref().map(|d| format!(" domain={}", escaped(d))).unwrap_or_default()
    )
}
