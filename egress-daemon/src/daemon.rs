//! `egress run`: the long-running daemon. Ties together the engine (policies in the kernel),
//! discovery (cgroups coming and going), the event pipeline, the control socket and metrics.

use std::{
    collections::HashMap,
    io,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, MutexGuard,
    },
    thread::{self, JoinHandle},
};

use anyhow::Context;
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::mpsc::UnboundedReceiver,
};

use crate::{
    cgroup::{Cgroup, Hierarchy},
    control::{
        self,
        protocol::{CgroupStatus, FlowTotal, IgnoredStatus, MapFill, PolicyStatus, StatusReport, UnbindableStatus},
        ReloadError,
    },
    discovery::{self, Change, ContainerNames},
    engine::{BindOutcome, Binding, Engine},
    flows::{self, store::FlowLog},
    format::LogFormat,
    kernel::{self, DropCounter, OnExit, SocketGuard, Start},
    matching::{self, IgnoredMatches, Match},
    metrics,
    pipeline::{self, budget::OutputLimits},
    policy::{model::PolicySet, parse_policy_file},
    printable::{escaped, timestamp},
    service,
    sinks::{history::EventHistory, stdout::EventWriter},
};

pub struct RunArgs {
    pub config: PathBuf,
    pub log_format: LogFormat,
    pub on_exit: OnExit,
}

