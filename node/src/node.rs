//! A running node: the swarm task, inbound streams handed to [`crate::serve::accept`], and
//! shutdown.

use std::sync::Arc;
use std::time::Duration;

use libp2p::{Multiaddr, PeerId};
use mesh_protocol::ModelCard;
use tokio::sync::broadcast;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::engine::SharedEngine;
use crate::identity::NodeIdentity;
use crate::network::{Client, NetworkConfig};
use crate::serve::{accept, ServeConfig, ServeSetupError, Server, StageModel};

#[derive(Debug, Clone, Default)]
pub struct NodeConfig {
    pub network: NetworkConfig,
    pub serve: ServeConfig,
    /// Inbound streams served at once: over all peers, per peer, and for catalogs; more are
    /// refused `overloaded`.
    pub streams: crate::serve::StreamLimits,
    /// Where to serve the HTTP API (loopback by default); `None` for no API.
    pub api: Option<std::net::SocketAddr>,
    /// A key every route of the API requires as `Authorization: Bearer <key>`; needed to
    /// serve the API off loopback.
    pub api_key: Option<String>,
    /// Extra names the API answers to as `Host`, besides loopback and its bound address.
    pub api_hosts: Vec<String>,
    /// The providers `any` calls through the API may use, by model (`--trust-provider`).
    pub trust: crate::dispatch::ProviderTrust,
    /// Where model files pulled through the API go (`POST /v1/mesh/pull`).
    pub models_dir: Option<std::path::PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Build(#[from] crate::network::BuildError),
    #[error(transparent)]
    Models(#[from] ServeSetupError),
    #[error("no bootstrap peer answered: {0}")]
    Bootstrap(String),
    #[error("{0}")]
    Api(String),
}

pub struct Node {
    client: Client,
    api_addr: Option<std::net::SocketAddr>,
    api_key_required: bool,
    server: Arc<Server>,
    /// What `GET /metrics` renders (also without an API: [`Node::metrics_text`]).
    registry: Arc<prometheus_client::registry::Registry>,
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
        Self::start_with_stages(identity, engines, Vec::new(), config).await
    }

    /// [`Node::start`], also running `stages` (ranges of models' layers) for heads, and
    /// announcing them under their weights' sha256.
    pub async fn start_with_stages(
        identity: NodeIdentity,
        engines: Vec<SharedEngine>,
        stages: Vec<StageModel>,
        config: NodeConfig,
    ) -> Result<Node, NodeError> {
        // Everything `GET /metrics` shows: mesh's families, and the swarm's (registered as the
        // network is built).
        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = crate::metrics::Metrics::register(&mut registry);
        let inspector = crate::inspector::Inspector::default();
        let mut server = Server::with_stages(&identity, engines, stages, config.serve.clone())?;
        server.observe(metrics.clone(), inspector.clone());
        let server = Arc::new(server);
        let access = crate::api::ApiAccess {
            key: config.api_key.clone().filter(|k| !k.is_empty()),
            hosts: config.api_hosts.clone(),
        };
        let api_listener = match config.api {
            Some(addr) => Some(
                crate::api::bind(addr, &access)
                    .await
                    .map_err(NodeError::Api)?,
            ),
            None => None,
        };
        let shutdown = CancellationToken::new();
        let (client, inbound_streams, event_loop) = crate::network::new_observed(
            &identity,
            &config.network,
            shutdown.clone(),
            &mut registry,
            metrics.clone(),
        )?;
        let telemetry = crate::metrics::Telemetry {
            registry: Arc::new(registry),
            metrics,
            inspector: inspector.clone(),
        };
        let registry = telemetry.registry.clone();
        let mut listening = client.events();

        let mut tasks = JoinSet::new();
        tasks.spawn(event_loop.run());
        tasks.spawn(tell_peers(client.events(), inspector, shutdown.clone()));
        tasks.spawn(accept(
            inbound_streams,
            server.clone(),
            config.streams,
            shutdown.clone(),
        ));

        let api_addr = api_listener.as_ref().and_then(|l| l.local_addr().ok());
        let api_key_required = access.key.is_some();
        if let Some(listener) = api_listener {
            let (client, server, shutdown) = (client.clone(), server.clone(), shutdown.clone());
            let context = crate::api::ApiContext {
                trust: Arc::new(config.trust.clone()),
                telemetry,
                models_dir: config.models_dir.clone(),
            };
            tasks.spawn(async move {
                if let Err(e) =
                    crate::api::serve(listener, client, server, access, context, shutdown).await
                {
                    tracing::error!("the HTTP API stopped: {e}");
                }
            });
        }
        let node = Node {
            client,
            api_addr,
            api_key_required,
            server,
            registry,
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
        for card in node.server.stage_cards() {
            node.client
                .provide_stage(&card.sha256)
                .await
                .map_err(|e| NodeError::Bootstrap(e.to_string()))?;
        }
        for sha256 in node.server.shared_files() {
            node.client
                .provide_blob(&sha256)
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

    /// Whether the API requires a key on every route.
    pub fn api_key_required(&self) -> bool {
        self.api_key_required
    }

    pub fn client(&self) -> Client {
        self.client.clone()
    }

    pub fn server(&self) -> &Arc<Server> {
        &self.server
    }

    /// The node's metrics in Prometheus's text format, as `GET /metrics` gives them.
    pub fn metrics_text(&self) -> String {
        crate::metrics::render(&self.registry)
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

/// Tells the inspector's subscribers (`/v1/mesh/events`) of peers connected and gone.
async fn tell_peers(
    mut events: broadcast::Receiver<crate::network::NetworkEvent>,
    inspector: crate::inspector::Inspector,
    shutdown: CancellationToken,
) {
    use crate::inspector::MeshEvent;
    use crate::network::NetworkEvent;
    loop {
        let event = tokio::select! {
            event = events.recv() => event,
            () = shutdown.cancelled() => return,
        };
        match event {
            Ok(NetworkEvent::Connected { peer, path }) => {
                inspector.publish(MeshEvent::PeerConnected {
                    peer: peer.to_string(),
                    path,
                });
            }
            Ok(NetworkEvent::Disconnected { peer }) => {
                inspector.publish(MeshEvent::PeerDisconnected {
                    peer: peer.to_string(),
                });
            }
            Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}
