//! cgroup v2 file system: where it is mounted, cgroup ids, and the cgroups `egress exec` makes.

use std::{
    fs, io,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use egress_common::mountinfo;
use thiserror::Error;

/// How the root cgroup is written wherever cgroups are named relative to the cgroup2 mount
/// (other cgroups: `system.slice/nginx.service`, no leading `/`).
pub const ROOT: &str = "/";

/// systemd unit types whose cgroup holds processes (slices only group units).
pub const PROCESS_UNIT_SUFFIXES: [&str; 5] = [".service", ".scope", ".socket", ".mount", ".swap"];
/// Unit types a `systemd_unit:` selector may name: those that run workloads, and the slices
/// that group them.
pub const SELECTABLE_UNIT_SUFFIXES: [&str; 4] = [".service", ".scope", ".slice", ".socket"];

/// A cgroup path as written (in a policy file) that cannot name a cgroup below the cgroup2 mount.
#[derive(Debug, Error)]
pub enum PathError {
    #[error("cgroup path `{0}` must be relative to the cgroup2 mount (no leading `/`)")]
    NotRelative(String),
    #[error("cgroup path `{0}` must not contain `..`")]
    Climbs(String),
}

/// The components of a cgroup path relative to the cgroup2 mount, without empty or `.` ones.
pub fn relative_components(text: &str) -> Result<Vec<&str>, PathError> {
    if text.starts_with('/') {
        return Err(PathError::NotRelative(text.to_owned()));
    }
    let parts: Vec<&str> = text.split('/').filter(|p| !p.is_empty() && *p != ".").collect();
    if parts.contains(&"..") {
        return Err(PathError::Climbs(text.to_owned()));
    }
    Ok(parts)
}

/// Whether a cgroup path or pattern has wildcards.
pub fn is_glob(pattern: &str) -> bool {
    pattern.contains(['*', '?'])
}

#[derive(Debug, Error)]
pub enum CgroupError {
    #[error("no cgroup v2 file system is mounted (looked for type cgroup2 in /proc/self/mountinfo)")]
    NoCgroup2,
    #[error("cannot read /proc/self/mountinfo: {0}")]
    MountInfo(#[source] io::Error),
    #[error("cgroup {path} does not exist")]
    Missing { path: PathBuf },
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_error<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> CgroupError + 'a {
    move |source| CgroupError::Io { action, path: path.to_path_buf(), source }
}

/// The kernel's id (the directory's inode number) of the root cgroup of the cgroup2 hierarchy.
pub const ROOT_CGROUP_ID: u64 = 1;

/// The cgroup2 hierarchy of this machine.
#[derive(Clone, Debug)]
pub struct Hierarchy {
    mount: PathBuf,
}

impl Hierarchy {
    /// Finds the cgroup2 mount in `/proc/self/mountinfo` (`/sys/fs/cgroup` on unified hosts,
    /// `/sys/fs/cgroup/unified` on hybrid ones). Where there are several, the one whose root is
    /// the hierarchy's real root: in a private cgroup namespace (a container, a Kubernetes pod)
    /// the usual mount shows the namespace's cgroup as its root, and the host's root may be
    /// mounted elsewhere (a hostPath volume).
    pub fn discover() -> Result<Self, CgroupError> {
        let points = mountinfo::points_of("cgroup2").map_err(CgroupError::MountInfo)?;
        let mounts: Vec<Self> = points.into_iter().map(|mount| Self { mount }).collect();
        let first = mounts.first().cloned().ok_or(CgroupError::NoCgroup2)?;
        Ok(mounts.into_iter().find(|h| h.root_is_real().unwrap_or(false)).unwrap_or(first))
    }

    /// Whether the mount's root is the hierarchy's real root cgroup. The kernel counts cgroup
    /// depths from that root; from any other (a cgroup namespace's root, a bind-mounted subtree)
    /// the depths egress computes would be wrong.
    pub fn root_is_real(&self) -> Result<bool, CgroupError> {
        let meta = fs::metadata(&self.mount).map_err(io_error("stat", &self.mount))?;
        Ok(meta.ino() == ROOT_CGROUP_ID)
    }

    pub fn mount(&self) -> &Path {
        &self.mount
    }

    /// Absolute directory of a cgroup given relative to the mount (`system.slice/x.service`).
    pub fn dir(&self, relative: &str) -> PathBuf {
        self.mount.join(relative.trim_start_matches('/'))
    }

    /// Path relative to the mount, as policies and events name cgroups; `/` for the root.
    pub fn relative(&self, dir: &Path) -> String {
        match dir.strip_prefix(&self.mount) {
            Ok(rel) if rel.as_os_str().is_empty() => ROOT.to_string(),
            Ok(rel) => rel.display().to_string(),
            Err(_) => dir.display().to_string(),
        }
    }

    /// Opens an existing cgroup: its directory, id and depth below the root.
    pub fn open(&self, relative: &str) -> Result<Cgroup, CgroupError> {
        let dir = self.dir(relative);
        let meta = fs::metadata(&dir).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => CgroupError::Missing { path: dir.clone() },
            _ => CgroupError::Io { action: "stat", path: dir.clone(), source: e },
        })?;
        let level = dir.strip_prefix(&self.mount).map(|rel| rel.components().count() as u32).unwrap_or(0);
        Ok(Cgroup { relative: self.relative(&dir), dir, id: meta.ino(), level })
    }

    /// Creates a cgroup (and its parents) and opens it.
    pub fn create(&self, relative: &str) -> Result<Cgroup, CgroupError> {
        let dir = self.dir(relative);
        fs::create_dir_all(&dir).map_err(io_error("create cgroup", &dir))?;
        self.open(relative)
    }
}

