//! A peer that holds a model's file and serves it corrupted: it announces the file under its
//! sha256 and the model under its name, signs a card naming the true sha256 and blob root, and
//! answers `/mesh/blob/1` with every piece's bytes flipped in the middle (its proof intact).
//! Built from mesh's network crate and the protocol crate, not from mesh's server.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use futures::AsyncWriteExt;
use libp2p::{Multiaddr, PeerId};
use mesh_node::blobs::{hash_file, tree};
use mesh_node::wire::{read_frame, write_frame};
use mesh_node::NodeIdentity;
use mesh_protocol::blob::{BlobRequest, BlobResponse};
use mesh_protocol::frame::DEFAULT_MAX_FRAME_LEN;
use mesh_protocol::ids::{BLOB_PROTOCOL, CATALOG_PROTOCOL};
use mesh_protocol::{CatalogRequest, CatalogResponse};
use tokio_util::sync::CancellationToken;

/// The liar, running while it lives.
pub struct BlobLiar {
    pub peer: PeerId,
    /// Pieces it sent, every one corrupted.
    pub lies: Arc<AtomicUsize>,
    _client: mesh_node::network::Client,
    shutdown: CancellationToken,
}

impl Drop for BlobLiar {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Starts a liar for `model`, whose true file is `file`, joined through `bootstrap`.
pub async fn blob_liar(model: &str, file: &Path, bootstrap: Multiaddr) -> BlobLiar {
    let blob = hash_file(file).expect("the file reads");
    let identity = NodeIdentity::generate();
    let config = crate::inprocess::loopback_config(vec![bootstrap.clone()]).network;
    let shutdown = CancellationToken::new();
    let (client, mut inbound, event_loop) =
        mesh_node::network::new(&identity, &config, shutdown.clone()).expect("a swarm");
    tokio::spawn(event_loop.run());
    super::join(&client, bootstrap).await;
    client.provide(model).await.expect("announces the model");
    client
        .provide_blob(&blob.sha256)
        .await
        .expect("announces the file");
    let signed = super::llama_card(&identity, model, &blob.sha256, 4, Some(blob.root_hex()));
    let lies = Arc::new(AtomicUsize::new(0));
    let (counted, stop) = (lies.clone(), shutdown.clone());
    let data = Arc::new(std::fs::read(file).expect("the file reads"));
    let tree = blob.tree.clone();
    tokio::spawn(async move {
        loop {
            let (_, protocol, mut stream) = tokio::select! {
                next = inbound.recv() => match next { Some(s) => s, None => return },
                () = stop.cancelled() => return,
            };
            let (signed, counted, data, tree) =
                (signed.clone(), counted.clone(), data.clone(), tree.clone());
            tokio::spawn(async move {
                if protocol.as_ref() == CATALOG_PROTOCOL {
                    let _ = read_frame::<CatalogRequest, _>(&mut stream, 1024).await;
                    let answer = CatalogResponse {
                        cards: vec![signed],
                        load: 0,
                    };
                    let _ = write_frame(&mut stream, &answer, DEFAULT_MAX_FRAME_LEN).await;
                } else if protocol.as_ref() == BLOB_PROTOCOL {
                    let Ok(Some(request)) =
                        read_frame::<BlobRequest, _>(&mut stream, DEFAULT_MAX_FRAME_LEN).await
                    else {
                        return;
                    };
                    let len = tree.len();
                    let header = BlobResponse::Header { len };
                    let _ = write_frame(&mut stream, &header, DEFAULT_MAX_FRAME_LEN).await;
                    let end = tree::piece_count(len).min(request.first + u64::from(request.count));
                    for index in request.first..end {
                        let start = (index * tree::PIECE_LEN as u64) as usize;
                        let mut piece = data[start..start + tree::piece_len(len, index)].to_vec();
                        let middle = piece.len() / 2;
                        piece[middle] ^= 0xff;
                        let proof = tree
                            .proof(index)
                            .unwrap()
                            .into_iter()
                            .map(|h| serde_bytes::ByteBuf::from(h.to_vec()))
                            .collect();
                        counted.fetch_add(1, Ordering::SeqCst);
                        let piece = BlobResponse::Piece {
                            index,
                            data: piece,
                            proof,
                        };
                        if write_frame(&mut stream, &piece, DEFAULT_MAX_FRAME_LEN)
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                    let _ =
                        write_frame(&mut stream, &BlobResponse::End, DEFAULT_MAX_FRAME_LEN).await;
                }
                let _ = stream.close().await;
            });
        }
    });
    BlobLiar {
        peer: identity.peer_id(),
        lies,
        _client: client,
        shutdown,
    }
}
