//! Many workloads at once: container- and service-style cgroup trees below one attach point,
//! each getting its own policy, new cgroups covered from their first packet, removed ones
//! leaving nothing behind in the kernel maps.

mod common;

use std::{
    fs,
    os::unix::fs::MetadataExt,
    time::{Duration, Instant},
};

use common::*;

const DOCKER_ID: &str = "3f2a9c1b0d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8";
const PODMAN_ID: &str = "9a8b7c6d5e4f30211203f4e5d6c7b8a99a8b7c6d5e4f30211203f4e5d6c7b8a9";
const CRI_ID: &str = "0c1d2e3f405162738495a6b7c8d9eaf00c1d2e3f405162738495a6b7c8d9eaf0";
const NEW_CRI_ID: &str = "5e5e5e5e405162738495a6b7c8d9eaf00c1d2e3f405162738495a6b7c8d9eaf0";

fn cgroup_id(cgroup: &TestCgroup) -> u64 {
    fs::metadata(&cgroup.dir).expect("stat cgroup").ino()
}

fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < timeout, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
    start.elapsed()
}

#[test]
fn each_workload_gets_its_own_policy_and_new_children_are_covered_at_once() {
    if !privileged() {
        return;
    }
    let parent = TestCgroup::new("fleet");
    let docker = parent.child(&format!("system.slice/docker-{DOCKER_ID}.scope"));
    let nginx = parent.child("system.slice/nginx.service");
    let podman = parent.child(&format!("machine.slice/libpod-{PODMAN_ID}.scope"));
    let pod = parent.child("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1234_5678.slice");
    let cri = parent.child(&format!(
        "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1234_5678.slice/cri-containerd-{CRI_ID}.scope"
    ));
    let unfiltered = parent.child("user.slice");

    let port_a = tcp_server("127.0.0.1:0");
    let port_b = tcp_server("127.0.0.1:0");
    let p = &parent.relative;
    let file = PolicyFile::attached_at(
        Some(p),
        &format!(
            "policies:
  - name: web
    container: {short}
    default: deny
    rules:
      - allow: 127.0.0.1
        protocol: tcp
        ports: [{port_a}]
  - name: nginx
    systemd_unit: nginx.service
    default: deny
    rules:
      - allow: 127.0.0.1
        protocol: tcp
        ports: [{port_b}]
  - name: podman
    container: {podman_short}
    default: allow
    rules:
      - deny: 127.0.0.1
  - name: kube
    cgroup: {p}/kubepods.slice/kubepods-burstable.slice/*
    default: deny
    rules: []
",
            short = &DOCKER_ID[..12],
            podman_short = &PODMAN_ID[..8],
        ),
    );
    let daemon = Daemon::start(&file);

    // Each workload gets exactly its own policy.
    assert_eq!(tcp_connect_from(&docker, "127.0.0.1", port_a), "ok");
    assert_eq!(tcp_connect_from(&docker, "127.0.0.1", port_b), "EPERM");
    assert_eq!(tcp_connect_from(&nginx, "127.0.0.1", port_b), "ok");
    assert_eq!(tcp_connect_from(&nginx, "127.0.0.1", port_a), "EPERM");
    assert_eq!(tcp_connect_from(&podman, "127.0.0.1", port_a), "EPERM");
    assert_eq!(tcp_connect_from(&podman, "127.0.0.2", port_a), "ECONNREFUSED");
    assert_eq!(tcp_connect_from(&pod, "127.0.0.1", port_a), "EPERM", "the glob selects the pod");
    assert_eq!(tcp_connect_from(&cri, "127.0.0.1", port_a), "EPERM", "the pod's policy covers its containers");
    assert_eq!(tcp_connect_from(&unfiltered, "127.0.0.1", port_a), "ok", "no policy up the path: not filtered");

    // Events name the container and the unit.
    let event = daemon.wait_event(Duration::from_secs(3), |e| e["policy"] == "web" && e["verdict"] == "blocked");
    assert_eq!(event["workload"], format!("docker:{}", &DOCKER_ID[..12]));
    assert_eq!(event["cgroup"], docker.relative.as_str());
    let event = daemon.wait_event(Duration::from_secs(3), |e| e["policy"] == "nginx" && e["verdict"] == "blocked");
    assert_eq!(event["workload"], "nginx.service");

    // A container created after the daemon started, under the covered pod: filtered from its
    // very first connect, with no daemon round trip.
    let new_container = parent.child(&format!(
        "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1234_5678.slice/cri-containerd-{NEW_CRI_ID}.scope"
    ));
    assert_eq!(tcp_connect_from(&new_container, "127.0.0.1", port_a), "EPERM");

    // A new pod slice matching the glob gets mapped by discovery. Binding it moves the policy
    // epoch on: a process that entered the cgroup before the binding may have had decisions of
    // the ancestor's policy cached, and those must be taken again.
    let epoch = || egress::kernel::pinned_policy_epoch(&file.pin_dir).expect("read the pinned policy epoch");
    let before_bind = epoch();
    let new_pod = parent.child("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod9999.slice");
    let new_pod_id = cgroup_id(&new_pod);
    let mapped_after = wait_until("the new pod is mapped", Duration::from_secs(3), || {
        bound_cgroup_ids(&file.pin_dir).contains(&new_pod_id)
    });
    eprintln!("a new matching cgroup was mapped {mapped_after:?} after mkdir");
    wait_until("binding moves the epoch on", Duration::from_secs(3), || epoch() != before_bind);

    // A removed cgroup leaves no map entry behind, nor a cached decision.
    let docker_id = cgroup_id(&docker);
    assert!(bound_cgroup_ids(&file.pin_dir).contains(&docker_id));
    let before_unbind = epoch();
    drop(docker);
    wait_until("the removed container's entry is gone", Duration::from_secs(3), || {
        !bound_cgroup_ids(&file.pin_dir).contains(&docker_id)
    });
    wait_until("unbinding moves the epoch on", Duration::from_secs(3), || epoch() != before_unbind);
    drop(new_pod);
    wait_until("the removed pod's entry is gone", Duration::from_secs(3), || {
        !bound_cgroup_ids(&file.pin_dir).contains(&new_pod_id)
    });
}

#[test]
fn a_thousand_cgroups_with_distinct_policies_and_100k_cidrs() {
    if !privileged() {
        return;
    }
    let parent = TestCgroup::new("scale");
    let mut yaml = String::from("policies:\n");
    let mut children = Vec::new();
    for i in 0..1000u32 {
        let child = parent.child(&format!("svc-{i}.service"));
        yaml.push_str(&format!("  - name: p{i}\n    cgroup: {}\n    default: allow\n    rules:\n", child.relative));
        // 100 CIDRs per policy, 100,000 in total; policy i also denies 127.0.{i/250}.{i%250+1}.
        yaml.push_str(&format!("      - deny: 127.1.{}.{}\n", i / 250, i % 250 + 1));
        for j in 0..99u32 {
            let n = i * 100 + j;
            yaml.push_str(&format!("      - deny: 10.{}.{}.0/24\n", n / 256 % 256, n % 256));
        }
        children.push(child);
    }
    let file = PolicyFile::attached_at(Some(&parent.relative), &yaml);
    let daemon = Daemon::start(&file);
    assert_eq!(bound_cgroup_ids(&file.pin_dir).len(), 1000);
    for i in [0u32, 1, 499, 998, 999] {
        let own = format!("127.1.{}.{}", i / 250, i % 250 + 1);
        let other_i = (i + 1) % 1000;
        let other = format!("127.1.{}.{}", other_i / 250, other_i % 250 + 1);
        let port = tcp_server(&format!("{own}:0"));
        assert_eq!(tcp_connect_from(&children[i as usize], &own, port), "EPERM", "policy p{i}");
        let port = tcp_server(&format!("{other}:0"));
        assert_eq!(tcp_connect_from(&children[i as usize], &other, port), "ok", "p{i} must not get p{other_i}'s rules");
    }
    drop(daemon);
}
