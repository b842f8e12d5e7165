//! What egress needs from the kernel, what it can do without, and the decision between the two
//! as a pure function of recorded probe results: a kernel that lacks a required feature is
//! refused with the feature and the first Linux release that has it; one that lacks an optional
//! feature gets the fallback, named. Kernels not at hand are checked by feeding the probe
//! results they give (see the tests). The probes themselves run in `kernel::probe`.

use std::collections::BTreeSet;

/// One thing a kernel offers or not, as a probe sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Feature {
    ProgCgroupSkb,
    ProgCgroupSock,
    ProgCgroupSockAddr,
    ProgLsm,
    MapLpmTrie,
    MapLruHash,
    MapRingBuf,
    /// Updates of many map entries in one system call: the atomic policy switch of a reload.
    MapBatch,
    /// bpf_links for cgroup programs: pinned, they keep enforcing while no daemon runs.
    CgroupLinks,
    /// `bpf_ktime_get_boot_ns`: event times.
    HelperKtimeGetBootNs,
    /// `bpf_sk_fullsock` in `cgroup_skb`: the packet hook's socket lookup.
    SkbSkFullsock,
    /// `bpf_get_current_pid_tgid` in `cgroup_skb`: the packet hook's events name the process.
    SkbCurrentPidTgid,
    /// `bpf_get_current_uid_gid` in `cgroup_skb`.
    SkbCurrentUidGid,
    /// `bpf_get_current_ancestor_cgroup_id` in the BPF LSM program: the AF_PACKET guard.
    LsmAncestorCgroupId,
    /// `bpf` in the active LSM list (`CONFIG_BPF_LSM` and `lsm=...,bpf`).
    LsmActive,
}

impl Feature {
    fn describe(self) -> &'static str {
        match self {
            Self::ProgCgroupSkb => "BPF program type cgroup_skb",
            Self::ProgCgroupSock => "BPF program type cgroup_sock",
            Self::ProgCgroupSockAddr => "BPF program type cgroup_sock_addr",
            Self::ProgLsm => "BPF program type lsm",
            Self::MapLpmTrie => "BPF map type lpm_trie",
            Self::MapLruHash => "BPF map type lru_hash",
            Self::MapRingBuf => "BPF map type ringbuf",
            Self::MapBatch => "batched map updates (BPF_MAP_UPDATE_BATCH)",
            Self::CgroupLinks => "BPF links for cgroup programs",
            Self::HelperKtimeGetBootNs => "helper bpf_ktime_get_boot_ns",
            Self::SkbSkFullsock => "helper bpf_sk_fullsock in cgroup_skb programs",
            Self::SkbCurrentPidTgid => "helper bpf_get_current_pid_tgid in cgroup_skb programs",
            Self::SkbCurrentUidGid => "helper bpf_get_current_uid_gid in cgroup_skb programs",
            Self::LsmAncestorCgroupId => "helper bpf_get_current_ancestor_cgroup_id in LSM programs",
            Self::LsmActive => "the BPF LSM (CONFIG_BPF_LSM and `bpf` in the kernel's lsm= list)",
        }
    }

    /// The first Linux release that has it: upstream for what exists since, the first tested
    /// kernel (`cargo xtask vm-test`, KERNELS.md) for what older kernels refuse to our programs.
    fn since(self) -> &'static str {
        match self {
            Self::ProgCgroupSkb | Self::ProgCgroupSock | Self::MapLruHash => "4.10",
            Self::MapLpmTrie => "4.11",
            Self::ProgCgroupSockAddr => "4.17",
            Self::SkbSkFullsock => "5.1",
            Self::MapBatch => "5.6",
            // The BPF LSM arrived with its program type.
            Self::ProgLsm | Self::CgroupLinks | Self::LsmActive => "5.7",
            Self::MapRingBuf | Self::HelperKtimeGetBootNs => "5.8",
            Self::LsmAncestorCgroupId => "6.1",
            Self::SkbCurrentPidTgid => "6.12",
            Self::SkbCurrentUidGid => "6.18",
        }
    }
}

/// The first tested kernel that lets our `program` call `helper`, for the helpers the verifier
/// refused to one of our programs on a tested kernel.
pub fn first_kernel_allowing(helper: &str, program: &str) -> Option<&'static str> {
    let feature = match (helper, program) {
        ("bpf_get_current_ancestor_cgroup_id", "socket_create") => Feature::LsmAncestorCgroupId,
        ("bpf_get_current_pid_tgid", "egress_packet") => Feature::SkbCurrentPidTgid,
        ("bpf_get_current_uid_gid", "egress_packet") => Feature::SkbCurrentUidGid,
        _ => return None,
    };
    Some(feature.since())
}

/// Without these egress does not start.
pub const REQUIRED: &[Feature] = &[
    Feature::ProgCgroupSkb,
    Feature::ProgCgroupSock,
    Feature::ProgCgroupSockAddr,
    Feature::MapLpmTrie,
    Feature::MapLruHash,
    Feature::MapRingBuf,
    Feature::MapBatch,
    Feature::CgroupLinks,
    Feature::HelperKtimeGetBootNs,
    Feature::SkbSkFullsock,
];

