//! The server and the client against each other, over a real socket, with a fake daemon.

use std::{
    io::Write,
    os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant, SystemTime},
};

use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::UnixStream,
};

use crate::{
    client::{self, ControlError, LogsArgs},
    control::{serve, CgroupStatus, ControlHandler, PolicyStatus, ReloadError, StatusReport},
    naming::test_record as record,
    sinks::history::EventHistory,
};

const BAD_FILE: &str = "/etc/egress/egress.yaml:3:7: unknown key `alow`";

struct FakeDaemon {
    history: EventHistory,
    reject_reload: AtomicBool,
}

impl FakeDaemon {
    fn new() -> Arc<Self> {
        Arc::new(Self { history: EventHistory::new(100), reject_reload: AtomicBool::new(false) })
    }
}

impl ControlHandler for FakeDaemon {
    fn status(&self) -> StatusReport {
        let policy = |name: &str| PolicyStatus { name: name.into(), rules: 1, cgroups: 1, ..PolicyStatus::default() };
        StatusReport {
            config: "/etc/egress/egress.yaml".into(),
            loaded_at: "2026-11-23T10:01:02.345Z".into(),
            generation: 4,
            attach: "/".into(),
            dropped_events: 3,
            policies: vec![policy("web"), policy("db")],
            cgroups: vec![CgroupStatus {
                cgroup: "egress-test".into(),
                policy: "web".into(),
                blocked: 5,
                ..CgroupStatus::default()
            }],
            ..StatusReport::default()
        }
    }

    fn reload(&self) -> Result<String, ReloadError> {
        if self.reject_reload.load(Ordering::SeqCst) {
            Err(ReloadError::Apply(anyhow::anyhow!(BAD_FILE)))
        } else {
            Ok("2 policies enforced from /etc/egress/egress.yaml".into())
        }
    }

    fn history(&self) -> &EventHistory {
        &self.history
    }
}

/// A directory for one test's socket, removed afterwards.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("egress-control-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Output shared with a task that writes it.
#[derive(Clone, Default)]
struct Shared(Arc<Mutex<Vec<u8>>>);

impl Write for Shared {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("lock").extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Shared {
    fn lines(&self) -> Vec<String> {
        String::from_utf8_lossy(&self.0.lock().expect("lock")).lines().map(str::to_string).collect()
    }
}

async fn eventually(within: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    done()
}

async fn logs(socket: &Path, args: LogsArgs, json: bool) -> Vec<String> {
    let mut out = Vec::new();
    client::logs_to(socket, args, json, &mut out).await.expect("logs");
    String::from_utf8(out).expect("utf-8").lines().map(str::to_string).collect()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).expect("metadata").permissions().mode() & 0o7777
}

