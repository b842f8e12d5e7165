//! The daemon's side of the control socket: sets the socket up (directory, stale file, mode,
//! group), checks each client's credentials and answers it in its own task, so that a slow or
//! stuck client never holds up the daemon or other clients.

use std::{
    ffi::CString,
    io,
    os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use anyhow::{anyhow, bail, Context};
use tokio::{
    io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, BufReader, BufWriter},
    net::{unix::UCred, UnixListener, UnixStream},
    task::{JoinHandle, JoinSet},
};

use super::{
    protocol::{Request, Response, StatusReport, MAX_REQUEST_LINE},
    stream::{backlog_then_live, reply, Chunk, Items},
};
use crate::{
    flows::{record::FlowLogRecord, store::FlowLog},
    naming::NamedEvent,
    sinks::history::{EventHistory, LogFilter},
    yaml::ConfigError,
};

/// How long a client may take to send its request line.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after a failed `accept` (out of file descriptors, ...), so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// History records examined per lock of the ring while sending a backlog: pushes wait at most
/// this long, however large `settings.history` is.
const BACKLOG_CHUNK: usize = 1024;
/// Rows `egress top` shows at most.
pub const TOP_ROWS: usize = 50;

/// What the daemon offers to control clients.
///
/// `status` and `reload` may block (they wait for the daemon's locks; a reload parses, walks the
/// cgroup tree and writes the maps), so the server calls them on tokio's blocking threads: a
/// slow reload never holds up the runtime, other clients or the daemon's other work.
pub trait ControlHandler: Send + Sync + 'static {
    fn status(&self) -> StatusReport;
    /// `Ok(summary)`, or why not, with the running policies left in force.
    fn reload(&self) -> Result<String, ReloadError>;
    fn history(&self) -> &EventHistory;
    /// Flow records, where the handler keeps them.
    fn flow_log(&self) -> Option<&FlowLog> {
        None
    }
}

/// Why a reload left the running policies in force; clients get its message.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The file was rejected: `FILE:LINE:COL: message`.
    #[error(transparent)]
    File(#[from] ConfigError),
    /// The file was good but could not be put in force.
    #[error("{0:#}")]
    Apply(anyhow::Error),
}

