//! The control socket's flow-record requests: `egress logs --flows` and `egress top`.

use std::{
    io,
    time::{Duration, SystemTime},
};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter},
    sync::broadcast::error::RecvError,
};

use super::protocol::Response;
use crate::flows::store::FlowLog;

/// Rows `egress top` shows at most.
pub const TOP_ROWS: usize = 50;

/// The kept flow records that match, then, with `follow`, live ones until the client closes.
pub async fn flows<R, W>(
    log: &FlowLog,
    policy: Option<String>,
    since_secs: Option<u64>,
    follow: bool,
    reader: &mut R,
    out: &mut BufWriter<W>,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let since = since_secs
        .map(|secs| SystemTime::now().checked_sub(Duration::from_secs(secs)).unwrap_or(SystemTime::UNIX_EPOCH));
    let (kept, live) = log.follow(policy.as_deref(), since, follow);
    for record in kept {
        line(out, &Response::Flow(record)).await?;
    }
    out.flush().await?;
    let Some(mut live) = live else { return Ok(()) };
    let mut scratch = [0u8; 256];
    loop {
        tokio::select! {
            received = live.recv() => {
                match received {
                    Ok(record) if policy.as_ref().is_none_or(|p| *p == record.policy) => {
                        line(out, &Response::Flow(record)).await?;
                    }
                    Ok(_) => {}
                    Err(RecvError::Lagged(missed)) => {
                        let message = format!("{missed} flow records skipped (client too slow)");
                        line(out, &Response::Notice { message }).await?;
                    }
                    Err(RecvError::Closed) => return out.flush().await,
                }
                if live.is_empty() {
                    out.flush().await?;
                }
            }
            read = reader.read(&mut scratch) => match read {
                Ok(0) | Err(_) => return Ok(()),
                Ok(_) => {}
            },
        }
    }
}

/// The top talkers of the last `window_secs`.
pub async fn top<W: AsyncWrite + Unpin>(log: &FlowLog, window_secs: u64, out: &mut BufWriter<W>) -> io::Result<()> {
    let rows = log.top(Duration::from_secs(window_secs), TOP_ROWS);
    line(out, &Response::Top { window_secs, rows }).await?;
    out.flush().await
}

async fn line<W: AsyncWrite + Unpin>(out: &mut BufWriter<W>, response: &Response) -> io::Result<()> {
    let mut bytes = serde_json::to_vec(response).map_err(io::Error::other)?;
    bytes.push(b'\n');
    out.write_all(&bytes).await
}