#[tokio::test]
async fn status_reload_and_logs_round_trip() {
    let dir = TempDir::new("roundtrip");
    let socket = dir.0.join("run/egress/control.sock");
    let daemon = FakeDaemon::new();
    let server = serve(&socket, None, daemon.clone()).await.expect("serve");
    assert!(std::fs::metadata(&socket).expect("socket").file_type().is_socket());
    assert_eq!(mode(&socket), 0o600, "root only without a group");
    assert_eq!(mode(&dir.0.join("run/egress")), 0o755);

    assert_eq!(client::fetch_status(&socket).await.expect("status"), daemon.status());

    let (policies, summary) = client::request_reload(&socket).await.expect("reload");
    assert_eq!((policies, summary.as_str()), (2, "2 policies enforced from /etc/egress/egress.yaml"));
    daemon.reject_reload.store(true, Ordering::SeqCst);
    let error = client::request_reload(&socket).await.expect_err("a rejected reload");
    assert!(matches!(error.downcast_ref::<ControlError>(), Some(ControlError::Daemon(_))), "{error:?}");
    assert_eq!(format!("{error:#}"), BAD_FILE, "the daemon's message alone, for editors to follow");
    assert!(client::reload(&socket).await.is_err());

    let now = SystemTime::now();
    let hour_ago = now - Duration::from_secs(3600);
    daemon.history.push(record(1, "allowed", "web", hour_ago));
    daemon.history.push(record(2, "blocked", "web", hour_ago));
    daemon.history.push(record(3, "blocked", "db", now));
    daemon.history.push(record(4, "audit", "web", now));

    let all = logs(&socket, LogsArgs::default(), false).await;
    assert_eq!(all.len(), 4);
    assert!(all[1].contains(" BLOCKED ") && all[1].contains("curl[2]"), "{all:?}");
    let blocked = LogsArgs { blocked_only: true, ..LogsArgs::default() };
    let lines = logs(&socket, blocked.clone(), true).await;
    let events: Vec<serde_json::Value> = lines.iter().map(|l| serde_json::from_str(l).expect("JSON")).collect();
    assert_eq!(events.iter().map(|e| e["pid"].as_u64().unwrap_or(0)).collect::<Vec<_>>(), [2, 3]);
    let keys: Vec<&str> = events[0].as_object().expect("object").keys().map(String::as_str).collect();
    let mut expected =
        ["time", "verdict", "policy", "rule", "cgroup", "pid", "comm", "uid", "protocol", "dst", "dport"];
    expected.sort_unstable();
    let mut keys = keys;
    keys.sort_unstable();
    assert_eq!(keys, expected, "a JSON line is the flow record alone");
    let recent_web =
        LogsArgs { policy: Some("web".into()), since: Some(Duration::from_secs(300)), ..LogsArgs::default() };
    let lines = logs(&socket, recent_web, false).await;
    assert_eq!(lines.len(), 1);
    assert!(lines[0].contains("AUDIT"), "{lines:?}");

    // Follow: the backlog, then a blocked event pushed afterwards, within a second.
    let out = Shared::default();
    let follower = {
        let (socket, mut out) = (socket.clone(), out.clone());
        let args = LogsArgs { follow: true, ..blocked };
        tokio::spawn(async move { client::logs_to(&socket, args, false, &mut out).await })
    };
    assert!(eventually(Duration::from_secs(2), || out.lines().len() == 2).await, "{:?}", out.lines());
    assert_eq!(daemon.history.followers(), 1);
    let pushed = Instant::now();
    daemon.history.push(record(5, "allowed", "web", SystemTime::now()));
    daemon.history.push(record(6, "blocked", "web", SystemTime::now()));
    assert!(eventually(Duration::from_secs(1), || out.lines().len() == 3).await, "{:?}", out.lines());
    assert!(pushed.elapsed() < Duration::from_secs(1));
    let lines = out.lines();
    assert!(lines[2].contains("curl[6]"), "only the blocked one: {lines:?}");

    // The daemon stopping ends the follower cleanly and removes the socket.
    drop(server);
    let ended = tokio::time::timeout(Duration::from_secs(2), follower).await;
    assert!(matches!(ended, Ok(Ok(Ok(())))), "{ended:?}");
    assert!(!socket.exists());
}

