//! Shared harness for the integration tests: they need root and a BPF-capable kernel, create
//! their own cgroups (never the root one or the test runner's), talk only to loopback or to
//! network namespaces they create, and clean everything up on drop, also when they fail.
#![allow(dead_code)]

use std::{
    collections::HashSet,
    fs,
    io::{BufRead, BufReader, Read},
    net::{TcpListener, UdpSocket},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::{
        atomic::{AtomicU32, Ordering},
        mpsc, Arc, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

/// Links of one attachment on these test machines: eight `sock_addr` programs (connect,
/// sendmsg, and the DNS hooks recvmsg and getpeername, each for IPv4 and IPv6), the packet
/// filters and the flow accounting on egress and ingress, sock_create and sock_release (their
/// kernel, locked down, refuses the BPF LSM program).
pub const LINKS_PER_ATTACH: usize = 14;

static UNIQUE: AtomicU32 = AtomicU32::new(0);

/// A name no other test (or concurrent test run) uses.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}-{}", std::process::id(), UNIQUE.fetch_add(1, Ordering::Relaxed))
}

/// True when this test can run. Without root it skips with a note, except under CI where a
/// test that needs BPF must fail rather than pass vacuously.
pub fn privileged() -> bool {
    // SAFETY: no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if root {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("this test needs root and BPF; CI must run it as root");
    }
    eprintln!("skipped: needs root");
    false
}

/// The `egress` binary under test.
pub fn egress_bin() -> PathBuf {
    std::env::var_os("EGRESS_BIN").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_egress")))
}

/// The cgroup2 mount the daemon uses.
pub fn cgroup2_mount() -> PathBuf {
    egress::cgroup::Hierarchy::discover().expect("a cgroup2 mount").mount().to_path_buf()
}

/// A cgroup the test owns; its processes are killed and it is removed on drop.
pub struct TestCgroup {
    pub relative: String,
    pub dir: PathBuf,
}

impl TestCgroup {
    pub fn new(prefix: &str) -> Self {
        let relative = unique(&format!("egress-test-{prefix}"));
        Self::at(&relative)
    }

    pub fn at(relative: &str) -> Self {
        let dir = cgroup2_mount().join(relative);
        fs::create_dir_all(&dir).expect("create test cgroup");
        Self { relative: relative.to_string(), dir }
    }

    pub fn child(&self, name: &str) -> TestCgroup {
        Self::at(&format!("{}/{name}", self.relative))
    }

    /// A command that will start inside this cgroup.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        let procs = self.dir.join("cgroup.procs");
        // SAFETY: the closure only does a write(2) through std, which is fine after fork here
        // because the test binary's other threads hold no locks the child needs.
        unsafe {
            cmd.pre_exec(move || fs::write(&procs, "0"));
        }
        cmd
    }

    /// Runs `python3 -c SCRIPT ARGS...` inside the cgroup.
    pub fn python(&self, script: &str, args: &[&str]) -> Output {
        self.command("python3").arg("-c").arg(script).args(args).output().expect("run python3")
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        remove_cgroup_tree(&self.dir);
    }
}

