//! `cargo xtask vm-test [KERNEL...]`: the functional suite on the kernels users run.
//!
//! Each kernel (a Debian cloud-flavour package, fetched once and cached) boots under QEMU with
//! software emulation and an initramfs holding the freshly built daemon, busybox, a small static
//! socket client (xtask/vm/vmclient.c) and the suite (xtask/vm/init.sh). The guest prints one
//! line per check on its serial console; the host turns them into a kernel x check table and
//! fails when a check fails on a kernel where it is expected to pass.
//!
//! One more guest boots a Debian root file system with systemd as PID 1 (rootfs.rs, service.rs)
//! and runs the README's "Run as a service" steps with `systemctl` (xtask/vm/service.sh).

mod boot;
mod initramfs;
mod kernels;
mod rootfs;
mod service;

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::Command,
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::{
    build, package,
    setup::{self, Scope, Verbosity},
    sys, workspace,
};
use boot::Reported;
use kernels::Kernel;

/// The kernels users run: Debian 11, Debian 12, Debian 13 and the newest stable series.
pub const DEFAULT_KERNELS: &[&str] = &["5.10", "6.1", "6.12", "6.18"];

/// The checks of xtask/vm/init.sh, in the order of the table.
const CHECKS: &[(&str, &str)] = &[
    (
        "refusal",
        "the daemon refuses a kernel without the ring buffer (masked by its test hook), naming it and Linux 5.8",
    ),
    ("load", "the daemon loads and attaches every program and reports ready"),
    ("tcp", "TCP connect: EPERM for denied IPv4/IPv6 destinations, allowed ones go through"),
    ("flow-opener", "connects that reuse a decision still open flow records naming the process"),
    ("udp", "UDP sendto and connect: EPERM when denied"),
    ("icmp", "ping sockets: EPERM when denied"),
    ("raw", "raw ICMP sockets: EPERM when denied (packet hook)"),
    ("v4-mapped", "TCP and UDP to ::ffff:a.b.c.d on IPv6 sockets judged by the IPv4 rules"),
    ("stateful", "a server in the cgroup answers TCP and UDP clients the policy denies; not others"),
    ("events", "blocked and reply events name the process (comm)"),
    ("reload", "`egress reload` of an edited file changes the verdicts"),
    ("restart", "SIGKILLed daemon: pinned programs keep enforcing; a new daemon adopts them"),
    ("af-packet", "AF_PACKET sockets refused in the cgroup by the BPF LSM (booted with lsm=...,bpf)"),
];

/// The kernel the systemd guest boots.
const SERVICE_KERNEL: &str = "6.18";

/// The steps of xtask/vm/service.sh, in the order of the table.
const SERVICE_CHECKS: &[(&str, &str)] = &[
    (
        "install",
        "the README's install lines run as written: `apt install` of the package (made on the host) \
         puts /usr/bin/egress, the unit, man pages and completions in place, enables and starts \
         nothing, and its policy file starts the service covering nothing",
    ),
    (
        "start",
        "`systemctl enable --now egress` returns once the policy is enforced (checked at once, no wait); \
         Type=notify",
    ),
    ("reload", "`systemctl reload egress`: unchanged file, then an edited file whose new verdicts apply"),
    (
        "reload-broken",
        "`systemctl reload egress` with a broken file fails; the previous policy stays enforced, the \
         service keeps running",
    ),
    ("status", "`egress status` answers and names the policy"),
    ("logs", "`egress logs -f --blocked` shows a connection blocked after it started, live"),
    ("journal", "`journalctl -u egress -p warning` holds that blocked flow, and no allowed ones"),
    (
        "restart",
        "`systemctl restart egress` while a client in the cgroup connects to a denied address back to \
         back: no connection gets through; a new main process",
    ),
    (
        "remove",
        "`apt-get remove egress` stops and disables the service and keeps the policy file; the \
         pinned enforcement stays; `apt-get purge` removes the policy file",
    ),
];

/// Checks that are known not to pass on a kernel series, and why. Each entry is a fact found by
/// this suite; a check listed here that passes is reported, so stale entries show up.
fn known_failure(series: &str, check: &str) -> Option<&'static str> {
    match (series, check) {
        ("5.10", "af-packet") => Some(
            "the 5.10 verifier refuses bpf_get_current_ancestor_cgroup_id in the BPF LSM program \
             (6.1 accepts it); the daemon starts with `AF_PACKET guard: off` and names the \
             missing helper",
        ),
        _ => None,
    }
}

