//! Serving `/mesh/blob/1`: pieces of the files of the models this node hosts, each with its
//! audit path, to peers the model's access policy lets in.
//!
//! In order, before a byte of the file is read: the request is read at a pace and within the
//! frame bound, and checked (version, root, 1 to 16 pieces); sharing must be on
//! (`--no-share-weights` turns it off); the root must be one of this node's files; the peer
//! must pass the model's policy (open, allow list, or a token for that model: the same check as
//! a call, without counting against the token's quota); the first piece must exist. A refusal
//! is one `error` frame, and no piece. Pieces are read off the async threads, and written under
//! the node's upload rate (`--share-rate`) and a write timeout.

use futures::{AsyncRead, AsyncReadExt, AsyncWrite};
use libp2p::PeerId;
use mesh_protocol::blob::{BlobRequest, BlobResponse};
use mesh_protocol::{ErrorCode, WireError};

use super::frames::{self, WRITE_TIMEOUT};
use super::Server;
use crate::auth::unix_now;
use crate::blobs::tree::{piece_count, piece_len, PIECE_LEN};
use crate::wire::{read_frame_paced, write_frame, WireIoError, REQUEST_PACE};

impl Server {
    /// Serves one `/mesh/blob/1` stream from `peer`.
    pub async fn serve_blob<S>(&self, peer: PeerId, stream: S)
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let (mut rd, mut wr) = stream.split();
        let max = self.config.max_frame_len;
        let pace = REQUEST_PACE.within(self.config.request_timeout);
        let request = match read_frame_paced::<BlobRequest, _>(&mut rd, max, pace).await {
            Ok(Some(request)) => request,
            Ok(None) => return,
            Err(WireIoError::Frame(e)) => {
                let error = WireError::bad_request(format!("not a blob request: {e}"));
                let _ = send(&mut wr, &BlobResponse::Error(error), max).await;
                frames::close(&mut wr).await;
                return;
            }
            Err(e) => {
                tracing::debug!(%peer, "bad or late blob request: {e}");
                return;
            }
        };
        if let Err(error) = self.send_pieces(peer, &request, &mut wr).await {
            tracing::debug!(%peer, code = %error.code, "blob request refused: {}", error.message);
            let _ = send(&mut wr, &BlobResponse::Error(error), max).await;
        }
        frames::close(&mut wr).await;
    }

    /// Checks `request`, then sends the header, the pieces and `end`.
    async fn send_pieces<W: AsyncWrite + Unpin>(
        &self,
        peer: PeerId,
        request: &BlobRequest,
        wr: &mut W,
    ) -> Result<(), WireError> {
        request.validate().map_err(WireError::bad_request)?;
        if !self.config.share_weights {
            return Err(WireError::new(
                ErrorCode::Unauthorized,
                "this node does not share model files (--no-share-weights)",
            ));
        }
        let found = self
            .blobs
            .read()
            .get(&request.root)
            .map(|(b, m)| (b.clone(), m.to_string()));
        let Some((blob, model)) = found else {
            return Err(WireError::new(
                ErrorCode::UnknownModel,
                format!("no file with blob root {} here", hex::encode(&request.root)),
            ));
        };
        let model = model.as_str();
        if !self.shares(model) {
            return Err(WireError::new(
                ErrorCode::Unauthorized,
                format!(
                    "this node does not share the files of {model} (--no-share-weights={model})"
                ),
            ));
        }
        self.auth
            .authorize(&peer, model, request.token.as_deref(), unix_now())
            .map_err(WireError::from)?;
        let len = blob.tree.len();
        let pieces = piece_count(len);
        if request.first >= pieces {
            return Err(WireError::bad_request(format!(
                "piece {} is past the file's last, {}",
                request.first,
                pieces - 1
            )));
        }
        let end = pieces.min(request.first + u64::from(request.count));
        let max = self.config.max_frame_len;
        send(wr, &BlobResponse::Header { len }, max).await?;
        let file = std::sync::Arc::new(std::fs::File::open(&blob.path).map_err(|e| {
            WireError::new(ErrorCode::Internal, format!("cannot open the file: {e}"))
        })?);
        for index in request.first..end {
            let want = piece_len(len, index);
            let (file, offset) = (file.clone(), index * PIECE_LEN as u64);
            let data = tokio::task::spawn_blocking(move || {
                use std::os::unix::fs::FileExt;
                let mut data = vec![0u8; want];
                file.read_exact_at(&mut data, offset).map(|()| data)
            })
            .await
            .map_err(|_| WireError::new(ErrorCode::Internal, "the piece read crashed"))?
            .map_err(|e| {
                WireError::new(
                    ErrorCode::Internal,
                    format!("cannot read piece {index}: {e} (the file changed on disk?)"),
                )
            })?;
            let proof = blob
                .tree
                .proof(index)
                .expect("index checked against the piece count")
                .into_iter()
                .map(|h| serde_bytes::ByteBuf::from(h.to_vec()))
                .collect();
            self.share_rate.take(data.len()).await;
            let piece = BlobResponse::Piece { index, data, proof };
            send(wr, &piece, max).await?;
        }
        send(wr, &BlobResponse::End, max).await
    }
}

async fn send<W: AsyncWrite + Unpin>(
    wr: &mut W,
    response: &BlobResponse,
    max: usize,
) -> Result<(), WireError> {
    match tokio::time::timeout(WRITE_TIMEOUT, write_frame(wr, response, max)).await {
        Ok(Ok(())) => Ok(()),
        // The fetcher is gone or too slow: nothing more can be told to it.
        Ok(Err(e)) => Err(WireError::new(
            ErrorCode::Internal,
            format!("write failed: {e}"),
        )),
        Err(_) => Err(WireError::new(ErrorCode::Internal, "write timed out")),
    }
}
