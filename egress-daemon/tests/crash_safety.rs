//! Crash and failure safety of reloads and restarts with pinned state: a daemon killed at every
//! step of an install (through the `EGRESS_FAULT_POINT` test hook) and a new daemon adopting what
//! it left, while connect loops in covered cgroups record every verdict; capacity limits refused
//! before anything is written; restarts as PID 1 in a container.

mod common;

use std::{
    collections::HashMap,
    fs,
    os::unix::process::ExitStatusExt,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use common::*;

fn egress(args: &[&str]) -> std::process::Output {
    Command::new(egress_bin()).args(args).output().expect("run egress")
}

/// `egress reload`, once the daemon answers on its control socket (it opens the socket just
/// after it reports the policies enforced).
fn reload(file: &PolicyFile) -> std::process::Output {
    let socket = file.socket.to_string_lossy().to_string();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !egress(&["status", "--socket", &socket]).status.success() {
        assert!(Instant::now() < deadline, "the control socket never answered");
        std::thread::sleep(Duration::from_millis(20));
    }
    egress(&["reload", "--socket", &socket])
}

/// `egress run` on `file` with the fault hook set (waits until it is ready).
fn daemon_with_fault(file: &PolicyFile, fault: &str) -> Daemon {
    let mut command = Command::new(egress_bin());
    command.args(["run", "--log-format", "json", "--config"]).arg(&file.path).env("EGRESS_FAULT_POINT", fault);
    Daemon::spawn(command)
}

/// The daemon's log once it holds `text` (its stderr is read by a thread), or after 5 s.
fn log_with(daemon: &Daemon, text: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !daemon.log().contains(text) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    daemon.log()
}

/// Starts `egress run` with a fault hook that fires before it becomes ready; returns how it
/// ended (it is killed after 20 s if the fault never fires).
fn run_until_fault(file: &PolicyFile, fault: &str) -> (std::process::ExitStatus, String) {
    let mut child = Command::new(egress_bin())
        .args(["run", "--log-format", "json", "--config"])
        .arg(&file.path)
        .env("EGRESS_FAULT_POINT", fault)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run egress");
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().expect("wait egress").is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let status = child.wait().expect("wait egress");
    let log = child.stderr.take().map(read_all).unwrap_or_default();
    (status, log)
}

/// A Python loop, started inside a cgroup, that connects to each target in turn until a stop
/// file appears and writes one `host:port outcome` line per attempt to a file.
struct ConnectLoop {
    child: Child,
    out: PathBuf,
}

const PY_LOOP: &str = r#"
import socket, sys, os, errno
out, stop = sys.argv[1], sys.argv[2]
targets = [(t.split(':')[0], int(t.split(':')[1])) for t in sys.argv[3:]]
with open(out, "w", buffering=1 << 16) as f:
    while not os.path.exists(stop):
        for host, port in targets:
            s = socket.socket()
            s.settimeout(2)
            try:
                s.connect((host, port)); r = "ok"
            except socket.timeout:
                r = "TIMEOUT"
            except OSError as e:
                r = errno.errorcode.get(e.errno, str(e.errno))
            s.close()
            f.write(f"{host}:{port} {r}\n")
"#;

/// One connect to each `host:port` argument, printing `host:port outcome` lines.
const PY_ONCE: &str = r#"
import socket, sys, errno
for t in sys.argv[1:]:
    host, port = t.split(':')
    s = socket.socket()
    s.settimeout(2)
    try:
        s.connect((host, int(port))); r = "ok"
    except socket.timeout:
        r = "TIMEOUT"
    except OSError as e:
        r = errno.errorcode.get(e.errno, str(e.errno))
    s.close()
    print(t, r)
"#;

impl ConnectLoop {
    fn start(cgroup: &TestCgroup, dir: &std::path::Path, name: &str, targets: &[(&str, u16)]) -> Self {
        let out = dir.join(format!("{name}.out"));
        let stop = dir.join("stop");
        let mut command = cgroup.command("python3");
        command.arg("-c").arg(PY_LOOP).arg(&out).arg(&stop);
        for (host, port) in targets {
            command.arg(format!("{host}:{port}"));
        }
        let child = command.stdin(Stdio::null()).spawn().expect("start the connect loop");
        Self { child, out }
    }

    /// Waits for the loop to end (the stop file must exist) and returns `(target, outcome)` pairs.
    fn finish(mut self) -> Vec<(String, String)> {
        let status = self.child.wait().expect("wait for the connect loop");
        assert!(status.success(), "the connect loop failed: {status}");
        let text = fs::read_to_string(&self.out).expect("read the loop's outcomes");
        text.lines()
            .filter_map(|line| line.split_once(' '))
            .map(|(target, outcome)| (target.to_string(), outcome.to_string()))
            .collect()
    }
}

/// What one policy version decides for each `host:port` a loop tries.
type Verdicts = HashMap<String, &'static str>;

fn verdicts(pairs: &[(&str, u16, &'static str)]) -> Verdicts {
    pairs.iter().map(|(host, port, outcome)| (format!("{host}:{port}"), *outcome)).collect()
}

/// Checks every attempt a loop recorded against the two versions it may have met; returns how
/// many attempts there were.
fn assert_each_outcome_is_one_versions(name: &str, outcomes: &[(String, String)], a: &Verdicts, b: &Verdicts) -> usize {
    let mut counts: HashMap<(String, String), usize> = HashMap::new();
    for (target, outcome) in outcomes {
        *counts.entry((target.clone(), outcome.clone())).or_default() += 1;
    }
    let wrong: Vec<_> = counts
        .iter()
        .filter(|((target, outcome), _)| {
            let (va, vb) = (a.get(target).copied(), b.get(target).copied());
            va != Some(outcome.as_str()) && vb != Some(outcome.as_str())
        })
        .collect();
    eprintln!("{name}: {} attempts: {counts:?}", outcomes.len());
    assert!(wrong.is_empty(), "{name}: outcomes that neither version gives: {wrong:?}");
    outcomes.len()
}

#[test]
fn a_daemon_killed_at_any_step_of_a_reload_leaves_every_connection_judged_by_the_old_or_new_policy() {
    if !privileged() {
        return;
    }
    let cg = TestCgroup::new("crash");
    let work = cg.child("work");
    let audit = cg.child("audit");
    let extra = cg.child("extra");
    let [a, b, c, d] = ["127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4"];
    let (pa, pb, pc, pd, pd2) = (
        tcp_server(&format!("{a}:0")),
        tcp_server(&format!("{b}:0")),
        tcp_server(&format!("{c}:0")),
        tcp_server(&format!("{d}:0")),
        tcp_server(&format!("{d}:0")),
    );
    // Version A lets `work` reach a, version B reaches b; both allow d only on pd and deny c.
    // `audit` (audit mode) must never be refused; `extra` has its own policy in A only, so a
    // reload to B unbinds it (it then falls back to the policy of `cg`).
    let main = |allowed: &str, port: u16| {
        format!(
            "  - name: main\n    cgroup: {}\n    default: deny\n    rules:\n      - allow: {allowed}\n        \
             protocol: tcp\n        ports: [{port}]\n      - allow: {d}\n        ports: [{pd}]\n      - deny: {c}\n",
            cg.relative
        )
    };
    let watch = format!(
        "  - name: watch\n    cgroup: {}\n    mode: audit\n    default: deny\n    rules:\n      - allow: {d}\n        \
         ports: [{pd}]\n",
        audit.relative
    );
    let only_c = format!(
        "  - name: only-c\n    cgroup: {}\n    default: deny\n    rules:\n      - allow: {c}\n",
        extra.relative
    );
    let version_a = format!("policies:\n{}{watch}{only_c}", main(a, pa));
    let version_b = format!("policies:\n{}{watch}", main(b, pb));
    let file = PolicyFile::attached_at(Some(&cg.relative), &version_a);

    let work_a = verdicts(&[(a, pa, "ok"), (b, pb, "EPERM"), (c, pc, "EPERM"), (d, pd, "ok"), (d, pd2, "EPERM")]);
    let work_b = verdicts(&[(a, pa, "EPERM"), (b, pb, "ok"), (c, pc, "EPERM"), (d, pd, "ok"), (d, pd2, "EPERM")]);
    let audit_both = verdicts(&[(c, pc, "ok"), (d, pd2, "ok")]);
    let extra_a = verdicts(&[(c, pc, "ok"), (b, pb, "EPERM"), (d, pd, "EPERM")]);
    let extra_b = verdicts(&[(c, pc, "EPERM"), (b, pb, "ok"), (d, pd, "ok")]);

    let check_settled = |version: char| {
        let (work_v, extra_v) = if version == 'A' { (&work_a, &extra_a) } else { (&work_b, &extra_b) };
        for (group, expected) in [(&work, work_v), (&audit, &audit_both), (&extra, extra_v)] {
            let targets: Vec<&str> = expected.keys().map(String::as_str).collect();
            let out = stdout_of(&group.python(PY_ONCE, &targets));
            let seen: HashMap<&str, &str> = out.lines().filter_map(|line| line.split_once(' ')).collect();
            for (target, outcome) in expected {
                assert_eq!(
                    seen.get(target.as_str()).copied(),
                    Some(*outcome),
                    "{} -> {target} once version {version} is in force",
                    group.relative
                );
            }
        }
    };

    let mut daemon = Daemon::start(&file);
    check_settled('A');
    let dir = file.path.parent().expect("policy dir").to_path_buf();
    let targets = [(a, pa), (b, pb), (c, pc), (d, pd), (d, pd2)];
    let loops = [
        ConnectLoop::start(&work, &dir, "work", &targets),
        ConnectLoop::start(&audit, &dir, "audit", &[(c, pc), (d, pd2)]),
        ConnectLoop::start(&extra, &dir, "extra", &[(c, pc), (b, pb), (d, pd)]),
    ];

    // Each point kills the daemon during a reload, except `fail-*`, which makes the step fail.
    // The faulty daemon's first install (adopting, same file) meets each point once, so `@2` is
    // the reload; `mid-unbind` is met only when a reload unbinds a cgroup. Reloads alternate
    // A -> B -> A; A -> B also unbinds `extra`.
    let steps = [
        "after-rules@2",
        "after-marker@2",
        "after-switch@2",
        "before-cleanup@2",
        "mid-unbind@1",
        "mid-cleanup@2",
        "after-switch@2",
        "after-cleanup@2",
        "fail-mid-switch@2",
        "mid-cleanup@2",
    ];
    let mut current = 'A';
    let mut kills = 0;
    for step in steps {
        let (next, next_yaml) = if current == 'A' { ('B', &version_b) } else { ('A', &version_a) };
        // Restart first, so each step also adopts the previous daemon's pins. The faulty daemon
        // meets its point during the reload only: its first install (same file) passes
        // `fault@1` only for points of the sweep, which are tested below.
        daemon.signal(libc::SIGKILL);
        drop(daemon);
        let faulty = daemon_with_fault(&file, step);
        file.rewrite_with(Some(&cg.relative), next_yaml);
        let out = reload(&file);
        assert!(!out.status.success(), "{step}: the reload must not succeed: {}", stdout_of(&out));
        if step.starts_with("fail-") {
            assert!(
                stderr_of(&out).contains("switching cgroups to the new policies failed"),
                "{step}: {}",
                stderr_of(&out)
            );
            check_settled(current);
            let out = reload(&file);
            assert!(out.status.success(), "{step}: the next reload works: {}", stderr_of(&out));
            daemon = faulty;
        } else {
            let log = log_with(&faulty, "killed at");
            let status = faulty.stop();
            assert_eq!(status.signal(), Some(libc::SIGKILL), "{step}: log:\n{log}");
            assert!(log.contains("killed at"), "{step}: the daemon died at its fault point; log:\n{log}");
            kills += 1;
            daemon = Daemon::start(&file);
            assert!(daemon.log().contains("adopting"), "{step}: log:\n{}", daemon.log());
        }
        check_settled(next);
        current = next;
    }

    // Deaths during adoption itself: after an A -> B reload killed right after its switch
    // (`extra` still bound to A's half, the rest to B's), a daemon killed once it unbound the
    // leftover, then one killed in the middle of sweeping the retired half.
    assert_eq!(current, 'A');
    daemon.signal(libc::SIGKILL);
    drop(daemon);
    let faulty = daemon_with_fault(&file, "after-switch@2");
    file.rewrite_with(Some(&cg.relative), &version_b);
    assert!(!reload(&file).status.success());
    let log = log_with(&faulty, "killed at after-switch");
    assert!(log.contains("killed at after-switch"), "log:\n{log}");
    assert_eq!(faulty.stop().signal(), Some(libc::SIGKILL));
    for fault in ["adopt-after-unbind@1", "mid-sweep@1"] {
        let (status, log) = run_until_fault(&file, fault);
        assert_eq!(status.signal(), Some(libc::SIGKILL), "{fault}: log:\n{log}");
        assert!(log.contains("killed at"), "{fault}: the daemon died at its fault point; log:\n{log}");
        kills += 1;
    }
    let daemon = Daemon::start(&file);
    check_settled('B');

    fs::write(dir.join("stop"), "").expect("stop the loops");
    let [work_loop, audit_loop, extra_loop] = loops;
    let attempts = assert_each_outcome_is_one_versions("work", &work_loop.finish(), &work_a, &work_b);
    assert_each_outcome_is_one_versions("audit", &audit_loop.finish(), &audit_both, &audit_both);
    assert_each_outcome_is_one_versions("extra", &extra_loop.finish(), &extra_a, &extra_b);
    assert!(attempts > 500, "the work loop made only {attempts} attempts");
    eprintln!("{kills} daemons killed at fault points");
    assert_eq!(
        fs::read_dir(file.pin_dir.join("links")).map(std::iter::Iterator::count).unwrap_or(0),
        PINNED_LINKS,
        "one set of links"
    );
    drop(daemon);
}

#[test]
fn a_file_needing_more_port_tables_than_a_generation_holds_is_refused_and_the_running_policy_stays() {
    if !privileged() {
        return;
    }
    let cg = TestCgroup::new("capacity");
    let allowed = tcp_server("127.0.0.1:0");
    let other = tcp_server("127.0.0.1:0");
    let small = format!(
        "policies:\n  - name: small\n    cgroup: {}\n    default: deny\n    rules:\n      - allow: 127.0.0.1\n        \
         protocol: tcp\n        ports: [{allowed}]\n",
        cg.relative
    );
    let file = PolicyFile::attached_at(Some(&cg.relative), &small);
    let _daemon = Daemon::start(&file);
    assert_eq!(tcp_connect_from(&cg, "127.0.0.1", allowed), "ok");
    assert_eq!(tcp_connect_from(&cg, "127.0.0.1", other), "EPERM");

    // Every rule is a /32 with a port: one distinct port table each.
    let tables = 32_769;
    let mut big = format!("policies:\n  - name: big\n    cgroup: {}\n    default: deny\n    rules:\n", cg.relative);
    for i in 0..tables {
        big.push_str(&format!("      - allow: 10.{}.{}.{}\n        ports: [80]\n", i >> 16, (i >> 8) & 255, i & 255));
    }
    file.rewrite_with(Some(&cg.relative), &big);
    let expected = format!("port tables: {tables} needed, 32768 available per generation");
    let out = reload(&file);
    assert!(!out.status.success());
    assert!(stderr_of(&out).contains(&expected), "want {expected:?} in: {}", stderr_of(&out));
    let check = egress(&["check", &file.path.to_string_lossy()]);
    assert_eq!(check.status.code(), Some(2), "egress check refuses it too");
    assert!(stderr_of(&check).contains(&expected), "{}", stderr_of(&check));

    // The running policy keeps its port rules, also after a second refused reload (which would
    // reuse the same table ids).
    assert!(!reload(&file).status.success());
    assert_eq!(tcp_connect_from(&cg, "127.0.0.1", allowed), "ok");
    assert_eq!(tcp_connect_from(&cg, "127.0.0.1", other), "EPERM");
    file.rewrite_with(Some(&cg.relative), &small);
    assert!(reload(&file).status.success());
    assert_eq!(tcp_connect_from(&cg, "127.0.0.1", allowed), "ok");
    assert_eq!(tcp_connect_from(&cg, "127.0.0.1", other), "EPERM");
}

#[test]
fn a_daemon_that_left_no_bindings_is_adopted_without_wiping_the_next_generation() {
    if !privileged() {
        return;
    }
    let cg = TestCgroup::new("nobind");
    let port = tcp_server("127.0.0.3:0");
    let late = format!("{}/late", cg.relative);
    let file = PolicyFile::attached_at(
        Some(&cg.relative),
        &format!("policies:\n  - name: watch\n    cgroup: {late}\n    mode: audit\n    default: deny\n"),
    );
    let first = Daemon::start(&file);
    first.signal(libc::SIGKILL);
    drop(first);
    let second = Daemon::start(&file);
    let late = cg.child("late");
    // The new cgroup is bound to the audit policy: refused flows are let through and reported.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        assert_eq!(tcp_connect_from(&late, "127.0.0.3", port), "ok", "audit mode never refuses");
        let event = second.events().into_iter().find(|e| e["policy"] == "watch");
        if let Some(event) = event {
            assert_eq!(event["verdict"], "audit", "{event}");
            break;
        }
        assert!(Instant::now() < deadline, "no event for the late cgroup; log:\n{}", second.log());
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_daemon_that_is_pid_1_in_its_namespace_restarts_after_a_crash() {
    if !privileged() {
        return;
    }
    let cg = TestCgroup::new("pid1");
    let port = tcp_server("127.0.0.2:0");
    let file = PolicyFile::attached_at(
        Some(&cg.relative),
        &format!("policies:\n  - name: p\n    cgroup: {}\n    default: deny\n", cg.relative),
    );
    let as_pid_1 = || {
        let mut command = Command::new("unshare");
        command.args(["--pid", "--fork", "--kill-child"]).arg(egress_bin());
        command.args(["run", "--log-format", "json", "--config"]).arg(&file.path);
        Daemon::spawn(command)
    };
    let first = as_pid_1();
    assert_eq!(tcp_connect_from(&cg, "127.0.0.2", port), "EPERM");
    first.signal(libc::SIGKILL);
    drop(first);
    let second = as_pid_1();
    assert!(second.log().contains("adopting"), "log:\n{}", second.log());
    assert_eq!(tcp_connect_from(&cg, "127.0.0.2", port), "EPERM");
    assert_eq!(fs::read_dir(file.pin_dir.join("links")).map(std::iter::Iterator::count).unwrap_or(0), PINNED_LINKS);
    second.signal(libc::SIGKILL);
    drop(second);
    let third = as_pid_1();
    assert_eq!(tcp_connect_from(&cg, "127.0.0.2", port), "EPERM");
    drop(third);
}