#[tokio::test]
async fn a_follower_that_leaves_is_forgotten_and_a_stuck_one_is_told_what_it_missed() {
    let dir = TempDir::new("follow");
    let socket = dir.0.join("control.sock");
    let daemon = FakeDaemon::new();
    let _server = serve(&socket, None, daemon.clone()).await.expect("serve");
    daemon.history.push(record(0, "blocked", "web", SystemTime::now()));

    let stream = UnixStream::connect(&socket).await.expect("connect");
    let (read, mut write) = stream.into_split();
    write.write_all(b"{\"request\":\"logs\",\"follow\":true}\n").await.expect("request");
    let mut lines = BufReader::new(read).lines();
    let first = lines.next_line().await.expect("read").expect("the backlog");
    assert!(first.contains("\"pid\":0"), "{first}");

    // The follower reads nothing while far more events than its buffer come in; pushing
    // is not slowed down by it.
    let started = Instant::now();
    for seq in 1..=100_000 {
        daemon.history.push(record(seq, "allowed", "web", SystemTime::now()));
    }
    let elapsed = started.elapsed();
    assert!(elapsed < Duration::from_secs(5), "100k pushes took {elapsed:?}");
    let notice = lines.next_line().await.expect("read").expect("a notice");
    assert_eq!(
        notice,
        format!(r#"{{"kind":"notice","message":"{} events skipped (client too slow)"}}"#, 100_000 - 4096)
    );
    let next = lines.next_line().await.expect("read").expect("an event");
    assert!(next.contains(&format!("\"pid\":{}", 100_000 - 4096 + 1)), "{next}");

    drop(lines);
    drop(write);
    assert!(eventually(Duration::from_secs(1), || daemon.history.followers() == 0).await);
}

#[tokio::test]
async fn one_daemon_per_socket_and_stale_sockets_are_replaced() {
    let dir = TempDir::new("stale");
    let socket = dir.0.join("control.sock");
    let first = serve(&socket, None, FakeDaemon::new()).await.expect("serve");
    let second = serve(&socket, None, FakeDaemon::new()).await.map(|_| ()).expect_err("a second daemon");
    assert_eq!(format!("{second:#}"), format!("another egress daemon is running on {}", socket.display()));
    assert!(client::fetch_status(&socket).await.is_ok(), "the first one still serves");
    drop(first);

    // A daemon killed with SIGKILL leaves its socket file behind.
    drop(std::os::unix::net::UnixListener::bind(&socket).expect("bind"));
    assert!(socket.exists());
    let error = client::fetch_status(&socket).await.expect_err("nobody answers");
    assert!(
        format!("{error:#}")
            .starts_with(&format!("cannot reach the egress daemon at {}: is it running? (", socket.display())),
        "{error:#}"
    );
    let _server = serve(&socket, None, FakeDaemon::new()).await.expect("replaces the stale socket");
    assert!(client::fetch_status(&socket).await.is_ok());

    let missing = dir.0.join("missing.sock");
    let error = client::fetch_status(&missing).await.expect_err("no socket");
    assert!(format!("{error:#}").contains("is it running? (No such file or directory"), "{error:#}");

    let file = dir.0.join("file");
    std::fs::write(&file, "x").expect("write");
    let error = serve(&file, None, FakeDaemon::new()).await.map(|_| ()).expect_err("not a socket");
    assert!(format!("{error:#}").contains("exists and is not a socket"), "{error:#}");
    assert!(file.exists(), "a file that is not a socket is left alone");
}

#[tokio::test]
async fn bad_and_oversized_requests_get_an_error() {
    let dir = TempDir::new("requests");
    let socket = dir.0.join("control.sock");
    let _server = serve(&socket, None, FakeDaemon::new()).await.expect("serve");
    let ask = |request: Vec<u8>| {
        let socket = socket.clone();
        async move {
            let stream = UnixStream::connect(&socket).await.expect("connect");
            let (read, mut write) = stream.into_split();
            write.write_all(&request).await.expect("request");
            let mut answer = String::new();
            BufReader::new(read).read_line(&mut answer).await.expect("answer");
            answer
        }
    };
    let answer = ask(b"{\"request\":\"reboot\"}\n".to_vec()).await;
    assert!(answer.starts_with(r#"{"kind":"error","message":"bad request: unknown variant `reboot`"#), "{answer}");
    let answer = ask(vec![b'x'; 70 * 1024]).await;
    assert_eq!(answer, "{\"kind\":\"error\",\"message\":\"request longer than 64 KiB\"}\n");
}

fn euid() -> u32 {
    // SAFETY: no preconditions.
    unsafe { libc::geteuid() }
}

#[tokio::test]
async fn a_group_opens_the_socket_to_its_members_only() {
    if euid() != 0 {
        eprintln!("skipped: needs root to chown and to connect as other users");
        return;
    }
    let dir = TempDir::new("group");
    let socket = dir.0.join("run/control.sock");
    let _server = serve(&socket, Some("daemon".into()), FakeDaemon::new()).await.expect("serve");
    let meta = std::fs::metadata(&socket).expect("socket");
    assert_eq!((meta.permissions().mode() & 0o7777, meta.gid()), (0o660, 1));
    assert!(serve(&dir.0.join("x.sock"), Some("no-such-group-egress".into()), FakeDaemon::new()).await.is_err());

    let perl = Path::new("/usr/bin/perl");
    if !perl.exists() {
        eprintln!("skipped the peer check: no /usr/bin/perl to connect as another user");
        return;
    }
    std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    // Wide open, as in the moment between bind and chmod: the credential check still holds.
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).expect("chmod");
    let ask_as = |uid: u32, gid: u32| {
        let socket = socket.clone();
        tokio::task::spawn_blocking(move || {
            use std::os::unix::process::CommandExt;
            let script = r#"use IO::Socket::UNIX; my $s = IO::Socket::UNIX->new(Peer => $ARGV[0]) or die "connect: $!";
                            print $s qq({"request":"status"}\n); print scalar <$s>;"#;
            let out = std::process::Command::new("/usr/bin/perl")
                .args(["-e", script])
                .arg(&socket)
                .uid(uid)
                .gid(gid)
                .output()
                .expect("perl");
            String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
        })
    };
    let outsider = ask_as(65534, 65534).await.expect("outsider");
    assert!(outsider.starts_with(r#"{"kind":"error","message":"permission denied: the control socket is for root and group daemon (uid 65534 asked)"}"#), "{outsider}");
    let member = ask_as(65534, 1).await.expect("member");
    assert!(member.starts_with(r#"{"kind":"status""#), "{member}");
}
