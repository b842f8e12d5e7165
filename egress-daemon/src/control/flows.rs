//! The control socket's flow-record requests: `egress logs --flows` and `egress top`.

use std::{
    io,
    time::{Duration, SystemTime},
};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufWriter};

use super::{
    protocol::Response,
    server::{follow_live, write_line},
};
use crate::flows::{record::FlowLogRecord, store::FlowLog};

/// Rows `egress top` shows at most.
pub const TOP_ROWS: usize = 50;

/// The kept flow records that match, then, with `follow`, live ones until the client closes.
pub async fn flows<R, W>(
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
    for record in kept {
        write_line(out, &Response::Flow(record)).await?;
    }
    out.flush().await?;
    let Some(live) = live else { return Ok(()) };
    let keep = |record: &FlowLogRecord| policy.as_ref().is_none_or(|p| *p == record.policy);
    follow_live(live, keep, Response::Flow, "flow records", reader, out).await
}

/// The top talkers of the last `window_secs`.
pub async fn top<W: AsyncWrite + Unpin>(log: &FlowLog, window_secs: u64, out: &mut BufWriter<W>) -> io::Result<()> {
    let rows = log.top(Duration::from_secs(window_secs), TOP_ROWS);
    write_line(out, &Response::Top { window_secs, rows }).await?;
    out.flush().await
}
