//! Running as a service: control socket (status, logs, reload), atomic reloads, restarts
//! without an enforcement gap, metrics, and the systemd unit.

mod common;

use std::{
    fs,
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use common::*;
use serde_json::Value;

fn file_for(cg: &TestCgroup, policies: &str) -> PolicyFile {
    PolicyFile::attached_at(Some(&cg.relative), policies)
}

fn one_policy(cg: &TestCgroup, rules: &str) -> String {
    format!("policies:\n  - name: svc\n    cgroup: {}\n    default: deny\n    rules:\n{rules}", cg.relative)
}

fn egress(args: &[&str]) -> std::process::Output {
    Command::new(egress_bin()).args(args).output().expect("run egress")
}

fn link_pins(file: &PolicyFile) -> usize {
    fs::read_dir(file.pin_dir.join("links")).map(std::iter::Iterator::count).unwrap_or(0)
}

#[test]
fn sigkill_leaves_enforcement_in_place_and_a_new_daemon_takes_over() {
    if !privileged() {
        return;
    }
    let cg = TestCgroup::new("restart");
    let allowed = tcp_server("127.0.0.1:0");
    let denied = tcp_server("127.0.0.2:0");
    let file = file_for(
        &cg,
        &one_policy(&cg, &format!("      - allow: 127.0.0.1\n        protocol: tcp\n        ports: [{allowed}]\n")),
    );
    let first = Daemon::start(&file);
    assert_eq!(tcp_connect_from(&cg, "127.0.0.2", denied), "EPERM");
    first.signal(libc::SIGKILL);
    drop(first);

    // No daemon: the pinned programs and maps still enforce.
    assert_eq!(tcp_connect_from(&cg, "127.0.0.2", denied), "EPERM");
    assert_eq!(tcp_connect_from(&cg, "127.0.0.1", allowed), "ok");

    let second = Daemon::start(&file);
    assert!(second.log().contains("adopting"), "log:\n{}", second.log());
    assert_eq!(tcp_connect_from(&cg, "127.0.0.2", denied), "EPERM");
    assert_eq!(tcp_connect_from(&cg, "127.0.0.1", allowed), "ok");
    // The events raised while no daemon ran are delivered by the new one.
    second.wait_event(Duration::from_secs(3), |e| e["dst"] == "127.0.0.2" && e["verdict"] == "blocked");
    assert_eq!(link_pins(&file), LINKS_PER_ATTACH, "the old links are replaced, not doubled");
    second.stop();
    assert_eq!(tcp_connect_from(&cg, "127.0.0.2", denied), "EPERM", "--on-exit keep is the default");
}

#[test]
fn on_exit_detach_removes_enforcement_when_the_daemon_stops() {
    if !privileged() {
        return;
    }
    let cg = TestCgroup::new("detach");
    let port = tcp_server("127.0.0.2:0");
    let file = file_for(&cg, &one_policy(&cg, ""));
    let daemon = Daemon::start_with(&file, &["--on-exit", "detach"]);
    assert_eq!(tcp_connect_from(&cg, "127.0.0.2", port), "EPERM");
    assert!(daemon.stop().success());
    assert_eq!(tcp_connect_from(&cg, "127.0.0.2", port), "ok");
    assert!(!egress::kernel::pinned_maps_exist(&file.pin_dir), "pins are removed");
}

#[test]
fn reloads_switch_atomically_and_never_let_anything_through_unfiltered() {
    if !privileged() {
        return;
    }
    let cg = TestCgroup::new("reload");
    let [a, b, c, d] = ["127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4"];
    let ports: Vec<u16> = [a, b, c, d].iter().map(|ip| tcp_server(&format!("{ip}:0"))).collect();
    // v1 allows a, v2 allows b; both allow d and deny c.
    let version =
        |allowed: &str| one_policy(&cg, &format!("      - allow: {allowed}\n      - allow: {d}\n      - deny: {c}\n"));
    let file = file_for(&cg, &version(a));
    let _daemon = Daemon::start(&file);
    let client = r#"
import socket, sys, time, errno
targets = [(sys.argv[i], int(sys.argv[i + 1])) for i in range(1, 9, 2)]
end = time.time() + float(sys.argv[9])
while time.time() < end:
    for host, port in targets:
        s = socket.socket()
        try:
            s.connect((host, port)); r = "ok"
        except OSError as e:
            r = errno.errorcode.get(e.errno, str(e.errno))
        s.close()
        print(host, r)
"#;
    let mut args: Vec<String> = vec![];
    for (ip, port) in [a, b, c, d].iter().zip(&ports) {
        args.push(ip.to_string());
        args.push(port.to_string());
    }
    args.push("4".into());
    let child =
        cg.command("python3").arg("-c").arg(client).args(&args).stdout(Stdio::piped()).spawn().expect("client loop");
    let socket = file.socket.to_string_lossy().to_string();
    let started = Instant::now();
    let mut reloads = 0;
    while started.elapsed() < Duration::from_secs(3) {
        file.rewrite_with(Some(&cg.relative), &version(if reloads % 2 == 0 { b } else { a }));
        let out = egress(&["reload", "--socket", &socket]);
        assert!(out.status.success(), "reload failed: {}", stderr_of(&out));
        reloads += 1;
    }
    let out = child.wait_with_output().expect("client");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut seen = std::collections::HashMap::new();
    for line in text.lines() {
        let (host, result) = line.split_once(' ').expect("host result");
        *seen.entry((host.to_string(), result.to_string())).or_insert(0) += 1;
        match host {
            h if h == c => assert_eq!(result, "EPERM", "denied by both versions: never let through"),
            h if h == d => assert_eq!(result, "ok", "allowed by both versions: never refused"),
            _ => assert!(result == "ok" || result == "EPERM", "unexpected {line}"),
        }
    }
    assert!(reloads >= 5, "only {reloads} reloads");
    assert!(text.lines().count() > 200, "client made only {} attempts", text.lines().count());
    eprintln!("{reloads} reloads, outcomes: {seen:?}");
    // The kernel reused decisions for a and b all along (per cgroup and per CPU): the file in
    // force now decides, not one of them.
    let (now_allowed, now_denied) =
        if (reloads - 1) % 2 == 0 { ((b, ports[1]), (a, ports[0])) } else { ((a, ports[0]), (b, ports[1])) };
    for _ in 0..3 {
        assert_eq!(tcp_connect_from(&cg, now_allowed.0, now_allowed.1), "ok", "allowed by the file in force");
        assert_eq!(tcp_connect_from(&cg, now_denied.0, now_denied.1), "EPERM", "denied by the file in force");
    }
}

#[test]
fn a_broken_file_on_reload_is_rejected_with_its_position_and_enforcement_goes_on() {
    if !privileged() {
        return;
    }
    let cg = TestCgroup::new("badreload");
    let port = tcp_server("127.0.0.2:0");
    let file = file_for(&cg, &one_policy(&cg, ""));
    let daemon = Daemon::start(&file);
    let before = file.status_json();
    file.rewrite_with(Some(&cg.relative), &one_policy(&cg, "      - allow: 127.0.0.1/8\n"));
    let out = egress(&["reload", "--socket", &file.socket.to_string_lossy()]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = stderr_of(&out);
    let expected = format!("{}:10:16:", file.path.display());
    assert!(stderr.contains(&expected), "want {expected} in: {stderr}");
    assert!(stderr.contains("host bits"), "{stderr}");
    // SIGHUP takes the same path.
    daemon.signal(libc::SIGHUP);
    std::thread::sleep(Duration::from_millis(300));
    assert!(daemon.log().contains("reload rejected"), "log:\n{}", daemon.log());
    assert_eq!(tcp_connect_from(&cg, "127.0.0.2", port), "EPERM", "the old policy stays in force");
    assert_eq!(file.status_json()["loaded_at"], before["loaded_at"]);
}

#[test]
fn logs_follow_blocked_shows_a_blocked_connect_within_a_second() {
    if !privileged() {
        return;
    }
    let cg = TestCgroup::new("logs");
    let allowed = tcp_server("127.0.0.1:0");
    let denied = tcp_server("127.0.0.2:0");
    let file = file_for(&cg, &one_policy(&cg, "      - allow: 127.0.0.1\n"));
    let _daemon = Daemon::start(&file);
    assert_eq!(tcp_connect_from(&cg, "127.0.0.1", allowed), "ok");
    let mut follower = Command::new(egress_bin())
        .args(["logs", "-f", "--blocked", "--json", "--socket"])
        .arg(&file.socket)
        .stdout(Stdio::piped())
        .spawn()
        .expect("egress logs -f");
    let (tx, rx) = mpsc::channel();
    let stdout = follower.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send((Instant::now(), line));
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    let attempted = Instant::now();
    assert_eq!(tcp_connect_from(&cg, "127.0.0.2", denied), "EPERM");
    let (seen_at, line) = rx.recv_timeout(Duration::from_secs(2)).expect("a blocked event");
    let event: Value = serde_json::from_str(&line).expect("JSON event");
    assert_eq!(event["verdict"], "blocked");
    assert_eq!(event["dst"], "127.0.0.2");
    assert!(seen_at.duration_since(attempted) < Duration::from_secs(1));
    assert!(rx.recv_timeout(Duration::from_millis(200)).is_err(), "--blocked shows no allowed flows");
    let _ = follower.kill();
    let _ = follower.wait();

    // The history (no -f) has both, in order.
    let out = egress(&["logs", "--json", "--socket", &file.socket.to_string_lossy()]);
    let verdicts: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .map(|e| e["verdict"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(verdicts, ["allowed", "blocked"]);
}

#[test]
fn status_and_metrics_say_what_is_enforced_where() {
    if !privileged() {
        return;
    }
    let cg = TestCgroup::new("status");
    let port = tcp_server("127.0.0.2:0");
    let metrics_port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("port").port();
    let file = file_for(&cg, &one_policy(&cg, ""));
    file.rewrite(&format!(
        "{}  metrics: 127.0.0.1:{metrics_port}\n{}",
        file.settings(Some(&cg.relative)),
        one_policy(&cg, "")
    ));
    let _daemon = Daemon::start(&file);
    assert_eq!(tcp_connect_from(&cg, "127.0.0.2", port), "EPERM");
    std::thread::sleep(Duration::from_millis(100));
    let status = file.status_json();
    let row = status["cgroups"]
        .as_array()
        .and_then(|rows| rows.iter().find(|r| r["cgroup"] == cg.relative.as_str()))
        .cloned()
        .unwrap_or_else(|| panic!("no row for the cgroup: {status:#}"));
    assert_eq!(row["policy"], "svc");
    assert_eq!(row["mode"], "enforce");
    assert_eq!(row["blocked"], 1);

    let text = egress(&["status", "--socket", &file.socket.to_string_lossy()]);
    assert!(stdout_of(&text).contains(&cg.relative), "{}", stdout_of(&text));

    let mut stream = std::net::TcpStream::connect(("127.0.0.1", metrics_port)).expect("metrics");
    std::io::Write::write_all(&mut stream, b"GET /metrics HTTP/1.0\r\n\r\n").expect("request");
    let body = read_all(stream);
    assert!(body.contains("egress_flows_total{policy=\"svc\",verdict=\"blocked\"} 1"), "{body}");
    assert!(body.contains("egress_events_dropped_total 0"), "{body}");
}

#[test]
fn the_systemd_unit_verifies() {
    let unit = fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../config/egress.service")).expect("unit");
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/../config/egress.yaml");
    let dir = std::env::temp_dir().join(unique("egress-unit"));
    fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("egress.service");
    let unit =
        unit.replace("/usr/bin/egress", &egress_bin().to_string_lossy()).replace("/etc/egress/egress.yaml", config);
    fs::write(&path, unit).expect("write unit");
    // `man:egress(1)` comes with the Debian package, not with a checkout.
    let out = Command::new("systemd-analyze").args(["verify", "--man=no"]).arg(&path).output();
    let _ = fs::remove_dir_all(&dir);
    match out {
        Ok(out) => assert!(out.status.success() && out.stderr.is_empty(), "{}", stderr_of(&out)),
        Err(error) => panic!("systemd-analyze is needed for this test: {error}"),
    }
}

#[test]
fn events_raised_while_no_daemon_runs_are_delivered_or_counted_as_lost() {
    if !privileged() {
        return;
    }
    let cg = TestCgroup::new("lost");
    let file = file_for(&cg, &one_policy(&cg, ""));
    // Budgets above the burst, so that events are lost to the full ring, not suppressed.
    let yaml = fs::read_to_string(&file.path).expect("read policy");
    let budgets = "settings:\n  events_per_second: 1000000\n  events_written_per_second: 1000000\n";
    file.rewrite(&yaml.replacen("settings:\n", budgets, 1));
    let first = Daemon::start(&file);
    first.signal(libc::SIGKILL);
    drop(first);
    // More blocked connects than the ring buffer holds (4 MiB of 80-byte records).
    let burst = r#"
import socket, errno
refused = 0
for _ in range(70000):
    s = socket.socket()
    try:
        s.connect(("127.0.0.2", 9))
    except PermissionError:
        refused += 1
    s.close()
print(refused)
"#;
    assert_eq!(stdout_of(&cg.python(burst, &[])), "70000");
    let second = Daemon::start(&file);
    let notice = second.wait_event(Duration::from_secs(5), |e| e["notice"] == "events_dropped");
    let dropped = notice["dropped"].as_u64().expect("dropped count");
    let delivered = second.events().iter().filter(|e| e["verdict"] == "blocked").count() as u64;
    assert!(dropped > 0, "{notice}");
    assert!(second.log().contains("lost while no daemon was reading"), "log:\n{}", second.log());
    assert!(delivered > 40_000, "the buffered events are delivered, got {delivered}");
    assert_eq!(delivered + dropped, 70_000, "every event is delivered or counted");
}
