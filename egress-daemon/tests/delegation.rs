//! Names prove nothing where an unprivileged user makes the cgroups: `systemd_unit` and
//! `container` selectors (and the wildcard part of `cgroup` globs) select a cgroup only where root
//! placed it. A user who makes `nginx.service` or `docker-<id>.scope` in the subtree systemd
//! delegated to them stays under the stricter policy above it, and `egress status` lists the
//! match as ignored.

mod common;

use std::{
    ffi::CString,
    fs,
    os::unix::fs::chown,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use common::*;
use serde_json::Value;

const USER: u32 = 4242;
const DOCKER_ID: &str = "7e57deadbeef0a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293";

/// Delegates a cgroup to `uid` as systemd delegates `user@UID.service`: the directory and the
/// control files a delegate writes are chowned to the user.
fn delegate(cgroup: &TestCgroup, uid: u32) {
    chown(&cgroup.dir, Some(uid), Some(uid)).expect("chown cgroup");
    for file in ["cgroup.procs", "cgroup.threads", "cgroup.subtree_control"] {
        chown(cgroup.dir.join(file), Some(uid), Some(uid)).expect("chown control file");
    }
}

/// `mkdir DIR` as `uid`: the user makes the cgroup, not root.
fn mkdir_as(uid: u32, dir: &Path) {
    let id = uid.to_string();
    let status = Command::new("setpriv")
        .args(["--reuid", &id, "--regid", &id, "--clear-groups", "mkdir"])
        .arg(dir)
        .status()
        .expect("run setpriv");
    assert!(status.success(), "uid {uid} could not mkdir {}", dir.display());
    assert_eq!(std::os::unix::fs::MetadataExt::uid(&fs::metadata(dir).expect("stat")), uid);
}

/// Marks a cgroup delegated the way systemd marks every unit with `Delegate=yes`.
fn mark_delegated(cgroup: &TestCgroup) {
    let path = CString::new(cgroup.dir.to_string_lossy().as_bytes()).expect("path");
    let name = CString::new("trusted.delegate").expect("name");
    // SAFETY: valid C strings and a one-byte value.
    let set = unsafe { libc::setxattr(path.as_ptr(), name.as_ptr(), b"1".as_ptr().cast(), 1, 0) };
    assert_eq!(set, 0, "setxattr trusted.delegate: {}", std::io::Error::last_os_error());
}

/// `(cgroup, policy)` of every row of a status report's `rows` list ("ignored" or "cgroups").
fn rows(status: &Value, rows: &str) -> Vec<(String, String)> {
    let mut list: Vec<(String, String)> = status[rows]
        .as_array()
        .map(|rows| {
            rows.iter()
                .map(|row| {
                    (row["cgroup"].as_str().unwrap_or("").to_string(), row["policy"].as_str().unwrap_or("").to_string())
                })
                .collect()
        })
        .unwrap_or_default();
    list.sort();
    list
}

fn ignored(status: &Value) -> Vec<(String, String)> {
    rows(status, "ignored")
}

fn bound(status: &Value) -> Vec<(String, String)> {
    rows(status, "cgroups")
}

fn pair(cgroup: &TestCgroup, policy: &str) -> (String, String) {
    (cgroup.relative.clone(), policy.to_string())
}

#[test]
fn unit_and_container_names_in_a_delegated_subtree_do_not_select_it() {
    if !privileged() {
        return;
    }
    let parent = TestCgroup::new("delegation");
    let nginx = parent.child("system.slice/nginx.service");
    let docker = parent.child(&format!("system.slice/docker-{DOCKER_ID}.scope"));
    let user = parent.child(&format!("user.slice/user@{USER}.service"));
    delegate(&user, USER);
    // The user's own cgroups, made by the user, with the names of the root-placed ones (the
    // container id is readable in /proc/PID/cgroup).
    mkdir_as(USER, &user.dir.join("nginx.service"));
    let forged_nginx = user.child("nginx.service");
    mkdir_as(USER, &user.dir.join("user.slice"));
    mkdir_as(USER, &user.dir.join(format!("user.slice/docker-{DOCKER_ID}.scope")));
    let forged_docker = user.child(&format!("user.slice/docker-{DOCKER_ID}.scope"));
    // A root-owned unit with Delegate=yes: what its processes make below it is theirs too.
    let runner = parent.child("system.slice/runner.service");
    mark_delegated(&runner);
    let runner_nginx = runner.child("nginx.service");

    let port = tcp_server("127.0.0.1:0");
    let p = &parent.relative;
    let file = PolicyFile::attached_at(
        Some(p),
        &format!(
            "policies:
  - name: strict
    cgroup: {p}
    default: deny
    rules: []
  - name: nginx
    systemd_unit: nginx.service
    default: allow
    rules: []
  - name: web
    container: {short}
    default: allow
    rules: []
  - name: services
    cgroup: {p}/**/nginx.service
    default: allow
    rules: []
",
            short = &DOCKER_ID[..12],
        ),
    );
    let daemon = Daemon::start(&file);

    // Where root placed them, the names select.
    assert_eq!(tcp_connect_from(&nginx, "127.0.0.1", port), "ok");
    assert_eq!(tcp_connect_from(&docker, "127.0.0.1", port), "ok");
    // Where the user made them, the stricter policy above governs.
    assert_eq!(tcp_connect_from(&forged_nginx, "127.0.0.1", port), "EPERM", "forged unit name");
    assert_eq!(tcp_connect_from(&forged_docker, "127.0.0.1", port), "EPERM", "forged container id");
    assert_eq!(tcp_connect_from(&runner_nginx, "127.0.0.1", port), "EPERM", "inside a Delegate=yes unit");

    let status = file.status_json();
    assert_eq!(
        bound(&status),
        {
            let mut want = vec![pair(&parent, "strict"), pair(&nginx, "nginx"), pair(&docker, "web")];
            want.sort();
            want
        },
        "{status:#}"
    );
    let mut want_ignored = vec![
        pair(&forged_nginx, "nginx"),
        pair(&forged_nginx, "services"),
        pair(&forged_docker, "web"),
        pair(&runner_nginx, "nginx"),
        pair(&runner_nginx, "services"),
    ];
    want_ignored.sort();
    assert_eq!(ignored(&status), want_ignored, "{status:#}");
    let reason = status["ignored"]
        .as_array()
        .and_then(|rows| rows.iter().find(|row| row["cgroup"] == forged_nginx.relative.as_str()))
        .map(|row| row["reason"].as_str().unwrap_or("").to_string())
        .unwrap_or_default();
    assert!(reason.contains(&format!("{} is owned by uid {USER}", user.relative)), "{reason}");

    // A cgroup the user makes while the daemon runs is checked as it is discovered.
    mkdir_as(USER, &user.dir.join("late.slice"));
    mkdir_as(USER, &user.dir.join("late.slice/nginx.service"));
    let late = user.child("late.slice/nginx.service");
    let started = Instant::now();
    while !ignored(&file.status_json()).contains(&pair(&late, "nginx")) {
        assert!(started.elapsed() < Duration::from_secs(5), "the new cgroup never showed as ignored");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(tcp_connect_from(&late, "127.0.0.1", port), "EPERM");

    // Each ignored match is warned about once, also across a reload.
    daemon.signal(libc::SIGHUP);
    let started = Instant::now();
    while !daemon.log().contains("reloaded:") {
        assert!(started.elapsed() < Duration::from_secs(5), "no reload; log:\n{}", daemon.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = daemon.log();
    let warnings = |cgroup: &TestCgroup| {
        log.lines().filter(|l| l.contains("does not govern it") && l.contains(&cgroup.relative)).count()
    };
    assert_eq!(warnings(&forged_nginx), 2, "one per policy: {log}");
    assert_eq!(warnings(&forged_docker), 1, "{log}");
    assert_eq!(warnings(&late), 2, "{log}");
    assert_eq!(ignored(&file.status_json()).len(), want_ignored.len() + 2);
    assert_eq!(tcp_connect_from(&forged_docker, "127.0.0.1", port), "EPERM");

    // Gone cgroups leave the list.
    drop(late);
    let started = Instant::now();
    while ignored(&file.status_json()).len() != want_ignored.len() {
        assert!(started.elapsed() < Duration::from_secs(5), "the removed cgroup stayed in the list");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn an_exact_path_into_a_delegated_subtree_is_the_operators_word() {
    if !privileged() {
        return;
    }
    let parent = TestCgroup::new("delegation-exact");
    let user = parent.child(&format!("user.slice/user@{USER}.service"));
    delegate(&user, USER);
    mkdir_as(USER, &user.dir.join("app.slice"));
    mkdir_as(USER, &user.dir.join("app.slice/web.service"));
    let web = user.child("app.slice/web.service");
    let port = tcp_server("127.0.0.1:0");
    let p = &parent.relative;
    let file = PolicyFile::attached_at(
        Some(p),
        &format!(
            "policies:
  - name: user
    cgroup: {user}
    default: deny
    rules: []
  - name: web
    cgroup: {web}
    default: allow
    rules: []
",
            user = user.relative,
            web = web.relative,
        ),
    );
    let _daemon = Daemon::start(&file);
    assert_eq!(tcp_connect_from(&web, "127.0.0.1", port), "ok", "the exact path selects it");
    let other = user.child("app.slice");
    assert_eq!(tcp_connect_from(&other, "127.0.0.1", port), "EPERM", "the user's policy covers the rest");
    assert!(ignored(&file.status_json()).is_empty());
}

#[test]
fn a_policy_inside_a_delegated_subtree_is_warned_about_until_its_root_is_covered() {
    if !privileged() {
        return;
    }
    const OWNER: u32 = 4243;
    let parent = TestCgroup::new("deleg-root");
    let user = parent.child(&format!("user.slice/user@{OWNER}.service"));
    delegate(&user, OWNER);
    mkdir_as(OWNER, &user.dir.join("app.slice"));
    mkdir_as(OWNER, &user.dir.join("app.slice/job.service"));
    let job = user.child("app.slice/job.service");
    let apps = format!(
        "policies:\n  - name: apps\n    cgroup: {}/app.slice/job.service\n    default: deny\n    rules: []\n",
        user.relative
    );
    let file = PolicyFile::attached_at(Some(&parent.relative), &apps);
    let _daemon = Daemon::start(&file);
    let port = tcp_server("127.0.0.1:0");
    assert_eq!(tcp_connect_from(&job, "127.0.0.1", port), "EPERM");

    // The attack: the user moves the job to a cgroup of their own that the selector does not name.
    mkdir_as(OWNER, &user.dir.join("escape.slice"));
    let escape = user.child("escape.slice");
    assert_eq!(tcp_connect_from(&escape, "127.0.0.1", port), "ok", "nothing holds the rest of the subtree");
    // Both checks say so, naming the delegation root.
    let status = file.status_json();
    let warnings: Vec<&str> = status["warnings"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
    assert!(warnings.len() == 1 && warnings[0].contains(&format!("inside `{}`", user.relative)), "{status:#}");
    let check = Command::new(egress_bin()).arg("check").arg(&file.path).output().expect("run egress check");
    assert!(check.status.success(), "{}", stderr_of(&check));
    assert!(
        stderr_of(&check)
            .contains(&format!("warning: policy `apps` selects `{}/app.slice/job.service`", user.relative)),
        "{}",
        stderr_of(&check)
    );

    // A policy at the delegation root holds the whole subtree, and the warning goes.
    file.rewrite_with(
        Some(&parent.relative),
        &format!("{apps}  - name: user\n    cgroup: {}\n    default: deny\n    rules: []\n", user.relative),
    );
    let reload =
        Command::new(egress_bin()).args(["reload", "--socket"]).arg(&file.socket).output().expect("run egress reload");
    assert!(reload.status.success(), "{}", stderr_of(&reload));
    assert_eq!(tcp_connect_from(&escape, "127.0.0.1", port), "EPERM");
    let status = file.status_json();
    assert!(status["warnings"].as_array().is_none_or(Vec::is_empty), "{status:#}");
    let check = Command::new(egress_bin()).arg("check").arg(&file.path).output().expect("run egress check");
    assert!(!stderr_of(&check).contains("warning"), "{}", stderr_of(&check));
}

#[test]
fn a_delegated_subtree_over_its_share_of_bindings_is_refused_not_left_unfiltered() {
    if !privileged() {
        return;
    }
    const OWNER: u32 = 4244;
    const SHARE: usize = 1024;
    let parent = TestCgroup::new("deleg-share");
    let user = parent.child(&format!("user.slice/user@{OWNER}.service"));
    delegate(&user, OWNER);
    mkdir_as(OWNER, &user.dir.join("jobs.slice"));
    let file = PolicyFile::attached_at(
        Some(&parent.relative),
        &format!(
            "policies:\n  - name: jobs\n    cgroup: {}/jobs.slice/*\n    default: deny\n    rules:\n      - allow: 127.0.0.1\n",
            user.relative
        ),
    );
    let daemon = Daemon::start(&file);
    let port = tcp_server("127.0.0.1:0");
    let count_bound = || {
        file.status_json()["cgroups"]
            .as_array()
            .map_or(0, |rows| rows.iter().filter(|row| row["policy"] == "jobs").count())
    };
    // The user makes as many matching cgroups as the subtree's share, each bound.
    let id = OWNER.to_string();
    let made = Command::new("setpriv")
        .args(["--reuid", &id, "--regid", &id, "--clear-groups", "sh", "-c"])
        .arg(format!(
            "cd {} && for i in $(seq 1 {SHARE}); do mkdir j$i || exit 1; done",
            user.dir.join("jobs.slice").display()
        ))
        .status()
        .expect("run setpriv");
    assert!(made.success());
    let started = Instant::now();
    while count_bound() < SHARE {
        assert!(started.elapsed() < Duration::from_secs(120), "only {} of {SHARE} bound", count_bound());
        std::thread::sleep(Duration::from_millis(200));
    }
    let first = user.child("jobs.slice/j1");
    assert_eq!(tcp_connect_from(&first, "127.0.0.1", port), "ok");

    // One more: without a share it would take another entry of the table every cgroup needs;
    // with one, the subtree is refused everything but for the cgroups already bound.
    mkdir_as(OWNER, &user.dir.join("jobs.slice/over"));
    let over = user.child("jobs.slice/over");
    let started = Instant::now();
    while file.status_json()["unbindable"].as_array().is_none_or(Vec::is_empty) {
        assert!(started.elapsed() < Duration::from_secs(10), "the subtree was never refused");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(tcp_connect_from(&over, "127.0.0.1", port), "EPERM", "a cgroup over the share");
    daemon.wait_event(Duration::from_secs(5), |e| e["verdict"] == "blocked" && e["rule"] == "unbindable");
    assert_eq!(tcp_connect_from(&first, "127.0.0.1", port), "ok", "a cgroup bound within the share");
    assert_eq!(tcp_connect_from(&first, "127.0.0.2", port), "EPERM");
    let status = file.status_json();
    assert_eq!(status["unbindable"][0]["cgroup"], user.relative.as_str(), "{}", status["unbindable"]);
    assert_eq!(count_bound(), SHARE);

    // A reload matches the tree again and keeps the subtree to its share.
    daemon.signal(libc::SIGHUP);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(tcp_connect_from(&over, "127.0.0.1", port), "EPERM", "after a reload");
    assert_eq!(tcp_connect_from(&first, "127.0.0.1", port), "ok", "after a reload");
    assert_eq!(count_bound(), SHARE);
}
