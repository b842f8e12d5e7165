//! The container image, as a DaemonSet would run it: built with podman from
//! `packaging/Containerfile` (the Debian package on a Debian 12 base made here with mmdebstrap,
//! no registry), run with the mounts and capabilities of `packaging/kubernetes/daemonset.yaml`,
//! and enforcing a policy on a cgroup of the host.
//!
//! Needs the package `cargo xtask test` builds before the tests (`target/package/`).

mod common;

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Output},
    time::{Duration, Instant},
};

use common::*;

/// The base the Containerfile names, imported under that name so the build pulls nothing.
const BASE: &str = "docker.io/library/debian:12-slim";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn tool_available(program: &str) -> bool {
    let found = std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()));
    if !found && std::env::var_os("CI").is_some() {
        panic!("this test needs {program} (installed by `cargo xtask setup`)");
    }
    if !found {
        eprintln!("skipped: {program} not installed");
    }
    found
}

fn podman() -> Command {
    let mut cmd = Command::new("podman");
    cmd.args(["--cgroup-manager", "cgroupfs", "--runtime", "runc"]);
    cmd
}

fn checked(output: Output, what: &str) -> String {
    assert!(output.status.success(), "{what} failed: {}{}", stdout_of(&output), stderr_of(&output));
    stdout_of(&output)
}

/// The Debian 12 base image, made once with mmdebstrap and kept in the user's cache.
fn ensure_base() {
    if podman().args(["image", "exists", BASE]).status().is_ok_and(|s| s.success()) {
        return;
    }
    let cache = std::env::var_os("HOME").map_or_else(std::env::temp_dir, PathBuf::from).join(".cache/egress-test");
    fs::create_dir_all(&cache).expect("cache dir");
    let tar = cache.join("debian-12-minbase.tar");
    if !tar.is_file() {
        let partial = tar.with_extension("partial.tar");
        checked(
            Command::new("mmdebstrap")
                .args(["--variant=minbase", "--quiet", "bookworm"])
                .arg(&partial)
                .arg("http://deb.debian.org/debian")
                .output()
                .expect("run mmdebstrap"),
            "mmdebstrap",
        );
        fs::rename(&partial, &tar).expect("keep the base");
    }
    checked(podman().args(["import"]).arg(&tar).arg(BASE).output().expect("podman import"), "podman import");
}

fn package() -> PathBuf {
    let dir = repo_root().join("target/package");
    fs::read_dir(&dir)
        .ok()
        .and_then(|entries| entries.flatten().map(|e| e.path()).find(|p| p.extension().is_some_and(|ext| ext == "deb")))
        .unwrap_or_else(|| panic!("no package in {}: run the tests with `cargo xtask test`", dir.display()))
}

/// The image and the container; both removed on drop.
struct Running {
    image: String,
    container: String,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = podman().args(["rm", "--force", "--time", "0", &self.container]).output();
        let _ = podman().args(["rmi", "--force", &self.image]).output();
    }
}

#[test]
fn the_image_enforces_a_policy_on_a_host_cgroup_with_the_daemonsets_settings() {
    if !privileged() || !tool_available("podman") || !tool_available("runc") || !tool_available("mmdebstrap") {
        return;
    }
    let deb = package();
    ensure_base();
    let running = Running { image: unique("localhost/egress-test-image"), container: unique("egress-test-image") };
    checked(
        podman()
            .args(["build", "--pull=never", "--quiet", "-f", "packaging/Containerfile", "-t", &running.image, "."])
            .current_dir(repo_root())
            .output()
            .expect("podman build"),
        &format!("podman build (with {})", deb.display()),
    );

    let parent = TestCgroup::new("image");
    let workload = parent.child("workload");
    let file = PolicyFile::attached_at(
        Some(&parent.relative),
        &format!(
            "policies:\n  - name: web\n    cgroup: {}\n    default: deny\n    rules:\n      - allow: 127.0.0.1\n",
            workload.relative
        ),
    );
    let config_dir = file.path.parent().expect("policy dir").to_path_buf();
    let mount = cgroup2_mount();
    let mut run = podman();
    run.args(["run", "--detach", "--name", &running.container, "--network=host", "--read-only"])
        // At most what the test itself may have: podman's defaults are higher, and raising a hard
        // limit needs CAP_SYS_RESOURCE where the test runs (not in every sandbox).
        .args(["--ulimit", "nofile=4096:4096", "--ulimit", "nproc=1024:1024"])
        .args(["--cap-drop=all", "--cap-add=BPF,PERFMON,NET_ADMIN,SYS_RESOURCE,SYS_ADMIN,DAC_READ_SEARCH"])
        .args(["--security-opt", "no-new-privileges", "--cgroupns=private"])
        .arg(format!("--volume={}:{}", mount.display(), mount.display()))
        .arg("--volume=/sys/fs/bpf:/sys/fs/bpf")
        .arg("--volume=/sys/kernel/security:/sys/kernel/security:ro")
        // The test's policy file names its control socket in the same directory.
        .arg(format!("--volume={}:{}", config_dir.display(), config_dir.display()))
        .arg(&running.image)
        .args(["run", "--config"])
        .arg(&file.path);
    checked(run.output().expect("podman run"), "podman run");

    let started = Instant::now();
    loop {
        let logs = podman().args(["logs", &running.container]).output().expect("podman logs");
        let text = format!("{}{}", stdout_of(&logs), stderr_of(&logs));
        if text.contains("all policies enforced") {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(90), "the daemon in the image never became ready:\n{text}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let port = tcp_server("127.0.0.1:0");
    assert_eq!(tcp_connect_from(&workload, "127.0.0.1", port), "ok");
    assert_eq!(tcp_connect_from(&workload, "127.0.0.2", port), "EPERM", "the image does not enforce");
    // The daemon in the container answers on its control socket, as the readiness probe asks.
    let status = checked(
        podman()
            .args(["exec", &running.container, "egress", "status", "--socket"])
            .arg(&file.socket)
            .output()
            .expect("exec"),
        "egress status in the container",
    );
    assert!(status.contains(&workload.relative), "{status}");
}
