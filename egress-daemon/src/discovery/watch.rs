//! Live view of the cgroup tree: inotify on every cgroup directory below a parent.
//!
//! cgroup2 raises `IN_CREATE`/`IN_DELETE` on a cgroup's directory when a child cgroup is made or
//! removed, so one watch per directory sees the whole subtree. A new directory gets its watch
//! when its creation is read, which is after the fact: its own children may already exist by
//! then, so it is listed right after the watch is added and whatever is there is reported too.
//! A child made between the two is both listed and notified; the watcher reports it once.
//!
//! The watcher runs as a tokio task reading the inotify descriptor through `AsyncFd` (no thread of
//! its own). The tree is watched before [`spawn_watcher`] returns, so every cgroup made after it
//! returns is reported: a caller that wants the whole picture calls `scan` after it, applies
//! that, then the changes (a cgroup both scanned and reported is `Added` twice; treat `Added` as
//! "exists with this id" and `Removed` as "is gone", and the result is right).

use std::{
    cmp::Reverse,
    collections::{BTreeMap, HashMap, HashSet},
    ffi::OsString,
    fs, io,
    ops::ControlFlow,
    os::unix::fs::MetadataExt,
    path::PathBuf,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
};

use inotify::{EventMask, EventOwned, Inotify, WatchDescriptor, WatchMask, Watches};
use tokio::{
    io::{unix::AsyncFd, Interest},
    runtime::Handle,
    sync::mpsc::{self, UnboundedReceiver, UnboundedSender},
    task::AbortHandle,
};

use super::scan::{child_dirs, dir_of, join, level_of, normalize, vanished};
use crate::cgroup::Cgroup;

/// A change below the watched cgroup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// A cgroup appeared (or was renamed to this path). Parents come before their children.
    Added(Cgroup),
    /// A cgroup went (or was renamed away from this path), with the id it had. Children come
    /// before their parents.
    Removed { relative: String, id: u64 },
}

/// Keeps the watcher running; dropping it stops the watcher and closes its channel.
#[derive(Debug)]
pub struct WatchHandle {
    task: AbortHandle,
    unwatched: Arc<AtomicUsize>,
}

impl WatchHandle {
    /// How many known cgroups could not be watched (`fs.inotify.max_user_watches`): cgroups
    /// created below them are found by a rescan every [`UNWATCHED_RESCAN`] instead of at once.
    pub fn unwatched(&self) -> Arc<AtomicUsize> {
        self.unwatched.clone()
    }
}

/// How often the tree is walked again while some cgroup in it could not be watched.
pub const UNWATCHED_RESCAN: std::time::Duration = std::time::Duration::from_secs(2);

impl Drop for WatchHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Watches every cgroup at and below `mount/under` (`under` relative to the mount) and sends each
/// change on the returned channel. Call it inside a tokio runtime with I/O enabled.
///
/// Fails if `under` does not exist or the tree cannot be watched whole (typically
/// `fs.inotify.max_user_watches`, one watch per cgroup). Later failures to watch a new cgroup
/// are logged and that cgroup is still reported. If the kernel's event queue overflows the
/// watcher walks the tree again and reports the difference. The channel closes when `under`
/// itself is removed (after its `Removed`), when the handle is dropped, or if reading inotify
/// fails (logged).
pub fn spawn_watcher(mount: PathBuf, under: String) -> io::Result<(UnboundedReceiver<Change>, WatchHandle)> {
    let runtime = Handle::try_current()
        .map_err(|e| io::Error::other(format!("the cgroup watcher needs a tokio runtime: {e}")))?;
    let inotify = Inotify::init()?;
    let mut tree = Tree::new(inotify.watches(), mount, &under);
    tree.start()?;
    let fd = {
        let _entered = runtime.enter();
        // SAFETY: `Inotify` owns its descriptor, closes it only when dropped, and is never swapped
        // out of the `AsyncFd` (only `read_events` is called through `get_mut`).
        unsafe { AsyncFd::register_with_interest(inotify, Interest::READABLE) }.map_err(io::Error::from)?
    };
    let (tx, rx) = mpsc::unbounded_channel();
    let unwatched = Arc::new(AtomicUsize::new(tree.unwatched()));
    let task = runtime.spawn(run(fd, tree, tx, unwatched.clone()));
    Ok((rx, WatchHandle { task: task.abort_handle(), unwatched }))
}

