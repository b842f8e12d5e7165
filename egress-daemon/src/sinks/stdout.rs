//! The stdout sink: one line per event on stdout (`run`) or stderr (`exec`), text or JSON, with
//! syslog priorities when the journal reads it; and the notices of what was not written.

use std::{
    io::{self, Write},
    time::SystemTime,
};

use crate::{
    format::{event_line, LogFormat},
    naming::NamedEvent,
    printable::{escaped, json_bytes, timestamp},
};

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

    pub fn write(&mut self, record: &NamedEvent) -> io::Result<()> {
        let mut line = Vec::with_capacity(256);
        if self.journal {
            line.extend_from_slice(crate::service::journal_priority(&record.verdict).as_bytes());
        }
        match self.format {
            LogFormat::Json => line.extend_from_slice(&json_bytes(record, false)?),
            LogFormat::Text => line.extend_from_slice(event_line(record).as_bytes()),
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
        let time = timestamp(SystemTime::now());
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
