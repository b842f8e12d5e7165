//! The kernel programs: which are loaded, the fallbacks the loader picks between, and attaching,
//! detaching and taking their links.

use std::{collections::HashMap, fs, os::fd::BorrowedFd, path::Path};

use aya::{
    programs::{
        cgroup_skb::CgroupSkbLinkId, cgroup_sock::CgroupSockLinkId, cgroup_sock_addr::CgroupSockAddrLinkId,
        links::FdLink, lsm::LsmLinkId, CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSock, CgroupSockAddr,
        Lsm, Program, ProgramError,
    },
    Btf, Ebpf,
};

use super::KernelError;

pub(super) static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/egress.bpf.o"));
/// A digest of [`OBJECT`] (FNV-1a 64, in hex), computed by build.rs: which build of the programs
/// this binary carries.
pub const PROGRAMS_BUILD: &str = env!("EGRESS_PROGRAMS_BUILD");

/// The flow hooks: they judge every connect and datagram.
const FILTER_SOCK_ADDR_PROGRAMS: [&str; 4] = ["connect4", "connect6", "sendmsg4", "sendmsg6"];
/// The DNS hooks that make steered replies look as if they came from the resolver the workload
/// named. Nothing is steered without name rules, so without them these have nothing to do.
const DNS_SOCK_ADDR_PROGRAMS: [&str; 4] = ["recvmsg4", "recvmsg6", "getpeername4", "getpeername6"];
/// The packet backstop, first with process names in its events, then without: kernels before
/// 6.18 refuse the current-task helpers in packet programs (KERNELS.md).
const EGRESS_PROGRAMS: [&str; 2] = ["egress_packet", "egress_packet_portable"];
const INGRESS_PROGRAM: &str = "ingress_packet";
/// Flow accounting, attached after the filters on the same hooks. Out: first the variant that
/// names who opens a TCP connection at its SYN, then the one that needs `connect()` to hand
/// that over (kernels that refuse the task helpers in packet programs).
const EGRESS_COUNT_PROGRAMS: [&str; 2] = ["egress_count", "egress_count_portable"];
const INGRESS_COUNT_PROGRAM: &str = "ingress_count";
const SOCK_CREATE_PROGRAM: &str = "sock_create";
/// Ends flow records when a socket is released (`cgroup/sock_release`, Linux 5.9+).
const SOCK_RELEASE_PROGRAM: &str = "sock_release";
const LSM_PROGRAM: &str = "socket_create";
const LSM_HOOK: &str = "socket_create";
/// The kernel's list of active LSMs; the BPF LSM runs programs only when `bpf` is in it.
const ACTIVE_LSMS: &str = "/sys/kernel/security/lsm";
const SECURITYFS: &str = "/sys/kernel/security";

