//! What a cgroup path says about its workload: the container runtime and id, or the systemd unit.
//!
//! Pure string work on paths relative to the cgroup2 mount; nothing here touches the file system.

use std::fmt;

/// The container runtimes whose cgroup layouts are recognised.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Runtime {
    Docker,
    Containerd,
    CriO,
    Podman,
}

impl Runtime {
    /// The runtime's name as events and the README spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Runtime::Docker => "docker",
            Runtime::Containerd => "containerd",
            Runtime::CriO => "cri-o",
            Runtime::Podman => "podman",
        }
    }
}

impl fmt::Display for Runtime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A container recognised from its cgroup.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ContainerRef {
    pub runtime: Runtime,
    /// The full 64-hex-digit container id, lower case.
    pub id: String,
}

/// Prefixes of a container's own cgroup, with or without systemd's `.scope` suffix (systemd and
/// cgroupfs drivers). The `conmon` scopes podman and CRI-O create beside each container hold
/// only the monitor process; their suffix is not a 64-hex id, so they fall out naturally.
const PREFIXES: &[(&str, Runtime)] = &[
    ("docker-", Runtime::Docker),
    ("cri-containerd-", Runtime::Containerd),
    ("nerdctl-", Runtime::Containerd),
    ("crio-", Runtime::CriO),
    ("libpod-", Runtime::Podman),
];

/// The container whose own cgroup `path` is (relative to the cgroup2 mount), judged by its last
/// component; `None` for anything else, including a container's sub-cgroups (podman's
/// `libpod-<id>.scope/container`) and the `conmon` scopes beside it.
pub fn container_of(path: &str) -> Option<ContainerRef> {
    let mut components = path.trim_matches('/').rsplit('/');
    let last = components.next()?;
    let parent = components.next().unwrap_or("");

    let stem = last.strip_suffix(".scope").unwrap_or(last);
    for (prefix, runtime) in PREFIXES {
        if let Some(id) = stem.strip_prefix(prefix) {
            return is_container_id(id).then(|| ContainerRef { runtime: *runtime, id: id.to_string() });
        }
    }

    // cgroupfs drivers name the cgroup by the bare id: `docker/<id>` for Docker, and
    // `kubepods/<qos>/pod<uid>/<id>` for containerd under Kubernetes.
    if last.len() == stem.len() && is_container_id(last) {
        let runtime = if parent == "docker" {
            Runtime::Docker
        } else if parent.starts_with("pod") {
            Runtime::Containerd
        } else {
            return None;
        };
        return Some(ContainerRef { runtime, id: last.to_string() });
    }
    None
}

/// The container whose cgroup `path` is or lies inside: the deepest component that
/// [`container_of`] recognises. Names the container in events from its sub-cgroups.
pub fn enclosing_container(path: &str) -> Option<ContainerRef> {
    let path = path.trim_matches('/');
    let mut end = path.len();
    loop {
        let prefix = &path[..end];
        if prefix.is_empty() {
            return None;
        }
        if let Some(found) = container_of(prefix) {
            return Some(found);
        }
        end = prefix.rfind('/')?;
    }
}

/// The systemd unit a cgroup belongs to: the deepest component that names a unit
/// (`system.slice/nginx.service` -> `nginx.service`). Slices are not units of work, so
/// `system.slice` alone has none.
pub fn unit_of(path: &str) -> Option<String> {
    path.split('/')
        .rev()
        .find(|component| {
            crate::cgroup::PROCESS_UNIT_SUFFIXES
                .iter()
                .any(|suffix| component.len() > suffix.len() && component.ends_with(suffix))
        })
        .map(str::to_string)
}