/// Options of `cargo xtask vm-test`.
#[derive(Debug)]
pub struct Options {
    pub kernels: Vec<String>,
    pub jobs: Option<usize>,
    pub timeout: Duration,
    /// Rewrite the generated table in KERNELS.md.
    pub write_doc: bool,
    /// Also boot the systemd guest and run the README's service steps.
    pub service: bool,
    /// Boot only the systemd guest (no kernel matrix).
    pub service_only: bool,
}

/// `cargo xtask vm-test`.
pub fn vm_test_command(options: Options) -> Result<()> {
    let started = Instant::now();
    let kernels: Vec<String> = if options.service_only {
        Vec::new()
    } else if options.kernels.is_empty() {
        DEFAULT_KERNELS.iter().map(|k| (*k).to_owned()).collect()
    } else {
        options.kernels.clone()
    };
    for series in &kernels {
        kernels::validate_series(series)?;
    }
    let toolchain = setup::ensure(Scope::Test, Verbosity::Summary)?;
    let bin = build::build_daemon(&toolchain)?;

    let work = workspace::target_dir().join("vm");
    let logs = work.join("logs");
    fs::create_dir_all(&logs).with_context(|| format!("create {}", work.display()))?;
    let (image, vmclient) = build_initramfs(&work, &bin)?;

    let cache = kernels::cache_dir()?;
    let mut fetcher = kernels::Fetcher::new(cache.clone());
    let mut fetched = Vec::new();
    for series in &kernels {
        fetched.push(fetcher.ensure(series)?);
    }
    let mut guests = Vec::new();
    let service_kernel = if options.service {
        let kernel = fetcher.ensure(SERVICE_KERNEL)?;
        // First: it runs longest, so it overlaps the others.
        guests.push(Guest {
            name: format!("systemd-{}", kernel.series),
            release: kernel.release.clone(),
            vmlinuz: kernel.vmlinuz.clone(),
            initramfs: service::build_initramfs(&work, &cache, &package::package(&bin)?, &vmclient)?,
            arguments: service::kernel_arguments(),
        });
        Some(kernel)
    } else {
        None
    };
    for kernel in &fetched {
        guests.push(Guest {
            name: kernel.series.clone(),
            release: kernel.release.clone(),
            vmlinuz: kernel.vmlinuz.clone(),
            initramfs: image.clone(),
            arguments: String::new(),
        });
    }
    let prepared = started.elapsed();

    let jobs = options
        .jobs
        .unwrap_or_else(|| thread::available_parallelism().map_or(1, usize::from))
        .clamp(1, guests.len().max(1));
    println!(
        "vm: booting {} guest(s), {jobs} at a time, {} s limit each (logs in {})",
        guests.len(),
        options.timeout.as_secs(),
        logs.display()
    );
    let mut results = boot_all(&guests, &logs, options.timeout, jobs)?;
    let service_run = if service_kernel.is_some() { Some(results.remove(0)) } else { None };

    let matrix = Matrix::new(
        "kernel",
        CHECKS,
        fetched.iter().zip(results).map(|(kernel, run)| (kernel.series.clone(), kernel_label(kernel), run)).collect(),
    );
    // `--service-only` boots no kernel of the matrix: no empty table.
    let mut table = if fetched.is_empty() { String::new() } else { matrix.markdown() };
    let mut failures = matrix.failures();
    if let (Some(kernel), Some(run)) = (service_kernel, service_run) {
        let systemd = run.info.get("systemd").cloned().unwrap_or_else(|| "?".to_owned());
        let label = format!("{}, Debian 12 root fs, systemd `{systemd}` as PID 1", kernel_label(&kernel));
        let service = Matrix::new("guest", SERVICE_CHECKS, vec![("systemd".to_owned(), label, run)]);
        table.push_str(&format!(
            "\nThe README's \"Run as a service\" steps under systemd (`xtask/vm/service.sh`):\n\n{}",
            service.markdown()
        ));
        failures.extend(service.failures());
    }
    println!("\n{table}");
    println!(
        "vm: {:.0} s in all ({:.0} s building and fetching, {:.0} s booting)",
        started.elapsed().as_secs_f64(),
        prepared.as_secs_f64(),
        (started.elapsed() - prepared).as_secs_f64()
    );
    if options.write_doc {
        let doc = workspace::root().join("KERNELS.md");
        write_doc(&doc, &table, options.service)?;
        println!("vm: wrote the table into {}", doc.display());
    }
    if !failures.is_empty() {
        bail!("{} check(s) failed where expected to pass: {}", failures.len(), failures.join(", "));
    }
    Ok(())
}