async fn run(mut fd: AsyncFd<Inotify>, mut tree: Tree, tx: UnboundedSender<Change>, unwatched: Arc<AtomicUsize>) {
    // Large enough for hundreds of events per read; inotify needs at least one full event.
    let mut buffer = vec![0u8; 64 * 1024];
    let mut rescan = tokio::time::interval(UNWATCHED_RESCAN);
    loop {
        let blind = unwatched.load(Ordering::Relaxed) > 0;
        let events = tokio::select! {
            () = tx.closed() => return,
            _ = rescan.tick(), if blind => {
                // Out of watches: see what was made below the cgroups without one (and watch
                // them if watches were freed meanwhile).
                let mut changes = Vec::new();
                tree.resync(&mut changes);
                unwatched.store(tree.unwatched(), Ordering::Relaxed);
                for change in changes {
                    if tx.send(change).is_err() {
                        return;
                    }
                }
                if !tree.known.contains_key(&tree.root) {
                    return;
                }
                continue;
            }
            read = read_events(&mut fd, &mut buffer) => read,
        };
        let events = match events {
            Ok(events) => events,
            Err(e) => {
                tracing::warn!("cgroup watcher below {} stopped: reading inotify: {e}", tree.root);
                return;
            }
        };
        let mut changes = Vec::new();
        let flow = tree.apply(events, &mut changes);
        unwatched.store(tree.unwatched(), Ordering::Relaxed);
        for change in changes {
            if tx.send(change).is_err() {
                return;
            }
        }
        if flow.is_break() {
            return;
        }
    }
}

async fn read_events(fd: &mut AsyncFd<Inotify>, buffer: &mut [u8]) -> io::Result<Vec<EventOwned>> {
    loop {
        let mut ready = fd.readable_mut().await?;
        let read = ready.try_io(|inner| {
            inner.get_mut().read_events(buffer).map(|events| events.map(|event| event.to_owned()).collect::<Vec<_>>())
        });
        if let Ok(result) = read {
            return result;
        }
        // Spurious readiness: try_io cleared it, wait again.
    }
}

fn watch_mask() -> WatchMask {
    WatchMask::CREATE
        | WatchMask::DELETE
        | WatchMask::DELETE_SELF
        | WatchMask::MOVED_FROM
        | WatchMask::MOVED_TO
        | WatchMask::ONLYDIR
}

/// A watched directory.
#[derive(Clone, Debug)]
struct Node {
    dir: PathBuf,
    relative: String,
    id: u64,
}

/// A reported cgroup.
#[derive(Clone, Debug)]
struct Entry {
    id: u64,
    wd: Option<WatchDescriptor>,
}

/// The watcher's picture of the tree: what it has reported, and which watch is which directory.
///
/// cgroup2 sends no `IN_DELETE_SELF` or `IN_IGNORED` when a cgroup is removed (kernfs keeps the
/// directory's link count, and the watch itself pins the inode), so a removal is only ever seen
/// as `IN_DELETE` on the parent. The watcher therefore removes a gone cgroup's watch itself (else
/// every removed cgroup would stay pinned), and watches the parent of the watched cgroup to see
/// that one go.
struct Tree {
    watches: Watches,
    mount: PathBuf,
    /// The watched cgroup, relative to the mount.
    root: String,
    /// Watch on the directory above `root` (none when `root` is the mount) and `root`'s name.
    above_root: Option<(i32, OsString)>,
    by_wd: HashMap<i32, Node>,
    /// Every cgroup reported and not yet removed, by relative path. Ordered, so a subtree is one
    /// range.
    known: BTreeMap<String, Entry>,
}

impl Tree {
    fn new(watches: Watches, mount: PathBuf, under: &str) -> Self {
        Self { watches, mount, root: normalize(under), above_root: None, by_wd: HashMap::new(), known: BTreeMap::new() }
    }

