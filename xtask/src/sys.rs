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

pub use egress_common::mountinfo::{mounts, Mount};

/// Where the cgroup v2 hierarchy is mounted (`/sys/fs/cgroup`, or `/sys/fs/cgroup/unified` in
/// the hybrid layout).
pub fn cgroup2_mount() -> Result<PathBuf> {
    cgroup2_in(&mounts().context("read /proc/self/mountinfo")?)
        .context("no cgroup2 filesystem is mounted (looked in /proc/self/mountinfo)")
}

fn cgroup2_in(mounts: &[Mount]) -> Option<PathBuf> {
    // A bind mount of a subtree (root other than "/") is not the hierarchy's top.
    mounts.iter().find(|m| m.fstype == "cgroup2" && m.root == "/").map(|m| m.point.clone())
}

/// Whether a filesystem of type `fstype` is mounted at `point`.
pub fn is_mounted(point: &Path, fstype: &str) -> Result<bool> {
    egress_common::mountinfo::is_mounted(point, fstype).context("read /proc/self/mountinfo")
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

    /// The hybrid layout: a tmpfs at /sys/fs/cgroup holding the v1 controllers and cgroup2.
    const HYBRID: &str = "\
36 25 0:31 / /sys/fs/cgroup ro - tmpfs tmpfs ro
41 36 0:38 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw
42 36 0:39 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,name=systemd
";

    #[test]
    fn finds_cgroup2_in_hybrid_layout() {
        let mounts = egress_common::mountinfo::parse(HYBRID);
        assert_eq!(cgroup2_in(&mounts), Some(PathBuf::from("/sys/fs/cgroup/unified")));
    }

    #[test]
    fn skips_bind_mounted_cgroup2_subtrees() {
        let text = "\
50 30 0:38 /system.slice /srv/cg rw - cgroup2 cgroup2 rw
51 30 0:38 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw
";
        assert_eq!(cgroup2_in(&egress_common::mountinfo::parse(text)), Some(PathBuf::from("/sys/fs/cgroup")));
    }

    #[test]
    fn reads_effective_uid() {
        let status = "Name:\tcat\nUid:\t1000\t0\t0\t0\nGid:\t0\t0\t0\t0\n";
        assert_eq!(effective_uid(status), Some(0));
        assert_eq!(effective_uid("Name:\tcat\n"), None);
    }
}