/// Builds the guest: the daemon with its libraries, busybox, vmclient and the suite as /init.
/// Returns the image and the vmclient binary.
fn build_initramfs(work: &Path, daemon: &Path) -> Result<(PathBuf, PathBuf)> {
    let source = workspace::root().join("xtask").join("vm");
    let client = work.join("vmclient");
    sys::run(Command::new("cc").args(["-static", "-O2", "-Wall", "-o"]).arg(&client).arg(source.join("vmclient.c")))?;
    let mut image = initramfs::Image::default();
    for dir in ["/proc", "/sys", "/dev", "/tmp", "/run", "/etc"] {
        image.dir(dir);
    }
    image.executable("/init", &source.join("init.sh"))?;
    image.executable("/checks.sh", &source.join("checks.sh"))?;
    image.executable("/bin/busybox", Path::new("/bin/busybox"))?;
    image.executable("/bin/vmclient", &client)?;
    image.dynamic_executable("/bin/egress", daemon)?;
    let out = work.join("initramfs.cpio");
    image.write(&out)?;
    Ok((out, client))
}

/// The package version names the upstream release (5.10.262), which `uname -r` of Debian's 5.10
/// and 6.1 packages does not (5.10.0-46-cloud-amd64).
fn kernel_label(kernel: &Kernel) -> String {
    format!("{} (Debian `{}`)", kernel.series, kernel.version)
}

/// One guest to boot.
struct Guest {
    /// The log's name.
    name: String,
    /// The kernel's release, for the progress line.
    release: String,
    vmlinuz: PathBuf,
    initramfs: PathBuf,
    /// Added to the kernel command line.
    arguments: String,
}

/// Boots every guest, `jobs` at a time; the runs come back in the guests' order.
fn boot_all(guests: &[Guest], logs: &Path, timeout: Duration, jobs: usize) -> Result<Vec<boot::Run>> {
    let next = Arc::new(Mutex::new(0usize));
    let results: Arc<Mutex<BTreeMap<usize, Result<boot::Run>>>> = Arc::default();
    thread::scope(|scope| {
        for _ in 0..jobs {
            let next = next.clone();
            let results = results.clone();
            scope.spawn(move || loop {
                let index = {
                    let mut next = next.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    let index = *next;
                    *next += 1;
                    index
                };
                let Some(guest) = guests.get(index) else {
                    break;
                };
                let log = logs.join(format!("{}.log", guest.name));
                let run = boot::boot(&guest.vmlinuz, &guest.initramfs, &guest.arguments, &log, timeout);
                if let Ok(run) = &run {
                    println!(
                        "vm: {} ({}) done in {:.0} s{}",
                        guest.name,
                        guest.release,
                        run.seconds,
                        run.problem.as_deref().map(|p| format!(": {p}")).unwrap_or_default()
                    );
                }
                results.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(index, run);
            });
        }
    });
    let results = Arc::try_unwrap(results)
        .map_err(|_| anyhow::anyhow!("boot threads still hold the results"))?
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    results.into_values().collect()
}

