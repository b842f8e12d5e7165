//! Checks that this machine can run egress, naming exactly what is missing.

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
    #[error("this kernel cannot run egress: missing {0} (needs Linux 5.8 or later with CONFIG_BPF_SYSCALL and CONFIG_CGROUP_BPF)")]
    Unsupported(String),
}

/// Everything egress needs before it touches the kernel; returns the cgroup2 hierarchy.
pub fn check() -> Result<Hierarchy, PreflightError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(PreflightError::NotRoot);
    }
    let hierarchy = Hierarchy::discover().map_err(PreflightError::NoCgroup2)?;
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
