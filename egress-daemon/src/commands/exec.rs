//! `egress exec`: run one command in a fresh cgroup under one policy.
//!
//! Enforcement must outlive every process of the command: signals that would end `exec` while
//! the command runs are forwarded to the command instead, whatever is left in the cgroup when the command ends (or
//! `exec` fails) is killed before the programs are detached, and a guard process keeps the
//! programs attached until the cgroup is empty even when `exec` is SIGKILLed.
//!
//! Those signals are taken over before `exec` makes anything: one that comes during start-up
//! ends it between two steps (the program load is abandoned at once), after what was made is
//! removed, with the status a shell gives a command killed by it.

use std::{io, os::unix::process::ExitStatusExt, path::PathBuf, process::ExitStatus, time::Duration};

use anyhow::{anyhow, Context};

use super::{
    exec_guard::Guard,
    exec_signals::{self, Forwarded, Interrupted},
};
use crate::{
    cgroup::{Cgroup, Hierarchy},
    engine::{Binding, Engine, Loaded},
    format::LogFormat,
    kernel::{self, Wanted},
    pipeline::{self, budget::OutputLimits},
    policy::{model::PolicySet, parse_policy_file},
    sinks::stdout::EventWriter,
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

/// Returns the command's exit status (128 + signal when it was killed, or when a signal ended
/// start-up before the command started).
pub async fn exec(args: ExecArgs) -> anyhow::Result<i32> {
    // First of all, so that no way out of start-up skips the cleanup: from here on the signals
    // wait in the signalfd. The runtime is current-thread, so no other thread exists yet; those
    // started later (the loader's) inherit the mask.
    let signals = Forwarded::install().context("taking over SIGINT, SIGTERM, SIGHUP and SIGQUIT")?;
    match start_and_run(&args, &signals).await {
        Err(error) => match error.downcast_ref::<Interrupted>() {
            Some(interrupted) => {
                tracing::info!("{interrupted}; nothing of exec is left behind");
                Ok(interrupted.status())
            }
            None => Err(error),
        },
        done => done,
    }
}

async fn start_and_run(args: &ExecArgs, signals: &Forwarded) -> anyhow::Result<i32> {
    let hierarchy = kernel::preflight()?;
    let set = one_policy(args)?;
    interrupted(signals)?;
    let cgroup =
        hierarchy.create(&format!("egress-exec-{}", std::process::id())).context("creating the transient cgroup")?;
    let result = exec_in(&hierarchy, &cgroup, set, args, signals).await;
    if let Err(error) = cgroup.kill_and_remove() {
        tracing::warn!(%error, "removing the transient cgroup");
    }
    result
}

/// The policy file with only the policy `exec` was asked for.
fn one_policy(args: &ExecArgs) -> anyhow::Result<PolicySet> {
    let mut set = parse_policy_file(&args.config)?;
    let index = set
        .policies
        .iter()
        .position(|p| p.name == args.policy)
        .ok_or_else(|| anyhow!("{}: no policy named {:?}", args.config.display(), args.policy))?;
    let policy = set.policies.swap_remove(index);
    set.policies = vec![policy];
    Ok(set)
}

/// Fails with [`Interrupted`] when a signal came in. Before the command exists every one counts,
/// the terminal's too: no command has received it.
fn interrupted(signals: &Forwarded) -> anyhow::Result<()> {
    match signals.pending().context("reading the signalfd")? {
        Some(number) => Err(Interrupted(number).into()),
        None => Ok(()),
    }
}

async fn exec_in(
    hierarchy: &Hierarchy,
    cgroup: &Cgroup,
    set: PolicySet,
    args: &ExecArgs,
    signals: &Forwarded,
) -> anyhow::Result<i32> {
    let names = set.policies.first().is_some_and(|p| !p.names.is_empty());
    // exec writes no flow records: the accounting programs would only add start-up time.
    let loaded = load(hierarchy, Wanted { dns: names, accounting: false }, signals).await?;
    let engine = loaded.engine;
    // The programs are exec's own: its proxy takes any free port, beside a running daemon's.
    let dns_settings = crate::settings::DnsSettings { listen_port: 0, ..set.settings.dns.clone() };
    let dns_maps = std::sync::Arc::new(std::sync::Mutex::new(loaded.dns_maps));
    let _dns = if names {
        let state = std::sync::Arc::new(crate::dns::DnsState::default());
        state.events.set(set.settings.events_per_second);
        engine.name_domains(state.clone());
        engine.watch_bindings(state.clone());
        Some(crate::dns::start(&dns_settings, state, dns_maps, engine.clone())?)
    } else {
        None
    };
    interrupted(signals)?;
    let limits = std::sync::Arc::new(OutputLimits::new(&set.settings));
    engine.apply(set, &args.config.display().to_string(), &[Binding { policy: 0, cgroup: cgroup.clone() }])?;
    engine.attach(cgroup)?;
    interrupted(signals)?;
    let writer = EventWriter::new(args.log_format, io::stderr());
    let events = pipeline::spawn(pipeline::Ends {
        events: loaded.events,
        drops: loaded.drops,
        catalog: engine.shared_catalog(),
        writer,
        history: None,
        limits,
    })
    .context("starting the event pipeline")?;
    // From here every way out goes through the guard's release below.
    let guard = match Guard::start(cgroup).context("starting the guard process") {
        Ok(guard) => guard,
        Err(error) => {
            events.stop().await?;
            return Err(error);
        }
    };

    let status = run_command(cgroup, &args.command, signals).await;
    // Before the programs go: nothing of the command may outlive its filter.
    empty(cgroup).await;
    guard.release().await;
    // Let events raised by the last system calls reach the ring buffer reader.
    tokio::time::sleep(Duration::from_millis(50)).await;
    events.stop().await?;
    let status = status?;
    Ok(status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0)))
}

/// Loads the programs on a thread of its own, so that a signal ends start-up at once rather
/// than after the verifier is done (most of a second). Abandoned, the load ends with the
/// process: nothing is attached or pinned before it returns.
async fn load(hierarchy: &Hierarchy, wanted: Wanted, signals: &Forwarded) -> anyhow::Result<Loaded> {
    let (done, loaded) = tokio::sync::oneshot::channel();
    let hierarchy = hierarchy.clone();
    std::thread::Builder::new()
        .name("egress-load".to_owned())
        .spawn(move || drop(done.send(Engine::load(None, &hierarchy, wanted))))
        .context("starting the loader thread")?;
    tokio::select! {
        loaded = loaded => loaded.context("the loader thread ended without a result")?,
        signal = signals.any() => Err(Interrupted(signal.context("reading the signalfd")?).into()),
    }
}

/// Starts the command and waits for it, passing on the signals that would end `exec`.
async fn run_command(cgroup: &Cgroup, command: &[String], signals: &Forwarded) -> anyhow::Result<ExitStatus> {
    // The last moment a signal can come in that the command would never get.
    interrupted(signals)?;
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
