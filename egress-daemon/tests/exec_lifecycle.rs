//! `egress exec` keeps a command filtered for as long as any process of it lives: signals that
//! would end exec go to the command, processes left behind are killed before the programs are
//! detached, and when exec is SIGKILLed its guard kills the command before enforcement ends.
//!
//! Each test runs a client that connects to a denied loopback address every few milliseconds
//! and logs each outcome; a single `ok` in the log would be a flow that escaped the filter.

mod common;

use std::{
    fs,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use common::*;

/// Connects to argv[1]:argv[2] in a loop, appending each outcome to argv[3].
const PY_CONNECT_LOOP: &str = r#"
import socket, sys, errno, time
out = open(sys.argv[3], "a", buffering=1)
while True:
    s = socket.socket()
    try:
        s.connect((sys.argv[1], int(sys.argv[2]))); out.write("ok\n")
    except OSError as e:
        out.write(errno.errorcode.get(e.errno, str(e.errno)) + "\n")
    s.close()
    time.sleep(0.002)
"#;

/// A policy file with one policy, `lifecycle`, that denies 127.0.0.2.
fn policy() -> PolicyFile {
    PolicyFile::new(
        "policies:\n  - name: lifecycle\n    cgroup: ignored-by-exec\n    rules:\n      - deny: 127.0.0.2\n",
    )
}

/// The scratch files of one test: the loop client and its log.
struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(unique("egress-exec-lifecycle"));
        fs::create_dir_all(&dir).expect("scratch dir");
        fs::write(dir.join("loop.py"), PY_CONNECT_LOOP).expect("write the client");
        Self { dir }
    }

    /// Shell words that start the connect loop in the background against `port` on 127.0.0.2.
    fn loop_command(&self, port: u16) -> String {
        format!(
            "python3 {} 127.0.0.2 {port} {} >/dev/null 2>&1 </dev/null",
            self.script().display(),
            self.log().display()
        )
    }

    fn script(&self) -> PathBuf {
        self.dir.join("loop.py")
    }

    fn log(&self) -> PathBuf {
        self.dir.join("outcomes")
    }

    /// The outcomes the loop logged: at least one, and every one a refusal.
    fn assert_always_refused(&self) {
        let text = fs::read_to_string(self.log()).unwrap_or_default();
        let outcomes: Vec<&str> = text.lines().collect();
        assert!(!outcomes.is_empty(), "the client never ran");
        assert!(outcomes.iter().all(|o| *o == "EPERM"), "a flow escaped the filter: {outcomes:?}");
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// `egress exec -- sh -c SCRIPT` with its stdout read line by line.
struct Exec {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Exec {
    fn start(file: &PolicyFile, script: &str) -> Self {
        let mut child = Command::new(egress_bin())
            .arg("exec")
            .arg("--config")
            .arg(&file.path)
            .args(["--policy", "lifecycle", "--", "sh", "-c", script])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start egress exec");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Self { child, lines }
    }

    /// The number the command printed as `NAME=N`.
    fn printed(&self, name: &str) -> i32 {
        let deadline = Instant::now() + Duration::from_secs(20);
        while let Ok(line) = self.lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            if let Some(value) = line.strip_prefix(&format!("{name}=")) {
                return value.trim().parse().expect("a pid");
            }
        }
        panic!("the command never printed {name}=");
    }

    fn signal(&self, signal: i32) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, signal) };
    }

    /// Waits for exec to end; panics after `limit`.
    fn wait(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "egress exec still running after {limit:?}");
            thread::sleep(Duration::from_millis(5));
        }
    }

    fn transient_cgroup(&self) -> PathBuf {
        cgroup2_mount().join(format!("egress-exec-{}", self.child.id()))
    }
}

impl Drop for Exec {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether `pid` is a live process (a zombie has ended; only its exit status is left).
fn alive(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z') && !rest.starts_with('X')),
        Err(_) => false,
    }
}

fn wait_until(limit: Duration, what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "{what} after {limit:?}");
        thread::sleep(Duration::from_millis(10));
    }
}

fn wait_for_outcomes(log: &Path) {
    wait_until(Duration::from_secs(20), "the client logged nothing", || {
        fs::read_to_string(log).is_ok_and(|t| t.lines().count() >= 3)
    });
}

#[test]
fn sigterm_goes_to_the_command_and_nothing_of_it_outlives_exec() {
    if !privileged() {
        return;
    }
    let file = policy();
    let scratch = Scratch::new();
    let port = tcp_server("127.0.0.2:0");
    let mut exec = Exec::start(
        &file,
        &format!("{} & echo BG=$!; sleep 100 & echo SLEEP=$!; echo SH=$$; wait", scratch.loop_command(port)),
    );
    let (background, sleeper, shell) = (exec.printed("BG"), exec.printed("SLEEP"), exec.printed("SH"));
    wait_for_outcomes(&scratch.log());

    exec.signal(libc::SIGTERM);
    let status = exec.wait(Duration::from_secs(15));
    // exec did not die of the signal: it passed it on, and reports the shell's death by it.
    assert_eq!(status.code(), Some(128 + libc::SIGTERM), "{status:?}");
    for (name, pid) in [("the connect loop", background), ("the background sleep", sleeper), ("the shell", shell)] {
        assert!(!alive(pid), "{name} (pid {pid}) outlived exec");
    }
    assert!(!exec.transient_cgroup().exists(), "the transient cgroup is left");
    scratch.assert_always_refused();
}

#[test]
fn a_grandchild_left_running_is_killed_before_exec_returns() {
    if !privileged() {
        return;
    }
    let file = policy();
    let scratch = Scratch::new();
    let port = tcp_server("127.0.0.2:0");
    // The shell exits as soon as the client has logged an outcome, leaving it running.
    let mut exec = Exec::start(
        &file,
        &format!(
            "{} & echo BG=$!; while [ ! -s {} ]; do sleep 0.05; done; exit 5",
            scratch.loop_command(port),
            scratch.log().display()
        ),
    );
    let background = exec.printed("BG");
    let status = exec.wait(Duration::from_secs(15));
    // Checked at once: dead by the time exec returned, not some time later.
    assert!(!alive(background), "the background client (pid {background}) outlived exec");
    assert_eq!(status.code(), Some(5), "{status:?}");
    assert!(!exec.transient_cgroup().exists(), "the transient cgroup is left");
    scratch.assert_always_refused();
}

#[test]
fn sigkill_of_exec_kills_the_command_before_enforcement_ends() {
    if !privileged() {
        return;
    }
    let file = policy();
    let scratch = Scratch::new();
    let port = tcp_server("127.0.0.2:0");
    let mut exec = Exec::start(
        &file,
        // The loop is detached from the shell (setsid, its own session): only the cgroup holds it.
        &format!("setsid {} & echo BG=$!; echo SH=$$; wait", scratch.loop_command(port)),
    );
    let (background, shell) = (exec.printed("BG"), exec.printed("SH"));
    let cgroup = exec.transient_cgroup();
    wait_for_outcomes(&scratch.log());

    exec.signal(libc::SIGKILL);
    exec.wait(Duration::from_secs(5));
    wait_until(Duration::from_secs(10), "the command survived exec's SIGKILL", || !alive(background) && !alive(shell));
    wait_until(Duration::from_secs(10), "the transient cgroup is left", || !cgroup.exists());
    // Every connect until the client died was refused: enforcement lasted while it lived.
    scratch.assert_always_refused();
}
