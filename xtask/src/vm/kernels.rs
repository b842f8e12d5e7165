//! Debian kernel images for the VM suite: found in Debian's archives, downloaded once, cached.
//!
//! apt runs under a private `APT_CONFIG` (its own sources list, lists and cache under the cache
//! directory), so the machine's own apt state is never touched. Only the `vmlinuz` is kept: the
//! cloud flavour builds in everything the suite needs (serial console, cgroup BPF, BPF LSM).

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

use crate::sys;

/// The archives that carry the kernel series the suite knows (see KERNELS.md).
const SOURCES: &str = "\
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian-security bullseye-security main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm-backports main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian-security bookworm-security main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie-backports main
";

/// A kernel ready to boot.
#[derive(Debug, Clone)]
pub struct Kernel {
    /// What was asked for: `6.1`.
    pub series: String,
    /// The release the package installs: `6.1.0-50-cloud-amd64`.
    pub release: String,
    /// The Debian package version: `6.1.176-1`.
    pub version: String,
    pub vmlinuz: PathBuf,
}

/// Where kernels (and the private apt state) are cached: `$EGRESS_VM_CACHE`, else
/// `~/.cache/egress-vm`, so fresh clones on the same machine (CI) reuse them.
pub fn cache_dir() -> Result<PathBuf> {
    if let Some(dir) = env::var_os("EGRESS_VM_CACHE").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    let base = match env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env::var_os("HOME").context("neither EGRESS_VM_CACHE nor HOME is set")?).join(".cache"),
    };
    Ok(base.join("egress-vm"))
}

/// Checks that `series` looks like `6.1` (major.minor), the form the package search needs.
pub fn validate_series(series: &str) -> Result<()> {
    let parts: Vec<&str> = series.split('.').collect();
    if parts.len() != 2 || parts.iter().any(|p| p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit())) {
        bail!("kernel `{series}` is not a major.minor series such as 6.1");
    }
    Ok(())
}

/// Finds kernels in the cache, fetching the missing ones (apt's lists are updated once per run,
/// and only when something is missing, so a warm cache works offline).
pub struct Fetcher {
    cache: PathBuf,
    apt: Option<PrivateApt>,
}

impl Fetcher {
    pub fn new(cache: PathBuf) -> Self {
        Self { cache, apt: None }
    }

    /// The cached kernel of `series`, fetching it first when it is not cached.
    pub fn ensure(&mut self, series: &str) -> Result<Kernel> {
        validate_series(series)?;
        let dir = self.cache.join("kernels").join(series);
        if let Some(kernel) = cached(&dir, series) {
            return Ok(kernel);
        }
        let apt = match self.apt.take() {
            Some(apt) => apt,
            None => PrivateApt::prepare(&self.cache.join("apt"))?,
        };
        let result = fetch(&apt, &self.cache, &dir, series);
        self.apt = Some(apt);
        result
    }
}

fn cached(dir: &Path, series: &str) -> Option<Kernel> {
    let meta = fs::read_to_string(dir.join("package")).ok()?;
    let (release, version) = meta.trim().split_once(' ')?;
    let vmlinuz = dir.join("vmlinuz");
    vmlinuz.is_file().then(|| Kernel {
        series: series.to_owned(),
        release: release.to_owned(),
        version: version.to_owned(),
        vmlinuz,
    })
}

fn fetch(apt: &PrivateApt, cache: &Path, dir: &Path, series: &str) -> Result<Kernel> {
    let package = apt.newest_cloud_image(series)?;
    let release = package.strip_prefix("linux-image-").context("unexpected package name")?.to_owned();
    println!("vm: fetching {package}");

    let work = cache.join("download").join(series);
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work).with_context(|| format!("create {}", work.display()))?;
    sys::run(apt.command("apt-get").arg("download").arg(&package).current_dir(&work))?;
    let deb = only_deb(&work)?;
    let version = deb_version(&deb)?;
    let tree = work.join("tree");
    sys::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tree))?;
    let image = tree.join("boot").join(format!("vmlinuz-{release}"));
    if !image.is_file() {
        bail!("{} has no boot/vmlinuz-{release}", deb.display());
    }

    fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let vmlinuz = dir.join("vmlinuz");
    fs::copy(&image, &vmlinuz).with_context(|| format!("copy {}", image.display()))?;
    let config = tree.join("boot").join(format!("config-{release}"));
    // The kernel's build configuration explains differences between kernels; keep it beside.
    let _ = fs::copy(&config, dir.join("config"));
    // Written last: its presence marks the cache entry complete.
    fs::write(dir.join("package"), format!("{release} {version}\n"))?;
    let _ = fs::remove_dir_all(&work);
    Ok(Kernel { series: series.to_owned(), release, version, vmlinuz })
}