fn remove_cgroup_tree(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_cgroup_tree(&entry.path());
            }
        }
    }
    let _ = fs::write(dir.join("cgroup.kill"), "1");
    for _ in 0..200 {
        if fs::remove_dir(dir).is_ok() || !dir.exists() {
            return;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// A policy file in a temporary directory, with the settings that keep a test daemon to
/// itself: programs attached at the test's own cgroup (never the root), its own bpffs pin
/// directory and control socket. The pins are removed on drop.
pub struct PolicyFile {
    pub path: PathBuf,
    pub pin_dir: PathBuf,
    pub socket: PathBuf,
}

impl PolicyFile {
    /// `policies` is the YAML of the `policies:` list (starting with `policies:`).
    pub fn new(policies: &str) -> Self {
        Self::attached_at(None, policies)
    }

    /// A file holding exactly `text` (so that line numbers in errors are the test's own).
    pub fn exact(text: &str) -> Self {
        let file = Self::attached_at(None, "");
        file.rewrite(text);
        file
    }

    /// Like `new`, with `settings.attach` set (required for `egress run`).
    pub fn attached_at(attach: Option<&str>, policies: &str) -> Self {
        let name = unique("egress-test-policy");
        let dir = std::env::temp_dir().join(&name);
        fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("policy.yaml");
        let pin_dir = PathBuf::from("/sys/fs/bpf").join(&name);
        let socket = dir.join("control.sock");
        let file = Self { path, pin_dir, socket };
        file.rewrite_with(attach, policies);
        file
    }

    pub fn settings(&self, attach: Option<&str>) -> String {
        let mut settings =
            format!("settings:\n  pin_dir: {}\n  control_socket: {}\n", self.pin_dir.display(), self.socket.display());
        if let Some(attach) = attach {
            settings.push_str(&format!("  attach: {attach}\n"));
        }
        settings
    }

    /// Replaces the file (atomically) keeping the test settings.
    pub fn rewrite_with(&self, attach: Option<&str>, policies: &str) {
        self.rewrite(&format!("{}{policies}", self.settings(attach)));
    }

    /// `egress status --json` from the daemon running this file.
    pub fn status_json(&self) -> Value {
        let out = Command::new(egress_bin())
            .args(["status", "--json", "--socket"])
            .arg(&self.socket)
            .output()
            .expect("run egress status");
        assert!(out.status.success(), "egress status failed: {}", stderr_of(&out));
        serde_json::from_slice(&out.stdout).expect("status is JSON")
    }

    pub fn rewrite(&self, yaml: &str) {
        let tmp = self.path.with_extension("tmp");
        fs::write(&tmp, yaml).expect("write policy");
        fs::rename(&tmp, &self.path).expect("replace policy");
    }
}

impl Drop for PolicyFile {
    fn drop(&mut self) {
        if let Some(dir) = self.path.parent() {
            let _ = fs::remove_dir_all(dir);
        }
        let _ = fs::remove_dir_all(&self.pin_dir);
    }
}

/// `egress run` in the background, with its JSON events collected.
pub struct Daemon {
    child: Child,
    events: Arc<Mutex<Vec<Value>>>,
    log: Arc<Mutex<String>>,
}

impl Daemon {
    /// Starts the daemon and waits until it says every policy is enforced.
    pub fn start(file: &PolicyFile) -> Self {
        Self::start_with(file, &[])
    }

    pub fn start_with(file: &PolicyFile, extra: &[&str]) -> Self {
        let text = fs::read_to_string(&file.path).expect("read policy");
        assert!(
            text.contains("\n  attach: "),
            "a test daemon must set settings.attach to a cgroup of the test, never the root"
        );
        let mut command = Command::new(egress_bin());
        command.args(["run", "--log-format", "json", "--config"]).arg(&file.path).args(extra);
        let daemon = Self::spawn(command);
        // The control socket opens just after the policies are reported enforced.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !file.socket.exists() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
        daemon
    }

    /// Starts `egress run ... --log-format json` as built by the caller and waits until ready.
    pub fn spawn(mut command: Command) -> Self {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start egress run");
        let events = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::new(Mutex::new(String::new()));
        let stdout = child.stdout.take().expect("stdout");
        let sink = events.clone();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let value = serde_json::from_str::<Value>(&line).unwrap_or(Value::String(line));
                sink.lock().unwrap().push(value);
            }
        });
        let stderr = child.stderr.take().expect("stderr");
        let (ready_tx, ready_rx) = mpsc::channel();
        let log_sink = log.clone();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("all policies enforced") {
                    let _ = ready_tx.send(());
                }
                let mut log = log_sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        let mut daemon = Self { child, events, log };
        if ready_rx.recv_timeout(Duration::from_secs(20)).is_err() {
            let status = daemon.child.try_wait().ok().flatten();
            panic!("egress run did not become ready (exit {status:?}); log:\n{}", daemon.log());
        }
        daemon
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    pub fn events(&self) -> Vec<Value> {
        self.events.lock().unwrap().clone()
    }

    /// Waits until an event satisfying `pred` arrives; panics after `timeout`.
    pub fn wait_event(&self, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(found) = self.events().into_iter().find(|e| pred(e)) {
                return found;
            }
            if Instant::now() > deadline {
                panic!("no matching event; got {:#?}\nlog:\n{}", self.events(), self.log());
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, signal) };
    }

    pub fn stop(mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        let status = self.child.wait().expect("wait egress");
        thread::sleep(Duration::from_millis(50));
        status
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A TCP server on loopback that accepts and answers "ok\n" to every connection.
pub fn tcp_server(addr: &str) -> u16 {
    let listener = TcpListener::bind(addr).expect("bind tcp server");
    let port = listener.local_addr().expect("local addr").port();
    thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut stream = stream;
            let _ = std::io::Write::write_all(&mut stream, b"ok\n");
        }
    });
    port
}

/// A UDP server on loopback that echoes every datagram.
pub fn udp_echo(addr: &str) -> u16 {
    let socket = UdpSocket::bind(addr).expect("bind udp");
    let port = socket.local_addr().expect("local addr").port();
    thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, peer)) = socket.recv_from(&mut buf) {
            let _ = socket.send_to(&buf[..n], peer);
        }
    });
    port
}

pub fn stdout_of(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

pub fn stderr_of(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).to_string()
}

/// Python snippet: `connect(family, host, port)` printing `ok`, or the errno name on failure.
pub const PY_TCP_CONNECT: &str = r#"
import socket, sys, errno
fam = socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET
s = socket.socket(fam, socket.SOCK_STREAM)
s.settimeout(3)
try:
    s.connect((sys.argv[1], int(sys.argv[2])))
    print("ok")
except socket.timeout:
    print("TIMEOUT")
