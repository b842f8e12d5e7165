//! Sinks for flow records: one readable line per event, or one JSON object per line.

use std::{
    io::{self, Write},
    net::IpAddr,
    time::SystemTime,
};

use crate::events::FlowRecord;

/// How events are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
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
            LogFormat::Json => serde_json::to_writer(&mut line, record)?,
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
        let time = rfc3339(SystemTime::now());
        let prefix = if self.journal { "<3>" } else { "" };
        let line = match self.format {
            LogFormat::Json => format!(
                "{prefix}{}\n",
                serde_json::json!({"time": time, "notice": "events_dropped", "dropped": dropped, "dropped_total": total})
            ),
            LogFormat::Text => {
                format!("{prefix}{time} DROPPED {dropped} events (ring buffer full; {total} since start)\n")
            }
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
        "{} {:<7} {:<5} {} {}[{}] uid={} cgroup={}{} policy={} rule=\"{}\"",
        r.time,
        r.verdict.to_uppercase(),
        r.protocol,
        destination,
        r.comm,
        r.pid,
        r.uid,
        r.cgroup,
        r.workload.as_deref().map(|w| format!(" workload={w}")).unwrap_or_default(),
        r.policy,
        r.rule
    )
}

/// UTC timestamp with milliseconds, e.g. `2026-11-23T10:01:02.345Z`.
pub fn rfc3339(time: SystemTime) -> String {
    let since = time.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (year, month, day) = civil_from_days((secs / 86_400) as i64);
    let rem = secs % 86_400;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        since.subsec_millis()
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn formats_utc_timestamps() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_795_426_862_345);
        assert_eq!(rfc3339(t), "2026-11-23T09:41:02.345Z");
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let leap = SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000Z");
    }
}