fn only_deb(dir: &Path) -> Result<PathBuf> {
    fs::read_dir(dir)?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .find(|path| path.extension().is_some_and(|ext| ext == "deb"))
        .with_context(|| format!("apt-get download left no .deb in {}", dir.display()))
}

fn deb_version(deb: &Path) -> Result<String> {
    let output = Command::new("dpkg-deb").args(["-f"]).arg(deb).arg("Version").output().context("run dpkg-deb -f")?;
    if !output.status.success() {
        bail!("dpkg-deb -f {} Version failed", deb.display());
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// apt with its own configuration, sources and state under one directory.
struct PrivateApt {
    config: PathBuf,
}

impl PrivateApt {
    fn prepare(root: &Path) -> Result<Self> {
        for sub in ["lists/partial", "cache/archives/partial", "state", "etc/parts"] {
            fs::create_dir_all(root.join(sub)).with_context(|| format!("create {}", root.join(sub).display()))?;
        }
        fs::write(root.join("etc/sources.list"), SOURCES)?;
        let status = root.join("state/status");
        if !status.exists() {
            fs::write(&status, "")?;
        }
        let r = root.display();
        let config = root.join("etc/apt.conf");
        fs::write(
            &config,
            format!(
                "Dir::Etc::SourceList \"{r}/etc/sources.list\";\n\
                 Dir::Etc::SourceParts \"{r}/etc/parts\";\n\
                 Dir::Etc::Preferences \"{r}/etc/preferences\";\n\
                 Dir::Etc::PreferencesParts \"{r}/etc/parts\";\n\
                 Dir::State \"{r}/state\";\n\
                 Dir::State::Lists \"{r}/lists\";\n\
                 Dir::State::status \"{r}/state/status\";\n\
                 Dir::Cache \"{r}/cache\";\n\
                 APT::Architecture \"amd64\";\n\
                 APT::Architectures \"amd64\";\n\
                 APT::Sandbox::User \"root\";\n\
                 Acquire::Languages \"none\";\n"
            ),
        )?;
        let apt = Self { config };
        println!("vm: apt-get update (private state under {r})");
        sys::run(apt.command("apt-get").args(["update", "-q"]))?;
        Ok(apt)
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.env("APT_CONFIG", &self.config);
        cmd
    }

    /// The newest `linux-image-<series>...-cloud-amd64` the archives carry.
    fn newest_cloud_image(&self, series: &str) -> Result<String> {
        let pattern = format!("^linux-image-{}[.-].*-cloud-amd64$", series.replace('.', "\\."));
        let output = self
            .command("apt-cache")
            .args(["search", "--names-only", &pattern])
            .output()
            .context("run apt-cache search")?;
        if !output.status.success() {
            bail!("apt-cache search {pattern} failed");
        }
        let text = String::from_utf8_lossy(&output.stdout);
        let mut names: Vec<&str> = text.lines().filter_map(|l| l.split_whitespace().next()).collect();
        names.sort_by_key(|name| version_key(name));
        names.last().map(|name| (*name).to_owned()).with_context(|| {
            format!(
                "no cloud kernel package for Linux {series} in Debian's archives (bullseye-security, \
                     bookworm, trixie and their backports carry 5.10, 6.1, 6.12 and 6.16 and later)"
            )
        })
    }
}

/// Sort key for package names: runs of digits compare as numbers (`6.1.0-50` after `6.1.0-9`).
fn version_key(name: &str) -> Vec<(u64, String)> {
    let mut key = Vec::new();
    let mut rest = name;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits > 0 {
            key.push((rest[..digits].parse().unwrap_or(u64::MAX), String::new()));
            rest = &rest[digits..];
        } else {
            let text = rest.bytes().take_while(|b| !b.is_ascii_digit()).count();
            key.push((0, rest[..text].to_owned()));
            rest = &rest[text..];
        }
    }
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_package_sorts_numerically() {
        let mut names =
            ["linux-image-6.1.0-9-cloud-amd64", "linux-image-6.1.0-50-cloud-amd64", "linux-image-6.1.0-10-cloud-amd64"];
        names.sort_by_key(|name| version_key(name));
        assert_eq!(names.last(), Some(&"linux-image-6.1.0-50-cloud-amd64"));
    }

    #[test]
    fn series_must_be_major_minor() {
        assert!(validate_series("6.12").is_ok());
        assert!(validate_series("6").is_err());
        assert!(validate_series("6.1.2").is_err());
        assert!(validate_series("6.x").is_err());
    }
}