/// The oldest release with every required feature, and the oldest one tested.
pub const MINIMUM: &str = "5.8";
pub const OLDEST_TESTED: &str = "5.10";

/// What the probes found: the features the kernel accepted. `unprobed` lists what was not asked
/// at all (the LSM helper can only be learned by loading the real program).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Probes {
    pub accepted: BTreeSet<Feature>,
    pub unprobed: BTreeSet<Feature>,
}

impl Probes {
    pub fn has(&self, feature: Feature) -> bool {
        self.accepted.contains(&feature)
    }
}

/// Whether the packet hook's events can name the process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PacketEvents {
    WithProcess,
    /// The portable variant: socket uid only; why.
    WithoutProcess(String),
}

/// Whether the BPF LSM program refuses AF_PACKET and other non-IP sockets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuardSupport {
    On,
    /// On if the verifier accepts the program (the one thing only the real load can tell).
    IfVerifierAccepts,
    Off(String),
}

/// What egress runs with on this kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Support {
    pub packet_events: PacketEvents,
    pub socket_guard: GuardSupport,
}

/// Why egress cannot run on this kernel.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "this kernel cannot run egress: it lacks {}; egress needs Linux {MINIMUM} or later with \
     CONFIG_BPF_SYSCALL and CONFIG_CGROUP_BPF (the oldest kernel tested is {OLDEST_TESTED})",
    described(.missing)
)]
pub struct Refusal {
    pub missing: Vec<Feature>,
}

/// "feature (Linux x.y), ...": what a refusal lacks.
fn described(missing: &[Feature]) -> String {
    let missing: Vec<String> =
        missing.iter().map(|feature| format!("{} (Linux {})", feature.describe(), feature.since())).collect();
    missing.join(", ")
}

/// The decision: refuse, naming every missing required feature, or run with these fallbacks.
pub fn decide(probes: &Probes) -> Result<Support, Refusal> {
    let missing: Vec<Feature> = REQUIRED.iter().copied().filter(|f| !probes.has(*f)).collect();
    if !missing.is_empty() {
        return Err(Refusal { missing });
    }
    let packet_events =
        match [Feature::SkbCurrentPidTgid, Feature::SkbCurrentUidGid].into_iter().find(|f| !probes.has(*f)) {
            None => PacketEvents::WithProcess,
            Some(lacking) => PacketEvents::WithoutProcess(format!(
                "this kernel lacks the {} (Linux {}): events of raw sockets and other packet-hook flows carry the \
             socket's uid, no process",
                lacking.describe(),
                lacking.since()
            )),
        };
    let socket_guard = if !probes.has(Feature::ProgLsm) {
        GuardSupport::Off(format!(
            "this kernel lacks the {} (Linux {})",
            Feature::ProgLsm.describe(),
            Feature::ProgLsm.since()
        ))
    } else if !probes.has(Feature::LsmActive) {
        GuardSupport::Off("BPF LSM not enabled (boot with lsm=...,bpf)".to_owned())
    } else if probes.has(Feature::LsmAncestorCgroupId) {
        GuardSupport::On
    } else if probes.unprobed.contains(&Feature::LsmAncestorCgroupId) {
        GuardSupport::IfVerifierAccepts
    } else {
        GuardSupport::Off(format!(
            "this kernel does not let socket_create call bpf_get_current_ancestor_cgroup_id (Linux {} has it)",
            Feature::LsmAncestorCgroupId.since()
        ))
    };
    Ok(Support { packet_events, socket_guard })
}

#[cfg(test)]
mod tests {
    use super::{Feature::*, *};

    /// What each kernel accepts, as recorded: upstream for the types and helpers that exist
    /// since, `cargo xtask vm-test` (KERNELS.md) for what the verifier refuses to our programs.
    fn kernel(accepted: &[Feature]) -> Probes {
        Probes { accepted: accepted.iter().copied().collect(), unprobed: BTreeSet::new() }
    }
    const LINUX_4_19: &[Feature] = &[ProgCgroupSkb, ProgCgroupSock, ProgCgroupSockAddr, MapLpmTrie, MapLruHash];
    const LINUX_5_4: &[Feature] =
        &[ProgCgroupSkb, ProgCgroupSock, ProgCgroupSockAddr, MapLpmTrie, MapLruHash, SkbSkFullsock];
    const LINUX_5_7: &[Feature] = &[
        ProgCgroupSkb,
        ProgCgroupSock,
        ProgCgroupSockAddr,
        ProgLsm,
        MapLpmTrie,
        MapLruHash,
        MapBatch,
        CgroupLinks,
        SkbSkFullsock,
    ];
    const LINUX_5_10: &[Feature] = &[
        ProgCgroupSkb,
        ProgCgroupSock,
        ProgCgroupSockAddr,
        ProgLsm,
        MapLpmTrie,
        MapLruHash,
        MapRingBuf,
        MapBatch,
        CgroupLinks,
        HelperKtimeGetBootNs,
        SkbSkFullsock,
    ];

