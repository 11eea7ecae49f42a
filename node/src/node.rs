//! A running node: the swarm task, the accept loops that serve streams, and shutdown.

use std::sync::Arc;
use std::time::Duration;

use futures::AsyncWriteExt;
use libp2p::{Multiaddr, PeerId};
use mesh_protocol::frame::DEFAULT_MAX_FRAME_LEN;
use mesh_protocol::{ErrorCode, InferResponse, ModelCard, WireError};
use tokio::sync::{broadcast, mpsc, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::engine::SharedEngine;
use crate::identity::NodeIdentity;
use crate::network::{Client, Inbound, NetworkConfig, INFER};
use crate::serve::{ServeConfig, ServeSetupError, Server};
use crate::wire::write_frame;

#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub network: NetworkConfig,
    pub serve: ServeConfig,
    /// Inbound streams served at once, over all peers; more are refused `overloaded`.
    pub max_inbound_streams: usize,
    /// Where to serve the HTTP API (loopback by default); `None` for no API.
    pub api: Option<std::net::SocketAddr>,
    /// A key the OpenAI-compatible routes require as `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            network: NetworkConfig::default(),
            serve: ServeConfig::default(),
            max_inbound_streams: 256,
            api: None,
            api_key: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Build(#[from] crate::network::BuildError),
    #[error(transparent)]
    Models(#[from] ServeSetupError),
    #[error("cannot listen on {addr}: {reason}")]
    Listen { addr: Multiaddr, reason: String },
    #[error("no bootstrap peer answered: {0}")]
    Bootstrap(String),
    #[error("{0}")]
    Api(String),
}

pub struct Node {
    client: Client,
    api_addr: Option<std::net::SocketAddr>,
    server: Arc<Server>,
    shutdown: CancellationToken,
    tasks: JoinSet<()>,
}

impl Node {
    /// Starts the node: listens, serves its models, dials the bootstrap peers and announces
    /// its models. Returns once every listener is up and a bootstrap peer (if any) answered.
    pub async fn start(
        identity: NodeIdentity,
        engines: Vec<SharedEngine>,
        config: NodeConfig,
    ) -> Result<Node, NodeError> {
        let server = Arc::new(Server::new(&identity, engines, config.serve.clone())?);
        let api_listener = match config.api {
            Some(addr) => Some(crate::api::bind(addr).await.map_err(NodeError::Api)?),
            None => None,
        };
        let shutdown = CancellationToken::new();
        let (client, inbound_streams, event_loop) =
            crate::network::new(&identity, &config.network, shutdown.clone())?;
        let mut listening = client.events();

        let mut tasks = JoinSet::new();
        tasks.spawn(event_loop.run());
        tasks.spawn(accept(
            inbound_streams,
            server.clone(),
            Arc::new(Semaphore::new(config.max_inbound_streams)),
            shutdown.clone(),
        ));

        let api_addr = api_listener.as_ref().and_then(|l| l.local_addr().ok());
        if let Some(listener) = api_listener {
            let (client, server, shutdown) = (client.clone(), server.clone(), shutdown.clone());
            let key = config.api_key.clone();
            tasks.spawn(async move {
                if let Err(e) = crate::api::serve(listener, client, server, key, shutdown).await {
                    tracing::error!("the HTTP API stopped: {e}");
                }
            });
        }
        let node = Node {
            client,
            api_addr,
            server,
            shutdown,
            tasks,
        };
        // Wait until each listener reports an address, so the caller can print them.
        let expected = config.network.listen.len();
        let mut seen = 0;
        while seen < expected {
            match tokio::time::timeout(Duration::from_secs(10), listening.recv()).await {
                Ok(Ok(crate::network::NetworkEvent::Listening(_))) => seen += 1,
                Ok(Ok(_)) => {}
                Ok(Err(broadcast::error::RecvError::Lagged(_))) => {}
                Ok(Err(broadcast::error::RecvError::Closed)) | Err(_) => break,
            }
        }
        node.join(&config.network.bootstrap).await?;
        for card in node.server.cards() {
            node.client
                .provide(&card.name)
                .await
                .map_err(|e| NodeError::Bootstrap(e.to_string()))?;
        }
        Ok(node)
    }

    /// Dials the bootstrap peers; succeeds if any answers (or none were given).
    async fn join(&self, bootstrap: &[Multiaddr]) -> Result<(), NodeError> {
        if bootstrap.is_empty() {
            return Ok(());
        }
        let dials = bootstrap.iter().map(|addr| {
            let client = self.client.clone();
            let addr = addr.clone();
            async move { (addr.clone(), client.dial(addr).await) }
        });
        let mut errors = Vec::new();
        let mut joined = 0;
        for (addr, result) in futures::future::join_all(dials).await {
            match result {
                Ok(peer) => {
                    tracing::info!(%peer, %addr, "joined through bootstrap peer");
                    joined += 1;
                }
                Err(e) => errors.push(format!("{addr}: {e}")),
            }
        }
        if joined == 0 {
            return Err(NodeError::Bootstrap(errors.join("; ")));
        }
        for e in errors {
            tracing::warn!("bootstrap peer unreachable: {e}");
        }
        Ok(())
    }

    pub fn peer_id(&self) -> PeerId {
        self.client.local_peer_id()
    }

    /// Where the HTTP API listens, if it is on.
    pub fn api_addr(&self) -> Option<std::net::SocketAddr> {
        self.api_addr
    }

    pub fn client(&self) -> Client {
        self.client.clone()
    }

    pub fn server(&self) -> &Arc<Server> {
        &self.server
    }

    pub fn cards(&self) -> Vec<ModelCard> {
        self.server.cards().cloned().collect()
    }

    /// Stops announcing, closes connections and waits for the node's tasks to end.
    pub async fn shutdown(mut self) {
        self.shutdown.cancel();
        let wait = async { while self.tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(Duration::from_secs(5), wait)
            .await
            .is_err()
        {
            tracing::warn!("node tasks did not stop within 5 s; aborting them");
            self.tasks.abort_all();
        }
    }
}

/// Serves inbound streams, each on its own task, at most `limit` at once; beyond that an
/// inference stream is answered `overloaded` and a catalog stream is closed.
async fn accept(
    mut incoming: mpsc::Receiver<Inbound>,
    server: Arc<Server>,
    limit: Arc<Semaphore>,
    shutdown: CancellationToken,
) {
    let mut calls = JoinSet::new();
    // Served streams plus at most this many refusals in flight.
    let refusal_cap = limit.available_permits() + 64;
    loop {
        tokio::select! {
            next = incoming.recv() => {
                let Some((peer, protocol, mut stream)) = next else { break };
                let is_infer = protocol == INFER;
                let server = server.clone();
                match limit.clone().try_acquire_owned() {
                    Ok(permit) => {
                        calls.spawn(async move {
                            if is_infer {
                                server.serve_infer(peer, stream).await;
                            } else {
                                server.serve_catalog(stream).await;
                            }
                            drop(permit);
                        });
                    }
                    // Refusals are bounded too; past that bound the stream is dropped (reset).
                    Err(_) if is_infer && calls.len() < refusal_cap => {
                        calls.spawn(async move {
                            let busy = InferResponse::Error(WireError::new(
                                ErrorCode::Overloaded,
                                "this node is serving its maximum number of streams",
                            ));
                            let refuse = async {
                                let _ = write_frame(&mut stream, &busy, DEFAULT_MAX_FRAME_LEN).await;
                                let _ = stream.close().await;
                            };
                            let _ = tokio::time::timeout(Duration::from_secs(5), refuse).await;
                        });
                    }
                    Err(_) => {}
                }
            }
            Some(_) = calls.join_next(), if !calls.is_empty() => {}
            _ = shutdown.cancelled() => break,
        }
    }
    calls.abort_all();
}