/// Everything the daemon's parts share.
#[derive(Clone)]
pub struct Daemon {
    pub engine: Engine,
    pub hierarchy: Hierarchy,
    pub config: PathBuf,
    pub history: Arc<EventHistory>,
    /// Flow records, for `egress logs --flows`, `egress top` and the metrics.
    pub flows: Arc<FlowLog>,
    pub drops: DropCounter,
    /// What the event output may write per second, as the policy file in force says.
    limits: Arc<OutputLimits>,
    names: Arc<Mutex<ContainerNames>>,
    /// Selector matches that do not count (see `matching`), for status.
    ignored: Arc<Mutex<IgnoredMatches>>,
    attach: String,
    /// Held by whatever changes which cgroups are bound (a reload, a cgroup coming or going), off
    /// the runtime: a reload's scan and the binding of a cgroup found meanwhile must not interleave.
    /// Taken before `names`, which is taken before the engine's locks.
    changing: Arc<Mutex<()>>,
    /// The kernel's DNS maps, and the DNS proxy once a policy has name rules.
    dns_maps: Arc<Mutex<crate::kernel::DnsMaps>>,
    /// What the DNS proxy learned (names seen, addresses), shared with events and status.
    dns: Arc<crate::dns::DnsState>,
    dns_service: Arc<Mutex<Option<crate::dns::DnsService>>>,
    /// Cgroups the watcher could not watch (out of inotify watches), for status.
    unwatched: Arc<std::sync::atomic::AtomicUsize>,
}

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let hierarchy = kernel::preflight()?;
    let set = parse_policy_file(&args.config)?;
    let parsed = started.elapsed();
    let settings = set.settings.clone();
    kernel::ensure_bpffs(&settings.pin_dir)?;
    let attach_point =
        hierarchy.open(&settings.attach).with_context(|| format!("settings.attach: cgroup {:?}", settings.attach))?;

    let loaded = Engine::load(Some(&settings.pin_dir), &hierarchy, kernel::Wanted::ALL)?;
    let verified = started.elapsed();
    if loaded.start == Start::Adopted {
        tracing::info!(pins = %settings.pin_dir.display(), "adopting the enforcement an earlier daemon left in place");
    }
    log_socket_guard(loaded.engine.state().enforcer.socket_guard());
    let dns_maps = Arc::new(Mutex::new(loaded.dns_maps));
    let dns_state = Arc::new(crate::dns::DnsState::default());
    loaded.engine.name_domains(dns_state.clone());
    loaded.engine.watch_bindings(dns_state.clone());
    // Watch before the first scan, so a cgroup created in between is not missed.
    let (changes, watcher) = discovery::spawn_watcher(hierarchy.mount().to_path_buf(), settings.attach.clone())
        .context("watching the cgroup tree")?;
    let daemon = Daemon {
        unwatched: watcher.unwatched(),
        engine: loaded.engine,
        drops: loaded.drops.clone(),
        limits: Arc::new(OutputLimits::new(&settings)),
        hierarchy: hierarchy.clone(),
        config: args.config.clone(),
        history: Arc::new(EventHistory::new(settings.history)),
        flows: Arc::new(FlowLog::new(settings.history, settings.flow_interval)),
        names: Arc::new(Mutex::new(ContainerNames::default())),
        ignored: Arc::new(Mutex::new(IgnoredMatches::default())),
        attach: settings.attach.clone(),
        changing: Arc::new(Mutex::new(())),
        dns_maps,
        dns: dns_state,
        dns_service: Arc::new(Mutex::new(None)),
    };

    let first = daemon.clone();
    tokio::task::spawn_blocking(move || {
        let _changing = first.changing();
        first.apply(set)
    })
    .await
    .context("applying the policies")??;
    let applied = started.elapsed();
    // Policies are in the maps before the programs see any traffic.
    daemon.engine.attach(&attach_point)?;
    let attached = started.elapsed();

    let control_server =
        control::server::serve(&settings.control_socket, settings.control_group.clone(), Arc::new(daemon.clone()))
            .await
            .context("starting the control socket")?;
    let _metrics = match settings.metrics {
        Some(address) => {
            let snapshot = daemon.clone();
            let snapshot: metrics::Snapshot = Arc::new(move || control::server::ControlHandler::status(&snapshot));
            Some(metrics::serve(address, snapshot).await.context("starting the metrics listener")?)
        }
        None => None,
    };
    // Ready before the event path starts: whatever waits in the ring (an earlier daemon's backlog,
    // a flood's events) cannot hold readiness up. Said once the control socket answers too:
    // scripts and tests wait for this line.
    service::notify_ready();
    tracing::info!(config = %args.config.display(), attach = %attach_point.relative, "all policies enforced");
    // Where start-up time goes (the benchmark reads this line): reading the file, verifying the
    // programs, matching cgroups and filling the maps, attaching.
    tracing::info!(
        read_ms = parsed.as_millis(),
        verify_ms = (verified - parsed).as_millis(),
        install_ms = (applied - verified).as_millis(),
        attach_ms = (attached - applied).as_millis(),
        total_ms = started.elapsed().as_millis(),
        "start-up"
    );

    let writer = EventWriter::new(args.log_format, io::stdout()).with_journal_priorities(service::under_journal());
    let events = pipeline::spawn(pipeline::Ends {
        events: loaded.events,
        drops: loaded.drops,
        catalog: daemon.engine.shared_catalog(),
        writer,
        history: Some(daemon.history.clone()),
        limits: daemon.limits.clone(),
    })
    .context("starting the event pipeline")?;
    let flow_sweeper = flows::spawn(loaded.flows, daemon.engine.shared_catalog(), daemon.flows.clone())
        .context("starting the flow record sweeper")?;
    let cgroups = CgroupFollower::spawn(daemon.clone(), changes).context("starting the cgroup follower")?;

    let result = daemon.serve_until_stopped().await;
    service::notify_stopping();
    cgroups.stop(watcher).await;
    let drained = events.stop().await;
    flow_sweeper.stop().await;
    drop(control_server);
    if args.on_exit == OnExit::Keep {
        tracing::info!("stopping; enforcement stays in place (--on-exit keep)");
    } else {
        tracing::info!("stopping; removing enforcement (--on-exit detach)");
    }
    let last = daemon.clone();
    // A reload still running (from the control socket) finishes first.
    tokio::task::spawn_blocking(move || {
        let _changing = last.changing();
        last.engine.state().enforcer.shut_down(args.on_exit);
    })
    .await
    .context("shutting down")?;
    result.and(drained)
}

/// Applies the cgroups the watcher reports, one at a time and in order, on a thread of its own:
/// matching a container's cgroup may run the container runtimes' CLIs, and a binding waits for
/// a reload in progress.
struct CgroupFollower {
    stopping: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

impl CgroupFollower {
    fn spawn(daemon: Daemon, mut changes: UnboundedReceiver<Change>) -> io::Result<Self> {
        let stopping = Arc::new(AtomicBool::new(false));
        let stopped = stopping.clone();
        let thread = thread::Builder::new().name("egress-cgroups".into()).spawn(move || {
            while let Some(change) = changes.blocking_recv() {
                daemon.on_change(change);
            }
            if !stopped.load(Ordering::Acquire) {
                tracing::error!("the cgroup watcher stopped; new cgroups are no longer discovered");
            }
        })?;
        Ok(Self { stopping, thread })
    }

