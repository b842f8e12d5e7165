//! The one error a file read through this framework ends in: what is wrong, and where.

/// A policy file that cannot be used, and where the problem is.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{file}{}: {message}", position(*.line, *.column))]
pub struct ConfigError {
    pub file: String,
    /// 1-based; 0 when the error has no position (the file could not be read).
    pub line: usize,
    pub column: usize,
    pub message: String,
}

/// `:LINE:COL`, or nothing for an error without a position.
fn position(line: usize, column: usize) -> String {
    if line == 0 {
        String::new()
    } else {
        format!(":{line}:{column}")
    }
}

/// A file's bytes as text; bytes that are not UTF-8 are an error at their position.
pub(crate) fn file_text(bytes: Vec<u8>, file: &str) -> Result<String, ConfigError> {
    String::from_utf8(bytes).map_err(|err| {
        let valid = &err.as_bytes()[..err.utf8_error().valid_up_to()];
        let line_start = valid.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        // Valid by construction: the bytes before the error decode.
        let column = String::from_utf8_lossy(&valid[line_start..]).chars().count() + 1;
        ConfigError {
            file: file.to_owned(),
            line: valid.iter().filter(|&&b| b == b'\n').count() + 1,
            column,
            message: "the file is not UTF-8 text".to_owned(),
        }
    })
}

/// Turns `serde_norway`'s `path: message at line L column C` into a [`ConfigError`].
pub(crate) fn from_yaml(err: &serde_norway::Error, text: &str, file: &str) -> ConfigError {
    let mut message = err.to_string();
    let Some(at) = err.location() else {
        let (line, column) = unmarked_position(&message, text);
        return ConfigError { file: file.to_owned(), line, column, message };
    };
    let suffixes = [format!(" at line {} column {}", at.line(), at.column()), format!(" at position {}", at.index())];
    if let Some((start, len)) = suffixes.iter().find_map(|s| message.find(s.as_str()).map(|start| (start, s.len()))) {
        message.replace_range(start..start + len, "");
    }
    ConfigError { file: file.to_owned(), line: at.line(), column: at.column(), message }
}

/// Where to point an error `serde_norway` gives no position (a document that is empty, one of
/// several, or whose aliases repeat too much): the end of the text, the second document's
/// marker, or the first alias; the start of the text when none is found.
fn unmarked_position(message: &str, text: &str) -> (usize, usize) {
    let lines = || text.lines().enumerate().map(|(i, l)| (i + 1, l));
    let found = if message.starts_with("EOF") {
        let last = text.lines().count().max(1);
        let len = text.lines().last().map_or(0, |l| l.chars().count());
        Some((last, len + 1))
    } else if message.contains("more than one document") {
        // The marker after the first line with content starts the second document.
        let first = lines().find(|(_, l)| !l.trim().is_empty() && !l.trim_start().starts_with('#'));
        lines()
            .skip_while(|(n, _)| first.is_some_and(|(f, _)| n <= &f))
            .find(|(_, l)| l.starts_with("---") || l.starts_with("..."))
            .map(|(n, _)| (n, 1))
    } else if message.contains("repetition limit") {
        lines().find_map(|(n, l)| {
            let at = l.char_indices().find(|&(i, c)| c == '*' && (i == 0 || l[..i].ends_with([' ', '[', '{', ','])))?;
            Some((n, l[..at.0].chars().count() + 1))
        })
    } else {
        None
    };
    found.unwrap_or((1, 1))
}
