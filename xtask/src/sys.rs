//! Small facts about the machine (root, mounts) and running commands with useful errors.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

/// Whether this process runs with effective uid 0.
pub fn is_root() -> Result<bool> {
    let status = fs::read_to_string("/proc/self/status").context("read /proc/self/status")?;
    effective_uid(&status).map(|uid| uid == 0).context("no `Uid:` line in /proc/self/status")
}

/// The effective uid from the `Uid:` line of `/proc/<pid>/status` (real, effective, saved, fs).
fn effective_uid(status: &str) -> Option<u32> {
    let line = status.lines().find(|line| line.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// Fails unless this is an `x86_64` Debian machine: the setup recipe is written for exactly that.
pub fn require_debian_x86_64() -> Result<()> {
    if !Path::new("/etc/debian_version").exists() {
        bail!(
            "this is not a Debian machine (/etc/debian_version is missing); `cargo xtask setup` \
             installs the BPF toolchain from Debian 12's packages and knows no other system"
        );
    }
    if std::env::consts::ARCH != "x86_64" {
        bail!(
            "this machine is {}, not x86_64; the setup recipe is only known to work on x86_64",
            std::env::consts::ARCH
        );
    }
    Ok(())
}

/// Fails with a message naming `what` unless running as root.
pub fn require_root(what: &str) -> Result<()> {
    if !is_root()? {
        bail!("{what} needs root; run it again as root (for example with sudo)");
    }
    Ok(())
}

/// One line of `/proc/self/mountinfo`, reduced to what we look for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// The directory of the filesystem that is mounted here (`/` unless it is a bind mount).
    pub root: String,
    /// Where it is mounted.
    pub point: PathBuf,
    /// The filesystem type, such as `cgroup2` or `bpf`.
    pub fstype: String,
}

/// The mounts visible to this process.
pub fn mounts() -> Result<Vec<Mount>> {
    let text = fs::read_to_string("/proc/self/mountinfo").context("read /proc/self/mountinfo")?;
    Ok(parse_mountinfo(&text))
}

/// Parses mountinfo text (proc(5)); lines that do not fit the format are skipped.
fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            // Optional fields sit between the mount options and a lone "-".
            let (left, right) = line.split_once(" - ")?;
            let left: Vec<&str> = left.split(' ').collect();
            let root = unescape(left.get(3)?);
            let point = PathBuf::from(unescape(left.get(4)?));
            let fstype = right.split(' ').next()?.to_owned();
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

/// Where the cgroup v2 hierarchy is mounted (`/sys/fs/cgroup`, or `/sys/fs/cgroup/unified` in
/// the hybrid layout).
pub fn cgroup2_mount() -> Result<PathBuf> {
    cgroup2_in(&mounts()?).context("no cgroup2 filesystem is mounted (looked in /proc/self/mountinfo)")
}

fn cgroup2_in(mounts: &[Mount]) -> Option<PathBuf> {
    // A bind mount of a subtree (root other than "/") is not the hierarchy's top.
    mounts.iter().find(|m| m.fstype == "cgroup2" && m.root == "/").map(|m| m.point.clone())
}

/// Whether a filesystem of type `fstype` is mounted at `point`.
pub fn is_mounted(point: &Path, fstype: &str) -> Result<bool> {
    Ok(mounts()?.iter().any(|m| m.point == point && m.fstype == fstype))
}

/// The command line, for messages.
pub fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|part| part.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `cmd` with inherited stdio and fails unless it exits successfully.
pub fn run(cmd: &mut Command) -> Result<()> {
    let line = describe(cmd);
    let status = cmd.status().with_context(|| format!("could not start `{line}`"))?;
    if !status.success() {
        bail!("`{line}` failed ({status})");
    }
    Ok(())
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
    fn finds_cgroup2_in_hybrid_layout() {
        let mounts = parse_mountinfo(HYBRID);
        assert_eq!(cgroup2_in(&mounts), Some(PathBuf::from("/sys/fs/cgroup/unified")));
    }

    #[test]
    fn skips_bind_mounted_cgroup2_subtrees() {
        let text = "\
50 30 0:38 /system.slice /srv/cg rw - cgroup2 cgroup2 rw
51 30 0:38 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw
";
        assert_eq!(cgroup2_in(&parse_mountinfo(text)), Some(PathBuf::from("/sys/fs/cgroup")));
    }

    #[test]
    fn parses_fstype_and_escaped_mount_points() {
        let mounts = parse_mountinfo(HYBRID);
        assert!(mounts.iter().any(|m| m.point == Path::new("/sys/fs/bpf") && m.fstype == "bpf"));
        assert!(mounts.iter().any(|m| m.point == Path::new("/mnt/with space")));
    }

    #[test]
    fn unescape_leaves_plain_backslashes() {
        assert_eq!(unescape(r"a\040b"), "a b");
        assert_eq!(unescape(r"a\b"), r"a\b");
        assert_eq!(unescape(r"tail\04"), r"tail\04");
    }

    #[test]
    fn reads_effective_uid() {
        let status = "Name:\tcat\nUid:\t1000\t0\t0\t0\nGid:\t0\t0\t0\t0\n";
        assert_eq!(effective_uid(status), Some(0));
        assert_eq!(effective_uid("Name:\tcat\n"), None);
    }
}