    /// Watches the existing tree without reporting it (the caller scans).
    fn start(&mut self) -> io::Result<()> {
        let root_dir = dir_of(&self.mount, &self.root);
        let meta = fs::metadata(&root_dir).map_err(|e| annotate(e, "watch", &root_dir))?;
        if !meta.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::NotADirectory,
                format!("{} is not a cgroup", root_dir.display()),
            ));
        }
        if let (Some(above), Some(name)) = (root_dir.parent(), root_dir.file_name()) {
            if self.root != crate::cgroup::ROOT {
                let wd = self
                    .watches
                    .add(above, WatchMask::DELETE | WatchMask::MOVED_FROM | WatchMask::ONLYDIR)
                    .map_err(|e| annotate(e, "watch", above))?;
                self.above_root = Some((wd.get_watch_descriptor_id(), name.to_os_string()));
            }
        }
        let mut ignored = Vec::new();
        if let Some(e) = self.add_subtree(root_dir, self.root.clone(), &mut ignored, None) {
            return Err(e);
        }
        if !self.known.contains_key(&self.root) {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("cgroup {} vanished while being watched", self.root),
            ));
        }
        Ok(())
    }

    /// Applies a batch of inotify events; `Break` once the watched cgroup itself is gone.
    fn apply(&mut self, events: Vec<EventOwned>, out: &mut Vec<Change>) -> ControlFlow<()> {
        for event in events {
            if event.mask.contains(EventMask::Q_OVERFLOW) {
                tracing::warn!("cgroup watcher below {}: inotify queue overflowed, rescanning", self.root);
                self.resync(out);
                if !self.known.contains_key(&self.root) {
                    return ControlFlow::Break(());
                }
                continue;
            }
            let wd = event.wd.get_watch_descriptor_id();
            if let Some((above, name)) = &self.above_root {
                if wd == *above {
                    let root_gone = event.mask.intersects(EventMask::DELETE | EventMask::MOVED_FROM)
                        && event.name.as_ref() == Some(name)
                        && !self.still_known(&dir_of(&self.mount, &self.root), &self.root);
                    if root_gone {
                        let root = self.root.clone();
                        self.remove_subtree(&root, out);
                        return ControlFlow::Break(());
                    }
                    continue;
                }
            }
            if event.mask.contains(EventMask::IGNORED) {
                self.by_wd.remove(&wd);
                continue;
            }
            let Some(node) = self.by_wd.get(&wd).cloned() else { continue };
            match &event.name {
                Some(name) if event.mask.contains(EventMask::ISDIR) => {
                    let relative = join(&node.relative, name);
                    let dir = node.dir.join(name);
                    if event.mask.intersects(EventMask::CREATE | EventMask::MOVED_TO) {
                        if let Some(e) = self.add_subtree(dir, relative, out, None) {
                            tracing::warn!(
                                "cgroup watcher: {e}; cgroups created below it are found by a rescan every {} s",
                                UNWATCHED_RESCAN.as_secs()
                            );
                        }
                    } else if event.mask.intersects(EventMask::DELETE | EventMask::MOVED_FROM)
                        && !self.still_known(&dir, &relative)
                    {
                        self.remove_subtree(&relative, out);
                    }
                }
                // Plain file systems (and cgroup v1) do send these.
                None if event.mask.contains(EventMask::DELETE_SELF) => {
                    if self.known.get(&node.relative).is_some_and(|entry| entry.id == node.id) {
                        self.remove_subtree(&node.relative, out);
                    }
                    if node.relative == self.root {
                        return ControlFlow::Break(());
                    }
                }
                _ => {}
            }
        }
        ControlFlow::Continue(())
    }

    /// Known cgroups without a watch.
    fn unwatched(&self) -> usize {
        self.known.values().filter(|entry| entry.wd.is_none()).count()
    }

    /// Whether `dir` exists as the very cgroup known at `relative`: a cgroup removed and made
    /// again before its deletion was read is already known by its new id, and the deletion was of
    /// the old one.
    fn still_known(&self, dir: &std::path::Path, relative: &str) -> bool {
        fs::metadata(dir).is_ok_and(|meta| self.known.get(relative).is_some_and(|entry| entry.id == meta.ino()))
    }

    /// Watches, lists and reports `dir` and everything below it, parents first. Keeps going past
    /// failures and returns the first one that was not a cgroup vanishing.
    fn add_subtree(
        &mut self,
        dir: PathBuf,
        relative: String,
        out: &mut Vec<Change>,
        mut seen: Option<&mut HashSet<String>>,
    ) -> Option<io::Error> {
        let mut first_error = None;
        let mut stack = vec![(dir, relative)];
        while let Some((dir, relative)) = stack.pop() {
            // Watch before listing: a child made after the listing is then always notified.
            let wd = match self.watches.add(&dir, watch_mask()) {
                Ok(wd) => Some(wd),
                Err(e) if vanished(&e) || e.raw_os_error() == Some(libc::ENOTDIR) => continue,
                Err(e) => {
                    first_error.get_or_insert_with(|| annotate(e, "watch", &dir));
                    None
                }
            };
            let id = match fs::metadata(&dir) {
                Ok(meta) => meta.ino(),
                Err(e) => {
                    if let Some(wd) = wd {
                        let _ = self.watches.remove(wd);
                    }
                    if !vanished(&e) {
                        first_error.get_or_insert_with(|| annotate(e, "stat", &dir));
                    }
                    continue;
                }
            };
            if let Some(wd) = &wd {
                self.by_wd
                    .insert(wd.get_watch_descriptor_id(), Node { dir: dir.clone(), relative: relative.clone(), id });
            }
            if let Some(seen) = seen.as_deref_mut() {
                seen.insert(relative.clone());
            }
            let previous = self.known.insert(relative.clone(), Entry { id, wd: wd.clone() });
            match previous {
                Some(old) if old.id == id => {}
                Some(old) => {
                    // Same path, another cgroup: the old one's watch would pin it.
                    self.unwatch(old.wd, wd.as_ref());
                    out.push(Change::Added(Cgroup {
                        dir: dir.clone(),
                        level: level_of(&relative),
                        relative: relative.clone(),
                        id,
                    }));
                }
                None => out.push(Change::Added(Cgroup {
                    dir: dir.clone(),
                    level: level_of(&relative),
                    relative: relative.clone(),
                    id,
                })),
            }
            match child_dirs(&dir) {
                Ok(children) => {
                    for (name, _) in children {
                        stack.push((dir.join(&name), join(&relative, &name)));
                    }
                }
                Err(e) => {
                    first_error.get_or_insert_with(|| annotate(e, "list", &dir));
                }
            }
        }
        first_error
    }

    /// Forgets and reports `relative` and everything known below it, children first.
    fn remove_subtree(&mut self, relative: &str, out: &mut Vec<Change>) {
        let prefix = if relative == crate::cgroup::ROOT { String::new() } else { format!("{relative}/") };
        let mut doomed: Vec<String> = self
            .known
            .range(prefix.clone()..)
            .take_while(|(path, _)| path.starts_with(&prefix))
            .map(|(path, _)| path.clone())
            .collect();
        if relative != crate::cgroup::ROOT && self.known.contains_key(relative) {
            doomed.push(relative.to_string());
        }
        self.forget(doomed, out);
    }

    /// After lost events: walks the tree again, reporting what appeared and what went.
    fn resync(&mut self, out: &mut Vec<Change>) {
        let mut seen = HashSet::new();
        let root_dir = dir_of(&self.mount, &self.root);
        if let Some(e) = self.add_subtree(root_dir, self.root.clone(), out, Some(&mut seen)) {
            tracing::warn!("cgroup watcher rescan: {e}");
        }
        let gone: Vec<String> = self.known.keys().filter(|path| !seen.contains(*path)).cloned().collect();
        self.forget(gone, out);
    }

    fn forget(&mut self, mut paths: Vec<String>, out: &mut Vec<Change>) {
        paths.sort_by_key(|path| Reverse(level_of(path)));
        for relative in paths {
            if let Some(entry) = self.known.remove(&relative) {
                self.unwatch(entry.wd, None);
                out.push(Change::Removed { relative, id: entry.id });
            }
        }
    }

    /// Drops a watch unless it is `keep` (re-adding a watch on the same inode returns the same
    /// descriptor). Failure means the kernel already dropped it.
    fn unwatch(&mut self, wd: Option<WatchDescriptor>, keep: Option<&WatchDescriptor>) {
        let Some(wd) = wd else { return };
        let id = wd.get_watch_descriptor_id();
        if keep.is_some_and(|keep| keep.get_watch_descriptor_id() == id) {
            return;
        }
        if self.by_wd.get(&id).is_some_and(|node| {
            self.known
                .get(&node.relative)
                .is_some_and(|e| e.wd.as_ref().is_some_and(|w| w.get_watch_descriptor_id() == id))
        }) {
            // Still the watch of another live path (a rename put it there): keep it.
            return;
        }
        self.by_wd.remove(&id);
        let _ = self.watches.remove(wd);
    }
}