    /// Stops the watcher, which ends the follower once it has applied what was reported.
    async fn stop(self, watcher: discovery::WatchHandle) {
        self.stopping.store(true, Ordering::Release);
        drop(watcher);
        let thread = self.thread;
        if tokio::task::spawn_blocking(move || thread.join()).await.map_or(true, |joined| joined.is_err()) {
            tracing::error!("the cgroup follower panicked");
        }
    }
}

/// Says at start whether non-IP sockets are refused to covered cgroups on this kernel.
fn log_socket_guard(guard: &SocketGuard) {
    match guard {
        SocketGuard::On => tracing::info!("AF_PACKET guard: {}", guard.describe()),
        SocketGuard::Off(_) => tracing::warn!("AF_PACKET guard: {}", guard.describe()),
    }
}

impl Daemon {
    async fn serve_until_stopped(&self) -> anyhow::Result<()> {
        let mut terminate = signal(SignalKind::terminate())?;
        let mut interrupt = signal(SignalKind::interrupt())?;
        let mut hangup = signal(SignalKind::hangup())?;
        let mut renewal = tokio::time::interval(crate::engine::DECISION_RENEWAL);
        renewal.tick().await;
        loop {
            tokio::select! {
                _ = renewal.tick() => {
                    let engine = self.engine.clone();
                    tokio::task::spawn_blocking(move || engine.renew_decisions());
                }
                _ = terminate.recv() => return Ok(()),
                _ = interrupt.recv() => return Ok(()),
                _ = hangup.recv() => {
                    let daemon = self.clone();
                    tokio::task::spawn_blocking(move || {
                        if let Err(message) = daemon.reload() {
                            tracing::error!("reload failed, the previous policies stay in force: {message}");
                        }
                    });
                }
            }
        }
    }

    /// Reloads the policy file; on any error the running policies stay in force. Blocks (parse,
    /// scan, the runtimes' CLIs, map writes): call it off the runtime.
    pub fn reload(&self) -> Result<String, ReloadError> {
        let _changing = self.changing();
        service::notify_reloading();
        let result = parse_policy_file(&self.config).map_err(ReloadError::File).and_then(|set| {
            if set.settings.attach != self.attach {
                tracing::warn!("settings.attach changed; it takes effect when the daemon restarts");
            }
            let count = set.policies.len();
            self.apply(set).map_err(ReloadError::Apply)?;
            Ok(format!("{count} policies enforced from {}", self.config.display()))
        });
        match &result {
            Ok(summary) => tracing::info!("reloaded: {summary}"),
            Err(message) => tracing::error!("reload rejected: {message}"),
        }
        metrics::count_reload(result.is_ok());
        service::notify_ready();
        result
    }

    /// Starts the DNS proxy (and kernel steering) once a policy has name rules; with none,
    /// steering an earlier daemon left on is turned off.
    fn ensure_dns(&self, set: &PolicySet) -> anyhow::Result<()> {
        let wanted = set.policies.iter().any(|p| !p.names.is_empty());
        let mut service = self.dns_service.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match (&*service, wanted) {
            (Some(running), true) if running.port != set.settings.dns.listen_port => {
                tracing::warn!("settings.dns.listen_port changed; it takes effect when the daemon restarts");
            }
            (Some(_), _) => {}
            (None, true) => {
                let started =
                    crate::dns::start(&set.settings.dns, self.dns.clone(), self.dns_maps.clone(), self.engine.clone())?;
                *service = Some(started);
            }
            (None, false) => {
                let mut maps = self.dns_maps.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                maps.set_proxy_port(0).context("turning DNS steering off")?;
            }
        }
        Ok(())
    }

