//! Installs the build toolchain and the test clients on Debian 12, idempotently.
//!
//! The recipe is ../shared/TOOLCHAIN.md: Debian's rustc/cargo with a prebuilt `core` for
//! `bpfel-unknown-none`, Debian's LLVM 22, and bpf-linker built against that LLVM.

use std::{
    env,
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

use crate::{sys, workspace};

/// The BPF toolchain: Debian's rustc/cargo, `core` for the BPF target, and the LLVM bpf-linker uses.
const BUILD_PACKAGES: &[&str] = &["rustc-web", "cargo-web", "libstd-rust-web-dev-bpf", "llvm-22-dev"];
/// The clients the integration tests drive traffic with.
const TEST_PACKAGES: &[&str] = &[
    "iproute2",
    "curl",
    "iputils-ping",
    "python3",
    "dnsutils",
    "procps",
    // tests/podman.rs: a real container (runc: crun refuses a hybrid cgroup layout whose
    // cgroup2 side holds a controller) on a busybox root filesystem, no image download.
    "podman",
    "crun",
    "runc",
    "busybox-static",
    // tests/clients/uring_connect.c: connect and sendmsg through io_uring.
    "gcc",
    "liburing-dev",
    // `cargo xtask vm-test`: boots other kernels with software emulation, and builds the
    // systemd guest's Debian root file system (an initramfs archive).
    "qemu-system-x86",
    "mmdebstrap",
    "cpio",
    // `cargo xtask package` (run by `cargo xtask test`): the Debian package's checker.
    "lintian",
];
/// What `cargo xtask bench` compares against and measures with.
const BENCH_PACKAGES: &[&str] = &["nftables", "iptables", "ipset", "iperf3", "clang", "libbpf-dev", "linux-libc-dev"];

const BPF_LINKER: &str = "bpf-linker";
const BPF_LINKER_VERSION: &str = "0.13.0";
/// bpf-linker's `llvm-sys` finds `llvm-config` here.
const LLVM_BIN: &str = "/usr/lib/llvm-22/bin";
/// Where the daemon pins its maps and links.
const BPFFS: &str = "/sys/fs/bpf";

/// How much of the machine a task needs; each level includes the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    /// Build the daemon and its kernel programs.
    Build,
    /// Also run the integration tests and the demo: test clients and bpffs.
    Test,
    /// Also run the benchmarks.
    Bench,
}

/// How much to say when nothing needs doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verbosity {
    /// One line per step, always (`cargo xtask setup`).
    EveryStep,
    /// One line when everything is present, every step otherwise (before build, test, run).
    Summary,
}

/// What the later steps need to know about the installed toolchain.
#[derive(Debug)]
pub struct Toolchain {
    /// The bpf-linker of the right version; rustc finds it on `PATH`.
    bpf_linker: PathBuf,
}

impl Toolchain {
    /// `PATH` with the bpf-linker's directory first, so the kernel build picks the right one.
    pub fn path_env(&self) -> Result<OsString> {
        let current = env::var_os("PATH").unwrap_or_default();
        let mut dirs: Vec<PathBuf> = env::split_paths(&current).collect();
        if let Some(dir) = self.bpf_linker.parent() {
            if dirs.first().map(PathBuf::as_path) != Some(dir) {
                dirs.insert(0, dir.to_path_buf());
            }
        }
        env::join_paths(dirs).context("build PATH for the kernel build")
    }
}

/// `cargo xtask setup [--bench]`.
pub fn setup_command(bench: bool) -> Result<()> {
    sys::require_debian_x86_64()?;
    sys::require_root("`cargo xtask setup`")?;
    let scope = if bench { Scope::Bench } else { Scope::Test };
    ensure(scope, Verbosity::EveryStep)?;
    println!("setup complete");
    Ok(())
}

