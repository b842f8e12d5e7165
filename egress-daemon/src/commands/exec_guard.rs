//! The guard of `egress exec`: a forked process that holds copies of the programs' links until
//! the command's cgroup is empty, so enforcement cannot end while a process of the command
//! lives, even when `exec` itself is SIGKILLed and can run no code of its own.
//!
//! `exec` forks the guard after attaching the programs and before starting the command, and
//! keeps the write end of a pipe whose read end the guard blocks on. When `exec` ends (cleanly,
//! on an error or killed) the pipe reaches end of file; the guard then kills everything in the
//! cgroup, waits until `cgroup.events` says it is empty, removes it and exits, and only then do
//! the last copies of the link fds close. A cgroup link lives as long as a fd refers to it, so
//! this needs BPF links (Linux 5.7+); with the older attach API detaching is explicit.
//!
//! The guard is a fork of a multi-threaded process that never calls exec, so it runs only
//! async-signal-safe system calls on memory prepared before the fork: no allocation, no locks.

use std::{
    ffi::CString,
    io,
    os::fd::{FromRawFd, OwnedFd},
    time::Duration,
};

use crate::cgroup::Cgroup;

/// How long `exec` waits for the guard to finish once the cgroup is empty.
const RELEASE_WAIT: Duration = Duration::from_secs(10);

/// The running guard, as `exec` holds it.
pub struct Guard {
    pid: libc::pid_t,
    /// Closing it (or `exec` dying) tells the guard to empty the cgroup and exit.
    release: Option<OwnedFd>,
}

/// The cgroup files the guard uses, as C strings made before the fork.
struct Paths {
    dir: CString,
    kill: CString,
    procs: CString,
    events: CString,
}

impl Guard {
    /// Forks the guard of `cgroup`. Call it with the programs attached, before the command runs.
    pub fn start(cgroup: &Cgroup) -> io::Result<Guard> {
        let c_path = |name: &str| {
            let path = if name.is_empty() { cgroup.dir.clone() } else { cgroup.dir.join(name) };
            CString::new(path.into_os_string().into_encoded_bytes()).map_err(io::Error::other)
        };
        let paths = Paths {
            dir: c_path("")?,
            kill: c_path("cgroup.kill")?,
            procs: c_path("cgroup.procs")?,
            events: c_path("cgroup.events")?,
        };
        let mut fds = [0; 2];
        // SAFETY: fds is a valid array of two ints.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 returned two open fds that nothing else owns.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: the child runs only `guard_main`, which makes async-signal-safe calls on
        // memory that exists before the fork, and never returns.
        match unsafe { libc::fork() } {
            -1 => Err(io::Error::last_os_error()),
            0 => {
                // SAFETY: closing the child's copy of the write end, so that only exec holds one.
                unsafe { libc::close(fds[1]) };
                guard_main(fds[0], &paths)
            }
            pid => {
                drop(read);
                Ok(Guard { pid, release: Some(write) })
            }
        }
    }

    /// Tells the guard the command is over (the cgroup should be empty by now) and waits a
    /// while for it to finish; a guard still waiting for stuck processes is left to finish alone.
    pub async fn release(mut self) {
        drop(self.release.take());
        let deadline = tokio::time::Instant::now() + RELEASE_WAIT;
        loop {
            let mut status = 0;
            // SAFETY: waiting on our own child; status is a valid int.
            let done = unsafe { libc::waitpid(self.pid, &mut status, libc::WNOHANG) };
            if done != 0 {
                return;
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(
                    pid = self.pid,
                    "processes of the command are still in its cgroup; the guard keeps them filtered until they end"
                );
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        // Dropped without `release` (a panic): closing the pipe still sets the guard going.
        drop(self.release.take());
    }
}

/// The guard process: waits for `exec` to let go, empties the cgroup, removes it, exits.
fn guard_main(release: libc::c_int, paths: &Paths) -> ! {
    // SAFETY: every call below is async-signal-safe and works on stack memory or on `paths`,
    // which the fork copied.
    unsafe {
        // Out of the terminal's process group and session: ^C, ^\ and a hangup are for the
        // command and exec, not for the guard; it ends when its work is done.
        libc::setsid();
        for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT, libc::SIGPIPE] {
            libc::signal(signal, libc::SIG_IGN);
        }
        // Keep nobody waiting for end of file on exec's standard streams.
        for fd in 0..3 {
            libc::close(fd);
        }
        let mut byte = 0u8;
        loop {
            let n = libc::read(release, (&raw mut byte).cast(), 1);
            if n == 0 || (n < 0 && *libc::__errno_location() != libc::EINTR) {
                break;
            }
        }
        let pause = libc::timespec { tv_sec: 0, tv_nsec: 10_000_000 };
        while populated(paths) {
            kill_all(paths);
            libc::nanosleep(&pause, std::ptr::null_mut());
        }
        libc::rmdir(paths.dir.as_ptr());
        libc::_exit(0)
    }
}

/// `populated 1` in `cgroup.events`; a cgroup that is gone or unreadable holds nothing to wait for.
unsafe fn populated(paths: &Paths) -> bool {
    let mut buf = [0u8; 256];
    let fd = libc::open(paths.events.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
    if fd < 0 {
        return false;
    }
    let n = libc::read(fd, buf.as_mut_ptr().cast(), buf.len());
    libc::close(fd);
    let Ok(len) = usize::try_from(n) else { return false };
    buf[..len].windows(11).any(|w| w == b"populated 1")
}

/// `cgroup.kill`, or SIGKILL to each pid in `cgroup.procs` where the kernel has no `cgroup.kill`.
unsafe fn kill_all(paths: &Paths) {
    let fd = libc::open(paths.kill.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
    if fd >= 0 {
        let written = libc::write(fd, b"1".as_ptr().cast(), 1);
        libc::close(fd);
        if written == 1 {
            return;
        }
    }
    let fd = libc::open(paths.procs.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
    if fd < 0 {
        return;
    }
    let mut buf = [0u8; 4096];
    let mut pid: libc::pid_t = 0;
    loop {
        let n = libc::read(fd, buf.as_mut_ptr().cast(), buf.len());
        let Ok(len) = usize::try_from(n) else { break };
        if len == 0 {
            break;
        }
        for &b in &buf[..len] {
            if b.is_ascii_digit() {
                pid = pid.saturating_mul(10).saturating_add(libc::pid_t::from(b - b'0'));
            } else {
                if pid > 0 {
                    libc::kill(pid, libc::SIGKILL);
                }
                pid = 0;
            }
        }
    }
    if pid > 0 {
        libc::kill(pid, libc::SIGKILL);
    }
    libc::close(fd);
}
