//! Names and JSON made safe to print: whatever a workload names its process or cgroup, a line
//! of output stays one line and cannot drive the terminal.

use std::{
    borrow::Cow,
    fmt::Write as _,
    io::{self, Write},
    time::SystemTime,
};

use serde::Serialize;

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

/// RFC 3339 UTC with milliseconds, as events, logs and status show times
/// (`2026-11-23T09:41:02.345Z`).
pub fn timestamp(time: SystemTime) -> String {
    humantime::format_rfc3339_millis(time).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