fn annotate(e: io::Error, action: &str, dir: &std::path::Path) -> io::Error {
    let hint = if e.raw_os_error() == Some(libc::ENOSPC) {
        " (out of inotify watches: raise fs.inotify.max_user_watches)"
    } else {
        ""
    };
    io::Error::new(e.kind(), format!("{action} {}: {e}{hint}", dir.display()))
}

#[cfg(test)]
mod tests {
    use std::{
        os::fd::AsRawFd,
        time::{Duration, Instant},
    };

    use super::*;
    use crate::discovery::{
        scan::scan,
        testutil::{cgroup2_or_skip, ScratchDir, TestCgroup},
    };

    const PATIENCE: Duration = Duration::from_secs(5);

    async fn next(rx: &mut UnboundedReceiver<Change>) -> Option<Change> {
        tokio::time::timeout(PATIENCE, rx.recv()).await.ok().flatten()
    }

    /// Receives until every path in `want` has been added; returns the changes in order.
    async fn until_added(rx: &mut UnboundedReceiver<Change>, want: &[String]) -> Vec<Change> {
        let mut got = Vec::new();
        let mut missing: HashSet<&String> = want.iter().collect();
        while !missing.is_empty() {
            let change = next(rx).await.unwrap_or_else(|| panic!("no Added for {missing:?}; got {got:?}"));
            if let Change::Added(found) = &change {
                missing.remove(&found.relative);
            }
            got.push(change);
        }
        got
    }

