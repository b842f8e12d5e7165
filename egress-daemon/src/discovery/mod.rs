//! Discovery: which cgroups exist, which appear and vanish, and what runs in them.
//!
//! - [`scan`]: one walk of the cgroup tree below a parent (ids and depths).
//! - [`spawn_watcher`]: inotify on that tree, reporting [`Change`]s as cgroups come and go.
//! - [`container_of`] / [`unit_of`]: the container (Docker, containerd/Kubernetes, CRI-O, Podman)
//!   or systemd unit a cgroup path names.
//! - [`ContainerNames`]: container names and id prefixes -> full ids, from the runtime CLIs when
//!   installed and from the ids seen in cgroup paths.
//! - [`check_placement`]: whether only root could have made a cgroup, or an unprivileged user in
//!   a delegated subtree (where any name can be forged).
//!
//! Paths are relative to the cgroup2 mount, written as `cgroup::Hierarchy::relative` writes them
//! (`system.slice/nginx.service`, `/` for the root). Nothing here knows about policies: the
//! engine matches what discovery reports against its selectors.

mod names;
mod placement;
mod runtime;
mod scan;
mod watch;

pub use names::{find_on_path, ContainerNames, MIN_PREFIX};
pub use placement::{check as check_placement, Reason as UntrustedReason, Untrusted};
pub use runtime::{container_of, enclosing_container, unit_of, ContainerRef, Runtime};
pub use scan::scan;
pub use watch::{spawn_watcher, Change, WatchHandle, UNWATCHED_RESCAN};

#[cfg(test)]
pub(crate) mod testutil {
    //! Scratch directories and test cgroups that clean up after themselves, even on panic.

    use std::{
        fs, io,
        path::{Path, PathBuf},
        sync::atomic::{AtomicUsize, Ordering},
    };

    static NEXT: AtomicUsize = AtomicUsize::new(0);

    /// A fresh directory under the system temp dir, removed on drop.
    pub struct ScratchDir(PathBuf);

    impl ScratchDir {
        pub fn new(tag: &str) -> Self {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let path = std::env::temp_dir().join(format!("egress-disc-{}-{tag}-{n}", std::process::id()));
            fs::create_dir_all(&path).expect("create scratch dir");
            Self(path)
        }

        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for ScratchDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    /// The cgroup2 mount when this process may create cgroups in it; `None` (with a note) where
    /// it may not, and a panic instead under `CI=true`, where the tests must run.
    pub fn cgroup2_or_skip() -> Option<PathBuf> {
        let why = match (is_root(), cgroup2_mount()) {
            (true, Some(mount)) => return Some(mount),
            (false, _) => "not root",
            (true, None) => "no cgroup2 mount",
        };
        assert!(std::env::var("CI").as_deref() != Ok("true"), "cgroup test cannot run: {why}");
        eprintln!("skipped: {why}");
        None
    }

    fn is_root() -> bool {
        // /proc/self/status "Uid:" real effective saved fs
        fs::read_to_string("/proc/self/status").is_ok_and(|status| {
            status.lines().find_map(|line| line.strip_prefix("Uid:")).and_then(|uids| uids.split_whitespace().nth(1))
                == Some("0")
        })
    }

    fn cgroup2_mount() -> Option<PathBuf> {
        egress_common::mountinfo::points_of("cgroup2").ok()?.into_iter().next()
    }

    /// `egress-disc-test-<pid>-<tag>` directly under the cgroup2 mount; it and every cgroup made
    /// below it are removed on drop. Never touches `cgroup.procs` or any other cgroup.
    pub struct TestCgroup {
        mount: PathBuf,
        relative: String,
    }

    impl TestCgroup {
        pub fn new(mount: &Path, tag: &str) -> Self {
            let relative = format!("egress-disc-test-{}-{tag}", std::process::id());
            let cgroup = Self { mount: mount.to_path_buf(), relative };
            cgroup.remove_all();
            fs::create_dir(cgroup.dir()).expect("create test cgroup");
            cgroup
        }

        pub fn relative(&self) -> &str {
            &self.relative
        }

        pub fn dir(&self) -> PathBuf {
            self.mount.join(&self.relative)
        }

        pub fn mkdir_all(&self, below: &str) {
            fs::create_dir_all(self.dir().join(below)).expect("create test cgroup");
        }

        /// rmdir, deepest first (a cgroup with children cannot be removed).
        fn remove_all(&self) {
            let mut dirs = Vec::new();
            let mut stack = vec![self.dir()];
            while let Some(dir) = stack.pop() {
                let Ok(entries) = fs::read_dir(&dir) else { continue };
                for entry in entries.flatten() {
                    if entry.file_type().is_ok_and(|t| t.is_dir()) {
                        stack.push(entry.path());
                    }
                }
                dirs.push(dir);
            }
            dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
            for dir in dirs {
                match fs::remove_dir(&dir) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => eprintln!("cannot remove test cgroup {}: {e}", dir.display()),
                }
            }
        }
    }

    impl Drop for TestCgroup {
        fn drop(&mut self) {
            self.remove_all();
        }
    }
}
