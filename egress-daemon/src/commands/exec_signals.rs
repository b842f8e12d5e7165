//! The signals that would end `egress exec` (SIGINT, SIGTERM, SIGHUP, SIGQUIT), taken from a
//! signalfd so that each comes with how it was sent: exec passes on the ones sent to it, and
//! skips the ones the terminal sent to its whole foreground process group, which the command,
//! being in that group, has already received. Before the command exists, any of them, the
//! terminal's too, ends start-up (after exec has removed what it made).

use std::{
    io,
    mem::{size_of, MaybeUninit},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use tokio::io::unix::AsyncFd;

const FORWARDED: [libc::c_int; 4] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT];

/// The forwarded signals, blocked for exec (their default action would end it) and readable.
pub struct Forwarded {
    fd: AsyncFd<OwnedFd>,
}

fn forwarded_set() -> libc::sigset_t {
    let mut set = MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: sigemptyset initialises the set; sigaddset takes valid signal numbers.
    unsafe {
        libc::sigemptyset(set.as_mut_ptr());
        for signal in FORWARDED {
            libc::sigaddset(set.as_mut_ptr(), signal);
        }
        set.assume_init()
    }
}

impl Forwarded {
    /// Blocks the signals (threads started later inherit the mask; exec's runtime has no other
    /// thread yet) and opens a signalfd for them. Signals already sent stay pending and are read.
    pub fn install() -> io::Result<Self> {
        let set = forwarded_set();
        // SAFETY: a valid set; the old mask is not wanted.
        let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        // SAFETY: a valid set; -1 asks for a new fd.
        let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: signalfd returned a new fd that nothing else owns; the AsyncFd owns it from
        // here, so it stays open and unchanged while registered.
        let fd = unsafe { AsyncFd::register(OwnedFd::from_raw_fd(fd)) }?;
        Ok(Self { fd })
    }

    /// The next signal to pass on to the command.
    pub async fn next(&self) -> io::Result<libc::c_int> {
        loop {
            let info = self.next_info().await?;
            if info.ssi_code != libc::SI_KERNEL {
                return Ok(info.ssi_signo as libc::c_int);
            }
        }
    }

    /// The next signal, however it was sent.
    pub async fn any(&self) -> io::Result<libc::c_int> {
        Ok(self.next_info().await?.ssi_signo as libc::c_int)
    }

    /// A signal that came in already, however it was sent; `None` when none is pending.
    pub fn pending(&self) -> io::Result<Option<libc::c_int>> {
        match read_info(self.fd.get_ref()) {
            Ok(info) => Ok(Some(info.ssi_signo as libc::c_int)),
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(error) => Err(error),
        }
    }

    async fn next_info(&self) -> io::Result<libc::signalfd_siginfo> {
        loop {
            let mut ready = self.fd.readable().await?;
            match ready.try_io(|fd| read_info(fd.get_ref())) {
                Ok(read) => return read,
                Err(_would_block) => continue,
            }
        }
    }
}

/// One siginfo from the (non-blocking) signalfd.
fn read_info(fd: &OwnedFd) -> io::Result<libc::signalfd_siginfo> {
    let mut info = MaybeUninit::<libc::signalfd_siginfo>::uninit();
    let size = size_of::<libc::signalfd_siginfo>();
    // SAFETY: reading at most one siginfo into memory of its size.
    let n = unsafe { libc::read(fd.as_raw_fd(), info.as_mut_ptr().cast(), size) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if usize::try_from(n).ok() != Some(size) {
        return Err(io::Error::other("short read from the signalfd"));
    }
    // SAFETY: the kernel filled the whole struct.
    Ok(unsafe { info.assume_init() })
}

/// Start-up of `exec` cut short by a signal, before the command started.
#[derive(Debug, thiserror::Error)]
#[error("stopped by {} before the command started", name(*.0))]
pub struct Interrupted(pub libc::c_int);

impl Interrupted {
    /// The exit status a shell gives a command killed by the signal.
    pub fn status(&self) -> i32 {
        128 + self.0
    }
}

fn name(signal: libc::c_int) -> String {
    match signal {
        libc::SIGINT => "SIGINT".to_owned(),
        libc::SIGTERM => "SIGTERM".to_owned(),
        libc::SIGHUP => "SIGHUP".to_owned(),
        libc::SIGQUIT => "SIGQUIT".to_owned(),
        other => format!("signal {other}"),
    }
}

/// Unblocks the signals again; for the command, between fork and exec (async-signal-safe), so
/// that it starts with the signal mask exec was given.
pub fn unblock_in_child() -> io::Result<()> {
    let set = forwarded_set();
    // SAFETY: a valid set; sigprocmask is async-signal-safe.
    if unsafe { libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
