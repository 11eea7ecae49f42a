//! Frames over an async byte stream: the async half of `mesh_protocol::frame`.
//!
//! Works on any `futures` `AsyncRead`/`AsyncWrite`, which is what libp2p streams implement.

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use mesh_protocol::frame::{self, FrameError, MAX_PREFIX_LEN};
use serde::{de::DeserializeOwned, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum WireIoError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("stream closed in the middle of a frame")]
    Truncated,
    #[error("stream error: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads one frame. `Ok(None)` means the stream ended cleanly before a frame began.
pub async fn read_frame<T, R>(io: &mut R, max_len: usize) -> Result<Option<T>, WireIoError>
where
    T: DeserializeOwned,
    R: AsyncRead + Unpin,
{
    let mut prefix = [0u8; MAX_PREFIX_LEN];
    let mut have = 0;
    let (len, _) = loop {
        let n = io.read(&mut prefix[have..have + 1]).await?;
        if n == 0 {
            return if have == 0 {
                Ok(None)
            } else {
                Err(WireIoError::Truncated)
            };
        }
        have += 1;
        if let Some(found) = frame::decode_prefix(&prefix[..have], max_len)? {
            break found;
        }
    };
    let mut body = vec![0u8; len];
    io.read_exact(&mut body).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => WireIoError::Truncated,
        _ => WireIoError::Io(e),
    })?;
    Ok(Some(frame::decode_body(&body)?))
}

/// Writes one frame and flushes it.
pub async fn write_frame<T, W>(io: &mut W, value: &T, max_len: usize) -> Result<(), WireIoError>
where
    T: Serialize,
    W: AsyncWrite + Unpin,
{
    let bytes = frame::encode_frame(value, max_len)?;
    io.write_all(&bytes).await?;
    io.flush().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::io::Cursor;

    fn block<F: std::future::Future>(f: F) -> F::Output {
        futures::executor::block_on(f)
    }

    #[test]
    fn frames_roundtrip_and_eof_is_clean() {
        let mut buf = Vec::new();
        block(write_frame(&mut buf, &"one", 64)).unwrap();
        block(write_frame(&mut buf, &2u8, 64)).unwrap();
        let mut r = Cursor::new(buf);
        assert_eq!(
            block(read_frame::<String, _>(&mut r, 64)).unwrap().unwrap(),
            "one"
        );
        assert_eq!(block(read_frame::<u8, _>(&mut r, 64)).unwrap(), Some(2));
        assert!(block(read_frame::<u8, _>(&mut r, 64)).unwrap().is_none());
    }

    #[test]
    fn truncated_and_oversized_frames_are_errors() {
        let mut buf = Vec::new();
        block(write_frame(&mut buf, &"hello", 64)).unwrap();
        buf.truncate(3);
        let r = block(read_frame::<String, _>(&mut Cursor::new(buf), 64));
        assert!(matches!(r, Err(WireIoError::Truncated)));

        // Announces 1 GiB; must fail without reading or allocating it.
        let r = block(read_frame::<String, _>(
            &mut Cursor::new(vec![0x80, 0x80, 0x80, 0x80, 0x04]),
            64,
        ));
        assert!(matches!(
            r,
            Err(WireIoError::Frame(FrameError::TooLarge { .. }))
        ));
    }
}
