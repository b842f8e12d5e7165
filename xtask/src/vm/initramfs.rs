//! The guest's whole root filesystem as an initramfs (`newc` cpio, uncompressed): the cloud
//! kernels have no 9p or virtiofs to share the host's files, and an initramfs needs no disk.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

/// What goes into the image: files copied from the host to a path in the guest.
#[derive(Debug, Default)]
pub struct Image {
    dirs: Vec<String>,
    files: Vec<(String, Vec<u8>, u32)>,
}

impl Image {
    pub fn dir(&mut self, path: &str) {
        self.dirs.push(path.to_owned());
    }

    /// Adds `host` as the executable `guest`, following symbolic links.
    pub fn executable(&mut self, guest: &str, host: &Path) -> Result<()> {
        let data = fs::read(host).with_context(|| format!("read {}", host.display()))?;
        self.files.push((guest.to_owned(), data, 0o100_755));
        Ok(())
    }

    /// Adds a dynamically linked `host` binary and every library `ldd` lists for it, at the
    /// same paths as on the host (the guest runs the host's glibc).
    pub fn dynamic_executable(&mut self, guest: &str, host: &Path) -> Result<()> {
        self.executable(guest, host)?;
        for library in shared_libraries(host)? {
            let path = library.to_string_lossy().into_owned();
            if !self.files.iter().any(|(p, _, _)| *p == path) {
                self.executable(&path, &library)?;
            }
        }
        Ok(())
    }

    /// Writes the image as a `newc` cpio archive; parent directories are created as needed.
    pub fn write(&self, out: &Path) -> Result<()> {
        let mut dirs: Vec<String> = Vec::new();
        let add_dir = |dir: &str, dirs: &mut Vec<String>| {
            let mut prefix = String::new();
            for part in dir.trim_matches('/').split('/').filter(|p| !p.is_empty()) {
                prefix.push('/');
                prefix.push_str(part);
                if !dirs.contains(&prefix) {
                    dirs.push(prefix.clone());
                }
            }
        };
        for dir in &self.dirs {
            add_dir(dir, &mut dirs);
        }
        for (path, _, _) in &self.files {
            if let Some(parent) = Path::new(path).parent() {
                add_dir(&parent.to_string_lossy(), &mut dirs);
            }
        }

        let mut archive = Vec::new();
        let mut ino = 1;
        for dir in &dirs {
            push_entry(&mut archive, ino, dir, 0o040_755, &[]);
            ino += 1;
        }
        for (path, data, mode) in &self.files {
            push_entry(&mut archive, ino, path, *mode, data);
            ino += 1;
        }
        push_entry(&mut archive, 0, "TRAILER!!!", 0, &[]);
        fs::write(out, archive).with_context(|| format!("write {}", out.display()))
    }
}

/// One `newc` record: header, name, data, each padded to four bytes.
fn push_entry(out: &mut Vec<u8>, ino: u32, path: &str, mode: u32, data: &[u8]) {
    let name = path.trim_start_matches('/');
    let name = if name.is_empty() { "." } else { name };
    let nlink = if mode & 0o040_000 != 0 { 2 } else { 1 };
    let size = u32::try_from(data.len()).unwrap_or(u32::MAX);
    let fields = [ino, mode, 0, 0, nlink, 0, size, 0, 0, 0, 0, name.len() as u32 + 1, 0];
    out.extend_from_slice(b"070701");
    for field in fields {
        out.extend_from_slice(format!("{field:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad4(out);
    out.extend_from_slice(data);
    pad4(out);
}

fn pad4(out: &mut Vec<u8>) {
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

/// The absolute paths `ldd` prints for `binary` (the loader included).
fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let output = Command::new("ldd").arg(binary).output().context("run ldd")?;
    if !output.status.success() {
        bail!("ldd {} failed", binary.display());
    }
    Ok(parse_ldd(&String::from_utf8_lossy(&output.stdout)))
}

fn parse_ldd(text: &str) -> Vec<PathBuf> {
    text.lines()
        .filter_map(|line| {
            // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
            let target = line.split_once("=>").map_or(line, |(_, right)| right);
            target.split_whitespace().next().filter(|p| p.starts_with('/')).map(PathBuf::from)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ldd_output() {
        let text = "\tlinux-vdso.so.1 (0x00007ffc)\n\
                    \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        assert_eq!(
            parse_ldd(text),
            vec![PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"), PathBuf::from("/lib64/ld-linux-x86-64.so.2")]
        );
    }

    #[test]
    fn newc_records_are_aligned() {
        let mut out = Vec::new();
        push_entry(&mut out, 1, "/init", 0o100_755, b"#!/bin/sh\n");
        assert_eq!(out.len() % 4, 0);
        assert!(out.starts_with(b"070701"));
        // 6 + 13 * 8 = 110 header bytes, then "init\0" padded to 116, then 10 data bytes padded.
        assert_eq!(&out[110..114], b"init");
        assert_eq!(out.len(), 128);
    }
}
