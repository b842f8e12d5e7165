//! The mount table (`/proc/self/mountinfo`, proc(5)): the one parser the daemon, its tests and
//! xtask use. Userspace only (feature `mountinfo`).

use std::{
    fs, io,
    path::{Path, PathBuf},
    string::{String, ToString},
    vec::Vec,
};

/// One line of the mount table, reduced to what egress looks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// The directory of the filesystem that is mounted here (`/` unless it is a bind mount or a
    /// cgroup namespace's view).
    pub root: String,
    /// Where it is mounted.
    pub point: PathBuf,
    /// The filesystem type, such as `cgroup2` or `bpf`.
    pub fstype: String,
}

/// The mounts visible to this process.
pub fn mounts() -> io::Result<Vec<Mount>> {
    Ok(parse(&fs::read_to_string("/proc/self/mountinfo")?))
}

/// Mount points of every filesystem of type `fstype`, in table order.
pub fn points_of(fstype: &str) -> io::Result<Vec<PathBuf>> {
    Ok(mounts()?.into_iter().filter(|m| m.fstype == fstype).map(|m| m.point).collect())
}

/// Whether a filesystem of type `fstype` is mounted at `point`.
pub fn is_mounted(point: &Path, fstype: &str) -> io::Result<bool> {
    Ok(mounts()?.iter().any(|m| m.point == point && m.fstype == fstype))
}

/// Parses mountinfo text; lines that do not fit the format are skipped.
pub fn parse(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            // Optional fields sit between the mount options and a lone "-".
            let (left, right) = line.split_once(" - ")?;
            let left: Vec<&str> = left.split(' ').collect();
            let root = unescape(left.get(3)?);
            let point = PathBuf::from(unescape(left.get(4)?));
            let fstype = right.split(' ').next()?.to_string();
            Some(Mount { root, point, fstype })
        })
        .collect()
}

/// Undoes mountinfo's octal escapes (`\040` for a space and so on).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escape = bytes
            .get(i + 1..i + 4)
            .filter(|digits| bytes[i] == b'\\' && digits.iter().all(|d| (b'0'..=b'7').contains(d)));
        if let Some(digits) = escape {
            let value = digits.iter().fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
            out.push(u8::try_from(value).unwrap_or(b'?'));
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
25 30 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
36 25 0:31 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
41 36 0:38 / /sys/fs/cgroup/unified rw,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
42 36 0:39 / /sys/fs/cgroup/systemd rw,relatime shared:11 - cgroup cgroup rw,name=systemd
77 25 0:40 / /sys/fs/bpf rw,relatime - bpf bpf rw
88 30 0:41 / /mnt/with\\040space rw - tmpfs tmpfs rw
";

    #[test]
    fn parses_fstype_and_escaped_mount_points() {
        let mounts = parse(HYBRID);
        assert!(mounts.iter().any(|m| m.point == Path::new("/sys/fs/bpf") && m.fstype == "bpf"));
        assert!(mounts.iter().any(|m| m.point == Path::new("/mnt/with space")));
        assert!(mounts.iter().any(|m| m.point == Path::new("/sys/fs/cgroup/unified") && m.fstype == "cgroup2"));
    }

    #[test]
    fn unescape_leaves_plain_backslashes() {
        assert_eq!(unescape(r"a\040b"), "a b");
        assert_eq!(unescape(r"a\b"), r"a\b");
        assert_eq!(unescape(r"tail\04"), r"tail\04");
    }
}