    /// Matches every existing cgroup below the attach point and puts `set` in force. Blocks (a walk
    /// of the tree, the runtimes' CLIs): call it off the runtime, holding `changing`.
    fn apply(&self, set: PolicySet) -> anyhow::Result<()> {
        let found = discovery::scan(self.hierarchy.mount(), &self.attach).context("scanning the cgroup tree")?;
        let names = self.refreshed_names(&found);
        let mut bindings = Vec::new();
        let mut ignored = IgnoredMatches::default();
        for f in &found {
            let matched = self.policy_for(&set, f, &names);
            ignored.add(&set, &f.relative, &matched);
            if let Some(policy) = matched.policy {
                bindings.push(Binding { policy, cgroup: f.clone() });
            }
        }
        drop(names);
        let (bindings, quarantined) = self.within_shares(bindings);
        // Before the switch, which would otherwise bind them to their policies for a moment.
        for (root, reason) in &quarantined {
            self.engine.refuse(root, reason)?;
        }
        self.flows.set_interval(set.settings.flow_interval);
        self.dns.events.set(set.settings.events_per_second);
        self.ensure_dns(&set)?;
        for policy in &set.policies {
            let count = bindings.iter().filter(|b| set.policies[b.policy].name == policy.name).count();
            let untrusted = ignored.iter().filter(|i| i.policy == policy.name).count();
            let (name, selector) = (escaped(&policy.name), escaped(&policy.selector.to_string()).into_owned());
            if count == 0 && untrusted > 0 {
                tracing::warn!(policy = %name, selector = %selector, ignored = untrusted, "no cgroup matches yet where root made it; it applies as soon as one appears");
            } else if count == 0 {
                tracing::warn!(policy = %name, selector = %selector, "no cgroup matches yet; it applies as soon as one appears");
            } else {
                tracing::info!(policy = %name, selector = %selector, cgroups = count, "enforcing");
            }
        }
        let settings = set.settings.clone();
        self.engine.apply(set, &self.config.display().to_string(), &bindings)?;
        self.engine.set_refused(&quarantined)?;
        self.limits.set(&settings);
        self.ignored().replace_with(ignored);
        // Parsing a large file leaves freed heap behind; hand it back to the system.
        // SAFETY: malloc_trim only releases free memory at the top of glibc's heaps.
        unsafe { libc::malloc_trim(0) };
        Ok(())
    }

    /// Keeps each delegated subtree to its share of bindings: a subtree over it keeps its first
    /// cgroups bound (by path) and its root is refused (returned, with why), covering the rest.
    fn within_shares(&self, bindings: Vec<Binding>) -> (Vec<Binding>, Vec<(Cgroup, String)>) {
        let mut per_root: HashMap<String, usize> = HashMap::new();
        let mut over: Vec<String> = Vec::new();
        let mut kept = Vec::with_capacity(bindings.len());
        let mut roots = matching::DelegationRoots::new(self.hierarchy.mount());
        let mut sorted = bindings;
        sorted.sort_by(|a, b| a.cgroup.relative.cmp(&b.cgroup.relative));
        for binding in sorted {
            if let Some(root) = roots.of(&binding.cgroup.relative) {
                let count = per_root.entry(root.clone()).or_default();
                if *count >= matching::MAX_BINDINGS_PER_DELEGATED_SUBTREE {
                    if !over.contains(&root) {
                        over.push(root);
                    }
                    continue;
                }
                *count += 1;
            }
            kept.push(binding);
        }
        let roots: Vec<(Cgroup, String)> =
            over.iter().filter_map(|root| self.hierarchy.open(root).ok()).map(|c| (c, quarantine_reason())).collect();
        let root_ids: Vec<u64> = roots.iter().map(|(c, _)| c.id).collect();
        kept.retain(|b| !root_ids.contains(&b.cgroup.id));
        (kept, roots)
    }

    /// Binds a cgroup that appeared, unbinds one that went. Blocks: call it off the runtime.
    fn on_change(&self, change: Change) {
        let _changing = self.changing();
        match change {
            Change::Added(found) => {
                // The runtimes' CLIs run before the engine's lock is taken, never under it.
                let names = self.refreshed_names(std::slice::from_ref(&found));
                let policy = {
                    let state = self.engine.state();
                    let Some(active) = &state.active else { return };
                    let matched = self.policy_for(&active.set, &found, &names);
                    if !matched.ignored.is_empty() {
                        let mut ignored = self.ignored();
                        let mut next = ignored.clone();
                        next.add(&active.set, &found.relative, &matched);
                        ignored.replace_with(next);
                    }
                    matched.policy
                };
                drop(names);
                if let Some(policy) = policy {
                    if let Some(root) = self.over_share(&found.relative) {
                        self.quarantine(&root);
                        return;
                    }
                    let binding = Binding { policy, cgroup: found.clone() };
                    match self.engine.bind(&binding) {
                        Ok(BindOutcome::Bound) => {
                            tracing::info!(cgroup = %escaped(&found.relative), "new cgroup bound to its policy");
                        }
                        Ok(BindOutcome::Refused) => tracing::error!(
                            cgroup = %escaped(&found.relative),
                            "the binding table is full: the new cgroup is refused everything (rule unbindable)"
                        ),
                        Err(error) => {
                            tracing::error!(cgroup = %escaped(&found.relative), "binding a new cgroup: {error:#}");
                        }
                    }
                }
            }
            Change::Removed { relative, id } => {
                self.ignored().forget(&relative);
                if let Some(container) = discovery::container_of(&relative) {
                    self.names.lock().unwrap_or_else(std::sync::PoisonError::into_inner).forget_id(&container.id);
                }
                if self.engine.unbind(id).is_some() {
                    tracing::info!(cgroup = %escaped(&relative), "cgroup removed; its binding is gone");
                }
            }
        }
    }

