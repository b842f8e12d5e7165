//! Who could have made a cgroup: the system manager or a container runtime (root), or an
//! unprivileged user inside a subtree delegated to them.
//!
//! A cgroup can be created by whoever may write its parent directory. systemd delegates
//! `user@UID.service` (and units with `Delegate=yes` and a `User=`) by chowning the unit's cgroup
//! to that user, and marks every delegated cgroup with the `trusted.delegate` xattr; rootless
//! container runtimes create their cgroups inside such a subtree. So a name found there proves
//! nothing: any user can `mkdir nginx.service` or `docker-<id>.scope` in their own subtree. A
//! cgroup is placed by a trusted party when every ancestor that decides who could create it is
//! root's alone: owned by uid 0, writable by no group or other, not delegated, and not a
//! container's own cgroup (what lies inside a container is the container's business).
//!
//! cgroup2 refuses `rename`, and a delegated cgroup cannot be removed by its delegate (that needs
//! write access to its root-owned parent), so the ancestors checked by path at discovery are the
//! ancestors the kernel sees for the cgroup's whole life.

use std::{
    ffi::CString,
    fmt, fs, io,
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::Path,
};

use super::{runtime::container_of, scan::dir_of};

/// The xattr systemd sets on the cgroup of every unit with `Delegate=yes`.
const DELEGATE_XATTR: &str = "trusted.delegate";

/// Why a cgroup is not known to be placed by root: the first ancestor that fails, and how.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Untrusted {
    /// The ancestor, relative to the cgroup2 mount (`/` for the root).
    pub ancestor: String,
    pub reason: Reason,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Owned by this uid: a subtree delegated to that user.
    Owner(u32),
    /// Writable by its group or by others (the permission bits).
    Writable(u32),
    /// systemd delegated it (`trusted.delegate`) to the processes of its unit.
    Delegated,
    /// A container's own cgroup: its children are the container's to make.
    Container,
    /// It could not be examined.
    Unreadable(String),
}

impl fmt::Display for Untrusted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ancestor = &self.ancestor;
        match &self.reason {
            Reason::Owner(uid) => write!(f, "{ancestor} is owned by uid {uid} (delegated to that user)"),
            Reason::Writable(mode) => write!(f, "{ancestor} is writable by group or others (mode {mode:04o})"),
            Reason::Delegated => write!(f, "{ancestor} is delegated to its unit's processes ({DELEGATE_XATTR} is set)"),
            Reason::Container => write!(f, "it lies inside the container cgroup {ancestor}"),
            Reason::Unreadable(error) => write!(f, "{ancestor} could not be examined ({error})"),
        }
    }
}

/// Checks that only root could have created the cgroup at `relative` (relative to `mount`),
/// looking at its ancestors from depth `from_depth` down to its parent (depth 0 is the root
/// cgroup, depth 1 a child of the root, ...). Ancestors above `from_depth` are not examined: the
/// caller names those components itself (an operator's literal path). Returns the first
/// ancestor, from the top, that fails.
pub fn check(mount: &Path, relative: &str, from_depth: usize) -> Result<(), Untrusted> {
    let components: Vec<&str> = relative.split('/').filter(|c| !c.is_empty()).collect();
    for depth in from_depth..components.len() {
        let ancestor = if depth == 0 { crate::cgroup::ROOT.to_string() } else { components[..depth].join("/") };
        if let Some(reason) = distrust(mount, &ancestor) {
            return Err(Untrusted { ancestor, reason });
        }
    }
    Ok(())
}

/// Why children of the cgroup `ancestor` might not be root's doing, if they might not.
fn distrust(mount: &Path, ancestor: &str) -> Option<Reason> {
    if ancestor != crate::cgroup::ROOT && container_of(ancestor).is_some() {
        return Some(Reason::Container);
    }
    let dir = dir_of(mount, ancestor);
    let meta = match fs::metadata(&dir) {
        Ok(meta) => meta,
        Err(error) => return Some(Reason::Unreadable(error.to_string())),
    };
    if meta.uid() != 0 {
        return Some(Reason::Owner(meta.uid()));
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Some(Reason::Writable(mode));
    }
    match has_xattr(&dir, DELEGATE_XATTR) {
        Ok(true) => Some(Reason::Delegated),
        Ok(false) => None,
        Err(error) => Some(Reason::Unreadable(error.to_string())),
    }
}

