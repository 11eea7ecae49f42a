//! Frames over an async byte stream: the async half of `mesh_protocol::frame`.
//!
//! Works on any `futures` `AsyncRead`/`AsyncWrite`, which is what libp2p streams implement.

use std::time::Duration;

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
    /// A request frame did not begin in time.
    #[error("no request frame began within {0:?}")]
    NoRequest(Duration),
    /// A request frame's body came too slowly.
    #[error("the frame came too slowly: {received} of {len} bytes, at less than {min_rate} bytes a second")]
    TooSlow {
        received: usize,
        len: usize,
        min_rate: u64,
    },
}

/// Reads one frame. `Ok(None)` means the stream ended cleanly before a frame began.
pub async fn read_frame<T, R>(io: &mut R, max_len: usize) -> Result<Option<T>, WireIoError>
where
    T: DeserializeOwned,
    R: AsyncRead + Unpin,
{
    let Some(len) = read_prefix(io, max_len).await? else {
        return Ok(None);
    };
    let body = read_body(io, len, None).await?;
    Ok(Some(frame::decode_body(&body)?))
}

/// Reads a frame's length prefix. `Ok(None)` means the stream ended cleanly before it began.
async fn read_prefix<R: AsyncRead + Unpin>(
    io: &mut R,
    max_len: usize,
) -> Result<Option<usize>, WireIoError> {
    let mut prefix = [0u8; MAX_PREFIX_LEN];
    let mut have = 0;
    loop {
        let n = io.read(&mut prefix[have..have + 1]).await?;
        if n == 0 {
            return if have == 0 {
                Ok(None)
            } else {
                Err(WireIoError::Truncated)
            };
        }
        have += 1;
        if let Some((len, _)) = frame::decode_prefix(&prefix[..have], max_len)? {
            return Ok(Some(len));
        }
    }
}

/// Bytes a frame's body is read in: memory grows with what arrives, never with what the
/// prefix announces.
const BODY_CHUNK: usize = 64 * 1024;

