//! Writing response frames: coalescing, write bounds, error frames.
//!
//! A call's frames go through a [`FrameBuffer`], so a burst of small deltas (and `started`
//! with the first of them) leaves in one write and one packet. Every write is bounded in
//! time, so a caller that stops reading while its connection stays up cannot hold a serving
//! task: a call's writes give up at its deadline, control writes after [`WRITE_TIMEOUT`].

use std::time::Duration;

use futures::{AsyncWrite, AsyncWriteExt};
use mesh_protocol::frame::encode_frame;
use mesh_protocol::{ErrorCode, InferResponse, WireError};

use crate::wire::write_frame;

/// How long `started` may wait to share a packet with the first output.
pub(super) const STARTED_HOLD: Duration = Duration::from_millis(2);

/// Longest wait for a small control write (an error frame, a catalog, a close): a caller
/// that stops reading must not hold a serving task.
pub(super) const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Encoded frames waiting to be written together.
pub(super) struct FrameBuffer {
    bytes: Vec<u8>,
    max_frame_len: usize,
    /// Writes give up at the call's deadline, so a caller that stops reading (while its
    /// connection stays up) cannot hold a slot past it.
    deadline: tokio::time::Instant,
}

impl FrameBuffer {
    pub(super) fn new(max_frame_len: usize, deadline: tokio::time::Instant) -> Self {
        FrameBuffer {
            bytes: Vec::new(),
            max_frame_len,
            deadline,
        }
    }

    pub(super) fn has_data(&self) -> bool {
        !self.bytes.is_empty()
    }

    /// Encodes a frame; one too large for a frame is the node's failure, told to the caller.
    pub(super) fn push(&mut self, frame: &InferResponse) -> Result<(), WireError> {
        let encoded = encode_frame(frame, self.max_frame_len).map_err(|e| {
            WireError::new(
                ErrorCode::Internal,
                format!("the answer does not fit in a frame: {e}"),
            )
        })?;
        self.bytes.extend_from_slice(&encoded);
        Ok(())
    }

    /// Writes and flushes everything buffered.
    pub(super) async fn send<W: AsyncWrite + Unpin>(&mut self, wr: &mut W) -> std::io::Result<()> {
        if self.bytes.is_empty() {
            return Ok(());
        }
        let write = async {
            wr.write_all(&self.bytes).await?;
            wr.flush().await
        };
        tokio::time::timeout_at(self.deadline, write)
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        self.bytes.clear();
        Ok(())
    }
}

/// Sends one `error` frame, within [`WRITE_TIMEOUT`]; a failure is only logged (the caller
/// has nothing more to learn from a stream that does not work).
pub(super) async fn send_error<W: AsyncWrite + Unpin>(
    wr: &mut W,
    error: WireError,
    max_frame_len: usize,
) {
    let frame = InferResponse::Error(error);
    match tokio::time::timeout(WRITE_TIMEOUT, write_frame(wr, &frame, max_frame_len)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!("could not send error frame: {e}"),
        Err(_) => tracing::debug!("error frame timed out"),
    }
}

/// Closes the write side, within [`WRITE_TIMEOUT`], ignoring failures.
pub(super) async fn close<W: AsyncWrite + Unpin>(wr: &mut W) {
    let _ = tokio::time::timeout(WRITE_TIMEOUT, wr.close()).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_protocol::decode_frame;

    fn delta(text: &str) -> InferResponse {
        InferResponse::Delta {
            text: text.into(),
            tokens: vec![],
        }
    }

    #[tokio::test]
    async fn buffered_frames_leave_in_one_write_and_decode_in_order() {
        let far = tokio::time::Instant::now() + Duration::from_secs(5);
        let mut out = FrameBuffer::new(1024, far);
        assert!(!out.has_data());
        for text in ["a", "b", "c"] {
            out.push(&delta(text)).unwrap();
        }
        assert!(out.has_data());
        let mut wire = Vec::new();
        out.send(&mut wire).await.unwrap();
        assert!(!out.has_data(), "sent bytes are not sent again");

        let mut frames = Vec::new();
        let mut rest = &wire[..];
        while let Some((frame, used)) = decode_frame::<InferResponse>(rest, 1024).unwrap() {
            frames.push(frame);
            rest = &rest[used..];
        }
        assert!(rest.is_empty());
        assert_eq!(frames, vec![delta("a"), delta("b"), delta("c")]);
    }

    #[tokio::test]
    async fn a_frame_too_large_is_an_internal_error_and_buffers_nothing() {
        let far = tokio::time::Instant::now() + Duration::from_secs(5);
        let mut out = FrameBuffer::new(16, far);
        let e = out.push(&delta(&"x".repeat(64))).unwrap_err();
        assert_eq!(e.code, ErrorCode::Internal);
        assert!(!out.has_data());
    }
}