except OSError as e:
    print(errno.errorcode.get(e.errno, str(e.errno)))
"#;

/// Runs a TCP connect from inside `cgroup`; returns `ok`, an errno name, or `TIMEOUT`.
pub fn tcp_connect_from(cgroup: &TestCgroup, host: &str, port: u16) -> String {
    stdout_of(&cgroup.python(PY_TCP_CONNECT, &[host, &port.to_string()]))
}

/// Reads all of a child's stderr into a string (helper for `egress exec`).
pub fn read_all(mut r: impl Read) -> String {
    let mut s = String::new();
    let _ = r.read_to_string(&mut s);
    s
}

/// A network namespace with one veth pair: `host_ip` on this side, `peer_ip` inside. Removed on
/// drop (deleting the namespace deletes the pair).
pub struct NetNs {
    pub name: String,
    pub host_if: String,
}

impl NetNs {
    pub fn new(v4_subnet: u8) -> Self {
        let name = unique("egt");
        let host_if = format!("eh{}", &name[name.len().saturating_sub(8)..]).replace('-', "");
        let peer_if = host_if.replacen("eh", "ep", 1);
        let ns = Self { name: name.clone(), host_if: host_if.clone() };
        sh(&format!("ip netns add {name}"));
        sh(&format!("ip link add {host_if} type veth peer name {peer_if} netns {name}"));
        sh(&format!("ip addr add 10.213.{v4_subnet}.1/24 dev {host_if}"));
        sh(&format!("ip -6 addr add fd00:e9e5:{v4_subnet}::1/64 dev {host_if} nodad"));
        sh(&format!("ip link set {host_if} up"));
        sh(&format!("ip -n {name} addr add 10.213.{v4_subnet}.2/24 dev {peer_if}"));
        sh(&format!("ip -n {name} -6 addr add fd00:e9e5:{v4_subnet}::2/64 dev {peer_if} nodad"));
        sh(&format!("ip -n {name} link set {peer_if} up"));
        sh(&format!("ip -n {name} link set lo up"));
        ns
    }

    /// A command run inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "pids", &self.name]).output().map(|out| {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = Command::new("kill").args(["-9", pid]).status();
            }
        });
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
        let _ = Command::new("ip").args(["link", "del", &self.host_if]).stderr(Stdio::null()).status();
    }
}

pub fn sh(command: &str) {
    let status = Command::new("sh").arg("-c").arg(command).status().expect("run sh");
    assert!(status.success(), "`{command}` failed");
}

/// cgroup ids currently in the kernel's cgroup -> policy map of a test daemon.
pub fn bound_cgroup_ids(pin_dir: &Path) -> HashSet<u64> {
    egress::kernel::pinned_bindings(pin_dir).expect("read the pinned cgroup map").into_keys().collect()
}

/// What a finished `egress` invocation left behind.
pub struct Run {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
    /// Pid of the `egress` process itself (names the transient cgroup of `exec`).
    pub pid: u32,
}

impl Run {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    pub fn describe(&self) -> String {
        format!(
            "status {:?} after {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status, self.elapsed, self.stdout, self.stderr
        )
    }
}

/// Runs `cmd` to completion with its output captured; kills it and panics after `limit`.
pub fn run_limited(mut cmd: Command, limit: Duration) -> Run {
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let pid = child.id();
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out_reader = thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_reader = thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if start.elapsed() > limit {
            // SIGTERM first: a daemon cleans up after itself; then SIGKILL.
            // SAFETY: signalling our own child.
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
            for _ in 0..300 {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                thread::sleep(Duration::from_millis(10));
            }
            let _ = child.kill();
            let _ = child.wait();
            let stderr = err_reader.join().unwrap_or_default();
            panic!("{cmd:?} still running after {limit:?}; stderr:\n{stderr}");
        }
        thread::sleep(Duration::from_millis(5));
    };
    let elapsed = start.elapsed();
    let stdout = out_reader.join().unwrap_or_default();
    let stderr = err_reader.join().unwrap_or_default();
    Run { status, stdout, stderr, elapsed, pid }
}

/// Python: loop `connect()` to `argv[1]` port 9 for `argv[2]` seconds, every one refused with
/// EPERM (anything else ends it with `UNEXPECTED=...`); prints `CONNECTS=N` at the end.
#[allow(dead_code)]
pub const PY_FLOOD: &str = r#"
import errno, socket, sys, time
end = time.monotonic() + float(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
n = 0
while time.monotonic() < end:
    for _ in range(1000):
        try:
            s.connect((sys.argv[1], 9))
            print("UNEXPECTED=connected", flush=True)
            sys.exit(1)
        except OSError as e:
            if e.errno != errno.EPERM:
                print("UNEXPECTED=" + errno.errorcode.get(e.errno, str(e.errno)), flush=True)
                sys.exit(1)
    n += 1000
print("CONNECTS=%d" % n, flush=True)
"#;
