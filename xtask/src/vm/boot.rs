//! Boots one kernel under QEMU (software emulation) and collects what the guest's suite prints.

use std::{
    collections::BTreeMap,
    fs,
    io::{BufRead, BufReader},
    path::Path,
    process::{Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};

/// The guest's verdict on one check, as printed on the console.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reported {
    Pass,
    Fail(String),
    Skip(String),
}

/// What one boot produced.
#[derive(Debug, Default)]
pub struct Run {
    pub checks: BTreeMap<String, Reported>,
    /// `INFO key value` lines: kernel release, active LSMs, the daemon's guard line.
    pub info: BTreeMap<String, String>,
    /// Whether the guest reached the end of its suite.
    pub done: bool,
    /// Why the run ended early (timeout, QEMU failure), if it did.
    pub problem: Option<String>,
    pub seconds: f64,
}

/// Boots `vmlinuz` with `initramfs` and `extra_arguments` on the kernel command line, writes
/// the whole console to `log`, and stops the guest after `timeout` if it has not powered off.
pub fn boot(vmlinuz: &Path, initramfs: &Path, extra_arguments: &str, log: &Path, timeout: Duration) -> Result<Run> {
    let started = Instant::now();
    let mut child = Command::new("qemu-system-x86_64")
        // /dev/kvm on these machines is a nested hypervisor stock kernels cannot use.
        .args(["-accel", "tcg", "-cpu", "max", "-m", "1024", "-smp", "1"])
        .args(["-nodefaults", "-display", "none", "-serial", "stdio", "-no-reboot"])
        .arg("-kernel")
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(initramfs)
        // `bpf` in the LSM list turns the BPF LSM on where the kernel is built with it but does
        // not enable it by default (5.10); panic=-1 turns a guest panic into a QEMU exit.
        // preempt=full (kernels with PREEMPT_DYNAMIC, 6.1 on; older ones ignore it) lets a
        // program run be preempted, so reloads are checked where only a real grace period is
        // safe before the old policies' entries go.
        .arg("-append")
        .arg(
            format!("console=ttyS0 quiet panic=-1 lsm=lockdown,capability,yama,bpf preempt=full {extra_arguments}")
                .trim_end(),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("could not start qemu-system-x86_64 (run `cargo xtask setup`)")?;

    let (tx, rx) = mpsc::channel::<String>();
    let stdout = child.stdout.take().context("qemu stdout")?;
    let stderr = child.stderr.take().context("qemu stderr")?;
    let err_tx = tx.clone();
    thread::spawn(move || {
        for line in BufReader::new(stdout).split(b'\n').map_while(Result::ok) {
            let line = String::from_utf8_lossy(&line).trim_end_matches('\r').to_owned();
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = err_tx.send(format!("qemu: {line}"));
        }
    });

    let mut run = Run::default();
    let mut console = String::new();
    let deadline = started + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                parse_line(&line, &mut run);
                console.push_str(&line);
                console.push('\n');
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                run.problem = Some(format!("no power-off within {} s", timeout.as_secs()));
                let _ = child.kill();
                break;
            }
        }
    }
    let status = child.wait().context("wait for qemu")?;
    run.seconds = started.elapsed().as_secs_f64();
    if run.problem.is_none() && !run.done {
        let why = console
            .lines()
            .find(|line| line.contains("Kernel panic"))
            .map_or_else(|| format!("qemu: {status}"), |line| line.trim().to_owned());
        run.problem = Some(format!("the guest stopped before the end of the suite ({why})"));
    }
    fs::write(log, console).with_context(|| format!("write {}", log.display()))?;
    Ok(run)
}

/// Reads one console line into `run`; everything else on the console (kernel messages) is ignored.
fn parse_line(line: &str, run: &mut Run) {
    // The kernel may print on the same line; the suite's words start the line.
    let mut words = line.splitn(4, ' ');
    match (words.next(), words.next(), words.next(), words.next()) {
        (Some("CHECK"), Some(name), Some(status), detail) => {
            let detail = detail.unwrap_or("").to_owned();
            let reported = match status {
                "PASS" => Reported::Pass,
                "SKIP" => Reported::Skip(detail),
                _ => Reported::Fail(detail),
            };
            run.checks.insert(name.to_owned(), reported);
        }
        (Some("INFO"), Some(key), value, rest) => {
            let value = [value, rest].into_iter().flatten().collect::<Vec<_>>().join(" ");
            run.info.insert(key.to_owned(), value);
        }
        (Some("DONE"), None, ..) => run.done = true,
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_suite_lines() {
        let mut run = Run::default();
        for line in [
            "[    1.2] random kernel message",
            "INFO kernel 6.1.0-50-cloud-amd64",
            "INFO guard AF_PACKET guard: on",
            "CHECK tcp PASS",
            "CHECK udp FAIL sendto-deny:want=EPERM,got=pass other:x",
            "CHECK af-packet SKIP BPF LSM not active",
            "DONE\r",
        ] {
            parse_line(line.trim_end_matches('\r'), &mut run);
        }
        assert!(run.done);
        assert_eq!(run.info["kernel"], "6.1.0-50-cloud-amd64");
        assert_eq!(run.info["guard"], "AF_PACKET guard: on");
        assert_eq!(run.checks["tcp"], Reported::Pass);
        assert_eq!(run.checks["udp"], Reported::Fail("sendto-deny:want=EPERM,got=pass other:x".into()));
        assert_eq!(run.checks["af-packet"], Reported::Skip("BPF LSM not active".into()));
    }
}
