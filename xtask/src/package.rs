//! `cargo xtask package`: the Debian package `target/package/egress_VERSION_ARCH.deb`, built
//! with `dpkg-deb` from a staged tree, then checked with lintian.
//!
//! Why `dpkg-deb` and not cargo-deb: it is part of dpkg, on every Debian machine, so CI builds
//! nothing more from crates.io; the maintainer scripts, the conffile list and every path are
//! written out here and in `packaging/debian/`, where a reader sees exactly what the package
//! does on install (it enables nothing) instead of a tool's defaults.

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, ensure, Context, Result};

use crate::{
    build,
    setup::{self, Scope, Verbosity},
    sys, workspace,
};

/// The package name, also the binary's.
const NAME: &str = "egress";
/// The file the package installs as a conffile: it covers nothing until edited.
const CONFFILE: &str = "/etc/egress/egress.yaml";
/// What the binary's `NEEDED` libraries come from. An unknown one fails the build: its
/// dependency must be written down here first.
const LIBRARIES: &[(&str, &str)] = &[
    ("libc.so.6", "libc6"),
    ("libm.so.6", "libc6"),
    ("libpthread.so.0", "libc6"),
    ("libdl.so.2", "libc6"),
    ("librt.so.1", "libc6"),
    ("ld-linux-x86-64.so.2", "libc6"),
    ("libgcc_s.so.1", "libgcc-s1"),
];

/// `cargo xtask package`.
pub fn package_command() -> Result<()> {
    let toolchain = setup::ensure(Scope::Build, Verbosity::Summary)?;
    let bin = build::build_daemon(&toolchain)?;
    let deb = package(&bin)?;
    lintian(&deb)?;
    Ok(())
}

/// Stages the tree, writes the control files and builds the `.deb`; returns its path.
pub fn package(bin: &Path) -> Result<PathBuf> {
    let root = workspace::root();
    let packaging = root.join("packaging");
    let version = package_version()?;
    let arch = architecture()?;
    let out_dir = workspace::target_dir().join("package");
    let tree = out_dir.join("tree");
    let _ = fs::remove_dir_all(&tree);
    fs::create_dir_all(&tree).with_context(|| format!("create {}", tree.display()))?;

    let usr_bin = tree.join("usr/bin/egress");
    install(bin, &usr_bin, 0o755)?;
    // What dh_strip does: the symbols are of no use to users (the programs are data, untouched).
    sys::run(
        Command::new("strip")
            .args(["--remove-section=.comment", "--remove-section=.note", "--strip-unneeded"])
            .arg(&usr_bin),
    )?;
    install(&root.join("config/egress.service"), &tree.join("lib/systemd/system/egress.service"), 0o644)?;
    install(&packaging.join("egress.yaml"), &tree.join(CONFFILE.trim_start_matches('/')), 0o644)?;

    let doc = tree.join("usr/share/doc/egress");
    install(&packaging.join("debian/copyright"), &doc.join("copyright"), 0o644)?;
    install_gz(&packaging.join("debian/changelog"), &doc.join("changelog.Debian.gz"))?;
    install_gz(&root.join("README.md"), &doc.join("README.md.gz"))?;
    // The reference pages the README links to, beside it as in the checkout.
    for entry in fs::read_dir(root.join("docs")).context("read docs/")? {
        let page = entry?.path();
        if page.extension().is_some_and(|extension| extension == "md") {
            let name = page.file_name().context("docs page name")?.to_string_lossy().into_owned();
            install_gz(&page, &doc.join("docs").join(format!("{name}.gz")))?;
        }
    }
    install(&workspace::demo_config(), &doc.join("examples/egress.yaml"), 0o644)?;
    install(&packaging.join("debian/lintian-overrides"), &tree.join("usr/share/lintian/overrides/egress"), 0o644)?;

    // Completions and man pages come from the binary's own CLI definition (hidden commands).
    for (shell, path) in [
        ("bash", "usr/share/bash-completion/completions/egress"),
        ("zsh", "usr/share/zsh/vendor-completions/_egress"),
        ("fish", "usr/share/fish/vendor_completions.d/egress.fish"),
    ] {
        let out = Command::new(bin).args(["completions", shell]).output().context("run egress completions")?;
        ensure!(out.status.success(), "`egress completions {shell}` failed: {}", String::from_utf8_lossy(&out.stderr));
        write(&tree.join(path), &out.stdout, 0o644)?;
    }
    let man = tree.join("usr/share/man/man1");
    sys::run(Command::new(bin).arg("manpages").arg(&man))?;
    for entry in fs::read_dir(&man)? {
        let page = entry?.path();
        fs::set_permissions(&page, fs::Permissions::from_mode(0o644))?;
        sys::run(Command::new("gzip").arg("-9n").arg(&page))?;
    }

    let depends = depends(bin)?;
    let minimum = minimum_linux(bin)?;
    let control = tree.join("DEBIAN");
    fs::create_dir_all(&control)?;
    let installed_kib = installed_size(&tree)?;
    write(
        &control.join("control"),
        control_file(&version, &arch, &depends, &minimum, installed_kib).as_bytes(),
        0o644,
    )?;
    write(&control.join("conffiles"), format!("{CONFFILE}\n").as_bytes(), 0o644)?;
    write(&control.join("md5sums"), &md5sums(&tree)?, 0o644)?;
    for script in ["postinst", "prerm", "postrm"] {
        install(&packaging.join("debian").join(script), &control.join(script), 0o755)?;
    }

    let deb = out_dir.join(format!("{NAME}_{version}_{arch}.deb"));
    sys::run(Command::new("dpkg-deb").args(["--root-owner-group", "-Zxz", "--build"]).arg(&tree).arg(&deb))?;
    let size = fs::metadata(&deb)?.len();
    println!("packaged {} ({} KiB; Depends: {depends})", deb.display(), size / 1024);
    Ok(deb)
}

