//! Sinks for flow records: one readable line per event, or one JSON object per line.

use std::{
    borrow::Cow,
    fmt::Write as _,
    io::{self, Write},
    net::IpAddr,
    time::SystemTime,
};

use serde::Serialize;

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

/// A name from the system or a policy file (process, cgroup, workload, policy) made safe to
/// print as part of one line: control characters (C0, DEL, C1), line and paragraph separators
/// and bidi controls become `\n`, `\r`, `\t`, `\xNN` or `\u{NNNN}`, and `\` becomes `\\`, so
/// a name can neither end a line, nor drive a terminal, nor pass for an escape.
pub fn escaped(name: &str) -> Cow<'_, str> {
    if !name.chars().any(|c| c == '\\' || is_hidden_control(c)) {
        return Cow::Borrowed(name);
    }
    let mut out = String::with_capacity(name.len() + 8);
    for c in name.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if u32::from(c) < 0x80 && is_hidden_control(c) => {
                let _ = write!(out, "\\x{:02x}", u32::from(c));
            }
            c if is_hidden_control(c) => {
                let _ = write!(out, "\\u{{{:04x}}}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// Characters that move the cursor, end a line, reorder text or start a terminal sequence
/// instead of showing as themselves.
fn is_hidden_control(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{2028}' | '\u{2029}' | '\u{061c}' | '\u{200e}' | '\u{200f}')
        || ('\u{202a}'..='\u{202e}').contains(&c)
        || ('\u{2066}'..='\u{2069}').contains(&c)
}

/// `value` as JSON whose strings hold only printable characters: serde_json escapes C0
/// controls, and this also writes DEL, C1 controls, line separators and bidi controls as
/// `\uNNNN`. Strings come from `String`s, so they are valid UTF-8 (names decoded from the
/// kernel or the file system carry U+FFFD where their bytes were not UTF-8).
pub fn json_bytes<T: Serialize + ?Sized>(value: &T, pretty: bool) -> serde_json::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(256);
    if pretty {
        let formatter = PrintableStrings(serde_json::ser::PrettyFormatter::new());
        value.serialize(&mut serde_json::Serializer::with_formatter(&mut out, formatter))?;
    } else {
        let formatter = PrintableStrings(serde_json::ser::CompactFormatter);
        value.serialize(&mut serde_json::Serializer::with_formatter(&mut out, formatter))?;
    }
    Ok(out)
}

/// A JSON formatter that escapes what [`is_hidden_control`] names inside strings.
struct PrintableStrings<F>(F);

impl<F: serde_json::ser::Formatter> serde_json::ser::Formatter for PrintableStrings<F> {
    fn write_string_fragment<W: ?Sized + Write>(&mut self, writer: &mut W, fragment: &str) -> io::Result<()> {
        let mut rest = fragment;
        while let Some((at, c)) = rest.char_indices().find(|&(_, c)| is_hidden_control(c)) {
            writer.write_all(&rest.as_bytes()[..at])?;
            write!(writer, "\\u{:04x}", u32::from(c))?;
            rest = &rest[at + c.len_utf8()..];
        }
        writer.write_all(rest.as_bytes())
    }

    fn begin_array<W: ?Sized + Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.0.begin_array(w)
    }
    fn end_array<W: ?Sized + Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.0.end_array(w)
    }
    fn begin_array_value<W: ?Sized + Write>(&mut self, w: &mut W, first: bool) -> io::Result<()> {
        self.0.begin_array_value(w, first)
    }
    fn end_array_value<W: ?Sized + Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.0.end_array_value(w)
    }
    fn begin_object<W: ?Sized + Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.0.begin_object(w)
    }
    fn end_object<W: ?Sized + Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.0.end_object(w)
    }
    fn begin_object_key<W: ?Sized + Write>(&mut self, w: &mut W, first: bool) -> io::Result<()> {
        self.0.begin_object_key(w, first)
    }
    fn begin_object_value<W: ?Sized + Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.0.begin_object_value(w)
    }
    fn end_object_value<W: ?Sized + Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.0.end_object_value(w)
    }
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
    fn names_cannot_break_or_drive_a_line() {
        assert_eq!(escaped("curl"), "curl");
        assert!(matches!(escaped("nginx.service"), Cow::Borrowed(_)));
        assert_eq!(escaped("x\n\x1b[2KBLOCKED"), "x\\n\\x1b[2KBLOCKED");
        assert_eq!(escaped("a\rb\tc\0d\x7f"), "a\\rb\\tc\\x00d\\x7f");
        assert_eq!(escaped("\u{9b}31m\u{2028}\u{202e}"), "\\u{009b}31m\\u{2028}\\u{202e}");
        // A literal backslash cannot pose as an escape.
        assert_eq!(escaped("x\\n"), "x\\\\n");
        assert_eq!(escaped("été"), "été");
    }

    #[test]
    fn json_strings_hold_printable_characters_only() {
        let name = "x\n\x1b[2K\x7f\u{9b}\u{2028}é";
        let bytes = json_bytes(&serde_json::json!({ "comm": name }), false).expect("json");
        let text = String::from_utf8(bytes).expect("utf-8");
        assert_eq!(text, r#"{"comm":"x\n\u001b[2K\u007f\u009b\u2028é"}"#);
        let back: serde_json::Value = serde_json::from_str(&text).expect("parses");
        assert_eq!(back["comm"], name);
        let pretty =
            String::from_utf8(json_bytes(&serde_json::json!({ "a": [1] }), true).expect("json")).expect("utf-8");
        assert_eq!(pretty, "{\n  \"a\": [\n    1\n  ]\n}");
    }

    #[test]
    fn formats_utc_timestamps() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_795_426_862_345);
        assert_eq!(rfc3339(t), "2026-11-23T09:41:02.345Z");
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let leap = SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000Z");
    }
}
