//! Answers that stream: what is kept, then, for a follower, what comes live until the client
//! closes its end. `egress logs` (events) and `egress logs --flows` (flow records) both go
//! through [`backlog_then_live`].

use std::io;

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter},
    sync::broadcast::{self, error::RecvError},
};

use super::protocol::Response;

/// Part of a backlog: the items to send, and how many were evicted before they could be.
pub(super) struct Chunk<T> {
    pub evicted: u64,
    pub items: Vec<T>,
}

/// How one kind of item streams: which it sends, how it becomes a response, what notices call it.
pub(super) struct Items<K, R> {
    pub keep: K,
    pub respond: R,
    /// Names the items in notices ("events", "flow records").
    pub what: &'static str,
}

/// Sends the chunks `next_chunk` gives until it gives none, then, with `live`, what `live`
/// brings until the client closes its end or the channel closes. Only items `keep` accepts
/// are sent live (the backlog is filtered where it is read).
pub(super) async fn backlog_then_live<T, K, F, R, W>(
    mut next_chunk: impl FnMut() -> Option<Chunk<T>>,
    live: Option<broadcast::Receiver<T>>,
    items: Items<K, F>,
    reader: &mut R,
    out: &mut BufWriter<W>,
) -> io::Result<()>
where
    T: Clone,
    K: Fn(&T) -> bool,
    F: Fn(T) -> Response,
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    while let Some(chunk) = next_chunk() {
        if chunk.evicted > 0 {
            write_line(out, &skipped(chunk.evicted, items.what)).await?;
        }
        for item in chunk.items {
            write_line(out, &(items.respond)(item)).await?;
        }
    }
    out.flush().await?;
    let Some(mut live) = live else { return Ok(()) };
    let mut scratch = [0u8; 256];
    loop {
        tokio::select! {
            received = live.recv() => {
                match received {
                    Ok(item) if (items.keep)(&item) => write_line(out, &(items.respond)(item)).await?,
                    Ok(_) => {}
                    Err(RecvError::Lagged(missed)) => write_line(out, &skipped(missed, items.what)).await?,
                    Err(RecvError::Closed) => return out.flush().await,
                }
                // One write per burst rather than per item.
                if live.is_empty() {
                    out.flush().await?;
                }
            }
            // A follower sends nothing after its request: readable means it closed its end.
            read = reader.read(&mut scratch) => match read {
                Ok(0) | Err(_) => return Ok(()),
                Ok(_) => {}
            },
        }
    }
}

fn skipped(count: u64, what: &str) -> Response {
    Response::Notice { message: format!("{count} {what} skipped (client too slow)") }
}

/// One response as one JSON line.
pub(super) async fn write_line<W: AsyncWrite + Unpin>(out: &mut BufWriter<W>, response: &Response) -> io::Result<()> {
    let mut line = serde_json::to_vec(response).map_err(io::Error::other)?;
    line.push(b'\n');
    out.write_all(&line).await
}

/// One response, flushed: the whole answer.
pub(super) async fn reply<W: AsyncWrite + Unpin>(out: &mut BufWriter<W>, response: &Response) -> io::Result<()> {
    write_line(out, response).await?;
    out.flush().await
}