/// Runs lintian on the package: errors fail, warnings are shown.
pub fn lintian(deb: &Path) -> Result<()> {
    if Command::new("lintian").arg("--version").output().is_err() {
        bail!("lintian is missing: `cargo xtask setup` installs it");
    }
    sys::run(Command::new("lintian").args(["--fail-on", "error", "--tag-display-limit", "0"]).arg(deb))
        .context("lintian found errors in the package")
}

/// The Kubernetes schema checker, from PyPI (it bundles the schemas: no cluster, no download at
/// check time), at the version whose schemas the manifests are checked against.
const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.37.0";

/// Checks packaging/kubernetes/*.yaml against the Kubernetes schemas, strictly (unknown fields
/// are errors). Installs the checker with pip first when it is missing.
pub fn validate_manifests() -> Result<()> {
    let version = Command::new("python3").args(["-m", "kubernetes_validate", "--version"]).output();
    let wanted = KUBERNETES_VALIDATE.rsplit_once("==").map_or("", |(_, v)| v);
    if !version.is_ok_and(|out| out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == wanted) {
        sys::run(Command::new("python3").args(["-m", "pip", "install", "--quiet", KUBERNETES_VALIDATE]))
            .context("installing the Kubernetes schema checker")?;
    }
    let dir = workspace::root().join("packaging/kubernetes");
    let mut manifests: Vec<PathBuf> = fs::read_dir(&dir)
        .with_context(|| format!("read {}", dir.display()))?
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "yaml"))
        .collect();
    manifests.sort();
    ensure!(!manifests.is_empty(), "no manifests in {}", dir.display());
    sys::run(Command::new("python3").args(["-m", "kubernetes_validate", "--strict"]).args(&manifests))
        .context("the Kubernetes manifests do not validate")
}