    /// The delegated subtree `relative` lies in, when that subtree already has its share of
    /// bound cgroups.
    fn over_share(&self, relative: &str) -> Option<String> {
        let root = matching::delegation_root(self.hierarchy.mount(), relative)?;
        let state = self.engine.state();
        let bound = state
            .active
            .as_ref()
            .map_or(0, |active| active.bound.values().filter(|b| matching::is_below(&b.relative, &root)).count());
        (bound >= matching::MAX_BINDINGS_PER_DELEGATED_SUBTREE).then_some(root)
    }

    /// Refuses everything to a delegated subtree's root: its cgroups that have no binding of their
    /// own (those over the share among them) are refused with it.
    fn quarantine(&self, root: &str) {
        let reason = quarantine_reason();
        let refused = self.hierarchy.open(root).map_err(anyhow::Error::from).and_then(|cgroup| {
            let already = self.engine.state().refused.contains_key(&cgroup.id);
            self.engine.refuse(&cgroup, &reason).map(|()| already)
        });
        match refused {
            Ok(true) => {}
            Ok(false) => tracing::error!(
                subtree = %escaped(root),
                "a delegated subtree went over its share of {} bound cgroups: it is refused everything \
                 (rule unbindable) but for the cgroups already bound in it",
                matching::MAX_BINDINGS_PER_DELEGATED_SUBTREE
            ),
            Err(error) => {
                tracing::error!(subtree = %escaped(root), "refusing a delegated subtree over its share: {error:#}");
            }
        }
    }

    fn changing(&self) -> MutexGuard<'_, ()> {
        self.changing.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// What governs a cgroup found on the tree, checking the placement of cgroups a selector
    /// names by what they are called (the check runs as each cgroup is discovered).
    fn policy_for(&self, set: &PolicySet, found: &Cgroup, names: &ContainerNames) -> Match {
        matching::policy_for(set, &found.relative, names, |depth| {
            discovery::check_placement(self.hierarchy.mount(), &found.relative, depth)
        })
    }

