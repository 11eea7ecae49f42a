//! What the mesh hosts, as this node can see it: its own models and the signed catalogs of
//! every peer it knows (routing table and open connections). Used by `GET /v1/models`,
//! `GET /v1/mesh/models` and `mesh models`.

use std::time::Duration;

use futures::future::join_all;
use libp2p::PeerId;
use mesh_protocol::ModelCard;
use serde::{Deserialize, Serialize};

use crate::call::Calls;
use crate::network::Client;
use crate::serve::Server;

/// How long one peer may take to hand over its catalog.
const CATALOG_WAIT: Duration = Duration::from_secs(5);

/// One model on one node: the whole model, or (when `card.layers` is set) a range of its
/// layers that the node runs for heads.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Listing {
    pub model: String,
    pub peer_id: String,
    /// Calls running or waiting on that node when it answered.
    pub load: u32,
    pub card: ModelCard,
    /// How this node reaches it (`local`, `direct`, `hole-punched`, `relayed`), when connected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

impl Listing {
    /// Whether calls can go to it (a stage runs layers for heads, and answers no calls).
    pub fn callable(&self) -> bool {
        self.card.layers.is_none()
    }
}

/// [`list`], without the ranges of layers: the models calls can go to.
pub async fn callable(client: &Client, local: Option<&Server>) -> Vec<Listing> {
    let mut all = list(client, local).await;
    all.retain(Listing::callable);
    all
}

/// Every model this node can see, sorted by model name then peer id. Peers whose catalog does
/// not arrive in time, or does not verify, are left out.
pub async fn list(client: &Client, local: Option<&Server>) -> Vec<Listing> {
    let me = client.local_peer_id();
    let mut out: Vec<Listing> = local
        .map(|server| {
            server
                .cards()
                .chain(server.stage_cards())
                .map(|card| Listing {
                    model: card.name.clone(),
                    peer_id: me.to_string(),
                    load: server.load(),
                    card: card.clone(),
                    path: Some(crate::network::Path::Local.as_str().into()),
                })
                .collect()
        })
        .unwrap_or_default();
    let paths = client.peers().await.unwrap_or_default();
    let mut peers: Vec<PeerId> = client.known_peers().await.unwrap_or_default();
    peers.extend(paths.iter().map(|p| p.peer_id));
    peers.sort();
    peers.dedup();
    peers.retain(|p| *p != me);
    let lookups = peers.iter().map(|peer| async move {
        let catalog = tokio::time::timeout(CATALOG_WAIT, client.catalog(*peer)).await;
        (*peer, catalog)
    });
    for (peer, result) in join_all(lookups).await {
        match result {
            Ok(Ok((cards, load))) => {
                // Asking for the catalog connected it if it was not: read the path after.
                let path = client
                    .peers()
                    .await
                    .unwrap_or_default()
                    .into_iter()
                    .find(|p| p.peer_id == peer)
                    .map(|p| p.path.as_str().to_string());
                out.extend(cards.into_iter().map(|card| Listing {
                    model: card.name.clone(),
                    peer_id: peer.to_string(),
                    load,
                    card,
                    path: path.clone(),
                }))
            }
            Ok(Err(e)) => tracing::debug!(%peer, "no catalog: {e}"),
            Err(_) => tracing::debug!(%peer, "no catalog within {CATALOG_WAIT:?}"),
        }
    }
    out.sort_by(|a, b| (&a.model, &a.peer_id).cmp(&(&b.model, &b.peer_id)));
    out
}