/// The package's version: the top entry of packaging/debian/changelog, whose upstream part must
/// be the workspace's version (Cargo.toml stays the one home of the release number).
fn package_version() -> Result<String> {
    let path = workspace::root().join("packaging/debian/changelog");
    let text = fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
    let version =
        changelog_version(&text).with_context(|| format!("{}: no `egress (VERSION)` first line", path.display()))?;
    let upstream = version.rsplit_once('-').map_or(version.as_str(), |(upstream, _)| upstream);
    ensure!(
        upstream == env!("CARGO_PKG_VERSION"),
        "{}: version {version} is not of the workspace's release {}: add a changelog entry",
        path.display(),
        env!("CARGO_PKG_VERSION")
    );
    Ok(version)
}

fn changelog_version(text: &str) -> Option<String> {
    let first = text.lines().next()?;
    let rest = first.strip_prefix(NAME)?.trim_start().strip_prefix('(')?;
    Some(rest.split_once(')')?.0.to_owned())
}

fn architecture() -> Result<String> {
    let out = Command::new("dpkg").arg("--print-architecture").output().context("run dpkg --print-architecture")?;
    ensure!(out.status.success(), "dpkg --print-architecture failed");
    Ok(String::from_utf8(out.stdout)?.trim().to_owned())
}

/// `Depends:` from the binary's dynamic section: each `NEEDED` library's package, versioned by
/// the highest symbol version the binary asks of it (`GLIBC_2.34` -> `libc6 (>= 2.34)`).
fn depends(bin: &Path) -> Result<String> {
    let headers = objdump(bin, "-p")?;
    let symbols = objdump(bin, "-T")?;
    let mut packages: Vec<&str> = Vec::new();
    for line in headers.lines() {
        let Some(library) = line.trim().strip_prefix("NEEDED") else { continue };
        let library = library.trim();
        let Some((_, package)) = LIBRARIES.iter().find(|(name, _)| *name == library) else {
            bail!("{} needs {library}, whose package xtask/src/package.rs does not know", bin.display());
        };
        if !packages.contains(package) {
            packages.push(package);
        }
    }
    let floors = packages
        .iter()
        .map(|package| {
            let prefix = if *package == "libc6" { "GLIBC_" } else { "GCC_" };
            match highest_symbol_version(&symbols, prefix) {
                Some(floor) => format!("{package} (>= {floor})"),
                None => (*package).to_owned(),
            }
        })
        .collect::<Vec<_>>();
    Ok(floors.join(", "))
}