fn has_xattr(path: &Path, name: &str) -> io::Result<bool> {
    let c_path = CString::new(path.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
    let c_name = CString::new(name).map_err(io::Error::other)?;
    // SAFETY: both are valid C strings; a null buffer of size 0 only asks for the value's size.
    let size = unsafe { libc::getxattr(c_path.as_ptr(), c_name.as_ptr(), std::ptr::null_mut(), 0) };
    if size >= 0 {
        return Ok(true);
    }
    let error = io::Error::last_os_error();
    match error.raw_os_error() {
        // Absent, or a kernel whose cgroupfs keeps no xattrs (and so no delegation marks).
        Some(libc::ENODATA | libc::ENOTSUP) => Ok(false),
        _ => Err(error),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::chown;

    use super::*;
    use crate::discovery::testutil::{cgroup2_or_skip, ScratchDir, TestCgroup};

    const ID: &str = "3f2a9c0d1e2f3a4b5c6d7e8f9a0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b";

    fn is_root() -> bool {
        // SAFETY: no preconditions.
        unsafe { libc::geteuid() == 0 }
    }

    #[test]
    fn root_owned_ancestors_are_trusted_and_the_cgroup_itself_is_not_examined() {
        if !is_root() {
            return;
        }
        let root = ScratchDir::new("place-ok");
        fs::create_dir_all(root.path().join("system.slice/nginx.service")).expect("mkdir");
        fs::set_permissions(root.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
        // the matched cgroup may itself be delegated (user@UID.service selected by name)
        chown(root.path().join("system.slice/nginx.service"), Some(4242), None).expect("chown");
        assert_eq!(check(root.path(), "system.slice/nginx.service", 0), Ok(()));
        assert_eq!(check(root.path(), "/", 0), Ok(()));
    }

    #[test]
    fn a_delegated_owner_a_writable_mode_or_a_container_is_untrusted() {
        if !is_root() {
            return;
        }
        let root = ScratchDir::new("place-bad");
        fs::set_permissions(root.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
        let user = "user.slice/user@4242.service";
        fs::create_dir_all(root.path().join(user).join("app.slice/nginx.service")).expect("mkdir");
        chown(root.path().join(user), Some(4242), Some(4242)).expect("chown");
        let err = check(root.path(), &format!("{user}/app.slice/nginx.service"), 0).expect_err("delegated");
        assert_eq!(err, Untrusted { ancestor: user.into(), reason: Reason::Owner(4242) });
        assert_eq!(err.to_string(), format!("{user} is owned by uid 4242 (delegated to that user)"));
        // an operator who names the delegated subtree literally vouches for it
        assert_eq!(check(root.path(), &format!("{user}/app.slice/nginx.service"), 3), Ok(()));

        fs::create_dir_all(root.path().join("shared/x")).expect("mkdir");
        fs::set_permissions(root.path().join("shared"), fs::Permissions::from_mode(0o775)).expect("chmod");
        let err = check(root.path(), "shared/x", 0).expect_err("group-writable");
        assert_eq!(err.reason, Reason::Writable(0o775));

        let container = format!("system.slice/docker-{ID}.scope");
        fs::create_dir_all(root.path().join(&container).join("nginx.service")).expect("mkdir");
        let err = check(root.path(), &format!("{container}/nginx.service"), 0).expect_err("inside a container");
        assert_eq!(err, Untrusted { ancestor: container.clone(), reason: Reason::Container });
        assert_eq!(check(root.path(), &container, 0), Ok(()));
    }

    #[test]
    fn real_cgroups_delegation_xattr_makes_descendants_untrusted() {
        let Some(mount) = cgroup2_or_skip() else { return };
        let parent = TestCgroup::new(&mount, "placement");
        parent.mkdir_all("system.slice/nginx.service");
        parent.mkdir_all("system.slice/runner.service/nginx.service");
        let p = parent.relative();
        assert_eq!(check(&mount, &format!("{p}/system.slice/nginx.service"), 0), Ok(()));
        let runner = format!("{p}/system.slice/runner.service");
        let c_path = CString::new(mount.join(&runner).into_os_string().into_encoded_bytes()).expect("path");
        let c_name = CString::new(DELEGATE_XATTR).expect("name");
        // SAFETY: valid C strings and a one-byte value.
        let set = unsafe { libc::setxattr(c_path.as_ptr(), c_name.as_ptr(), b"1".as_ptr().cast(), 1, 0) };
        assert_eq!(set, 0, "setxattr: {}", io::Error::last_os_error());
        let err = check(&mount, &format!("{runner}/nginx.service"), 0).expect_err("delegated unit");
        assert_eq!(err, Untrusted { ancestor: runner.clone(), reason: Reason::Delegated });
        // the delegated unit itself was placed by systemd
        assert_eq!(check(&mount, &runner, 0), Ok(()));
    }
}
