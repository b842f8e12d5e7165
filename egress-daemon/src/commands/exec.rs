//! `egress exec`: run one command in a fresh cgroup under one policy.
//!
//! Enforcement must outlive every process of the command: signals that would end `exec` while
//! the command runs are forwarded to the command instead, whatever is left in the cgroup when the command ends (or
//! `exec` fails) is killed before the programs are detached, and a guard process keeps the
//! programs attached until the cgroup is empty even when `exec` is SIGKILLed.

use std::{io, os::unix::process::ExitStatusExt, path::PathBuf, process::ExitStatus, time::Duration};

use anyhow::{anyhow, Context};

use super::{
    exec_guard::Guard,
    exec_signals::{self, Forwarded},
};
use crate::{
    cgroup::{Cgroup, Hierarchy},
    engine::{Binding, Engine},
    kernel,
    output::{EventWriter, LogFormat},
    pipeline,
    policy::parse_policy_file,
};

pub struct ExecArgs {
    pub config: PathBuf,
    pub policy: String,
    pub log_format: LogFormat,
    pub command: Vec<String>,
}

/// How long `exec` keeps killing what is left in the cgroup before giving up on it (the guard
/// keeps waiting).
const EMPTY_WAIT: Duration = Duration::from_secs(10);

/// Returns the command's exit status (128 + signal when it was killed).
pub async fn exec(args: ExecArgs) -> anyhow::Result<i32> {
    let hierarchy = kernel::preflight()?;
    let mut set = parse_policy_file(&args.config)?;
    let index = set
        .policies
        .iter()
        .position(|p| p.name == args.policy)
        .ok_or_else(|| anyhow!("{}: no policy named {:?}", args.config.display(), args.policy))?;
    let policy = set.policies.swap_remove(index);
    set.policies = vec![policy];

    let cgroup =
        hierarchy.create(&format!("egress-exec-{}", std::process::id())).context("creating the transient cgroup")?;
    let result = exec_in(&hierarchy, &cgroup, set, &args).await;
    if let Err(error) = cgroup.kill_and_remove() {
        tracing::warn!(%error, "removing the transient cgroup");
    }
    result
}

async fn exec_in(
    hierarchy: &Hierarchy,
    cgroup: &Cgroup,
    set: crate::policy::model::PolicySet,
    args: &ExecArgs,
) -> anyhow::Result<i32> {
    let loaded = Engine::load(None, hierarchy)?;
    let engine = loaded.engine;
    // The programs are exec's own: its proxy takes any free port, beside a running daemon's.
    let dns_settings = crate::policy::DnsSettings { listen_port: 0, ..set.settings.dns.clone() };
    let dns_maps = std::sync::Arc::new(std::sync::Mutex::new(loaded.dns_maps));
    let _dns = if set.policies.first().is_some_and(|p| !p.names.is_empty()) {
        let state = std::sync::Arc::new(crate::dns::DnsState::default());
        state.events.set(set.settings.events_per_second);
        engine.name_domains(state.clone());
        engine.watch_bindings(state.clone());
        Some(crate::dns::start(&dns_settings, state, dns_maps, engine.clone())?)
    } else {
        None
    };
    engine.apply(set, &args.config.display().to_string(), &[Binding { policy: 0, cgroup: cgroup.clone() }])?;
    engine.attach(cgroup)?;
    let guard = Guard::start(cgroup).context("starting the guard process")?;

    // Before any thread starts: a thread inherits the signal mask it is created with, and one
    // that left these signals unblocked would let them end exec while the command runs.
    let signals = Forwarded::install().context("taking over SIGINT, SIGTERM, SIGHUP and SIGQUIT")?;
    let writer = EventWriter::new(args.log_format, io::stderr());
    let events = pipeline::spawn(pipeline::Ends {
        events: loaded.events,
        drops: loaded.drops,
        catalog: engine.shared_catalog(),
        writer,
        history: None,
    })
    .context("starting the event pipeline")?;

    let status = run_command(cgroup, &args.command, &signals).await;
    // Before the programs go: nothing of the command may outlive its filter.
    empty(cgroup).await;
    guard.release().await;
    // Let events raised by the last system calls reach the ring buffer reader.
    tokio::time::sleep(Duration::from_millis(50)).await;
    events.stop().await?;
    let status = status?;
    Ok(status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0)))
}

/// Starts the command and waits for it, passing on the signals that would end `exec`.
async fn run_command(cgroup: &Cgroup, command: &[String], signals: &Forwarded) -> anyhow::Result<ExitStatus> {
    let mut child = spawn_in_cgroup(cgroup, command).with_context(|| format!("starting {}", command.join(" ")))?;
    let pid = child.id().and_then(|pid| libc::pid_t::try_from(pid).ok());
    loop {
        tokio::select! {
            status = child.wait() => return Ok(status?),
            number = signals.next() => {
                if let (Ok(number), Some(pid)) = (number, pid) {
                    // SAFETY: signalling our own child, which is not reaped while we wait on it.
                    unsafe { libc::kill(pid, number) };
                }
            }
        }
    }
}

/// Kills everything left in the cgroup and waits until it is empty (or gives up on stuck
/// processes after a while: the guard keeps the programs attached until they are gone).
async fn empty(cgroup: &Cgroup) {
    let deadline = tokio::time::Instant::now() + EMPTY_WAIT;
    loop {
        match cgroup.populated() {
            Ok(false) => return,
            Ok(true) => {}
            Err(error) => {
                tracing::warn!(%error, "checking that the command's processes are gone");
                return;
            }
        }
        if let Err(error) = cgroup.kill_all() {
            tracing::warn!(%error, "killing the command's remaining processes");
        }
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!("processes of the command are still in {} after SIGKILL", cgroup.relative);
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn spawn_in_cgroup(cgroup: &Cgroup, command: &[String]) -> io::Result<tokio::process::Child> {
    let (program, args) =
        command.split_first().ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no command given"))?;
    let procs = std::ffi::CString::new(cgroup.dir.join("cgroup.procs").as_os_str().as_encoded_bytes())
        .map_err(io::Error::other)?;
    // SAFETY: getpid has no preconditions.
    let exec_pid = unsafe { libc::getpid() };
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args);
    // SAFETY: only async-signal-safe calls (sigprocmask, prctl, getppid, open, write, close)
    // between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            exec_signals::unblock_in_child()?;
            // Should exec die without a word (SIGKILL), the command dies with it; the guard
            // kills the rest of the cgroup.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::getppid() != exec_pid {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            // Writing "0" moves the writing process itself.
            let written = libc::write(fd, b"0".as_ptr().cast(), 1);
            libc::close(fd);
            if written != 1 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn()
}