pub(super) enum LinkId {
    SockAddr(&'static str, CgroupSockAddrLinkId),
    Skb(&'static str, CgroupSkbLinkId),
    Sock(&'static str, CgroupSockLinkId),
    Lsm(LsmLinkId),
}

/// Whether sockets that leave the IP stack (`AF_PACKET`, ...) are refused to covered cgroups:
/// that needs the BPF LSM, which the kernel runs only when booted with `lsm=...,bpf`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SocketGuard {
    On,
    Off(String),
}

impl SocketGuard {
    /// One line for logs and `egress status`.
    pub fn describe(&self) -> String {
        match self {
            Self::On => "on (BPF LSM socket_create)".to_string(),
            Self::Off(reason) => format!("off: {reason}"),
        }
    }
}

/// The programs loaded besides the filters (the flow hooks, the packet backstop, `sock_create`
/// and the LSM guard), which always are. Leaving one out takes nothing from enforcement: the
/// filters never depend on them, only share maps that stay created.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Wanted {
    /// The DNS hooks (`recvmsg`, `getpeername`), needed only where name rules steer DNS.
    pub dns: bool,
    /// Flow accounting (the counting packet programs and `sock_release`), read only by flow
    /// records.
    pub accounting: bool,
}

impl Wanted {
    pub const ALL: Self = Self { dns: true, accounting: true };
}

/// Which variants this kernel accepted, once every program is loaded (nothing attached yet).
pub(super) struct Loaded {
    /// The `cgroup_sock_addr` programs loaded.
    pub sock_addr: Vec<&'static str>,
    /// Which of `EGRESS_PROGRAMS` this kernel accepted.
    pub egress_program: &'static str,
    pub socket_guard: SocketGuard,
    /// Whether this kernel has `cgroup/sock_release` (flows then end when their socket closes;
    /// without it, by idle expiry).
    pub sock_release: bool,
    /// The flow accounting programs that loaded (none when the kernel refused one, or they were
    /// not wanted).
    pub counting: Vec<(&'static str, CgroupSkbAttachType)>,
}

impl Loaded {
    /// Whether the packet hook names who opens a TCP connection (`connect()` then hands
    /// nothing over: `settings_flags::OPENER_AT_SYN`).
    pub fn opener_at_syn(&self) -> bool {
        self.counting.iter().any(|(name, _)| *name == EGRESS_COUNT_PROGRAMS[0])
    }
}

/// Loads (verifies) the programs `wanted` asks for, several at once: verification is most of a
/// daemon's start-up, and the kernel verifies each program on the CPU that asked.
pub(super) fn load_all(ebpf: &mut Ebpf, wanted: Wanted) -> Result<Loaded, KernelError> {
    let mut programs: HashMap<&str, &mut Program> = ebpf.programs_mut().collect();
    let mut take = |name: &'static str| programs.remove(name).ok_or(KernelError::MissingProgram(name));
    let dns_programs: &[&'static str] = if wanted.dns { &DNS_SOCK_ADDR_PROGRAMS } else { &[] };
    let sock_addr_names: Vec<&'static str> = FILTER_SOCK_ADDR_PROGRAMS.iter().chain(dns_programs).copied().collect();
    let mut sock_addr = Vec::with_capacity(sock_addr_names.len());
    for &name in &sock_addr_names {
        sock_addr.push((name, as_type::<CgroupSockAddr>(name, take(name)?)?));
    }
    let egress = [EGRESS_PROGRAMS[0], EGRESS_PROGRAMS[1]].map(|name| (name, take(name)));
    let ingress = as_type::<CgroupSkb>(INGRESS_PROGRAM, take(INGRESS_PROGRAM)?)?;
    let accounting = if wanted.accounting {
        let egress_count = EGRESS_COUNT_PROGRAMS.map(|name| (name, take(name)));
        let ingress_count = take(INGRESS_COUNT_PROGRAM);
        let sock_release = as_type::<CgroupSock>(SOCK_RELEASE_PROGRAM, take(SOCK_RELEASE_PROGRAM)?)?;
        Some((egress_count, ingress_count, sock_release))
    } else {
        None
    };
    let sock_create = as_type::<CgroupSock>(SOCK_CREATE_PROGRAM, take(SOCK_CREATE_PROGRAM)?)?;
    let lsm = as_type::<Lsm>(LSM_PROGRAM, take(LSM_PROGRAM)?)?;

    std::thread::scope(|scope| {
        let sock_addr: Vec<_> = sock_addr
            .into_iter()
            .map(|(name, program)| scope.spawn(move || program.load().map_err(KernelError::program(name))))
            .collect();
        let egress = scope.spawn(move || load_first(egress));
        let ingress = scope.spawn(move || ingress.load().map_err(KernelError::program(INGRESS_PROGRAM)));
        let accounting = accounting.map(|(egress_count, ingress_count, sock_release)| {
            let counting = scope.spawn(move || load_count_programs(egress_count, ingress_count));
            (counting, scope.spawn(move || sock_release.load()))
        });
        let sock_create = scope.spawn(move || sock_create.load().map_err(KernelError::program(SOCK_CREATE_PROGRAM)));
        let socket_guard = scope.spawn(move || load_socket_guard(lsm));

        for job in sock_addr {
            joined(job)?;
        }
        let egress_program = joined(egress)?;
        if egress_program == EGRESS_PROGRAMS[1] {
            tracing::info!(
                "this kernel refuses the current-task helpers in packet programs: events of raw and other \
                 packet-judged flows name no process"
            );
        }
        joined(ingress)?;
        let (counting, sock_release) = match accounting {
            Some((counting, sock_release)) => {
                (counting_loaded(joined(counting)), sock_release_loaded(joined(sock_release)))
            }
            None => (Vec::new(), false),
        };
        joined(sock_create)?;
        let socket_guard = joined(socket_guard);
        Ok(Loaded { sock_addr: sock_addr_names, egress_program, socket_guard, sock_release, counting })
    })
}

/// Flow records are worth less than enforcement: a kernel that refuses the accounting programs
/// still gets its policies enforced.
fn counting_loaded(
    result: Result<Vec<(&'static str, CgroupSkbAttachType)>, KernelError>,
) -> Vec<(&'static str, CgroupSkbAttachType)> {
    result.unwrap_or_else(|error| {
        tracing::warn!(%error, "this kernel refuses the flow accounting programs: no flow records");
        Vec::new()
    })
}

fn sock_release_loaded(result: Result<(), ProgramError>) -> bool {
    match result {
        Ok(()) => true,
        Err(error) => {
            tracing::warn!(%error, "no cgroup/sock_release on this kernel (Linux 5.9+): flows end by idle expiry");
            false
        }
    }
}

/// A loading thread's result; a thread that panicked is re-raised here.
fn joined<T>(job: std::thread::ScopedJoinHandle<'_, T>) -> T {
    job.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// One program of the object as its type.
fn as_type<'a, T>(name: &'static str, program: &'a mut Program) -> Result<&'a mut T, KernelError>
where
    &'a mut T: TryFrom<&'a mut Program, Error = ProgramError>,
{
    program.try_into().map_err(KernelError::program(name))
}

/// Loads the first of two `cgroup_skb` variants the verifier accepts; its name.
fn load_first(variants: [(&'static str, Result<&mut Program, KernelError>); 2]) -> Result<&'static str, KernelError> {
    let [(full, first), (portable, second)] = variants;
    match as_type::<CgroupSkb>(full, first?)?.load() {
        Ok(()) => Ok(full),
        Err(error) => {
            tracing::debug!(%error, program = full, "refused by this kernel; loading {portable}");
            as_type::<CgroupSkb>(portable, second?)?.load().map_err(KernelError::program(portable))?;
            Ok(portable)
        }
    }
}

/// Attaches every loaded program to `cgroup`, pushing each link as it is made (so that a
/// failure part-way leaves `ids` holding what must be detached again).
pub(super) fn attach_all(
    ebpf: &mut Ebpf,
    loaded: &Loaded,
    cgroup: BorrowedFd<'_>,
    ids: &mut Vec<LinkId>,
) -> Result<(), KernelError> {
    for &name in &loaded.sock_addr {
        let id = program::<CgroupSockAddr>(ebpf, name)?
            .attach(cgroup, CgroupAttachMode::Single)
            .map_err(KernelError::program(name))?;
        ids.push(LinkId::SockAddr(name, id));
    }
    let mut skb_programs =
        vec![(loaded.egress_program, CgroupSkbAttachType::Egress), (INGRESS_PROGRAM, CgroupSkbAttachType::Ingress)];
    skb_programs.extend(&loaded.counting);
    for (name, attach_type) in skb_programs {
        let id = program::<CgroupSkb>(ebpf, name)?
            .attach(cgroup, attach_type, CgroupAttachMode::Single)
            .map_err(KernelError::program(name))?;
        ids.push(LinkId::Skb(name, id));
    }
    let mut sock_programs = vec![SOCK_CREATE_PROGRAM];
    if loaded.sock_release {
        sock_programs.push(SOCK_RELEASE_PROGRAM);
    }
    for name in sock_programs {
        let id = program::<CgroupSock>(ebpf, name)?
            .attach(cgroup, CgroupAttachMode::Single)
            .map_err(KernelError::program(name))?;
        ids.push(LinkId::Sock(name, id));
    }
    if loaded.socket_guard == SocketGuard::On {
        let id = program::<Lsm>(ebpf, LSM_PROGRAM)?.attach().map_err(KernelError::program(LSM_PROGRAM))?;
        ids.push(LinkId::Lsm(id));
    }
    Ok(())
}

/// Takes a link out of the program that owns it, as a plain fd link that can be pinned; returns
/// the program's name with it.
pub(super) fn take_link(ebpf: &mut Ebpf, id: LinkId) -> Result<(&'static str, FdLink), KernelError> {
    Ok(match id {
        LinkId::SockAddr(name, id) => {
            let link = program::<CgroupSockAddr>(ebpf, name)?.take_link(id).map_err(KernelError::program(name))?;
            (name, FdLink::try_from(link)?)
        }
        LinkId::Skb(name, id) => {
            let link = program::<CgroupSkb>(ebpf, name)?.take_link(id).map_err(KernelError::program(name))?;
            (name, FdLink::try_from(link)?)
        }
        LinkId::Sock(name, id) => {
            let link = program::<CgroupSock>(ebpf, name)?.take_link(id).map_err(KernelError::program(name))?;
            (name, FdLink::try_from(link)?)
        }
        LinkId::Lsm(id) => {
            let link = program::<Lsm>(ebpf, LSM_PROGRAM)?.take_link(id).map_err(KernelError::program(LSM_PROGRAM))?;
            (LSM_PROGRAM, link.into())
        }
    })
}

/// Detaches one link this process owns.
pub(super) fn detach(ebpf: &mut Ebpf, id: LinkId) -> Result<(), KernelError> {
    match id {
        LinkId::SockAddr(name, id) => {
            program::<CgroupSockAddr>(ebpf, name)?.detach(id).map_err(KernelError::program(name))
        }
        LinkId::Skb(name, id) => program::<CgroupSkb>(ebpf, name)?.detach(id).map_err(KernelError::program(name)),
        LinkId::Sock(name, id) => program::<CgroupSock>(ebpf, name)?.detach(id).map_err(KernelError::program(name)),
        LinkId::Lsm(id) => program::<Lsm>(ebpf, LSM_PROGRAM)?.detach(id).map_err(KernelError::program(LSM_PROGRAM)),
    }
}

/// The program `name` of the object, as its type.
fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, KernelError>
where
    &'a mut T: TryFrom<&'a mut Program, Error = ProgramError>,
{
    as_type(name, ebpf.program_mut(name).ok_or(KernelError::MissingProgram(name))?)
}

/// Loads the flow accounting programs: the first of `EGRESS_COUNT_PROGRAMS` the verifier
/// accepts, and the ingress one.
fn load_count_programs(
    egress: [(&'static str, Result<&mut Program, KernelError>); 2],
    ingress: Result<&mut Program, KernelError>,
) -> Result<Vec<(&'static str, CgroupSkbAttachType)>, KernelError> {
    let egress = load_first(egress)?;
    if egress == EGRESS_COUNT_PROGRAMS[1] {
        tracing::info!("the packet hook cannot name who opens a connection: connect() hands it over");
    }
    as_type::<CgroupSkb>(INGRESS_COUNT_PROGRAM, ingress?)?
        .load()
        .map_err(KernelError::program(INGRESS_COUNT_PROGRAM))?;
    Ok(vec![(egress, CgroupSkbAttachType::Egress), (INGRESS_COUNT_PROGRAM, CgroupSkbAttachType::Ingress)])
}

/// Loads the LSM program where the kernel runs BPF LSM programs; says why not otherwise.
fn load_socket_guard(program: &mut Lsm) -> SocketGuard {
    if !Path::new(ACTIVE_LSMS).exists() {
        // securityfs is not mounted on every host (nor in every container).
        let _ = std::process::Command::new("mount")
            .args(["-t", "securityfs", "securityfs", SECURITYFS])
            .stderr(std::process::Stdio::null())
            .status();
    }
    match fs::read_to_string(ACTIVE_LSMS) {
        Ok(list) if list.trim().split(',').any(|lsm| lsm == "bpf") => {}
        Ok(list) => {
            return SocketGuard::Off(format!(
                "the BPF LSM is not active (active: {}); boot with lsm={},bpf to refuse AF_PACKET and other \
                 non-IP sockets to covered cgroups",
                list.trim(),
                list.trim()
            ))
        }
        Err(error) => return SocketGuard::Off(format!("cannot read {ACTIVE_LSMS}: {error}")),
    }
    let btf = match Btf::from_sys_fs() {
        Ok(btf) => btf,
        Err(error) => return SocketGuard::Off(format!("no kernel BTF for the LSM program: {error}")),
    };
    match program.load(LSM_HOOK, &btf).map_err(KernelError::program(LSM_PROGRAM)) {
        Ok(()) => SocketGuard::On,
        Err(error) => {
            let error = error.to_string();
            tracing::debug!(%error, "the LSM program did not load");
            match super::probe::missing_helper(&error) {
                Some(missing) => {
                    SocketGuard::Off(format!("{missing}; AF_PACKET and other non-IP sockets are not refused"))
                }
                None => SocketGuard::Off(format!("loading the LSM program: {error}{}", lockdown_hint())),
            }
        }
    }
}

/// A locked-down kernel (`/sys/kernel/security/lockdown` not `[none]`) may refuse BPF LSM
/// programs with EPERM; say so next to the error.
fn lockdown_hint() -> String {
    match fs::read_to_string(format!("{SECURITYFS}/lockdown")) {
        Ok(modes) if !modes.contains("[none]") => {
            format!(" (the kernel is locked down: {}; lockdown may refuse BPF LSM programs)", modes.trim())
        }
        _ => String::new(),
    }
}
