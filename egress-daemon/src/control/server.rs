//! The daemon's side of the control socket.

use std::{
    io,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use anyhow::{bail, Context};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::broadcast::error::RecvError,
    task::JoinHandle,
};

use super::{
    history::{EventHistory, LogFilter},
    protocol::{Request, Response, StatusReport},
};

/// Longest request line accepted.
const MAX_REQUEST: usize = 64 * 1024;

/// What the daemon offers to control clients.
pub trait ControlHandler: Send + Sync + 'static {
    fn status(&self) -> StatusReport;
    /// `Ok(summary)` or `Err(message)` (for a bad file: `FILE:LINE:COL: message`).
    fn reload(&self) -> Result<String, String>;
    fn history(&self) -> &EventHistory;
}

/// Serving stops and the socket file is removed when this is dropped.
pub struct ServerHandle {
    path: PathBuf,
    task: JoinHandle<()>,
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Listens on `socket`: root only, or root and members of `group`.
pub async fn serve(socket: &Path, group: Option<String>, handler: Arc<dyn ControlHandler>) -> anyhow::Result<ServerHandle> {
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if socket.exists() {
        if UnixStream::connect(socket).await.is_ok() {
            bail!("another egress daemon is running on {}", socket.display());
        }
        std::fs::remove_file(socket).with_context(|| format!("removing the stale {}", socket.display()))?;
    }
    let listener = UnixListener::bind(socket).with_context(|| format!("listening on {}", socket.display()))?;
    let gid = match &group {
        Some(name) => Some(group_id(name).with_context(|| format!("settings.control_group {name}"))?),
        None => None,
    };
    let mode = if gid.is_some() { 0o660 } else { 0o600 };
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(mode))?;
    if let Some(gid) = gid {
        std::os::unix::fs::chown(socket, None, Some(gid))?;
    }
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let handler = handler.clone();
            tokio::spawn(async move {
                if let Err(error) = answer(stream, gid, handler).await {
                    tracing::debug!(%error, "control connection ended");
                }
            });
        }
    });
    Ok(ServerHandle { path: socket.to_path_buf(), task })
}

async fn answer(stream: UnixStream, gid: Option<u32>, handler: Arc<dyn ControlHandler>) -> io::Result<()> {
    let allowed = stream.peer_cred().is_ok_and(|cred| cred.uid() == 0 || gid.is_some_and(|g| in_group(&cred, g)));
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(read.take(MAX_REQUEST as u64));
    reader.read_line(&mut line).await?;
    if !allowed {
        return send(&mut write, &Response::Error { message: "permission denied: root or settings.control_group only".into() }).await;
    }
    let request = match serde_json::from_str::<Request>(&line) {
        Ok(request) => request,
        Err(error) => return send(&mut write, &Response::Error { message: format!("bad request: {error}") }).await,
    };
    match request {
        Request::Status => send(&mut write, &Response::Status(handler.status())).await,
        Request::Reload => {
            let response = match handler.reload() {
                Ok(message) => Response::Reloaded { message },
                Err(message) => Response::Error { message },
            };
            send(&mut write, &response).await
        }
        Request::Logs { follow, blocked_only, policy, since_secs } => {
            let since = since_secs.map(|secs| SystemTime::now() - Duration::from_secs(secs));
            let filter = LogFilter { blocked_only, policy, since };
            let (kept, mut live) = handler.history().snapshot_and_follow(&filter);
            for record in kept {
                send(&mut write, &Response::Event(record)).await?;
            }
            if !follow {
                return Ok(());
            }
            loop {
                match live.recv().await {
                    Ok(record) if filter.matches(&record) => send(&mut write, &Response::Event(record)).await?,
                    Ok(_) => {}
                    Err(RecvError::Lagged(skipped)) => {
                        let message = format!("{skipped} events skipped (client too slow)");
                        send(&mut write, &Response::Notice { message }).await?;
                    }
                    Err(RecvError::Closed) => return Ok(()),
                }
            }
        }
    }
}

async fn send(write: &mut tokio::net::unix::OwnedWriteHalf, response: &Response) -> io::Result<()> {
    let mut line = serde_json::to_vec(response)?;
    line.push(b'\n');
    write.write_all(&line).await
}

fn in_group(cred: &tokio::net::unix::UCred, gid: u32) -> bool {
    if cred.gid() == gid {
        return true;
    }
    let Some(pid) = cred.pid() else { return false };
    std::fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|status| {
        status
            .lines()
            .find_map(|l| l.strip_prefix("Groups:"))
            .is_some_and(|groups| groups.split_whitespace().any(|g| g.parse() == Ok(gid)))
    })
}

fn group_id(name: &str) -> anyhow::Result<u32> {
    let group = std::fs::read_to_string("/etc/group").context("reading /etc/group")?;
    group
        .lines()
        .filter_map(|line| {
            let mut fields = line.split(':');
            Some((fields.next()?, fields.nth(1)?))
        })
        .find(|(group, _)| *group == name)
        .and_then(|(_, gid)| gid.parse().ok())
        .with_context(|| format!("no group named {name}"))
}