/// A client the socket does not serve.
#[derive(Debug, thiserror::Error)]
enum AccessError {
    #[error("cannot tell who the client is: {0}")]
    Unknown(#[source] io::Error),
    #[error("permission denied: the control socket is for root only (uid {uid} asked)")]
    RootOnly { uid: u32 },
    #[error("permission denied: the control socket is for root and group {group} (uid {uid} asked)")]
    NotInGroup { group: String, uid: u32 },
}

/// A request line that cannot be read.
#[derive(Debug, thiserror::Error)]
enum RequestError {
    #[error("reading the request: {0}")]
    Read(#[source] io::Error),
    #[error("request longer than {} KiB", MAX_REQUEST_LINE / 1024)]
    TooLong,
}

/// The socket being served. Dropping it stops serving (the listener and every open
/// connection) and removes the socket file, unless another daemon has replaced it since.
pub struct ServerHandle {
    socket: SocketFile,
    task: JoinHandle<()>,
}

impl ServerHandle {
    pub fn path(&self) -> &Path {
        &self.socket.path
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The socket file this daemon bound, removed on drop if it is still the same file.
struct SocketFile {
    path: PathBuf,
    identity: Option<(u64, u64)>,
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        let current = std::fs::symlink_metadata(&self.path).ok().map(|m| (m.dev(), m.ino()));
        if current.is_some() && current == self.identity {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Who may use the socket besides root.
#[derive(Clone, Debug)]
struct Access {
    group: Option<(String, u32)>,
    /// The daemon's own user: a daemon run as another user (in tests) answers that user.
    own_uid: u32,
}

/// Serves the control socket at `socket`: mode 0600 (root only), or 0660 and owned by `group`
/// when one is given. Fails if another daemon answers on `socket`; a stale socket file left by
/// a killed daemon is replaced.
pub async fn serve(
    socket: &Path,
    group: Option<String>,
    handler: Arc<dyn ControlHandler>,
) -> anyhow::Result<ServerHandle> {
    let group = match group {
        Some(name) => {
            let gid = group_id(&name).with_context(|| format!("settings.control_group: {name}"))?;
            Some((name, gid))
        }
        None => None,
    };
    prepare_directory(socket)?;
    remove_stale(socket).await?;

    let listener = UnixListener::bind(socket).with_context(|| format!("listening on {}", socket.display()))?;
    let identity = std::fs::symlink_metadata(socket).ok().map(|m| (m.dev(), m.ino()));
    let file = SocketFile { path: socket.to_path_buf(), identity };
    // Until the mode is set the socket may be open to more users than it should be; the
    // credential check on every connection covers that moment.
    let mode = if group.is_some() { 0o660 } else { 0o600 };
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", socket.display()))?;
    if let Some((name, gid)) = &group {
        std::os::unix::fs::chown(socket, None, Some(*gid))
            .with_context(|| format!("giving {} to group {name}", socket.display()))?;
    }

    // SAFETY: geteuid has no preconditions and cannot fail.
    let own_uid = unsafe { libc::geteuid() };
    let access = Access { group, own_uid };
    let task = tokio::spawn(accept_loop(listener, access, handler));
    Ok(ServerHandle { socket: file, task })
}

/// Creates the socket's directory (0755, so that a configured group can reach the socket).
fn prepare_directory(socket: &Path) -> anyhow::Result<()> {
    let Some(dir) = socket.parent().filter(|dir| !dir.as_os_str().is_empty()) else {
        return Ok(());
    };
    if dir.exists() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    // Not narrowed by the umask: group members need to traverse it.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
        .with_context(|| format!("setting the mode of {}", dir.display()))
}

/// Removes a socket file nobody answers on; refuses to touch a live one or a non-socket.
async fn remove_stale(socket: &Path) -> anyhow::Result<()> {
    let meta = match std::fs::symlink_metadata(socket) {
        Ok(meta) => meta,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(error) => return Err(error).with_context(|| format!("inspecting {}", socket.display())),
    };
    if !meta.file_type().is_socket() {
        bail!("{} exists and is not a socket; remove it or set settings.control_socket", socket.display());
    }
    match UnixStream::connect(socket).await {
        Ok(_) => bail!("another egress daemon is running on {}", socket.display()),
        Err(error) if error.kind() == io::ErrorKind::ConnectionRefused => {
            std::fs::remove_file(socket).with_context(|| format!("removing the stale {}", socket.display()))
        }
        Err(error) => Err(error).with_context(|| format!("checking whether a daemon answers on {}", socket.display())),
    }
}

async fn accept_loop(listener: UnixListener, access: Access, handler: Arc<dyn ControlHandler>) {
    // Dropping the set (when the handle aborts this task) aborts every connection's task.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let (access, handler) = (access.clone(), handler.clone());
                    connections.spawn(async move {
                        if let Err(error) = converse(stream, &access, handler).await {
                            tracing::debug!(%error, "control connection ended");
                        }
                    });
                }
                Err(error) => {
                    tracing::warn!(%error, "control socket: accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// One client: one request, its answer.
async fn converse(stream: UnixStream, access: &Access, handler: Arc<dyn ControlHandler>) -> io::Result<()> {
    let peer = stream.peer_cred();
    let (read, write) = stream.into_split();
    let mut reader = BufReader::new(read);
    let mut out = BufWriter::new(write);

    let allowed = authorize(peer, access);
    // The request is read even from a client that is refused: closing with its request unread
    // would reset the connection and lose the refusal.
    let line = tokio::time::timeout(REQUEST_TIMEOUT, read_request_line(&mut reader)).await;
    if let Err(refusal) = allowed {
        tracing::warn!("control socket: {refusal}");
        return reply(&mut out, &Response::Error { message: refusal.to_string() }).await;
    }
    let line = match line {
        Ok(Ok(Some(line))) => line,
        Ok(Ok(None)) => return Ok(()),
        Ok(Err(error)) => return reply(&mut out, &Response::Error { message: error.to_string() }).await,
        Err(_) => {
            let message = format!("no request within {} s", REQUEST_TIMEOUT.as_secs());
            return reply(&mut out, &Response::Error { message }).await;
        }
    };
    let request = match serde_json::from_slice::<Request>(&line) {
        Ok(request) => request,
        Err(error) => return reply(&mut out, &Response::Error { message: format!("bad request: {error}") }).await,
    };
    match request {
        Request::Status => {
            let status = off_runtime(&handler, ControlHandler::status).await?;
            reply(&mut out, &Response::Status(status)).await
        }
        Request::Reload => {
            let response = off_runtime(&handler, |handler| match handler.reload() {
                Ok(message) => Response::Reloaded { policies: handler.status().policies.len(), message },
                Err(error) => Response::Error { message: error.to_string() },
            })
            .await?;
            reply(&mut out, &response).await
        }
        Request::Logs { follow, blocked_only, policy, since_secs } => {
            let filter = LogFilter { blocked_only, policy, since: since_time(since_secs) };
            logs(handler.history(), &filter, follow, &mut reader, &mut out).await
        }
        Request::Flows { follow, policy, since_secs } => match handler.flow_log() {
            Some(log) => flows(log, policy, since_time(since_secs), follow, &mut reader, &mut out).await,
            None => reply(&mut out, &Response::Error { message: "no flow records here".into() }).await,
        },
        Request::Top { window_secs } => match handler.flow_log() {
            Some(log) => top(log, window_secs, &mut out).await,
            None => reply(&mut out, &Response::Error { message: "no flow records here".into() }).await,
        },
    }
}

/// Runs a handler call on tokio's blocking threads.
async fn off_runtime<T: Send + 'static>(
    handler: &Arc<dyn ControlHandler>,
    call: impl FnOnce(&dyn ControlHandler) -> T + Send + 'static,
) -> io::Result<T> {
    let handler = handler.clone();
    tokio::task::spawn_blocking(move || call(handler.as_ref())).await.map_err(io::Error::other)
}

/// The request line without its newline; `None` if the client closed without one.
async fn read_request_line<R: AsyncRead + Unpin>(reader: &mut BufReader<R>) -> Result<Option<Vec<u8>>, RequestError> {
    let mut line = Vec::new();
    let limit = MAX_REQUEST_LINE as u64;
    let read = (&mut *reader).take(limit).read_until(b'\n', &mut line).await.map_err(RequestError::Read)?;
    match line.last() {
        _ if read == 0 => Ok(None),
        Some(b'\n') => {
            line.pop();
            Ok(Some(line))
        }
        _ if read as u64 >= limit => Err(RequestError::TooLong),
        // The client closed its end after a request without a newline.
        _ => Ok(Some(line)),
    }
}

/// Root and the daemon's own user always; others only as members of the configured group.
fn authorize(peer: io::Result<UCred>, access: &Access) -> Result<(), AccessError> {
    let peer = peer.map_err(AccessError::Unknown)?;
    if peer.uid() == 0 || peer.uid() == access.own_uid {
        return Ok(());
    }
    let Some((name, gid)) = &access.group else {
        return Err(AccessError::RootOnly { uid: peer.uid() });
    };
    let member = peer.gid() == *gid
        || peer.pid().is_some_and(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/status"))
                .is_ok_and(|status| supplementary_groups(&status).contains(gid))
        });
    if member {
        Ok(())
    } else {
        Err(AccessError::NotInGroup { group: name.clone(), uid: peer.uid() })
    }
}

/// The `Groups:` line of `/proc/PID/status`.
fn supplementary_groups(status: &str) -> Vec<u32> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("Groups:"))
        .map(|groups| groups.split_whitespace().filter_map(|g| g.parse().ok()).collect())
        .unwrap_or_default()
}

/// The kept events that match, then, with `follow`, the live ones until the client closes
/// its end or a write fails.
async fn logs<R, W>(
    history: &EventHistory,
    filter: &LogFilter,
    follow: bool,
    reader: &mut R,
    out: &mut BufWriter<W>,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    // Subscribing and marking the end of the backlog happen in one step (see
    // `EventHistory::follow`): every event is sent once, from the backlog or live.
    let (mut backlog, live) = if follow {
        let (backlog, live) = history.follow();
        (backlog, Some(live))
    } else {
        (history.backlog(), None)
    };
    let next_chunk = || {
        (!backlog.is_done()).then(|| {
            let chunk = history.read_backlog(&mut backlog, filter, BACKLOG_CHUNK);
            Chunk { evicted: chunk.evicted, items: chunk.records }
        })
    };
    let items = Items { keep: |record: &NamedEvent| filter.matches(record), respond: Response::Event, what: "events" };
    backlog_then_live(next_chunk, live, items, reader, out).await
}

/// The kept flow records that match, then, with `follow`, live ones until the client closes.
async fn flows<R, W>(
    log: &FlowLog,
    policy: Option<String>,
    since: Option<SystemTime>,
    follow: bool,
    reader: &mut R,
    out: &mut BufWriter<W>,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (kept, live) = log.follow(policy.as_deref(), since, follow);
    let mut kept = Some(kept);
    let next_chunk = || kept.take().map(|items| Chunk { evicted: 0, items });
    let keep = |record: &FlowLogRecord| policy.as_ref().is_none_or(|p| *p == record.policy);
    let items = Items { keep, respond: Response::Flow, what: "flow records" };
    backlog_then_live(next_chunk, live, items, reader, out).await
}

/// The top talkers of the last `window_secs`.
async fn top<W: AsyncWrite + Unpin>(log: &FlowLog, window_secs: u64, out: &mut BufWriter<W>) -> io::Result<()> {
    let rows = log.top(Duration::from_secs(window_secs), TOP_ROWS);
    reply(out, &Response::Top { window_secs, rows }).await
}

/// The start of a request's `since_secs` window (the epoch when it reaches back further).
fn since_time(since_secs: Option<u64>) -> Option<SystemTime> {
    since_secs.map(|secs| SystemTime::now().checked_sub(Duration::from_secs(secs)).unwrap_or(SystemTime::UNIX_EPOCH))
}

/// The id of group `name` (through NSS, like `chgrp`), or `name` itself if it is a number.
fn group_id(name: &str) -> anyhow::Result<u32> {
    let c_name = CString::new(name).map_err(|_| anyhow!("a group name cannot contain a NUL byte"))?;
    let mut buffer: Vec<libc::c_char> = vec![0; 1024];
    loop {
        // SAFETY: an all-zero `group` is valid (null pointers, gid 0); getgrnam_r fills it.
        let mut group: libc::group = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::group = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call and `buffer.len()` is the buffer's size;
        // `group`'s strings point into `buffer`, and only the gid is read afterwards.
        let status =
            unsafe { libc::getgrnam_r(c_name.as_ptr(), &mut group, buffer.as_mut_ptr(), buffer.len(), &mut found) };
        match status {
            0 if !found.is_null() => return Ok(group.gr_gid),
            0 => return name.parse().map_err(|_| anyhow!("no group named {name}")),
            libc::ERANGE if buffer.len() < 1 << 20 => buffer.resize(buffer.len() * 2, 0),
            errno => {
                return Err(io::Error::from_raw_os_error(errno)).with_context(|| format!("looking up group {name}"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_supplementary_groups() {
        let status = "Name:\tcat\nUid:\t1000\t1000\t1000\t1000\nGroups:\t4 24 27 1000 \nNSpid:\t1\n";
        assert_eq!(supplementary_groups(status), [4, 24, 27, 1000]);
        assert_eq!(supplementary_groups("Groups:\t\n"), Vec::<u32>::new());
        assert_eq!(supplementary_groups("Name:\tx\n"), Vec::<u32>::new());
    }

    #[test]
    fn resolves_groups_by_name_or_number() {
        assert_eq!(group_id("root").expect("root group"), 0);
        assert_eq!(group_id("4242").expect("numeric"), 4242);
        assert!(group_id("no-such-group-egress").is_err());
        assert!(group_id("nul\0byte").is_err());
    }
}
