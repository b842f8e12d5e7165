//! Appending records to the flow log file and rotating it by size.

use std::{
    fs::{self, File, OpenOptions},
    io::{self, Write},
    path::{Path, PathBuf},
};

use super::{ecs, FlowLogSettings, Format};
use crate::flows::record::FlowLogRecord;

/// Why a record could not be written.
#[derive(Debug, thiserror::Error)]
pub enum FlowFileError {
    #[error("flow log {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("flow log: encoding a record: {0}")]
    Encode(#[from] serde_json::Error),
}

/// The open flow log: appends one JSON line per record, rotates before `max_size`.
pub struct FlowFile {
    settings: FlowLogSettings,
    file: File,
    size: u64,
}

impl FlowFile {
    /// Opens (creating, mode 0640) the file of `settings` for appending.
    pub fn open(settings: FlowLogSettings) -> Result<Self, FlowFileError> {
        let file = open_append(&settings.path)?;
        let size = file.metadata().map_err(|source| io_error(&settings.path, source))?.len();
        Ok(FlowFile { settings, file, size })
    }

    pub fn settings(&self) -> &FlowLogSettings {
        &self.settings
    }

    /// Appends `records` (one write per record, each a whole line).
    pub fn append(&mut self, records: &[FlowLogRecord]) -> Result<(), FlowFileError> {
        for record in records {
            let mut line = match self.settings.format {
                Format::Records => serde_json::to_vec(record)?,
                Format::Ecs => serde_json::to_vec(&ecs::to_ecs(record, 0))?,
            };
            line.push(b'\n');
            let len = line.len() as u64;
            if self.size > 0 && self.size + len > self.settings.max_size {
                self.rotate()?;
            }
            self.file.write_all(&line).map_err(|source| io_error(&self.settings.path, source))?;
            self.size += len;
        }
        Ok(())
    }

    /// `PATH.(k-1)` -> `PATH.k`, ..., `PATH` -> `PATH.1`, then a fresh `PATH`.
    fn rotate(&mut self) -> Result<(), FlowFileError> {
        let path = self.settings.path.clone();
        let keep = self.settings.keep;
        if keep == 0 {
            self.file.set_len(0).map_err(|source| io_error(&path, source))?;
            self.size = 0;
            return Ok(());
        }
        for k in (1..keep).rev() {
            let from = rotated(&path, k);
            if from.exists() {
                fs::rename(&from, rotated(&path, k + 1)).map_err(|source| io_error(&from, source))?;
            }
        }
        fs::rename(&path, rotated(&path, 1)).map_err(|source| io_error(&path, source))?;
        self.file = open_append(&path)?;
        self.size = 0;
        Ok(())
    }
}

/// The `k`th rotated file of `path` (1: the newest).
pub fn rotated(path: &Path, k: u32) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{k}"));
    PathBuf::from(name)
}

fn open_append(path: &Path) -> Result<File, FlowFileError> {
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(|source| io_error(dir, source))?;
    }
    OpenOptions::new().create(true).append(true).mode(0o640).open(path).map_err(|source| io_error(path, source))
}

fn io_error(path: &Path, source: io::Error) -> FlowFileError {
    FlowFileError::Io { path: path.to_path_buf(), source }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flowlog::read::read_records;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("egress-flowlog-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn record(n: u16) -> FlowLogRecord {
        let mut r = crate::flowlog::ecs::tests::sample();
        r.dstport = n;
        r
    }

    #[test]
    fn rotates_by_size_and_keeps_the_newest_files() {
        for format in [Format::Records, Format::Ecs] {
            let dir = temp_dir(format.as_str());
            let path = dir.join("flows.jsonl");
            let settings = FlowLogSettings { path: path.clone(), max_size: 4096, keep: 2, format };
            let mut file = FlowFile::open(settings).unwrap();
            let records: Vec<FlowLogRecord> = (1..=100).map(record).collect();
            file.append(&records).unwrap();
            assert!(rotated(&path, 1).exists() && rotated(&path, 2).exists());
            assert!(!rotated(&path, 3).exists());
            for p in [path.clone(), rotated(&path, 1), rotated(&path, 2)] {
                assert!(fs::metadata(&p).unwrap().len() <= 4096, "{p:?}");
            }
            // What is left is the newest records, oldest first, whole.
            let read = read_records(&path, None).unwrap();
            assert!(!read.records.is_empty() && read.records.len() < 100);
            assert_eq!(read.skipped, 0);
            let ports: Vec<u16> = read.records.iter().map(|r| r.dstport).collect();
            let first = ports[0];
            assert_eq!(ports, (first..=100).collect::<Vec<_>>(), "{format:?}");
            assert_eq!(read.records.last(), records.last());
            fs::remove_dir_all(&dir).unwrap();
        }
    }
}