/// Checks the machine for `scope` and installs what is missing.
///
/// Root is only demanded when something has to be installed or mounted, so a build on a machine
/// that is already set up works as any user.
pub fn ensure(scope: Scope, verbosity: Verbosity) -> Result<Toolchain> {
    sys::require_debian_x86_64()?;
    let state = State::inspect(scope)?;

    if verbosity == Verbosity::Summary && state.is_complete() {
        let bpffs = if scope >= Scope::Test { ", bpffs mounted" } else { "" };
        println!("ok: setup complete ({} packages, {BPF_LINKER} {BPF_LINKER_VERSION}{bpffs})", state.present.len());
        return state.toolchain();
    }

    if state.needs_root() && !sys::is_root()? {
        bail!("the machine is not set up ({}); run `cargo xtask setup` as root first", state.describe_missing());
    }
    install_packages(&state)?;
    let bpf_linker = ensure_bpf_linker(state.bpf_linker)?;
    if let Some(mounted) = state.bpffs_mounted {
        ensure_bpffs(mounted)?;
    }
    Ok(Toolchain { bpf_linker })
}

/// What is there and what is not, found without changing anything.
#[derive(Debug)]
struct State {
    present: Vec<&'static str>,
    missing: Vec<&'static str>,
    bpf_linker: LinkerState,
    /// `None` when the scope does not need bpffs.
    bpffs_mounted: Option<bool>,
}

#[derive(Debug)]
enum LinkerState {
    Ready(PathBuf),
    WrongVersion { path: PathBuf, reported: String },
    Missing,
}

impl State {
    fn inspect(scope: Scope) -> Result<Self> {
        let mut packages: Vec<&'static str> = BUILD_PACKAGES.to_vec();
        if scope >= Scope::Test {
            packages.extend_from_slice(TEST_PACKAGES);
        }
        if scope >= Scope::Bench {
            packages.extend_from_slice(BENCH_PACKAGES);
        }
        let mut present = Vec::new();
        let mut missing = Vec::new();
        for package in packages {
            if is_installed(package)? {
                present.push(package);
            } else {
                missing.push(package);
            }
        }
        let bpffs_mounted = if scope >= Scope::Test { Some(sys::is_mounted(Path::new(BPFFS), "bpf")?) } else { None };
        Ok(Self { present, missing, bpf_linker: find_bpf_linker(), bpffs_mounted })
    }

    fn is_complete(&self) -> bool {
        self.missing.is_empty() && matches!(self.bpf_linker, LinkerState::Ready(_)) && self.bpffs_mounted != Some(false)
    }

    /// apt and mount need root; `cargo install` into ~/.cargo does not.
    fn needs_root(&self) -> bool {
        !self.missing.is_empty() || self.bpffs_mounted == Some(false)
    }

    fn describe_missing(&self) -> String {
        let mut parts = Vec::new();
        if !self.missing.is_empty() {
            parts.push(format!("missing packages: {}", self.missing.join(", ")));
        }
        if !matches!(self.bpf_linker, LinkerState::Ready(_)) {
            parts.push(format!("{BPF_LINKER} {BPF_LINKER_VERSION} is not installed"));
        }
        if self.bpffs_mounted == Some(false) {
            parts.push(format!("bpffs is not mounted at {BPFFS}"));
        }
        parts.join("; ")
    }

    fn toolchain(&self) -> Result<Toolchain> {
        match &self.bpf_linker {
            LinkerState::Ready(path) => Ok(Toolchain { bpf_linker: path.clone() }),
            _ => bail!("{BPF_LINKER} {BPF_LINKER_VERSION} is not installed"),
        }
    }
}

/// Whether dpkg reports `package` as installed.
fn is_installed(package: &str) -> Result<bool> {
    let output = Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .context("could not run dpkg-query")?;
    // dpkg-query exits non-zero for a package it has never heard of: that is "not installed".
    let status = String::from_utf8_lossy(&output.stdout);
    Ok(output.status.success() && status.split_whitespace().last() == Some("installed"))
}

fn install_packages(state: &State) -> Result<()> {
    for package in &state.present {
        println!("ok: {package} already installed");
    }
    if state.missing.is_empty() {
        return Ok(());
    }
    for package in &state.missing {
        println!("installing {package}");
    }
    println!("running apt-get update");
    sys::run(apt_get().arg("update"))?;
    sys::run(apt_get().args(["install", "-y", "-q"]).args(&state.missing))?;
    for package in &state.missing {
        if !is_installed(package)? {
            bail!("apt-get install finished but {package} is still not installed");
        }
    }
    Ok(())
}

