//! A real container: podman runs a busybox root filesystem (no image download) with no network
//! but its own loopback, below a cgroup the test owns, and a `container: <name>` policy applies
//! to it once the daemon has seen its cgroup and asked `podman ps` for its name.
//!
//! Podman's cgroupfs manager places the container at `<cgroup-parent>/libpod-<id>` in the cgroup2
//! hierarchy (also in a hybrid layout, where podman itself works with the v1 controllers). The
//! OCI runtime is runc: crun refuses a hybrid layout whose cgroup2 side holds any controller
//! ("cgroups in hybrid mode not supported, drop all controllers from cgroupv2"), as on hosts
//! where `hugetlb` is not mounted as v1.

mod common;

use std::{
    fs,
    os::unix::fs::{symlink, MetadataExt},
    path::{Path, PathBuf},
    process::{Command, Output},
    time::{Duration, Instant},
};

use common::*;

const PORT: u16 = 8080;

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
        .unwrap_or(false)
}

/// True when podman, runc and a busybox are installed. Skips with a note otherwise, except under
/// CI, where `cargo xtask setup` installs them and a missing one must fail the test.
fn podman_available() -> bool {
    let missing: Vec<&str> = ["podman", "runc", "busybox"].into_iter().filter(|p| !on_path(p)).collect();
    if missing.is_empty() {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("this test needs {missing:?} (installed by `cargo xtask setup`)");
    }
    eprintln!("skipped: {missing:?} not installed");
    false
}

/// A root filesystem holding only busybox (Debian's busybox-static) and the applets the test uses.
struct Rootfs(PathBuf);

impl Rootfs {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(unique("egress-test-rootfs"));
        for sub in ["bin", "dev", "etc", "proc", "sys", "tmp"] {
            fs::create_dir_all(dir.join(sub)).expect("rootfs dir");
        }
        fs::copy(egress::discovery::find_on_path("busybox").expect("busybox on PATH"), dir.join("bin/busybox"))
            .expect("copy busybox");
        for applet in ["sh", "nc", "sleep", "true", "cat"] {
            symlink("busybox", dir.join("bin").join(applet)).expect("applet link");
        }
        Self(dir)
    }
}

impl Drop for Rootfs {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// `podman` with the settings this test needs on any host: the cgroupfs manager (a plain
/// `--cgroup-parent` path, no systemd needed) and runc.
fn podman() -> Command {
    let mut cmd = Command::new("podman");
    cmd.args(["--cgroup-manager", "cgroupfs", "--runtime", "runc"]);
    cmd
}

/// The named container; removed on drop, with the cgroups podman made for it and its `conmon`
/// below the test parent in the v1 hierarchies of a hybrid layout (the cgroup2 side goes with
/// the test's own `TestCgroup`).
struct Container {
    name: String,
    parent: String,
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = podman().args(["rm", "--force", "--time", "0", &self.name]).output();
        for mount in cgroup_v1_mounts() {
            remove_dirs_below(&mount.join(&self.parent));
        }
    }
}

fn cgroup_v1_mounts() -> Vec<PathBuf> {
    egress_common::mountinfo::points_of("cgroup").unwrap_or_default()
}

fn remove_dirs_below(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_dirs_below(&entry.path());
            }
        }
    }
    for _ in 0..100 {
        if fs::remove_dir(dir).is_ok() || !dir.exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn checked(output: Output, what: &str) -> String {
    assert!(output.status.success(), "{what} failed: {}{}", stdout_of(&output), stderr_of(&output));
    stdout_of(&output)
}

#[test]
fn a_policy_applies_to_a_real_podman_container_by_name() {
    if !privileged() || !podman_available() {
        return;
    }
    let parent = TestCgroup::new("podman");
    let rootfs = Rootfs::new();
    let name = unique("egress-test-podman");
    let file = PolicyFile::attached_at(
        Some(&parent.relative),
        &format!(
            "policies:
  - name: podman-web
    container: {name}
    default: deny
    rules:
      - allow: 127.0.0.1
        protocol: tcp
        ports: [{PORT}]
"
        ),
    );
    let daemon = Daemon::start(&file);

    // Started after the daemon: discovery sees the cgroup appear and asks podman for the name.
    let container = Container { name: name.clone(), parent: parent.relative.clone() };
    let id = checked(
        podman()
            .args(["run", "--detach", "--name", &name, "--network", "none"])
            .args(["--cgroup-parent", &format!("/{}", parent.relative)])
            // Lower than the limits podman would ask for, which raising needs CAP_SYS_RESOURCE.
            .args(["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"])
            .arg("--rootfs")
            .arg(&rootfs.0)
            .args(["/bin/sleep", "600"])
            .output()
            .expect("run podman"),
        "podman run",
    );
    assert!(id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()), "container id {id:?}");

    // The container's process is in `<parent>/libpod-<id>` of the cgroup2 hierarchy.
    let pid = checked(
        podman().args(["inspect", "--format", "{{.State.Pid}}", &name]).output().expect("podman inspect"),
        "podman inspect",
    );
    let own = fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("read the container's cgroup");
    let v2 = own.lines().find_map(|l| l.strip_prefix("0::")).expect("a cgroup2 line");
    let relative = format!("{}/libpod-{id}", parent.relative);
    assert_eq!(v2, format!("/{relative}"), "where podman put the container");
    eprintln!("container {name} runs in cgroup2 {v2}");

    let cgroup_id = fs::metadata(cgroup2_mount().join(&relative)).expect("stat the container's cgroup").ino();
    let start = Instant::now();
    while !bound_cgroup_ids(&file.pin_dir).contains(&cgroup_id) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the container's cgroup was not bound; log:\n{}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("bound {:?} after the container started", start.elapsed());

    // Inside the container (its own loopback): a server on the allowed port, then one connect
    // that the policy allows and one that it refuses.
    let script = format!(
        "nc -l -p {PORT} -e true & sleep 1
nc -w 3 127.0.0.1 {PORT} </dev/null && echo allowed=ok
nc -w 3 127.0.0.2 {PORT} </dev/null 2>&1
echo done"
    );
    let output = podman().args(["exec", &name, "/bin/sh", "-c", &script]).output().expect("podman exec");
    let text = format!("{}{}", stdout_of(&output), stderr_of(&output));
    assert!(text.contains("allowed=ok"), "the allowed connect failed: {text}");
    assert!(
        text.contains("127.0.0.2") && text.contains("Operation not permitted"),
        "the connect to 127.0.0.2 was not refused with EPERM: {text}"
    );
    assert!(text.contains("done"), "{text}");

    let event = daemon.wait_event(Duration::from_secs(5), |e| {
        e["policy"] == "podman-web" && e["verdict"] == "blocked" && e["dst"] == "127.0.0.2"
    });
    assert_eq!(event["workload"], format!("podman:{}", &id[..12]));
    assert_eq!(event["cgroup"], relative.as_str());
    assert_eq!(event["dport"], PORT);
    let allowed = daemon.wait_event(Duration::from_secs(5), |e| {
        e["policy"] == "podman-web" && e["verdict"] == "allowed" && e["dst"] == "127.0.0.1"
    });
    assert_eq!(allowed["workload"], format!("podman:{}", &id[..12]));

    drop(container);
    drop(daemon);
}