/// Reads a body of `len` bytes as it arrives. With `pace`, each byte must have arrived by the
/// time the pace allows for it (see [`Pace`]), measured from `started`.
async fn read_body<R: AsyncRead + Unpin>(
    io: &mut R,
    len: usize,
    pace: Option<(Pace, tokio::time::Instant)>,
) -> Result<Vec<u8>, WireIoError> {
    let mut body = Vec::with_capacity(len.min(BODY_CHUNK));
    let mut chunk = vec![0u8; len.min(BODY_CHUNK)];
    while body.len() < len {
        let want = (len - body.len()).min(chunk.len());
        let read = io.read(&mut chunk[..want]);
        let n = match pace {
            Some((pace, started)) => {
                let by = pace.deadline_for(started, body.len() as u64 + 1);
                tokio::time::timeout_at(by, read)
                    .await
                    .map_err(|_| WireIoError::TooSlow {
                        received: body.len(),
                        len,
                        min_rate: pace.min_rate,
                    })??
            }
            None => read.await?,
        };
        if n == 0 {
            return Err(WireIoError::Truncated);
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Ok(body)
}

/// How fast a request frame must arrive, so that a stream that announces a frame and then
/// trickles or stalls gives its place up early: the first byte within `first_byte`; then,
/// after `grace`, at least `min_rate` bytes a second on average; all of it within `total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pace {
    pub first_byte: Duration,
    pub grace: Duration,
    /// Bytes a second.
    pub min_rate: u64,
    pub total: Duration,
}

/// The pace of request frames: any honest caller writes its request at once, in one go.
pub const REQUEST_PACE: Pace = Pace {
    first_byte: Duration::from_secs(5),
    grace: Duration::from_secs(2),
    min_rate: 16 * 1024,
    total: Duration::from_secs(10),
};

impl Pace {
    /// The same pace, with all of a frame due within `total`.
    pub fn within(self, total: Duration) -> Pace {
        Pace { total, ..self }
    }

    /// When the body's first `bytes` must have arrived, for a body begun at `started`.
    fn deadline_for(&self, started: tokio::time::Instant, bytes: u64) -> tokio::time::Instant {
        let rate = self.min_rate.max(1);
        let allowed = self.grace + Duration::from_micros(bytes.saturating_mul(1_000_000) / rate);
        started + allowed.min(self.total)
    }
}

/// Reads one request frame at `pace` (see [`Pace`]). `Ok(None)` means the stream ended
/// cleanly before a frame began.
pub async fn read_frame_paced<T, R>(
    io: &mut R,
    max_len: usize,
    pace: Pace,
) -> Result<Option<T>, WireIoError>
where
    T: DeserializeOwned,
    R: AsyncRead + Unpin,
{
    let started = tokio::time::Instant::now();
    let first = pace.first_byte.min(pace.total);
    let len = match tokio::time::timeout(first, read_prefix(io, max_len)).await {
        Ok(len) => len?,
        Err(_) => return Err(WireIoError::NoRequest(first)),
    };
    let Some(len) = len else { return Ok(None) };
    let pace = Pace {
        total: pace.total.saturating_sub(started.elapsed()),
        ..pace
    };
    let body = read_body(io, len, Some((pace, tokio::time::Instant::now()))).await?;
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

    /// A frame prefix announcing `len` bytes.
    fn prefix(len: usize) -> Vec<u8> {
        mesh_protocol::frame::encode_prefix(len as u64)
    }

    const FAST: Pace = Pace {
        first_byte: Duration::from_millis(200),
        grace: Duration::from_millis(200),
        min_rate: 1024,
        total: Duration::from_secs(5),
    };

    #[tokio::test]
    async fn a_request_that_never_begins_is_given_up_at_the_first_byte_deadline() {
        let (mut near, _far) = tokio::io::duplex(64);
        let mut near = tokio_util::compat::TokioAsyncReadCompatExt::compat(&mut near);
        let begun = std::time::Instant::now();
        let r = read_frame_paced::<String, _>(&mut near, 1 << 20, FAST).await;
        assert!(matches!(r, Err(WireIoError::NoRequest(_))), "{r:?}");
        assert!(begun.elapsed() < Duration::from_secs(2));
    }

    #[tokio::test]
    async fn an_announced_body_that_stalls_is_given_up_after_the_grace_not_the_total() {
        let (mut near, mut far) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut far, &prefix(1 << 20))
            .await
            .unwrap();
        let mut near = tokio_util::compat::TokioAsyncReadCompatExt::compat(&mut near);
        let begun = std::time::Instant::now();
        let r = read_frame_paced::<String, _>(&mut near, 1 << 20, FAST).await;
        assert!(
            matches!(r, Err(WireIoError::TooSlow { received: 0, len, .. }) if len == 1 << 20),
            "{r:?}"
        );
        assert!(
            begun.elapsed() < Duration::from_secs(2),
            "{:?}",
            begun.elapsed()
        );
    }

    #[tokio::test]
    async fn a_body_that_keeps_the_pace_is_read_whole() {
        let (mut near, mut far) = tokio::io::duplex(64);
        let body = mesh_protocol::frame::encode_frame(&"x".repeat(3000), 1 << 20).unwrap();
        tokio::spawn(async move {
            // 3 KB at about 4 KB/s, in pieces: above the 1 KB/s minimum.
            for piece in body.chunks(400) {
                tokio::io::AsyncWriteExt::write_all(&mut far, piece)
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            far
        });
        let mut near = tokio_util::compat::TokioAsyncReadCompatExt::compat(&mut near);
        let got = read_frame_paced::<String, _>(&mut near, 1 << 20, FAST)
            .await
            .unwrap();
        assert_eq!(got.unwrap().len(), 3000);
    }

    /// A reader that records the largest buffer it was asked to fill.
    struct Recording {
        bytes: Cursor<Vec<u8>>,
        largest: usize,
    }

    impl AsyncRead for Recording {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &mut [u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            self.largest = self.largest.max(buf.len());
            std::pin::Pin::new(&mut self.bytes).poll_read(cx, buf)
        }
    }

    #[test]
    fn a_body_is_read_in_chunks_not_at_its_announced_size() {
        // Announces 1 MiB and sends 10 bytes: truncated, and never asked for more than a
        // chunk's room at once (the buffer grows with what arrives).
        let mut bytes = prefix(1 << 20);
        bytes.extend_from_slice(&[0; 10]);
        let mut io = Recording {
            bytes: Cursor::new(bytes),
            largest: 0,
        };
        let r = block(read_frame::<String, _>(&mut io, 1 << 20));
        assert!(matches!(r, Err(WireIoError::Truncated)), "{r:?}");
        assert!(
            io.largest <= BODY_CHUNK,
            "asked for {} bytes at once",
            io.largest
        );
    }
}
