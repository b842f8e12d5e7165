//! A restart while a workload floods a denied address, once with an empty event ring and once
//! with a ring the previous daemon left full: the new daemon must tell systemd it is ready
//! (`READY=1` on `NOTIFY_SOCKET`, a datagram socket the test binds) in a time that does not grow
//! with the backlog, and must write the backlog through the per-cgroup event budget, reporting
//! what it suppressed instead of writing every event. Times are printed (BENCH.md has them) and
//! held to generous bounds; the structure is what is asserted.

mod common;

use std::{
    io::{BufRead, BufReader},
    os::unix::net::UnixDatagram,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use common::*;
use serde_json::Value;

/// Flooding processes, each looping `connect()` to the denied address on one socket.
const FLOODERS: usize = 4;
/// How long the flooders run: both restarts and their measurements fit in it.
const FLOOD_SECS: u64 = 40;
/// A kernel budget high enough that the flood fills the ring while no daemon reads it.
const FILLING_BUDGET: u32 = 10_000_000;
/// The budget the restarted daemon runs with (the default).
const BUDGET: u64 = 1_000;
/// Generous: the restart with a full ring may be this much slower to READY than with an empty one.
const READY_SPREAD: Duration = Duration::from_secs(1);
/// How long the restarted daemon's output is watched: its first budget windows close in it.
const WATCH: Duration = Duration::from_secs(3);
/// Generous: READY must come this soon in any case.
const READY_BOUND: Duration = Duration::from_secs(10);

/// `egress run` with `NOTIFY_SOCKET` set, its output lines stamped with their arrival.
struct Started {
    child: Child,
    spawned: Instant,
    ready: Arc<Mutex<Option<Instant>>>,
    lines: Arc<Mutex<Vec<(Instant, Value)>>>,
    log: Arc<Mutex<String>>,
}

impl Started {
    fn spawn(file: &PolicyFile, tag: &str) -> Self {
        let notify_path = file.path.with_file_name(format!("notify-{tag}.sock"));
        let notify = UnixDatagram::bind(&notify_path).expect("bind the notify socket");
        let ready = Arc::new(Mutex::new(None));
        let seen = ready.clone();
        thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = notify.recv(&mut buf) {
                if String::from_utf8_lossy(&buf[..n]).lines().any(|l| l == "READY=1") {
                    seen.lock().unwrap().get_or_insert_with(Instant::now);
                }
            }
        });
        let spawned = Instant::now();
        let mut child = Command::new(egress_bin())
            .args(["run", "--log-format", "json", "--config"])
            .arg(&file.path)
            .env("NOTIFY_SOCKET", &notify_path)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start egress run");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        let stdout = child.stdout.take().expect("stdout");
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let value = serde_json::from_str::<Value>(&line).unwrap_or(Value::String(line));
                sink.lock().unwrap().push((Instant::now(), value));
            }
        });
        let log = Arc::new(Mutex::new(String::new()));
        let log_sink = log.clone();
        let stderr = child.stderr.take().expect("stderr");
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut log = log_sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        let started = Self { child, spawned, ready, lines, log };
        let deadline = Instant::now() + Duration::from_secs(60);
        while started.ready_after().is_none() {
            assert!(Instant::now() < deadline, "no READY=1 within 60 s; log:\n{}", started.log());
            thread::sleep(Duration::from_millis(2));
        }
        started
    }

    fn ready_after(&self) -> Option<Duration> {
        self.ready.lock().unwrap().map(|at| at - self.spawned)
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    fn lines(&self) -> Vec<(Instant, Value)> {
        self.lines.lock().unwrap().clone()
    }

    fn stop(mut self) -> Self {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
        self
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn online_cpus() -> u64 {
    // SAFETY: sysconf has no preconditions.
    u64::try_from(unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }).unwrap_or(1).max(1)
}

fn config(file: &PolicyFile, attach: &TestCgroup, noisy: &TestCgroup, budget: u32) {
    file.rewrite(&format!(
        "{}  events_per_second: {budget}\npolicies:\n  - name: noisy\n    cgroup: {}\n    default: allow\n    rules:\n      - deny: 127.0.0.2/32\n",
        file.settings(Some(&attach.relative)),
        noisy.relative
    ));
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

#[test]
fn a_restart_under_a_flood_is_ready_in_a_time_that_does_not_grow_with_the_backlog() {
    if !privileged() {
        return;
    }
    let attach = TestCgroup::new("restart-flood");
    let noisy = attach.child("noisy");
    let file = PolicyFile::attached_at(Some(&attach.relative), "policies: []\n");
    config(&file, &attach, &noisy, BUDGET as u32);
    let first = Started::spawn(&file, "first");
    let flooders: Vec<Child> = (0..FLOODERS)
        .map(|_| {
            noisy
                .command("python3")
                .args(["-c", PY_FLOOD, "127.0.0.2", &FLOOD_SECS.to_string()])
                .stdout(Stdio::piped())
                .spawn()
                .expect("start a flooder")
        })
        .collect();
    thread::sleep(Duration::from_secs(2));

    // An empty ring: the running daemon kept up (the kernel budget held the flood to a trickle).
    drop(first.stop());
    let empty = Started::spawn(&file, "empty");
    let ready_empty = empty.ready_after().expect("ready");
    thread::sleep(Duration::from_secs(1));

    // A full ring: with a budget that admits the whole flood, and no daemon reading, the flood
    // fills the ring (4 MiB of 80-byte records) in well under a second.
    config(&file, &attach, &noisy, FILLING_BUDGET);
    let reloaded =
        Command::new(egress_bin()).args(["reload", "--socket"]).arg(&file.socket).output().expect("run egress reload");
    assert!(reloaded.status.success(), "reload: {}", stderr_of(&reloaded));
    let stopped_at = Instant::now();
    let empty = empty.stop();
    let stop_took = stopped_at.elapsed();
    thread::sleep(Duration::from_secs(2));
    config(&file, &attach, &noisy, BUDGET as u32);
    let full = Started::spawn(&file, "full");
    let ready_full = full.ready_after().expect("ready");
    thread::sleep(WATCH);
    let lines = full.lines();
    let log = full.log();
    let full = full.stop();
    drop(empty);

    for flooder in flooders {
        let out = flooder.wait_with_output().expect("wait for a flooder");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("CONNECTS="), "a flooder failed: {text}");
    }

    let is_noisy = |v: &Value| v["cgroup"] == noisy.relative.as_str() && v["verdict"] == "blocked";
    let written = lines.iter().filter(|(_, v)| is_noisy(v)).count() as u64;
    let notices: Vec<&(Instant, Value)> = lines.iter().filter(|(_, v)| v["notice"].is_string()).collect();
    let suppressed: u64 = notices
        .iter()
        .filter(|(_, v)| v["notice"] == "events_suppressed")
        .filter_map(|(_, v)| v["suppressed"].as_u64())
        .sum();
    let not_written: u64 = notices
        .iter()
        .filter(|(_, v)| v["notice"] == "events_not_written")
        .filter_map(|(_, v)| v["not_written"].as_u64())
        .sum();
    let watched = lines.last().map_or(WATCH, |(at, _)| *at - full.spawned);
    eprintln!(
        "restart under a flood ({FLOODERS} flooders, {} CPUs): READY after {} with an empty ring, {} with a full \
         one; stop with the flood running {}; with the full ring: {written} events written, {suppressed} \
         suppressed, {not_written} not written, {} notices in the {} after start",
        online_cpus(),
        ms(ready_empty),
        ms(ready_full),
        ms(stop_took),
        notices.len(),
        ms(watched),
    );
    assert!(ready_full < READY_BOUND, "READY took {} with a full ring; log:\n{log}", ms(ready_full));
    assert!(
        ready_full < ready_empty + READY_SPREAD,
        "READY took {} with a full ring, {} with an empty one",
        ms(ready_full),
        ms(ready_empty)
    );
    // The backlog went through the per-cgroup budget: suppression is reported, not every event.
    assert!(suppressed > 0, "no events_suppressed notice; notices: {notices:?}");
    let seconds = watched.as_secs() + 1;
    assert!(
        written <= BUDGET * online_cpus() * seconds,
        "{written} events written in {seconds} s: more than the budget allows"
    );
    // READY came before the backlog was done with: its suppression is reported once a budget
    // window has closed.
    let first_notice = notices.iter().find(|(_, v)| v["notice"] == "events_suppressed").map(|(at, _)| *at);
    let ready_at = full.ready.lock().unwrap().expect("ready");
    assert!(first_notice.is_some_and(|at| ready_at < at), "READY came after the backlog was written");
}