    fn ignored(&self) -> std::sync::MutexGuard<'_, IgnoredMatches> {
        self.ignored.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Container names (best effort, from the runtimes' CLIs) and ids seen in `found`. Only ids of
    /// cgroups root placed count: a user could otherwise make a prefix ambiguous (which selects
    /// nothing) with a forged `docker-<id>.scope`, or have the CLIs run for every one made.
    fn refreshed_names(&self, found: &[Cgroup]) -> std::sync::MutexGuard<'_, ContainerNames> {
        let mut names = self.names.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let ids: Vec<String> = found
            .iter()
            .filter_map(|f| {
                let container = discovery::container_of(&f.relative)?;
                discovery::check_placement(self.hierarchy.mount(), &f.relative, 0).is_ok().then_some(container.id)
            })
            .collect();
        if !ids.is_empty() || found.len() > 1 {
            names.note_ids(ids);
            names.refresh();
        }
        names
    }
}

/// The status lines that say what this kernel lets egress guarantee.
fn guarantees(state: &crate::engine::State) -> Vec<String> {
    let mut lines = vec![format!("AF_PACKET guard: {}", state.enforcer.socket_guard().describe())];
    let deep = state.active.as_ref().map_or(0, |active| active.bound.values().filter(|b| b.deep).count());
    if deep > 0 {
        lines.push(format!(
            "deep cgroups: {deep} bound deeper than {} levels, found by id; unbound cgroups that deep beside them are refused",
            egress_common::MAX_CGROUP_LEVEL
        ));
    }
    lines
}

impl control::server::ControlHandler for Daemon {
    fn status(&self) -> StatusReport {
        let mut state = self.engine.state();
        let dropped_events = self.drops.read().map_or(0, |drops| drops.total);
        let malformed_packets = self.drops.malformed_packets().unwrap_or(0);
        let guarantees = guarantees(&state);
        let Some(active) = &state.active else {
            return StatusReport {
                attach: self.attach.clone(),
                dropped_events,
                malformed_packets,
                guarantees,
                ..StatusReport::default()
            };
        };
        let policies = active
            .set
            .policies
            .iter()
            .enumerate()
            .map(|(index, p)| PolicyStatus {
                name: p.name.clone(),
                selector: p.selector.to_string(),
                mode: p.mode.as_str().to_string(),
                default: p.default.as_str().to_string(),
                rules: p.rules.len() + p.names.len(),
                cgroups: active.bound.values().filter(|b| b.policy == index).count(),
                ..PolicyStatus::default()
            })
            .collect();
        let bound: Vec<(u64, crate::engine::Bound)> = active.bound.iter().map(|(id, b)| (*id, b.clone())).collect();
        let modes: Vec<(String, String)> =
            active.set.policies.iter().map(|p| (p.name.clone(), p.mode.as_str().to_string())).collect();
        let mut report = StatusReport {
            generation: state.enforcer.generation(),
            config: active.source.clone(),
            loaded_at: timestamp(active.loaded_at),
            attach: self.attach.clone(),
            dropped_events,
            malformed_packets,
            guarantees,
            policies,
            cgroups: Vec::new(),
            maps: state
                .enforcer
                .map_fill()
                .into_iter()
                .map(|(map, used, capacity)| MapFill { map: map.to_owned(), used, capacity })
                .collect(),
            flow_totals: self
                .flows
                .totals()
                .into_iter()
                .map(|((policy, workload), t)| FlowTotal {
                    policy,
                    workload,
                    packets_out: t.packets_out,
                    bytes_out: t.bytes_out,
                    packets_in: t.packets_in,
                    bytes_in: t.bytes_in,
                })
                .collect(),
            flow_evictions: self.flows.evictions(),
            warnings: Vec::new(),
            ignored: self
                .ignored()
                .iter()
                .map(|i| IgnoredStatus {
                    cgroup: i.cgroup.clone(),
                    policy: i.policy.clone(),
                    selector: i.selector.clone(),
                    reason: i.reason.clone(),
                })
                .collect(),
            // Filled from the proxy's counters below.
            ..StatusReport::default()
        };
        for (id, b) in bound {
            let stats = state.enforcer.cgroup_stats(id).unwrap_or_default();
            let (policy, mode) = modes.get(b.policy).cloned().unwrap_or_default();
            report.cgroups.push(CgroupStatus {
                cgroup: b.relative,
                policy,
                mode,
                workload: b.workload,
                allowed: stats.allowed,
                blocked: stats.blocked,
                audited: stats.audited,
                // The proxy's refused-query events count against the same budget.
                suppressed: stats.suppressed + self.dns.events.suppressed(id),
                learned: self.dns.learned(id),
                deep: b.deep,
            });
        }
        report.cgroups.sort_by(|a, b| a.cgroup.cmp(&b.cgroup));
        report.unbindable = state
            .refused
            .values()
            .map(|r| UnbindableStatus { cgroup: r.relative.clone(), reason: r.reason.clone() })
            .collect();
        report.unbindable.sort_by(|a, b| a.cgroup.cmp(&b.cgroup));
        drop(state);
        let bound: Vec<(&str, &str)> = report.cgroups.iter().map(|c| (c.cgroup.as_str(), c.policy.as_str())).collect();
        report.warnings = matching::uncovered_delegations(self.hierarchy.mount(), &bound);
        let unwatched = self.unwatched.load(std::sync::atomic::Ordering::Relaxed);
        if unwatched > 0 {
            report.warnings.push(format!(
                "{unwatched} cgroups could not be watched (out of inotify watches: raise \
                 fs.inotify.max_user_watches): cgroups created below them are found by a rescan every {} s, \
                 and until then run under their nearest bound ancestor's policy",
                discovery::UNWATCHED_RESCAN.as_secs()
            ));
        }
        crate::dns::status::fill(&self.dns, &mut report);
        report
    }

    fn reload(&self) -> Result<String, ReloadError> {
        Daemon::reload(self)
    }

    fn history(&self) -> &EventHistory {
        &self.history
    }

    fn flow_log(&self) -> Option<&FlowLog> {
        Some(&self.flows)
    }
}

fn quarantine_reason() -> String {
    format!(
        "its delegated subtree has more than {} cgroups bound to policies",
        matching::MAX_BINDINGS_PER_DELEGATED_SUBTREE
    )
}
