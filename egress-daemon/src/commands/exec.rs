//! `egress exec`: run one command in a fresh cgroup under one policy.

use std::{io, os::unix::process::ExitStatusExt, path::PathBuf, time::Duration};

use anyhow::{anyhow, Context};

use super::{load_policies, Failure};
use crate::{
    cgroup::{Cgroup, Hierarchy},
    engine::{Binding, Engine},
    events::Catalog,
    loader::Enforcer,
    output::{EventWriter, LogFormat},
    pipeline, preflight,
};

pub struct ExecArgs {
    pub config: PathBuf,
    pub policy: String,
    pub log_format: LogFormat,
    pub command: Vec<String>,
}

/// Returns the command's exit status (128 + signal when it was killed).
pub async fn exec(args: ExecArgs) -> Result<i32, Failure> {
    let hierarchy = preflight::check()?;
    let mut set = load_policies(&args.config)?;
    let index = set
        .policies
        .iter()
        .position(|p| p.name == args.policy)
        .ok_or_else(|| anyhow!("{}: no policy named {:?}", args.config.display(), args.policy))?;
    let policy = set.policies.swap_remove(index);
    set.policies = vec![policy];

    let cgroup = hierarchy
        .create(&format!("egress-exec-{}", std::process::id()))
        .context("creating the transient cgroup")?;
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
) -> Result<i32, Failure> {
    let (mut enforcer, _) = Enforcer::load(None).context("loading the kernel programs")?;
    let ring = enforcer.take_events()?;
    let engine = Engine::new(enforcer, Catalog::new(hierarchy.clone()));
    engine.apply(set, &args.config.display().to_string(), &[Binding { policy: 0, cgroup: cgroup.clone() }])?;
    engine.attach(cgroup)?;

    let writer = EventWriter::new(args.log_format, io::stderr());
    let events = pipeline::spawn(ring, engine.clone(), writer, None).context("starting the event pipeline")?;

    let status = spawn_in_cgroup(cgroup, &args.command)
        .with_context(|| format!("starting {}", args.command.join(" ")))?
        .wait()
        .await?;
    // Let events raised by the last system calls reach the ring buffer reader.
    tokio::time::sleep(Duration::from_millis(50)).await;
    events.stop().await?;
    Ok(status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0)))
}

fn spawn_in_cgroup(cgroup: &Cgroup, command: &[String]) -> io::Result<tokio::process::Child> {
    let (program, args) = command
        .split_first()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no command given"))?;
    let procs = std::ffi::CString::new(cgroup.dir.join("cgroup.procs").as_os_str().as_encoded_bytes())
        .map_err(io::Error::other)?;
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args);
    // SAFETY: only async-signal-safe calls (open, write, close) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
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
