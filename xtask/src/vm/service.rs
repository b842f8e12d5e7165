//! The systemd guest: the cached Debian root file system (rootfs.rs) plus an overlay holding a
//! user's view of the checkout (`/src`: the Debian package `cargo xtask package` made, `config/`,
//! the README's service steps) and the suite (xtask/vm/service.sh) as a unit systemd starts at
//! boot. The guest installs the package as the README says and tests what it installed.

use std::{
    fs,
    io::Write,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};

use super::rootfs;
use crate::workspace;

/// The README section whose shell block the guest runs.
const SECTION: &str = "## Run as a service";
/// The unit that runs the suite; named on the kernel command line (`systemd.wants=`).
const UNIT: &str = "egress-vm-service.service";
/// Units that wait for hardware a guest without udev never announces, or need kernel modules.
const MASKED: &[&str] = &["serial-getty@ttyS0.service", "getty.target", "systemd-modules-load.service"];

/// What the kernel command line adds for this guest: systemd as PID 1 from the initramfs, no
/// status lines between the suite's, and the suite's unit.
pub fn kernel_arguments() -> String {
    format!("rdinit=/lib/systemd/systemd systemd.show_status=0 systemd.wants={UNIT}")
}

/// The shell block of the README's service section, as the user would paste it.
pub fn readme_steps(readme: &str) -> Result<String> {
    let Some(start) = readme.lines().position(|line| line.trim_end() == SECTION) else {
        bail!("README.md has no `{SECTION}` section");
    };
    let mut lines = readme.lines().skip(start + 1).take_while(|line| !line.starts_with("## "));
    if !lines.any(|line| line.trim_end() == "```sh") {
        bail!("README.md's `{SECTION}` section has no ```sh block");
    }
    let mut block = String::new();
    for line in lines {
        if line.trim_end() == "```" {
            return Ok(block);
        }
        block.push_str(line);
        block.push('\n');
    }
    bail!("README.md's `{SECTION}` shell block is not closed")
}

/// Builds the guest's initramfs: the cached root file system followed by the overlay (the
/// kernel unpacks concatenated archives in order).
pub fn build_initramfs(work: &Path, cache: &Path, deb: &Path, vmclient: &Path) -> Result<PathBuf> {
    let base = rootfs::ensure(cache)?;
    let root = workspace::root();
    let overlay = work.join("service-overlay");
    let _ = fs::remove_dir_all(&overlay);

    let src = overlay.join("src");
    // Where `cargo xtask package` leaves it in a checkout (the README installs it from there).
    copy(deb, &src.join("target/package").join(deb.file_name().context("package file name")?), 0o644)?;
    for entry in fs::read_dir(root.join("config")).context("read config/")? {
        let path = entry?.path();
        if path.is_file() {
            copy(&path, &src.join("config").join(path.file_name().context("file name")?), 0o644)?;
        }
    }
    let readme = fs::read_to_string(root.join("README.md")).context("read README.md")?;
    fs::write(src.join("readme-steps.sh"), readme_steps(&readme)?)?;

    let vm = root.join("xtask").join("vm");
    copy(&vm.join("service.sh"), &overlay.join("usr/local/sbin/egress-vm-service"), 0o755)?;
    copy(&vm.join("checks.sh"), &overlay.join("usr/local/lib/egress-vm/checks.sh"), 0o644)?;
    copy(vmclient, &overlay.join("usr/local/bin/vmclient"), 0o755)?;
    let units = overlay.join("etc/systemd/system");
    copy(&vm.join(UNIT), &units.join(UNIT), 0o644)?;
    for unit in MASKED {
        symlink("/dev/null", units.join(unit)).with_context(|| format!("mask {unit}"))?;
    }

    let overlay_cpio = work.join("service-overlay.cpio");
    rootfs::write_cpio(&overlay, &overlay_cpio)?;
    let out = work.join("service-initramfs.cpio");
    let mut image = fs::File::create(&out).with_context(|| format!("create {}", out.display()))?;
    for part in [&base, &overlay_cpio] {
        image.write_all(&fs::read(part).with_context(|| format!("read {}", part.display()))?)?;
    }
    Ok(out)
}

fn copy(from: &Path, to: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(parent) = to.parent() {
        fs::create_dir_all(parent).with_context(|| format!("create {}", parent.display()))?;
    }
    fs::copy(from, to).with_context(|| format!("copy {} to {}", from.display(), to.display()))?;
    fs::set_permissions(to, fs::Permissions::from_mode(mode))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_service_block() {
        let readme = "# x\n```sh\nnot this\n```\n## Run as a service\n\ntext\n```sh\na\n# b\nc\n```\nmore\n## Next\n";
        assert_eq!(readme_steps(readme).unwrap(), "a\n# b\nc\n");
        assert!(readme_steps("## Run as a service\nno block\n## Next\n```sh\nx\n```\n").is_err());
    }

    #[test]
    fn the_readme_has_runnable_service_steps() {
        let readme = fs::read_to_string(workspace::root().join("README.md")).unwrap();
        let steps = readme_steps(&readme).unwrap();
        assert!(steps.contains("systemctl"), "{steps}");
    }
}
