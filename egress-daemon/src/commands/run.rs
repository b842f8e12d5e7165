//! `egress run`: the daemon in the foreground.

use std::{io, path::PathBuf};

use anyhow::Context;
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::watch,
};

use super::{load_policies, Failure};
use crate::{
    cgroup::Hierarchy,
    engine::{Binding, Engine},
    events::Catalog,
    loader::Enforcer,
    output::{EventWriter, LogFormat},
    pipeline, preflight,
};

pub struct RunArgs {
    pub config: PathBuf,
    pub log_format: LogFormat,
}

pub async fn run(args: RunArgs) -> Result<(), Failure> {
    let hierarchy = preflight::check()?;
    // Fail on a bad file before touching the kernel.
    load_policies(&args.config)?;
    let mut enforcer = Enforcer::load().context("loading the kernel programs")?;
    let ring = enforcer.take_events()?;
    let engine = Engine::new(enforcer, Catalog::new(hierarchy.clone()));
    apply(&engine, &hierarchy, &args.config)?;

    let (stop_tx, stop_rx) = watch::channel(false);
    let writer = EventWriter::new(args.log_format, io::stdout());
    let events = tokio::spawn(pipeline::pump(ring, engine.clone(), writer, stop_rx));

    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut hangup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
            _ = hangup.recv() => {
                if let Err(failure) = apply(&engine, &hierarchy, &args.config) {
                    tracing::error!("reload failed, the previous policies stay in force: {:#}", failure.error);
                }
            }
        }
    }
    tracing::info!("stopping; enforcement is removed with the daemon");
    let _ = stop_tx.send(true);
    events.await.context("event pipeline")??;
    Ok(())
}

/// Loads the policy file and puts it in force, all or nothing.
fn apply(engine: &Engine, hierarchy: &Hierarchy, config: &std::path::Path) -> Result<(), Failure> {
    let set = load_policies(config)?;
    let mut bindings = Vec::new();
    for (index, policy) in set.policies.iter().enumerate() {
        let cgroup = hierarchy
            .open(&policy.cgroup)
            .with_context(|| format!("policy {}", policy.name))?;
        bindings.push(Binding { policy: index, cgroup });
    }
    for enforced in engine.apply(&set, &bindings)? {
        tracing::info!(policy = %enforced.policy, cgroup = %enforced.cgroup, "enforcing");
    }
    tracing::info!(policies = set.policies.len(), config = %config.display(), "all policies enforced");
    Ok(())
}
