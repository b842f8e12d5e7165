//! egress in a private cgroup namespace (a container, a Kubernetes pod): the cgroup2 mount there
//! is rooted at the namespace's cgroup while the kernel counts depths from the host's root, so
//! `run` and `exec` refuse to start with that mount, and use the host's root when it is mounted
//! too. `check` needs no kernel and works anywhere.

mod common;

use std::{fs, path::PathBuf, process::Command};

use common::*;

/// `egress ARGS...` started in `cgroup`, in a new cgroup namespace rooted there and a new mount
/// namespace where `setup` (shell) runs first, as a container runtime would set it up. With a
/// `limit` (seconds) it is killed after that long, so a command that should refuse to start
/// cannot hang the test.
fn in_namespaces(cgroup: &TestCgroup, setup: &str, args: &[&str], limit: Option<u32>) -> Command {
    let mut command = match limit {
        Some(seconds) => {
            let mut command = cgroup.command("timeout");
            command.arg(seconds.to_string()).arg("unshare");
            command
        }
        None => cgroup.command("unshare"),
    };
    command
        .args(["--cgroup", "--mount", "--propagation", "private", "sh", "-c"])
        .arg(format!("{setup} && exec \"$@\""))
        .arg("sh")
        .arg(egress_bin())
        .args(args);
    command
}

fn policy_for(work: &TestCgroup) -> PolicyFile {
    PolicyFile::attached_at(
        Some(&work.relative),
        &format!("policies:\n  - name: strict\n    cgroup: {}\n    default: deny\n    rules: []\n", work.relative),
    )
}

#[test]
fn run_and_exec_refuse_the_namespaces_own_cgroup2_mount_and_check_still_works() {
    if !privileged() {
        return;
    }
    let parent = TestCgroup::new("cgroupns");
    let inside = parent.child("ns");
    let work = parent.child("work");
    let file = policy_for(&work);
    let config = file.path.to_string_lossy().to_string();
    let mount = cgroup2_mount();
    let remount = format!("umount {m} && mount -t cgroup2 cgroup2 {m}", m = mount.display());

    for args in
        [vec!["run", "--config", &config], vec!["exec", "--config", &config, "--policy", "strict", "--", "true"]]
    {
        let out = in_namespaces(&inside, &remount, &args, Some(20)).output().expect("run egress");
        let stderr = stderr_of(&out);
        assert_eq!(out.status.code(), Some(1), "egress {}: {stderr}", args[0]);
        assert!(stderr.contains("rooted below the host's root cgroup"), "egress {}: {stderr}", args[0]);
        assert!(stderr.contains("--cgroupns=host"), "the fix is named: {stderr}");
    }

    let out = in_namespaces(&inside, &remount, &["check", &config], Some(20)).output().expect("run egress check");
    assert!(out.status.success(), "egress check: {}", stderr_of(&out));
    assert!(stdout_of(&out).contains("strict"), "{}", stdout_of(&out));
}

/// Removes a directory made for a mount point on drop.
struct MountPoint(PathBuf);

impl Drop for MountPoint {
    fn drop(&mut self) {
        let _ = fs::remove_dir(&self.0);
    }
}

#[test]
fn run_uses_the_hosts_cgroup2_root_when_it_is_mounted_too() {
    if !privileged() {
        return;
    }
    let parent = TestCgroup::new("cgroupns-host");
    let inside = parent.child("ns");
    let work = parent.child("work");
    let file = policy_for(&work);
    let config = file.path.to_string_lossy().to_string();
    let mount = cgroup2_mount();
    let host_root = MountPoint(std::env::temp_dir().join(unique("egress-test-host-cgroup2")));
    fs::create_dir_all(&host_root.0).expect("mount point");
    // As with a Kubernetes hostPath volume of /sys/fs/cgroup: the host's root elsewhere, the
    // namespace's own mount at the usual place.
    let setup = format!(
        "mount --bind {mount} {host} && umount {mount} && mount -t cgroup2 cgroup2 {mount}",
        mount = mount.display(),
        host = host_root.0.display()
    );
    let daemon =
        Daemon::spawn(in_namespaces(&inside, &setup, &["run", "--log-format", "json", "--config", &config], None));
    let port = tcp_server("127.0.0.1:0");
    assert_eq!(tcp_connect_from(&work, "127.0.0.1", port), "EPERM", "log:\n{}", daemon.log());
    let event = daemon.wait_event(std::time::Duration::from_secs(3), |e| e["verdict"] == "blocked");
    assert_eq!(event["cgroup"], work.relative.as_str());
    drop(daemon);
}