fn objdump(bin: &Path, flag: &str) -> Result<String> {
    let out = Command::new("objdump").arg(flag).arg(bin).output().context("run objdump (binutils)")?;
    ensure!(out.status.success(), "objdump {flag} {} failed", bin.display());
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The highest `PREFIXx.y[.z]` version named in `objdump -T` output.
fn highest_symbol_version(symbols: &str, prefix: &str) -> Option<String> {
    symbols
        .split(|c: char| c.is_whitespace() || c == '(' || c == ')')
        .filter_map(|word| word.strip_prefix(prefix))
        .filter_map(|version| {
            let parts = version.split('.').map(str::parse::<u32>).collect::<Result<Vec<_>, _>>().ok()?;
            Some((parts, version.to_owned()))
        })
        .max_by(|a, b| a.0.cmp(&b.0))
        .map(|(_, version)| version)
}

/// The oldest Linux the embedded programs run on, as `egress --version` names it (the daemon's
/// preflight is the one home of that fact).
fn minimum_linux(bin: &Path) -> Result<String> {
    let out = Command::new(bin).arg("--version").output().context("run egress --version")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let minimum =
        text.split_once("Linux ").and_then(|(_, rest)| rest.split_once(" or later")).map(|(v, _)| v.to_owned());
    minimum.with_context(|| format!("`egress --version` names no minimum Linux: {text}"))
}

fn control_file(version: &str, arch: &str, depends: &str, minimum: &str, installed_kib: u64) -> String {
    format!(
        "Package: {NAME}
Version: {version}
Architecture: {arch}
Maintainer: egress maintainers <maintainers@users.noreply.h-seed-5120b7d3.example>
Installed-Size: {installed_kib}
Depends: {depends}
Section: net
Priority: optional
Description: per-cgroup egress filtering on eBPF
 Kernel programs attached to cgroup v2 decide, for every connection or
 datagram a workload sends, whether its destination (CIDR or domain name,
 protocol, ports) is allowed. A small daemon loads the policies from YAML,
 keeps them in the kernel maps, answers the workloads' DNS for name rules,
 and streams an event per new flow naming the process that tried it.
 Needs Linux {minimum} or later with cgroup v2.
 .
 Installing enables nothing: edit /etc/egress/egress.yaml, then run
 `systemctl enable --now egress`.
"
    )
}

/// `DEBIAN/md5sums` as dh_md5sums writes it: every file but the conffiles (dpkg keeps theirs).
fn md5sums(tree: &Path) -> Result<Vec<u8>> {
    let mut files = Vec::new();
    collect_files(tree, tree, &mut files)?;
    files.retain(|file| !file.starts_with("DEBIAN") && Path::new("/").join(file) != Path::new(CONFFILE));
    files.sort();
    let out = Command::new("md5sum").args(&files).current_dir(tree).output().context("run md5sum")?;
    ensure!(out.status.success(), "md5sum failed: {}", String::from_utf8_lossy(&out.stderr));
    Ok(out.stdout)
}

fn collect_files(root: &Path, dir: &Path, files: &mut Vec<PathBuf>) -> Result<()> {
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            collect_files(root, &path, files)?;
        } else {
            files.push(path.strip_prefix(root)?.to_path_buf());
        }
    }
    Ok(())
}

/// `Installed-Size`: KiB of the files, as dpkg-gencontrol counts them (one KiB per started KiB).
fn installed_size(tree: &Path) -> Result<u64> {
    let mut total = 0;
    for entry in fs::read_dir(tree)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        if meta.is_dir() {
            total += installed_size(&entry.path())?;
        } else {
            total += meta.len().div_ceil(1024);
        }
    }
    Ok(total)
}

fn install(from: &Path, to: &Path, mode: u32) -> Result<()> {
    let bytes = fs::read(from).with_context(|| format!("read {}", from.display()))?;
    write(to, &bytes, mode)
}

/// gzip -9n, as Debian policy asks of documentation (no name or time stamp inside).
fn install_gz(from: &Path, to: &Path) -> Result<()> {
    let plain = to.with_extension("");
    install(from, &plain, 0o644)?;
    sys::run(Command::new("gzip").arg("-9nf").arg(&plain))
}

fn write(to: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    if let Some(parent) = to.parent() {
        fs::create_dir_all(parent).with_context(|| format!("create {}", parent.display()))?;
    }
    fs::write(to, bytes).with_context(|| format!("write {}", to.display()))?;
    fs::set_permissions(to, fs::Permissions::from_mode(mode))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_changelog_version() {
        assert_eq!(changelog_version("egress (0.1.0-1) unstable; urgency=medium\n").as_deref(), Some("0.1.0-1"));
        assert_eq!(changelog_version("other (1) unstable\n"), None);
        assert!(package_version().unwrap().starts_with(env!("CARGO_PKG_VERSION")));
    }

    #[test]
    fn finds_the_glibc_floor() {
        let symbols = "0 DF *UND* 0 (GLIBC_2.2.5) memcpy\n0 DF *UND* 0 (GLIBC_2.34) __libc_start_main\n\
                       0 DF *UND* 0 (GLIBC_2.9) pipe2\n0 DF *UND* 0 GCC_4.2.0 _Unwind_Resume\n";
        assert_eq!(highest_symbol_version(symbols, "GLIBC_").as_deref(), Some("2.34"));
        assert_eq!(highest_symbol_version(symbols, "GCC_").as_deref(), Some("4.2.0"));
        assert_eq!(highest_symbol_version("", "GLIBC_"), None);
    }
}
