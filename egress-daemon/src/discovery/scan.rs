//! One pass over the cgroup tree: every cgroup below a directory, with its id and depth.

use crate::cgroup::Cgroup;
use std::{
    ffi::OsString,
    fs, io,
    os::unix::fs::{DirEntryExt, MetadataExt},
    path::{Path, PathBuf},
};

/// Every cgroup at and below `mount/under` (`under` relative to the mount; `""` or `/` for the
/// root), parents before their children. Cgroups removed while the walk runs are skipped; only
/// `under` itself missing, or an error other than a vanished entry, fails it.
pub fn scan(mount: &Path, under: &str) -> io::Result<Vec<Cgroup>> {
    let top = normalize(under);
    let top_dir = dir_of(mount, &top);
    let meta = fs::metadata(&top_dir)?;
    if !meta.is_dir() {
        return Err(io::Error::new(io::ErrorKind::NotADirectory, format!("{} is not a cgroup", top_dir.display())));
    }
    let mut found = vec![Cgroup { dir: top_dir.clone(), level: level_of(&top), relative: top.clone(), id: meta.ino() }];
    // Depth-first with an explicit stack: deep trees cannot overflow the thread's stack.
    let mut stack: Vec<(PathBuf, String)> = vec![(top_dir, top)];
    while let Some((dir, relative)) = stack.pop() {
        for (name, id) in child_dirs(&dir)? {
            let child = join(&relative, &name);
            found.push(Cgroup { dir: dir.join(&name), level: level_of(&child), relative: child.clone(), id });
            stack.push((dir.join(&name), child));
        }
    }
    Ok(found)
}

/// The subdirectories of a cgroup directory with their inode numbers, straight from `readdir`
/// (kernfs reports the cgroup id as `d_ino` and the type as `d_type`, so no `stat` per entry).
/// A directory that has vanished has no children.
pub(super) fn child_dirs(dir: &Path) -> io::Result<Vec<(OsString, u64)>> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if vanished(&e) => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut children = Vec::new();
    for entry in entries {
        let entry = match entry {
            Ok(entry) => entry,
            Err(e) if vanished(&e) => break,
            Err(e) => return Err(e),
        };
        match entry.file_type() {
            Ok(kind) if kind.is_dir() => children.push((entry.file_name(), entry.ino())),
            Ok(_) => {}
            Err(e) if vanished(&e) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(children)
}

/// Errors meaning "removed while we looked": the walk goes on without it.
pub(super) fn vanished(e: &io::Error) -> bool {
    // kernfs answers ENODEV for a node deactivated between lookup and use.
    e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENODEV)
}

/// `under` as the relative path cgroups are named by: no leading or trailing `/`, `/` for the root.
pub(super) fn normalize(under: &str) -> String {
    let trimmed = under.trim_matches('/');
    if trimmed.is_empty() {
        crate::cgroup::ROOT.to_string()
    } else {
        trimmed.to_string()
    }
}

/// The relative path of child `name` of the cgroup `parent`. Names that are not UTF-8 are
/// written lossily: the id is what maps the cgroup, the path only names it.
pub(super) fn join(parent: &str, name: &OsString) -> String {
    let name = name.to_string_lossy();
    if parent == crate::cgroup::ROOT {
        name.into_owned()
    } else {
        format!("{parent}/{name}")
    }
}

pub(super) fn level_of(relative: &str) -> u32 {
    if relative == crate::cgroup::ROOT {
        0
    } else {
        u32::try_from(relative.split('/').count()).unwrap_or(u32::MAX)
    }
}

pub(super) fn dir_of(mount: &Path, relative: &str) -> PathBuf {
    if relative == crate::cgroup::ROOT {
        mount.to_path_buf()
    } else {
        mount.join(relative)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::testutil::{cgroup2_or_skip, ScratchDir, TestCgroup};

    #[test]
    fn relative_paths_and_levels() {
        assert_eq!(normalize(""), "/");
        assert_eq!(normalize("/"), "/");
        assert_eq!(normalize("/system.slice/"), "system.slice");
        assert_eq!(join("/", &"a".into()), "a");
        assert_eq!(join("a/b", &"c".into()), "a/b/c");
        assert_eq!(level_of("/"), 0);
        assert_eq!(level_of("a"), 1);
        assert_eq!(level_of("a/b/c"), 3);
        assert_eq!(dir_of(Path::new("/m"), "/"), Path::new("/m"));
        assert_eq!(dir_of(Path::new("/m"), "a/b"), Path::new("/m/a/b"));
    }

    #[test]
    fn finds_every_directory_with_its_inode_and_depth() {
        let root = ScratchDir::new("scan-small");
        for dir in ["top/a/b/c", "top/a/d", "top/e"] {
            fs::create_dir_all(root.path().join(dir)).expect("mkdir");
        }
        fs::write(root.path().join("top/a/cgroup.procs"), "").expect("write file");
        let mut found = scan(root.path(), "/top/").expect("scan");
        let order: Vec<&str> = found.iter().map(|f| f.relative.as_str()).collect();
        for (parent, child) in [("top", "top/a"), ("top/a", "top/a/b"), ("top/a/b", "top/a/b/c")] {
            let at = |p: &str| order.iter().position(|r| *r == p).expect("present");
            assert!(at(parent) < at(child), "{parent} before {child} in {order:?}");
        }
        found.sort_by(|a, b| a.relative.cmp(&b.relative));
        let rels: Vec<(&str, u32)> = found.iter().map(|f| (f.relative.as_str(), f.level)).collect();
        assert_eq!(rels, [("top", 1), ("top/a", 2), ("top/a/b", 3), ("top/a/b/c", 4), ("top/a/d", 3), ("top/e", 2)]);
        for f in &found {
            let ino = fs::metadata(root.path().join(&f.relative)).expect("stat").ino();
            assert_eq!(f.id, ino, "{}", f.relative);
        }
        assert!(scan(root.path(), "missing").is_err());
        assert!(scan(root.path(), "top/a/cgroup.procs").is_err());
    }

    #[test]
    fn a_thousand_plain_directories() {
        // Making directories on a disk-backed /tmp is slow; the 10,000 case runs on real cgroups.
        let root = ScratchDir::new("scan-big");
        for i in 0..20 {
            for j in 0..50 {
                fs::create_dir_all(root.path().join(format!("t/p{i}/c{j}"))).expect("mkdir");
            }
        }
        let found = scan(root.path(), "t").expect("scan");
        assert_eq!(found.len(), 1 + 20 + 1_000);
    }

    #[test]
    fn real_cgroups_ids_are_inodes_and_levels_are_depths() {
        let Some(mount) = cgroup2_or_skip() else { return };
        let parent = TestCgroup::new(&mount, "scan");
        for dir in ["a/b/c", "a/d", "e"] {
            parent.mkdir_all(dir);
        }
        let found = scan(&mount, parent.relative()).expect("scan");
        assert_eq!(found.len(), 6);
        let base = level_of(parent.relative());
        for f in &found {
            let dir = mount.join(&f.relative);
            assert_eq!(f.id, fs::metadata(&dir).expect("stat").ino(), "{}", f.relative);
            assert_eq!(
                f.level,
                u32::try_from(dir.strip_prefix(&mount).expect("below").components().count()).expect("small")
            );
            assert!(f.level >= base);
        }
    }
}