/// Full container ids as every runtime above writes them: 64 lower-case hex digits.
pub(super) fn is_container_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f2a9c0d1e2f3a4b5c6d7e8f9a0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b";
    const POD: &str = "pod8d4c3e2a_1b2c_4d5e_9f0a_123456789abc";

    fn found(path: &str) -> Option<(Runtime, String)> {
        container_of(path).map(|c| (c.runtime, c.id))
    }

    fn is(runtime: Runtime) -> Option<(Runtime, String)> {
        Some((runtime, ID.to_string()))
    }

    #[test]
    fn docker_systemd_and_cgroupfs_drivers() {
        assert_eq!(found(&format!("system.slice/docker-{ID}.scope")), is(Runtime::Docker));
        assert_eq!(found(&format!("/system.slice/docker-{ID}.scope")), is(Runtime::Docker));
        assert_eq!(found(&format!("docker/{ID}")), is(Runtime::Docker));
        // rootless docker under the user's systemd instance
        assert_eq!(
            found(&format!("user.slice/user-1000.slice/user@1000.service/user.slice/docker-{ID}.scope")),
            is(Runtime::Docker)
        );
        // dockershim-era kubelet: docker scopes inside pod slices
        assert_eq!(
            found(&format!(
                "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-{POD}.slice/docker-{ID}.scope"
            )),
            is(Runtime::Docker)
        );
        // the docker daemon's own unit is not a container
        assert_eq!(found("system.slice/docker.service"), None);
        assert_eq!(found("docker"), None);
    }

    #[test]
    fn containerd_under_kubernetes_systemd_driver_every_qos_class() {
        for path in [
            format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-{POD}.slice/cri-containerd-{ID}.scope"),
            format!(
                "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-{POD}.slice/cri-containerd-{ID}.scope"
            ),
            format!("kubepods.slice/kubepods-{POD}.slice/cri-containerd-{ID}.scope"),
        ] {
            assert_eq!(found(&path), is(Runtime::Containerd), "{path}");
        }
        // the pod and QoS slices themselves are not containers
        assert_eq!(found(&format!("kubepods.slice/kubepods-{POD}.slice")), None);
        assert_eq!(found("kubepods.slice/kubepods-burstable.slice"), None);
    }

    #[test]
    fn containerd_under_kubernetes_cgroupfs_driver_every_qos_class() {
        let pod = "pod8d4c3e2a-1b2c-4d5e-9f0a-123456789abc";
        for path in [
            format!("kubepods/burstable/{pod}/{ID}"),
            format!("kubepods/besteffort/{pod}/{ID}"),
            format!("kubepods/{pod}/{ID}"),
        ] {
            assert_eq!(found(&path), is(Runtime::Containerd), "{path}");
        }
        assert_eq!(found(&format!("kubepods/burstable/{pod}")), None);
        // a bare id under anything but a pod or docker is not claimed
        assert_eq!(found(&format!("some/where/{ID}")), None);
        assert_eq!(found(ID), None);
    }

    #[test]
    fn nerdctl_scopes_are_containerd() {
        assert_eq!(found(&format!("system.slice/nerdctl-{ID}.scope")), is(Runtime::Containerd));
    }

    #[test]
    fn cri_o_containers_but_not_conmon() {
        let slice = format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-{POD}.slice");
        assert_eq!(found(&format!("{slice}/crio-{ID}.scope")), is(Runtime::CriO));
        assert_eq!(found(&format!("{slice}/crio-conmon-{ID}.scope")), None);
        assert_eq!(found(&format!("kubepods/burstable/pod123/crio-{ID}")), is(Runtime::CriO));
    }

    #[test]
    fn podman_root_rootless_and_cgroupfs_but_not_conmon() {
        assert_eq!(found(&format!("machine.slice/libpod-{ID}.scope")), is(Runtime::Podman));
        assert_eq!(
            found(&format!("user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope")),
            is(Runtime::Podman)
        );
        assert_eq!(found(&format!("libpod_parent/libpod-{ID}")), is(Runtime::Podman));
        assert_eq!(found(&format!("machine.slice/libpod-conmon-{ID}.scope")), None);
        // the split-cgroup child some podman versions create: not the container's own cgroup
        assert_eq!(found(&format!("machine.slice/libpod-{ID}.scope/container")), None);
        // a pod's infra slice
        assert_eq!(found(&format!("machine.slice/machine-libpod_pod_{ID}.slice")), None);
    }

    #[test]
    fn rejects_short_upper_case_and_non_hex_ids() {
        assert_eq!(found(&format!("system.slice/docker-{}.scope", &ID[..12])), None);
        assert_eq!(found(&format!("system.slice/docker-{}.scope", ID.to_uppercase())), None);
        assert_eq!(found(&format!("system.slice/docker-{}g.scope", &ID[..63])), None);
        assert_eq!(found(&format!("system.slice/docker-{ID}0.scope")), None);
        assert_eq!(found(""), None);
        assert_eq!(found("/"), None);
    }

    #[test]
    fn enclosing_container_walks_up_to_the_container() {
        let scope = format!("machine.slice/libpod-{ID}.scope");
        assert_eq!(enclosing_container(&format!("{scope}/container")).map(|c| (c.runtime, c.id)), is(Runtime::Podman));
        assert_eq!(
            enclosing_container(&format!("kubepods/burstable/pod1/{ID}/sub")).map(|c| (c.runtime, c.id)),
            is(Runtime::Containerd)
        );
        assert_eq!(enclosing_container("system.slice/nginx.service"), None);
        assert_eq!(enclosing_container("/"), None);
    }

    #[test]
    fn units_are_the_deepest_unit_component() {
        assert_eq!(unit_of("system.slice/nginx.service").as_deref(), Some("nginx.service"));
        assert_eq!(unit_of("/system.slice/nginx.service").as_deref(), Some("nginx.service"));
        assert_eq!(unit_of("system.slice/nginx.service/worker").as_deref(), Some("nginx.service"));
        assert_eq!(
            unit_of("user.slice/user-1000.slice/user@1000.service/app.slice/foo.service").as_deref(),
            Some("foo.service")
        );
        assert_eq!(unit_of("user.slice/user-1000.slice/user@1000.service/init.scope").as_deref(), Some("init.scope"));
        assert_eq!(unit_of(&format!("system.slice/docker-{ID}.scope")), Some(format!("docker-{ID}.scope")));
        assert_eq!(unit_of("system.slice/sshd.socket").as_deref(), Some("sshd.socket"));
        assert_eq!(unit_of("system.slice"), None);
        assert_eq!(unit_of("user.slice/user-1000.slice"), None);
        assert_eq!(unit_of("egress-demo"), None);
        assert_eq!(unit_of(".service"), None);
        assert_eq!(unit_of("/"), None);
    }
}