/// One cgroup directory.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Cgroup {
    pub dir: PathBuf,
    /// Path relative to the cgroup2 mount.
    pub relative: String,
    /// The kernel's cgroup id (the directory's inode number).
    pub id: u64,
    /// Depth below the root cgroup (the root is level 0).
    pub level: u32,
}

impl Cgroup {
    pub fn file(&self) -> Result<fs::File, CgroupError> {
        fs::File::open(&self.dir).map_err(io_error("open cgroup", &self.dir))
    }

    /// The id of this cgroup's ancestor at `level` (the root is level 0).
    pub fn ancestor_at(&self, level: u32) -> Result<u64, CgroupError> {
        let mut dir = self.dir.as_path();
        for _ in level..self.level {
            dir = dir.parent().ok_or_else(|| CgroupError::Missing { path: self.dir.clone() })?;
        }
        fs::metadata(dir).map(|meta| meta.ino()).map_err(io_error("stat", dir))
    }

    /// Sends SIGKILL to every process in the cgroup and the cgroups below it: one write to
    /// `cgroup.kill` (Linux 5.14+), which also catches processes forking meanwhile; on older
    /// kernels a SIGKILL to each pid `cgroup.procs` lists, below as well.
    pub fn kill_all(&self) -> Result<(), CgroupError> {
        let kill = self.dir.join("cgroup.kill");
        match fs::write(&kill, "1") {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound && !self.dir.exists() => return Ok(()),
            Err(_) => {}
        }
        kill_listed(&self.dir)
    }

    /// Whether any process is left in the cgroup or below it (`populated` of `cgroup.events`);
    /// a cgroup that is gone holds none.
    pub fn populated(&self) -> Result<bool, CgroupError> {
        let events = self.dir.join("cgroup.events");
        match fs::read_to_string(&events) {
            Ok(text) => Ok(text.lines().any(|l| l == "populated 1")),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(CgroupError::Io { action: "read", path: events, source: e }),
        }
    }

    /// Kills every process left in the cgroup and removes it. Waits briefly for the kernel to
    /// let go of exiting processes, since rmdir fails while any remain.
    pub fn kill_and_remove(&self) -> Result<(), CgroupError> {
        let kill = self.dir.join("cgroup.kill");
        if kill.exists() {
            let _ = fs::write(&kill, "1");
        }
        let mut last = None;
        for _ in 0..200 {
            match fs::remove_dir(&self.dir) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) => last = Some(e),
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        Err(CgroupError::Io {
            action: "remove cgroup",
            path: self.dir.clone(),
            source: last.unwrap_or_else(|| io::Error::other("busy")),
        })
    }
}

/// SIGKILL to each process `cgroup.procs` of `dir` and of the cgroups below it lists.
fn kill_listed(dir: &Path) -> Result<(), CgroupError> {
    let procs = dir.join("cgroup.procs");
    let text = match fs::read_to_string(&procs) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(CgroupError::Io { action: "read", path: procs, source: e }),
    };
    for pid in text.lines().filter_map(|l| l.trim().parse::<libc::pid_t>().ok()) {
        // SAFETY: kill(2) has no memory preconditions; a pid that has exited meanwhile is ESRCH.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    for entry in fs::read_dir(dir).map_err(io_error("read", dir))?.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            kill_listed(&entry.path())?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_hierarchys_own_root_is_real() {
        // Whether this machine's mount is the real root depends on where the tests run (a
        // container has its own cgroup namespace); tests/cgroup_namespace.rs covers both cases.
        let elsewhere = Hierarchy { mount: std::env::temp_dir() };
        assert!(!elsewhere.root_is_real().expect("stat"));
    }
}
