//! A small Debian root file system with systemd, for the guest that runs the README's service
//! steps with systemd as PID 1. Built once with mmdebstrap from Debian's packages and cached as
//! an uncompressed `newc` cpio archive (booted as the initramfs: the cloud kernels have no 9p,
//! and their virtio block driver is a module), keyed by a hash of everything that shapes it.
//!
//! mmdebstrap runs apt inside the new tree with its own configuration and cache there, so the
//! machine's own apt state is left as it was.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context, Result};

use crate::sys;

/// Debian 12, the release the package is made for: installing it there with apt checks its
/// dependencies (glibc 2.34 or later) against the oldest system it promises to run on.
const SUITE: &str = "bookworm";
const MIRROR: &str = "http://deb.debian.org/debian";
/// `essential` plus these: systemd as init (journald included), `ip` for the network, apt to
/// install the egress package as the README says. The suite's client is the static vmclient;
/// everything else it uses (bash, coreutils, grep, sed) is essential.
const PACKAGES: &[&str] = &["systemd", "systemd-sysv", "iproute2", "apt"];
const OPTIONS: &[&str] = &[
    "--variant=essential",
    "--keyring=/usr/share/keyrings/debian-archive-keyring.gpg",
    "--dpkgopt=path-exclude=/usr/share/doc/*",
    "--dpkgopt=path-exclude=/usr/share/man/*",
    "--dpkgopt=path-exclude=/usr/share/info/*",
    "--dpkgopt=path-exclude=/usr/share/locale/*",
    // The exclusions keep the image small while it is built; packages installed later in the
    // guest (egress's) get their documentation and examples as on any Debian system.
    "--customize-hook=rm -f \"$1/etc/dpkg/dpkg.cfg.d/99mmdebstrap\"",
];

/// The cached root file system for the current recipe, built first when missing.
pub fn ensure(cache: &Path) -> Result<PathBuf> {
    let recipe = recipe();
    let dir = cache.join("rootfs").join(format!("{SUITE}-{:016x}", fnv1a(recipe.as_bytes())));
    let image = dir.join("rootfs.cpio");
    if image.is_file() {
        return Ok(image);
    }
    println!("vm: building the systemd root file system (Debian {SUITE}: {})", PACKAGES.join(", "));
    let tree = dir.join("tree");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let mut cmd = Command::new("mmdebstrap");
    cmd.args(OPTIONS)
        .arg(format!("--include={}", PACKAGES.join(",")))
        .arg(SUITE)
        .arg(&tree)
        .arg(MIRROR)
        .stdout(Stdio::null());
    sys::run(&mut cmd).context("mmdebstrap (run `cargo xtask setup`)")?;
    let partial = dir.join("rootfs.cpio.partial");
    write_cpio(&tree, &partial)?;
    fs::write(dir.join("recipe"), &recipe)?;
    // Renamed last: its presence marks the cache entry complete.
    fs::rename(&partial, &image)?;
    let _ = fs::remove_dir_all(&tree);
    Ok(image)
}

/// Everything that shapes the image; a change to any of it builds a new one.
fn recipe() -> String {
    format!("suite={SUITE}\nmirror={MIRROR}\npackages={}\noptions={}\n", PACKAGES.join(","), OPTIONS.join(" "))
}

/// Archives `tree` (symbolic links, devices and modes as they are) with `cpio -H newc`.
pub fn write_cpio(tree: &Path, out: &Path) -> Result<()> {
    let file = fs::File::create(out).with_context(|| format!("create {}", out.display()))?;
    let mut find =
        Command::new("find").arg(".").arg("-mindepth").arg("1").current_dir(tree).stdout(Stdio::piped()).spawn()?;
    let names = find.stdout.take().context("find stdout")?;
    let status = Command::new("cpio")
        .args(["-o", "-H", "newc", "--quiet"])
        .current_dir(tree)
        .stdin(names)
        .stdout(file)
        .status()
        .context("run cpio (run `cargo xtask setup`)")?;
    let found = find.wait()?;
    if !status.success() || !found.success() {
        bail!("archiving {} with cpio failed", tree.display());
    }
    Ok(())
}

/// FNV-1a: a cache key that stays the same across Rust releases (unlike `DefaultHasher`).
fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_key_follows_the_recipe() {
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_ne!(fnv1a(recipe().as_bytes()), fnv1a(b"suite=bookworm\n"));
        assert!(recipe().contains("systemd-sysv"));
    }
}