    fn with(base: &[Feature], more: &[Feature]) -> Probes {
        kernel(&[base, more].concat())
    }

    #[test]
    fn kernels_before_5_8_are_refused_naming_what_they_lack() {
        let refusal = decide(&kernel(LINUX_4_19)).unwrap_err();
        assert_eq!(refusal.missing, vec![MapRingBuf, MapBatch, CgroupLinks, HelperKtimeGetBootNs, SkbSkFullsock]);
        let text = refusal.to_string();
        assert!(text.contains("BPF map type ringbuf (Linux 5.8)"), "{text}");
        assert!(text.contains("helper bpf_sk_fullsock in cgroup_skb programs (Linux 5.1)"), "{text}");
        assert!(text.contains("needs Linux 5.8 or later"), "{text}");

        let text = decide(&kernel(LINUX_5_4)).unwrap_err().to_string();
        assert!(text.contains("BPF links for cgroup programs (Linux 5.7)"), "{text}");
        assert!(text.contains("batched map updates (BPF_MAP_UPDATE_BATCH) (Linux 5.6)"), "{text}");
        assert!(!text.contains("bpf_sk_fullsock"), "{text}");

        let refusal = decide(&kernel(LINUX_5_7)).unwrap_err();
        assert_eq!(refusal.missing, vec![MapRingBuf, HelperKtimeGetBootNs]);
        assert_eq!(
            refusal.to_string(),
            "this kernel cannot run egress: it lacks BPF map type ringbuf (Linux 5.8), helper \
             bpf_ktime_get_boot_ns (Linux 5.8); egress needs Linux 5.8 or later with CONFIG_BPF_SYSCALL and \
             CONFIG_CGROUP_BPF (the oldest kernel tested is 5.10)"
        );
    }

    #[test]
    fn debian_5_10_runs_without_the_guard_and_without_process_names_in_packet_events() {
        // Debian's 5.10 does not list bpf in its default LSM order.
        let support = decide(&kernel(LINUX_5_10)).unwrap();
        assert_eq!(support.socket_guard, GuardSupport::Off("BPF LSM not enabled (boot with lsm=...,bpf)".into()));
        let PacketEvents::WithoutProcess(why) = support.packet_events else { panic!("5.10 has no pid in skb") };
        assert!(why.contains("bpf_get_current_pid_tgid in cgroup_skb programs (Linux 6.12)"), "{why}");
        // Booted with lsm=...,bpf: the verifier still refuses the helper to LSM programs.
        let support = decide(&with(LINUX_5_10, &[LsmActive])).unwrap();
        assert_eq!(
            support.socket_guard,
            GuardSupport::Off(
                "this kernel does not let socket_create call bpf_get_current_ancestor_cgroup_id (Linux 6.1 has it)"
                    .into()
            )
        );
    }

    #[test]
    fn newer_kernels_get_the_guard_and_then_process_names() {
        let linux_6_1 = with(LINUX_5_10, &[LsmActive, LsmAncestorCgroupId]);
        let support = decide(&linux_6_1).unwrap();
        assert_eq!(support.socket_guard, GuardSupport::On);
        assert!(matches!(support.packet_events, PacketEvents::WithoutProcess(_)));

        let linux_6_12 = with(LINUX_5_10, &[LsmActive, LsmAncestorCgroupId, SkbCurrentPidTgid]);
        let PacketEvents::WithoutProcess(why) = decide(&linux_6_12).unwrap().packet_events else {
            panic!("6.12 refuses uid_gid in skb")
        };
        assert!(why.contains("bpf_get_current_uid_gid in cgroup_skb programs (Linux 6.18)"), "{why}");

        let linux_6_18 = with(LINUX_5_10, &[LsmActive, LsmAncestorCgroupId, SkbCurrentPidTgid, SkbCurrentUidGid]);
        assert_eq!(
            decide(&linux_6_18).unwrap(),
            Support { packet_events: PacketEvents::WithProcess, socket_guard: GuardSupport::On }
        );
    }

    #[test]
    fn a_kernel_without_the_lsm_program_type_says_so() {
        let mut probes = kernel(LINUX_5_10);
        probes.accepted.remove(&ProgLsm);
        let support = decide(&probes).unwrap();
        assert_eq!(
            support.socket_guard,
            GuardSupport::Off("this kernel lacks the BPF program type lsm (Linux 5.7)".into())
        );
    }

    #[test]
    fn the_lsm_helper_is_left_to_the_real_load_when_not_probed() {
        let mut probes = with(LINUX_5_10, &[LsmActive]);
        probes.unprobed.insert(LsmAncestorCgroupId);
        assert_eq!(decide(&probes).unwrap().socket_guard, GuardSupport::IfVerifierAccepts);
    }
}