fn apt_get() -> Command {
    let mut cmd = Command::new("apt-get");
    cmd.env("DEBIAN_FRONTEND", "noninteractive")
        // A fresh VM often runs unattended-upgrades right after boot: wait for its lock.
        .args(["-o", "DPkg::Lock::Timeout=300"]);
    cmd
}

/// Places to look for bpf-linker: `PATH`, then where `cargo install` puts binaries.
fn bpf_linker_candidates() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = env::var_os("PATH").map(|path| env::split_paths(&path).collect()).unwrap_or_default();
    if let Some(root) = env::var_os("CARGO_INSTALL_ROOT") {
        dirs.push(PathBuf::from(root).join("bin"));
    }
    if let Some(home) = env::var_os("CARGO_HOME") {
        dirs.push(PathBuf::from(home).join("bin"));
    }
    if let Some(home) = env::var_os("HOME") {
        dirs.push(PathBuf::from(home).join(".cargo").join("bin"));
    }
    let mut seen = Vec::new();
    for dir in dirs {
        let candidate = dir.join(BPF_LINKER);
        if candidate.is_file() && !seen.contains(&candidate) {
            seen.push(candidate);
        }
    }
    seen
}

/// The first bpf-linker of the right version, else the first one found at all.
fn find_bpf_linker() -> LinkerState {
    let mut first_wrong = None;
    for path in bpf_linker_candidates() {
        let reported = linker_version(&path);
        if reported.as_deref() == Some(BPF_LINKER_VERSION) {
            return LinkerState::Ready(path);
        }
        if first_wrong.is_none() {
            first_wrong =
                Some(LinkerState::WrongVersion { path, reported: reported.unwrap_or_else(|| "no version".to_owned()) });
        }
    }
    first_wrong.unwrap_or(LinkerState::Missing)
}

/// The version `bpf-linker --version` reports (`bpf-linker 0.13.0`), if it runs at all.
fn linker_version(path: &Path) -> Option<String> {
    let output = Command::new(path).arg("--version").output().ok()?;
    if !output.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&output.stdout);
    text.split_whitespace().nth(1).map(str::to_owned)
}

fn ensure_bpf_linker(state: LinkerState) -> Result<PathBuf> {
    match state {
        LinkerState::Ready(path) => {
            println!("ok: {BPF_LINKER} {BPF_LINKER_VERSION} already installed ({})", path.display());
            return Ok(path);
        }
        LinkerState::WrongVersion { path, reported } => {
            println!("installing {BPF_LINKER} {BPF_LINKER_VERSION} ({} reports {reported})", path.display());
        }
        LinkerState::Missing => println!("installing {BPF_LINKER} {BPF_LINKER_VERSION}"),
    }

    let path = env::var_os("PATH").unwrap_or_default();
    let path = env::join_paths(std::iter::once(PathBuf::from(LLVM_BIN)).chain(env::split_paths(&path)))
        .context("build PATH for cargo install")?;
    sys::run(
        workspace::cargo()
            .args(["install", BPF_LINKER, "--version", BPF_LINKER_VERSION])
            .args(["--locked", "--no-default-features", "--features", "llvm-22"])
            .env("PATH", path),
    )?;

    match find_bpf_linker() {
        LinkerState::Ready(path) => Ok(path),
        _ => bail!(
            "`cargo install {BPF_LINKER}` finished but no {BPF_LINKER} {BPF_LINKER_VERSION} was \
             found on PATH or in ~/.cargo/bin"
        ),
    }
}

fn ensure_bpffs(mounted: bool) -> Result<()> {
    if mounted {
        println!("ok: bpffs already mounted at {BPFFS}");
        return Ok(());
    }
    println!("mounting bpffs at {BPFFS}");
    sys::run(Command::new("mount").args(["-t", "bpf", "bpf", BPFFS]))
}
