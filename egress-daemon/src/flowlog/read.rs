//! Reading the flow log back, oldest record first, over its rotated files, in either format.

use std::{
    fs::File,
    io::{self, BufRead, BufReader},
    path::{Path, PathBuf},
    time::SystemTime,
};

use super::{ecs, file::rotated, MAX_KEEP};
use crate::flows::record::FlowLogRecord;

/// Why the flow log could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("flow log {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("flow log {0}: no such file (is settings.flow_log set?)")]
    Missing(PathBuf),
}

/// The records of a flow log.
#[derive(Debug, Default)]
pub struct FlowLogRead {
    /// Oldest first.
    pub records: Vec<FlowLogRecord>,
    /// Lines that were neither format (a line cut by a crash, a foreign file): counted, so a
    /// report over them says it is incomplete.
    pub skipped: usize,
    /// The files read, oldest first.
    pub files: Vec<PathBuf>,
}

/// Every record of the flow log at `path` (its rotated files first) that ended at or after
/// `since`.
pub fn read_records(path: &Path, since: Option<SystemTime>) -> Result<FlowLogRead, ReadError> {
    let mut files: Vec<PathBuf> = (1..=MAX_KEEP).map(|k| rotated(path, k)).take_while(|p| p.exists()).collect();
    files.reverse();
    if path.exists() {
        files.push(path.to_path_buf());
    }
    if files.is_empty() {
        return Err(ReadError::Missing(path.to_path_buf()));
    }
    let mut out = FlowLogRead::default();
    for file in &files {
        let reader = BufReader::new(File::open(file).map_err(|source| ReadError::Io { path: file.clone(), source })?);
        for line in reader.lines() {
            let line = line.map_err(|source| ReadError::Io { path: file.clone(), source })?;
            if line.trim().is_empty() {
                continue;
            }
            match parse_line(&line) {
                Some(record) if since.is_none_or(|since| record.end_at >= since) => out.records.push(record),
                Some(_) => {}
                None => out.skipped += 1,
            }
        }
    }
    out.files = files;
    Ok(out)
}

/// A record from one line of either format.
pub fn parse_line(line: &str) -> Option<FlowLogRecord> {
    if let Ok(flow) = serde_json::from_str::<ecs::EcsFlow>(line) {
        return Some(ecs::from_ecs(flow));
    }
    let mut record: FlowLogRecord = serde_json::from_str(line).ok()?;
    record.end_at = parse_time(&record.end)?;
    Some(record)
}

/// An RFC 3339 time as records write it.
pub fn parse_time(text: &str) -> Option<SystemTime> {
    humantime::parse_rfc3339_weak(text).ok()
}