/// One cell of the table.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Cell {
    Pass,
    Fail(String),
    /// Failed where a known failure is recorded.
    Known(&'static str, String),
    /// The guest skipped it (a kernel feature is off), with the reason.
    Skip(String),
    /// Passed where a known failure is recorded: the entry is stale.
    UnexpectedPass(&'static str),
    /// No line for it: the guest stopped before (see the log).
    NotRun(String),
}

struct Matrix {
    /// The first column's title.
    title: &'static str,
    checks: &'static [(&'static str, &'static str)],
    /// Series, label, cells, seconds.
    rows: Vec<(String, String, Vec<Cell>, f64)>,
}

impl Matrix {
    /// A table of `checks` with one row per (series, label, run).
    fn new(
        title: &'static str,
        checks: &'static [(&'static str, &'static str)],
        runs: Vec<(String, String, boot::Run)>,
    ) -> Self {
        let rows = runs
            .into_iter()
            .map(|(series, label, run)| {
                let cells = checks.iter().map(|(check, _)| cell(&series, check, &run)).collect();
                (series, label, cells, run.seconds)
            })
            .collect();
        Self { title, checks, rows }
    }

    fn failures(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (series, _, cells, _) in &self.rows {
            for ((check, _), cell) in self.checks.iter().zip(cells) {
                if matches!(cell, Cell::Fail(_) | Cell::NotRun(_)) {
                    out.push(format!("{check} on {series}"));
                }
            }
        }
        out
    }

    fn markdown(&self) -> String {
        let mut notes: Vec<String> = Vec::new();
        let mut note = |text: String| -> usize {
            if let Some(i) = notes.iter().position(|n| *n == text) {
                return i + 1;
            }
            notes.push(text);
            notes.len()
        };
        let mut out = format!("| {} |", self.title);
        for (check, _) in self.checks {
            out.push_str(&format!(" {check} |"));
        }
        out.push_str(" boot + suite |\n|---|");
        out.push_str(&"---|".repeat(self.checks.len() + 1));
        out.push('\n');
        for (_, label, cells, seconds) in &self.rows {
            out.push_str(&format!("| {label} |"));
            for ((check, _), cell) in self.checks.iter().zip(cells) {
                let text = match cell {
                    Cell::Pass => "pass".to_owned(),
                    Cell::Fail(detail) => {
                        format!("**FAIL** [{}]", note(format!("{check}: {detail}")))
                    }
                    Cell::Known(why, detail) => {
                        format!("known failure [{}]", note(format!("{check}: {why} (seen: {detail})")))
                    }
                    Cell::Skip(why) => format!("skip [{}]", note(format!("{check}: {why}"))),
                    Cell::UnexpectedPass(why) => {
                        format!("pass (listed as failing) [{}]", note(format!("{check}: {why}")))
                    }
                    Cell::NotRun(why) => format!("**not run** [{}]", note(why.clone())),
                };
                out.push_str(&format!(" {text} |"));
            }
            out.push_str(&format!(" {seconds:.0} s |\n"));
        }
        for (i, text) in notes.iter().enumerate() {
            out.push_str(&format!("\n[{}] {}\n", i + 1, text.replace('|', "\\|")));
        }
        out
    }
}

fn cell(series: &str, check: &str, run: &boot::Run) -> Cell {
    let known = known_failure(series, check);
    match (run.checks.get(check), known) {
        (Some(Reported::Pass), None) => Cell::Pass,
        (Some(Reported::Pass), Some(why)) => Cell::UnexpectedPass(why),
        (Some(Reported::Fail(detail)), Some(why)) => Cell::Known(why, detail.clone()),
        (Some(Reported::Fail(detail)), None) => Cell::Fail(detail.clone()),
        (Some(Reported::Skip(why)), _) => Cell::Skip(why.clone()),
        (None, Some(why)) => Cell::Known(why, "not run".to_owned()),
        (None, None) => Cell::NotRun(
            run.problem.clone().unwrap_or_else(|| "the suite stopped before this check (see its log)".to_owned()),
        ),
    }
}

const DOC_BEGIN: &str = "<!-- vm-test:begin (generated by `cargo xtask vm-test --write-doc`) -->";
const DOC_END: &str = "<!-- vm-test:end -->";

/// Replaces the generated part of KERNELS.md, keeping the text around it.
fn write_doc(path: &Path, table: &str, service: bool) -> Result<()> {
    let text = fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    let (Some(begin), Some(end)) = (text.find(DOC_BEGIN), text.find(DOC_END)) else {
        bail!("{} has no `{DOC_BEGIN}` ... `{DOC_END}` section", path.display());
    };
    let mut legend = String::from("\n| check | what it shows |\n|---|---|\n");
    for (check, what) in CHECKS {
        legend.push_str(&format!("| {check} | {what} |\n"));
    }
    if service {
        legend.push_str("\n| service step | what it shows |\n|---|---|\n");
        for (check, what) in SERVICE_CHECKS {
            legend.push_str(&format!("| {check} | {what} |\n"));
        }
    }
    let updated = format!("{}{DOC_BEGIN}\n{table}{legend}\n{}", &text[..begin], &text[end..]);
    fs::write(path, updated).with_context(|| format!("write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_check_is_a_failure_unless_known() {
        let run = boot::Run { problem: Some("no power-off within 300 s".into()), ..Default::default() };
        assert!(matches!(cell("6.1", "tcp", &run), Cell::NotRun(_)));
        let matrix = Matrix::new("kernel", CHECKS, vec![("6.1".into(), "6.1 (Debian `6.1.176-1`)".into(), run)]);
        assert_eq!(matrix.failures().len(), CHECKS.len());
        assert!(matrix.markdown().contains("no power-off within 300 s"));
    }
}
