//! The client's writer task: queued frames to the transport, in pieces,
//! releasing each frame's share of the send budget once written.

use super::{lost, Frame, Inner};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::io::{AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::mpsc;

/// Frames are handed to the transport in pieces of this size, so that
/// progress is seen on a slow link even while one large frame is written.
const WRITE_PIECE: usize = 64 << 10;

/// Writes one queued frame and releases its share of the budget.
async fn write_one<W: AsyncWrite + Unpin>(
    w: &mut BufWriter<W>,
    (frame, permit): Frame,
    inner: &Inner,
) -> std::io::Result<()> {
    write_pieces(w, &frame, inner).await?;
    drop(permit);
    inner.queued.fetch_sub(frame.len(), Ordering::Relaxed);
    Ok(())
}

pub(super) async fn write_loop<W: AsyncWrite + Unpin>(
    mut w: BufWriter<W>,
    mut rx: mpsc::UnboundedReceiver<Frame>,
    inner: Arc<Inner>,
) {
    let res: std::io::Result<()> = async {
        while let Some(f) = rx.recv().await {
            write_one(&mut w, f, &inner).await?;
            while let Ok(f) = rx.try_recv() {
                write_one(&mut w, f, &inner).await?;
            }
            w.flush().await?;
            inner.moved();
        }
        w.shutdown().await
    }
    .await;
    if let Err(e) = res {
        inner.fail_all(lost(e));
    }
}

/// Writes one frame in pieces, recording progress after each.
async fn write_pieces<W: AsyncWrite + Unpin>(
    w: &mut BufWriter<W>,
    frame: &[u8],
    inner: &Inner,
) -> std::io::Result<()> {
    for piece in frame.chunks(WRITE_PIECE) {
        w.write_all(piece).await?;
        inner.moved();
    }
    Ok(())
}
