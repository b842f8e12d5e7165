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
    os::unix::process::ExitStatusExt,
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

/// What a signal at some moment of exec's start-up must leave: exec ends promptly, with the
/// status of a command killed by the signal (start-up cut short, or the command, started, got
/// the signal and died of it), or killed by it before exec made anything; and neither the
/// transient cgroup nor the programs in it remain.
fn assert_start_up_cut_cleanly(exec: &mut Exec, signal: i32, delay: Duration) {
    let cgroup = exec.transient_cgroup();
    let sent = Instant::now();
    let status = exec.wait(Duration::from_secs(10));
    let took = sent.elapsed();
    let ok = status.code() == Some(128 + signal) || (status.code().is_none() && status.signal() == Some(signal));
    assert!(ok, "signal {signal} after {delay:?}: {status:?}");
    assert!(took < Duration::from_secs(3), "signal {signal} after {delay:?}: exec took {took:?} to end");
    // A cgroup that is gone has no programs attached; exec pins nothing.
    wait_until(
        Duration::from_secs(2),
        &format!("signal {signal} after {delay:?}: {} is left", cgroup.display()),
        || !cgroup.exists(),
    );
}

/// The moments of start-up the signal tests hit: before exec blocked the signals, while it
/// creates the cgroup, loads the programs (about a second on 2 vCPUs), attaches, and after the
/// command started.
const START_UP_DELAYS_MS: [u64; 6] = [0, 100, 300, 600, 1000, 2000];

#[test]
fn sigterm_or_sigint_at_any_moment_of_start_up_leaves_nothing_behind() {
    if !privileged() {
        return;
    }
    let file = policy();
    for signal in [libc::SIGTERM, libc::SIGINT] {
        for delay in START_UP_DELAYS_MS.map(Duration::from_millis) {
            let mut exec = Exec::start(&file, "exec sleep 30");
            thread::sleep(delay);
            exec.signal(signal);
            assert_start_up_cut_cleanly(&mut exec, signal, delay);
        }
    }
}

/// The terminal's ^C goes to the whole foreground process group (`SI_KERNEL`). Once the
/// command runs it has it too and exec passes nothing on; before that, no command has it and
/// it must end start-up.
#[test]
fn ctrl_c_from_the_terminal_during_start_up_leaves_nothing_behind() {
    if !privileged() {
        return;
    }
    let file = policy();
    for delay in START_UP_DELAYS_MS.map(Duration::from_millis) {
        let terminal = Pty::open();
        let mut command = Command::new(egress_bin());
        command
            .arg("exec")
            .arg("--config")
            .arg(&file.path)
            .args(["--policy", "lifecycle", "--", "sleep", "30"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        terminal.make_controlling(&mut command);
        let child = command.spawn().expect("start egress exec");
        let mut exec = Exec { child, lines: mpsc::channel().1 };
        thread::sleep(delay);
        terminal.type_ctrl_c();
        assert_start_up_cut_cleanly(&mut exec, libc::SIGINT, delay);
    }
}

/// A pseudo-terminal whose far end becomes the controlling terminal of a new session.
struct Pty {
    master: std::os::fd::OwnedFd,
    slave: std::ffi::CString,
}

impl Pty {
    fn open() -> Self {
        use std::os::fd::FromRawFd;
        // SAFETY: plain libc calls on a fd this function owns; ptsname_r writes into `name`.
        unsafe {
            let fd = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC);
            assert!(fd >= 0, "posix_openpt: {}", std::io::Error::last_os_error());
            let master = std::os::fd::OwnedFd::from_raw_fd(fd);
            assert_eq!(libc::grantpt(fd), 0, "grantpt");
            assert_eq!(libc::unlockpt(fd), 0, "unlockpt");
            let mut name = [0 as libc::c_char; 128];
            assert_eq!(libc::ptsname_r(fd, name.as_mut_ptr(), name.len()), 0, "ptsname_r");
            let slave = std::ffi::CStr::from_ptr(name.as_ptr()).to_owned();
            Self { master, slave }
        }
    }

    /// The command starts a session whose controlling terminal (and stdin) is this one; its
    /// process group is the terminal's foreground group.
    fn make_controlling(&self, command: &mut Command) {
        use std::os::unix::process::CommandExt;
        let slave = self.slave.clone();
        // SAFETY: only async-signal-safe calls between fork and exec, on memory made before.
        unsafe {
            command.pre_exec(move || {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let fd = libc::open(slave.as_ptr(), libc::O_RDWR);
                if fd < 0 || libc::ioctl(fd, libc::TIOCSCTTY, 0) != 0 || libc::dup2(fd, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::close(fd);
                Ok(())
            });
        }
    }

    /// What the terminal does on ^C: SIGINT to its foreground process group.
    fn type_ctrl_c(&self) {
        use std::os::fd::AsRawFd;
        // SAFETY: writing one byte from a valid buffer to our own fd.
        let written = unsafe { libc::write(self.master.as_raw_fd(), b"\x03".as_ptr().cast(), 1) };
        assert_eq!(written, 1, "writing ^C: {}", std::io::Error::last_os_error());
    }
}