    /// A removal as the tests expect it (ids are the kernel's: compared with [`anonymous`]).
    fn removed(relative: &str) -> Change {
        Change::Removed { relative: relative.to_string(), id: 0 }
    }

    fn anonymous(change: Change) -> Change {
        match change {
            Change::Removed { relative, .. } => Change::Removed { relative, id: 0 },
            added => added,
        }
    }

    #[test]
    fn needs_a_runtime() {
        let dir = ScratchDir::new("watch-nort");
        let err = spawn_watcher(dir.path().to_path_buf(), "/".into()).err().map(|e| e.to_string());
        assert!(err.is_some_and(|e| e.contains("tokio runtime")));
    }

    #[tokio::test]
    async fn missing_parent_is_an_error() {
        let dir = ScratchDir::new("watch-missing");
        assert!(spawn_watcher(dir.path().to_path_buf(), "nope".into()).is_err());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn real_cgroups_nested_mkdir_and_rmdir_with_latency() {
        let Some(mount) = cgroup2_or_skip() else { return };
        let parent = TestCgroup::new(&mount, "watch");
        let (mut rx, _handle) = spawn_watcher(mount.clone(), parent.relative().to_string()).expect("watch");
        let p = parent.relative().to_string();

        // a/b/c made back to back: b and c usually exist before a's watch does.
        for dir in ["a", "a/b", "a/b/c"] {
            fs::create_dir(parent.dir().join(dir)).expect("mkdir");
        }
        let want: Vec<String> = ["a", "a/b", "a/b/c"].iter().map(|d| format!("{p}/{d}")).collect();
        let got = until_added(&mut rx, &want).await;
        assert_eq!(got.len(), 3, "each reported once: {got:?}");
        for (change, relative) in got.iter().zip(&want) {
            let Change::Added(found) = change else { panic!("{change:?}") };
            assert_eq!(&found.relative, relative, "parents first");
            assert_eq!(found.id, fs::metadata(mount.join(relative)).expect("stat").ino());
            assert_eq!(found.level, level_of(relative));
        }

        for dir in ["a/b/c", "a/b", "a"] {
            fs::remove_dir(parent.dir().join(dir)).expect("rmdir");
        }
        for dir in ["a/b/c", "a/b", "a"] {
            assert_eq!(next(&mut rx).await.map(anonymous), Some(removed(&format!("{p}/{dir}"))));
        }

        // mkdir -> Added latency, one cgroup at a time.
        let mut latencies = Vec::new();
        for i in 0..200 {
            let relative = format!("{p}/lat{i}");
            let started = Instant::now();
            fs::create_dir(mount.join(&relative)).expect("mkdir");
            match next(&mut rx).await {
                Some(Change::Added(found)) if found.relative == relative => latencies.push(started.elapsed()),
                other => panic!("expected Added {relative}, got {other:?}"),
            }
        }
        latencies.sort();
        let pct = |q: usize| latencies[(latencies.len() - 1) * q / 100];
        println!(
            "mkdir -> Added latency over {} cgroups: min {:?}, median {:?}, p99 {:?}, max {:?}",
            latencies.len(),
            pct(0),
            pct(50),
            pct(99),
            pct(100)
        );
        assert!(pct(50) < Duration::from_millis(100));
        for i in 0..200 {
            fs::remove_dir(mount.join(format!("{p}/lat{i}"))).expect("rmdir");
        }
        for i in 0..200 {
            assert_eq!(next(&mut rx).await.map(anonymous), Some(removed(&format!("{p}/lat{i}"))));
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn real_cgroups_deep_bursts_are_all_reported() {
        let Some(mount) = cgroup2_or_skip() else { return };
        let parent = TestCgroup::new(&mount, "burst");
        let (mut rx, _handle) = spawn_watcher(mount.clone(), parent.relative().to_string()).expect("watch");
        let p = parent.relative().to_string();
        let mut want = Vec::new();
        for i in 0..50 {
            let mut path = format!("{p}/t{i}");
            for depth in 0..6 {
                fs::create_dir(mount.join(&path)).expect("mkdir");
                want.push(path.clone());
                path = format!("{path}/d{depth}");
            }
        }
        let got = until_added(&mut rx, &want).await;
        assert_eq!(got.len(), want.len(), "no duplicates");
        // and after the burst, the watcher's picture equals a fresh scan
        let mut scanned: Vec<String> = scan(&mount, &p).expect("scan").into_iter().map(|f| f.relative).collect();
        scanned.retain(|r| r != &p);
        scanned.sort();
        want.sort();
        assert_eq!(scanned, want);
    }

    #[tokio::test]
    async fn rename_moves_the_subtree() {
        // cgroup2 refuses rename (EPERM, a cgroup v1 feature), so plain directories.
        let dir = ScratchDir::new("watch-rename");
        fs::create_dir_all(dir.path().join("w/a/b")).expect("mkdir");
        let (mut rx, _handle) = spawn_watcher(dir.path().to_path_buf(), "w".into()).expect("watch");
        fs::rename(dir.path().join("w/a"), dir.path().join("w/z")).expect("rename");
        assert_eq!(next(&mut rx).await.map(anonymous), Some(removed("w/a/b")));
        assert_eq!(next(&mut rx).await.map(anonymous), Some(removed("w/a")));
        let got = until_added(&mut rx, &["w/z".into(), "w/z/b".into()]).await;
        assert_eq!(got.len(), 2);
        // the moved directories report under their new names
        fs::create_dir(dir.path().join("w/z/b/c")).expect("mkdir");
        let got = until_added(&mut rx, &["w/z/b/c".into()]).await;
        assert_eq!(got.len(), 1);
    }

    #[test]
    fn real_cgroups_removed_cgroups_release_their_watches() {
        let Some(mount) = cgroup2_or_skip() else { return };
        let parent = TestCgroup::new(&mount, "unwatch");
        let mut inotify = Inotify::init().expect("inotify");
        let mut tree = Tree::new(inotify.watches(), mount.clone(), parent.relative());
        tree.start().expect("start");
        let kernel_watches = |inotify: &Inotify| {
            let info = fs::read_to_string(format!("/proc/self/fdinfo/{}", inotify.as_raw_fd())).expect("fdinfo");
            info.lines().filter(|line| line.starts_with("inotify wd:")).count()
        };
        // the watched cgroup and the directory above it
        assert_eq!(kernel_watches(&inotify), 2);
        let mut buffer = vec![0u8; 64 * 1024];
        let mut pump = |tree: &mut Tree, inotify: &mut Inotify| {
            std::thread::sleep(Duration::from_millis(50));
            let events: Vec<EventOwned> = match inotify.read_events(&mut buffer) {
                Ok(events) => events.map(|e| e.to_owned()).collect(),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Vec::new(),
                Err(e) => panic!("read: {e}"),
            };
            let mut out = Vec::new();
            assert!(tree.apply(events, &mut out).is_continue());
            out
        };
        for i in 0..20 {
            parent.mkdir_all(&format!("c{i}/d"));
        }
        assert_eq!(pump(&mut tree, &mut inotify).len(), 40);
        assert_eq!(kernel_watches(&inotify), 42);
        for i in 0..20 {
            fs::remove_dir(parent.dir().join(format!("c{i}/d"))).expect("rmdir");
            fs::remove_dir(parent.dir().join(format!("c{i}"))).expect("rmdir");
        }
        assert_eq!(pump(&mut tree, &mut inotify).len(), 40);
        pump(&mut tree, &mut inotify);
        assert_eq!(kernel_watches(&inotify), 2, "watches on removed cgroups are released");
        assert_eq!(tree.by_wd.len(), 1);
        assert_eq!(tree.known.len(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn real_cgroups_removing_the_watched_parent_closes_the_channel() {
        let Some(mount) = cgroup2_or_skip() else { return };
        let parent = TestCgroup::new(&mount, "gone");
        let p = parent.relative().to_string();
        parent.mkdir_all("x");
        let (mut rx, _handle) = spawn_watcher(mount.clone(), format!("{p}/x")).expect("watch");
        fs::remove_dir(parent.dir().join("x")).expect("rmdir");
        assert_eq!(next(&mut rx).await.map(anonymous), Some(removed(&format!("{p}/x"))));
        assert_eq!(next(&mut rx).await, None);
    }

    #[tokio::test]
    async fn dropping_the_handle_stops_the_watcher() {
        let dir = ScratchDir::new("watch-drop");
        fs::create_dir(dir.path().join("w")).expect("mkdir");
        let (mut rx, handle) = spawn_watcher(dir.path().to_path_buf(), "w".into()).expect("watch");
        drop(handle);
        assert_eq!(next(&mut rx).await, None);
    }

    #[tokio::test]
    async fn works_on_plain_directories_too() {
        let dir = ScratchDir::new("watch-plain");
        fs::create_dir(dir.path().join("w")).expect("mkdir");
        let (mut rx, _handle) = spawn_watcher(dir.path().to_path_buf(), "w".into()).expect("watch");
        fs::create_dir_all(dir.path().join("w/x/y")).expect("mkdir");
        fs::write(dir.path().join("w/x/file"), "").expect("file");
        let got = until_added(&mut rx, &["w/x".into(), "w/x/y".into()]).await;
        assert_eq!(got.len(), 2, "{got:?}");
    }

    #[test]
    fn a_cgroup_without_a_watch_is_counted_and_its_children_found_by_a_rescan() {
        let dir = ScratchDir::new("watch-unwatched");
        fs::create_dir_all(dir.path().join("w/blind")).expect("mkdir");
        let inotify = Inotify::init().expect("inotify");
        let mut tree = Tree::new(inotify.watches(), dir.path().to_path_buf(), "w");
        tree.start().expect("start");
        assert_eq!(tree.unwatched(), 0);
        // As if the watch could not be added (out of watches): drop it.
        let entry = tree.known.get_mut("w/blind").expect("known");
        let wd = entry.wd.take().expect("watched");
        tree.by_wd.remove(&wd.get_watch_descriptor_id());
        tree.watches.remove(wd).expect("remove watch");
        assert_eq!(tree.unwatched(), 1);
        fs::create_dir(dir.path().join("w/blind/child")).expect("mkdir");
        let mut out = Vec::new();
        tree.resync(&mut out);
        let added: Vec<String> = out
            .iter()
            .filter_map(|c| match c {
                Change::Added(cgroup) => Some(cgroup.relative.clone()),
                Change::Removed { .. } => None,
            })
            .collect();
        assert_eq!(added, ["w/blind/child"]);
        // Watches were free again: the rescan watched it.
        assert_eq!(tree.unwatched(), 0);
    }

    #[test]
    fn resync_reports_the_difference() {
        let dir = ScratchDir::new("watch-resync");
        for d in ["w/keep/k", "w/old/o"] {
            fs::create_dir_all(dir.path().join(d)).expect("mkdir");
        }
        let inotify = Inotify::init().expect("inotify");
        let mut tree = Tree::new(inotify.watches(), dir.path().to_path_buf(), "w");
        tree.start().expect("start");
        assert_eq!(tree.known.len(), 5);
        fs::remove_dir(dir.path().join("w/old/o")).expect("rmdir");
        fs::remove_dir(dir.path().join("w/old")).expect("rmdir");
        fs::create_dir_all(dir.path().join("w/new/n")).expect("mkdir");
        let mut out = Vec::new();
        tree.resync(&mut out);
        let added: Vec<&str> = out
            .iter()
            .filter_map(|c| match c {
                Change::Added(f) => Some(f.relative.as_str()),
                Change::Removed { .. } => None,
            })
            .collect();
        assert_eq!(added, ["w/new", "w/new/n"]);
        let gone: Vec<Change> =
            out.into_iter().filter(|c| matches!(c, Change::Removed { .. })).map(anonymous).collect();
        assert_eq!(gone, [removed("w/old/o"), removed("w/old")]);
    }

    #[test]
    fn remove_subtree_does_not_take_siblings_sharing_a_prefix() {
        let dir = ScratchDir::new("watch-prefix");
        for d in ["w/a/x", "w/a-b/y", "w/a.c", "w/ab"] {
            fs::create_dir_all(dir.path().join(d)).expect("mkdir");
        }
        let inotify = Inotify::init().expect("inotify");
        let mut tree = Tree::new(inotify.watches(), dir.path().to_path_buf(), "w");
        tree.start().expect("start");
        let mut out = Vec::new();
        tree.remove_subtree("w/a", &mut out);
        let out: Vec<Change> = out.into_iter().map(anonymous).collect();
        assert_eq!(out, [removed("w/a/x"), removed("w/a")]);
        let left: Vec<&str> = tree.known.keys().map(String::as_str).collect();
        assert_eq!(left, ["w", "w/a-b", "w/a-b/y", "w/a.c", "w/ab"]);
    }

    #[test]
    fn real_cgroups_ten_thousand_scanned_and_watched_quickly() {
        let Some(mount) = cgroup2_or_skip() else { return };
        let parent = TestCgroup::new(&mount, "big");
        let p = parent.relative().to_string();
        let started = Instant::now();
        for i in 0..100 {
            for j in 0..100 {
                parent.mkdir_all(&format!("p{i}/c{j}"));
            }
        }
        let made = started.elapsed();
        let started = Instant::now();
        let found = scan(&mount, &p).expect("scan");
        let scanned = started.elapsed();
        assert_eq!(found.len(), 1 + 100 + 10_000);

        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let _entered = runtime.enter();
        let started = Instant::now();
        let (mut rx, handle) = spawn_watcher(mount.clone(), p.clone()).expect("watch");
        let watched = started.elapsed();
        println!("10,101 cgroups: created in {made:?}, scanned in {scanned:?}, watched (spawn_watcher) in {watched:?}");
        assert!(scanned.as_secs() < 2 && watched.as_secs() < 2);

        fs::create_dir(mount.join(format!("{p}/p99/c99/new"))).expect("mkdir");
        let change = runtime.block_on(next(&mut rx));
        assert!(matches!(change, Some(Change::Added(found)) if found.relative == format!("{p}/p99/c99/new")));
        drop(handle);
    }
}
