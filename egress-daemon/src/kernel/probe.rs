//! Checks that this machine can run egress before anything is loaded, naming exactly what is
//! missing: root, a host-rooted cgroup2, the program and map types, a bpffs for the pins.

use aya::{
    maps::MapType,
    programs::ProgramType,
    sys::{is_map_supported, is_program_supported},
};
use thiserror::Error;

use crate::cgroup::{CgroupError, Hierarchy};

#[derive(Debug, Error)]
pub enum PreflightError {
    #[error("egress must run as root (it needs CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN); try sudo")]
    NotRoot,
    #[error("{0}; egress needs cgroup v2")]
    NoCgroup2(#[source] CgroupError),
    #[error(
        "the cgroup2 file system at {mount} is rooted below the host's root cgroup (egress runs in a private cgroup \
         namespace, as in a container or Kubernetes pod, or sees a bind-mounted subtree): the kernel counts cgroup \
         depths from the host's root, so no policy would take effect. Run egress in the host's cgroup namespace \
         (docker/podman run --cgroupns=host) or mount the host's cgroup2 root into its mount namespace (Kubernetes: \
         a hostPath volume of /sys/fs/cgroup)"
    )]
    NotHostRoot { mount: std::path::PathBuf },
    #[error("{0}")]
    Cgroup(#[source] CgroupError),
    #[error("this kernel cannot run egress: missing {0} (needs Linux 5.10 or later, the oldest kernel tested, with CONFIG_BPF_SYSCALL and CONFIG_CGROUP_BPF)")]
    Unsupported(String),
}

/// Everything egress needs before it touches the kernel; returns the cgroup2 hierarchy.
pub fn check() -> Result<Hierarchy, PreflightError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(PreflightError::NotRoot);
    }
    let hierarchy = Hierarchy::discover().map_err(PreflightError::NoCgroup2)?;
    if !hierarchy.root_is_real().map_err(PreflightError::Cgroup)? {
        return Err(PreflightError::NotHostRoot { mount: hierarchy.mount().to_path_buf() });
    }
    let mut missing = Vec::new();
    for (program, name) in [
        (ProgramType::CgroupSockAddr, "BPF program type cgroup_sock_addr"),
        (ProgramType::CgroupSkb, "BPF program type cgroup_skb"),
    ] {
        if !is_program_supported(program).unwrap_or(false) {
            missing.push(name);
        }
    }
    for (map, name) in [
        (MapType::LpmTrie, "BPF map type lpm_trie"),
        (MapType::RingBuf, "BPF map type ringbuf"),
        (MapType::LruHash, "BPF map type lru_hash"),
    ] {
        if !is_map_supported(map).unwrap_or(false) {
            missing.push(name);
        }
    }
    if missing.is_empty() {
        Ok(hierarchy)
    } else {
        Err(PreflightError::Unsupported(missing.join(", ")))
    }
}

/// Helpers the verifier refused to one of our programs on a tested kernel, and the first tested
/// kernel that allows them there (`cargo xtask vm-test`, KERNELS.md): (helper, program, kernel).
const HELPERS_BY_KERNEL: &[(&str, &str, &str)] = &[
    ("bpf_get_current_ancestor_cgroup_id", "socket_create", "6.1"),
    ("bpf_get_current_pid_tgid", "egress_packet", "6.12"),
    ("bpf_get_current_uid_gid", "egress_packet", "6.18"),
];

/// One line for a program the verifier refused because this kernel does not let that program
/// type call a helper: names the helper and, where known, the first tested kernel that has it.
/// `None` when the error is something else (its full text then says more).
pub fn missing_helper(error: &str) -> Option<String> {
    let program = error
        .split("program ")
        .nth(1)
        .and_then(|rest| rest.split(':').next())
        .filter(|name| name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'))
        .unwrap_or("a program");
    let helper = ["unknown func ", "cannot use helper "].iter().find_map(|marker| {
        let rest = &error[error.find(marker)? + marker.len()..];
        Some(rest.split(|c: char| c == '#' || c.is_whitespace()).next()?.to_owned())
    })?;
    let since = HELPERS_BY_KERNEL
        .iter()
        .find(|(h, p, _)| *h == helper && *p == program)
        .map_or_else(String::new, |(_, _, kernel)| format!(" (Linux {kernel} has it)"));
    Some(format!("this kernel does not let {program} call {helper}{since}"))
}

/// bpffs magic number (`BPF_FS_MAGIC`).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Makes sure `pin_dir` lies on a bpffs, mounting one at `/sys/fs/bpf` when nothing is mounted
/// there yet (systemd hosts have it; minimal machines may not).
pub fn ensure_bpffs(pin_dir: &std::path::Path) -> anyhow::Result<()> {
    use anyhow::{bail, Context};
    let bpffs_root = std::path::Path::new("/sys/fs/bpf");
    if pin_dir.starts_with(bpffs_root) && !is_bpffs(bpffs_root) {
        std::fs::create_dir_all(bpffs_root).context("creating /sys/fs/bpf")?;
        let status = std::process::Command::new("mount")
            .args(["-t", "bpf", "bpf", "/sys/fs/bpf"])
            .status()
            .context("running mount -t bpf")?;
        if !status.success() {
            bail!("no bpffs at /sys/fs/bpf and mounting one failed; egress pins its maps and links there");
        }
        tracing::info!("mounted bpffs at /sys/fs/bpf");
    }
    let existing = pin_dir.ancestors().find(|p| p.exists()).unwrap_or(bpffs_root);
    if !is_bpffs(existing) {
        bail!("settings.pin_dir {} is not on a bpffs (mount -t bpf bpf DIR)", pin_dir.display());
    }
    Ok(())
}

fn is_bpffs(path: &std::path::Path) -> bool {
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs fills the zeroed struct; the path is a valid C string.
    unsafe {
        let mut stats: libc::statfs = std::mem::zeroed();
        libc::statfs(c_path.as_ptr(), &mut stats) == 0 && stats.f_type as i64 == BPF_FS_MAGIC
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_missing_helper_and_the_kernel_that_has_it() {
        let error = "program socket_create: the BPF_PROG_LOAD syscall returned Invalid argument (os error 22). \
                     Verifier output: arg#0 type is not a struct\n53: (85) call bpf_get_current_ancestor_cgroup_id#123\n\
                     unknown func bpf_get_current_ancestor_cgroup_id#123\nverification time 4278 usec";
        assert_eq!(
            missing_helper(error).as_deref(),
            Some("this kernel does not let socket_create call bpf_get_current_ancestor_cgroup_id (Linux 6.1 has it)")
        );
        let error = "program egress_packet: ... 715: (85) call bpf_get_current_uid_gid#15\n\
                     program of this type cannot use helper bpf_get_current_uid_gid#15\n";
        assert_eq!(
            missing_helper(error).as_deref(),
            Some("this kernel does not let egress_packet call bpf_get_current_uid_gid (Linux 6.18 has it)")
        );
        assert_eq!(missing_helper("program connect4: R1 invalid mem access"), None);
    }
}
