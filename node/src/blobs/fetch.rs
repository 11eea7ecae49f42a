//! Fetching a run of pieces of a blob from one peer over `/mesh/blob/1`, each piece checked
//! against the root before it is handed on.
//!
//! A peer that sends a piece that does not verify, a length other than the one asked for, or
//! anything out of order is reported as [`FetchError::Lied`]: the caller backs it off and gets
//! the piece elsewhere. A refusal (`unauthorized`, `unknown_model`, a bad request) comes back as
//! [`FetchError::Refused`] with the node's reason.

use std::time::Duration;

use futures::AsyncWriteExt;
use libp2p::PeerId;
use mesh_protocol::blob::{BlobRequest, BlobResponse, BLOB_VERSION, MAX_PIECES_PER_REQUEST};
use mesh_protocol::frame::DEFAULT_MAX_FRAME_LEN;
use mesh_protocol::WireError;

use super::tree::{self, Hash};
use crate::network::{Client, NetworkError, BLOB};
use crate::wire::{read_frame, write_frame, WireIoError};

/// The longest wait for one frame of the answer (a piece is 256 KiB).
pub const FRAME_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a fetch from one peer failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("cannot reach {peer}: {source}")]
    Network { peer: PeerId, source: NetworkError },
    #[error("{peer} refused: {error}")]
    Refused { peer: PeerId, error: WireError },
    #[error("{peer} sent a bad answer: {why}")]
    Lied { peer: PeerId, why: String },
    #[error("{peer}: the stream broke: {why}")]
    Broken { peer: PeerId, why: String },
}

/// What is asked of one peer.
#[derive(Debug, Clone)]
pub struct PieceRun {
    pub root: Hash,
    /// The blob's length, when known (from a signed card): a peer claiming another is lying.
    pub len: Option<u64>,
    pub first: u64,
    pub count: u32,
    pub token: Option<Vec<u8>>,
}

/// One verified piece.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    pub index: u64,
    pub data: Vec<u8>,
}

/// Fetches `run` from `peer`: the blob's length and the pieces, every one verified. Pieces
/// come as they arrive through `each` (so a large run need not be held in memory).
pub async fn fetch_run(
    client: &Client,
    peer: PeerId,
    run: &PieceRun,
    mut each: impl FnMut(Piece),
) -> Result<u64, FetchError> {
    let count = run.count.clamp(1, MAX_PIECES_PER_REQUEST);
    let stream = client
        .open_stream(peer, BLOB)
        .await
        .map_err(|source| FetchError::Network { peer, source })?;
    let (mut rd, mut wr) = futures::AsyncReadExt::split(stream);
    let request = BlobRequest {
        version: BLOB_VERSION,
        root: run.root.to_vec(),
        first: run.first,
        count,
        token: run.token.clone(),
    };
    let broken = |why: String| FetchError::Broken { peer, why };
    let lied = |why: String| FetchError::Lied { peer, why };
    write_frame(&mut wr, &request, DEFAULT_MAX_FRAME_LEN)
        .await
        .map_err(|e| broken(e.to_string()))?;
    let _ = wr.close().await;
    let len = match next_frame(&mut rd, peer).await? {
        BlobResponse::Header { len } => len,
        BlobResponse::Error(error) => return Err(FetchError::Refused { peer, error }),
        other => return Err(lied(format!("{other:?} before the header"))),
    };
    if run.len.is_some_and(|want| want != len) {
        return Err(lied(format!(
            "says the file is {len} bytes, the card says {:?}",
            run.len
        )));
    }
    let pieces = tree::piece_count(len);
    let end = pieces.min(run.first + u64::from(count));
    let mut expected = run.first;
    loop {
        match next_frame(&mut rd, peer).await? {
            BlobResponse::Piece { index, data, proof } => {
                if index != expected || index >= end {
                    return Err(lied(format!("piece {index} where {expected} was due")));
                }
                let proof: Vec<Hash> = proof
                    .iter()
                    .map(|h| h.as_slice().try_into())
                    .collect::<Result<_, _>>()
                    .map_err(|_| lied(format!("piece {index}: a proof hash is not 32 bytes")))?;
                tree::verify_piece(&run.root, len, index, &data, &proof)
                    .map_err(|e| lied(e.to_string()))?;
                each(Piece { index, data });
                expected += 1;
            }
            BlobResponse::End if expected == end => return Ok(len),
            BlobResponse::End => {
                return Err(lied(format!(
                    "ended after piece {}, before {}",
                    expected.saturating_sub(1),
                    end - 1
                )))
            }
            BlobResponse::Error(error) => return Err(FetchError::Refused { peer, error }),
            BlobResponse::Header { .. } => return Err(lied("a second header".into())),
        }
    }
}

/// The next frame of a holder's answer, within [`FRAME_TIMEOUT`].
async fn next_frame<R: futures::AsyncRead + Unpin>(
    rd: &mut R,
    peer: PeerId,
) -> Result<BlobResponse, FetchError> {
    let read = read_frame::<BlobResponse, _>(rd, DEFAULT_MAX_FRAME_LEN);
    match tokio::time::timeout(FRAME_TIMEOUT, read).await {
        Err(_) => Err(FetchError::Broken {
            peer,
            why: format!("no frame within {} s", FRAME_TIMEOUT.as_secs()),
        }),
        Ok(Ok(Some(frame))) => Ok(frame),
        Ok(Ok(None)) => Err(FetchError::Broken {
            peer,
            why: "the stream ended early".into(),
        }),
        Ok(Err(WireIoError::Frame(e))) => Err(FetchError::Lied {
            peer,
            why: format!("not a blob frame: {e}"),
        }),
        Ok(Err(e)) => Err(FetchError::Broken {
            peer,
            why: e.to_string(),
        }),
    }
}
