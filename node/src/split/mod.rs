//! Pooling machines for one model: a head holds the embedding, its first layers and the output
//! head, samples every token, and runs the other layers on nodes that hold them (stages).
//!
//! - [`plan`]: which nodes run which layers (a pure function of what the head knows).
//! - [`link`]: one `/mesh/stage/1` session, from the head's side.
//! - `pipeline`: a call's forward pass through the head and the stages, with a lost stage
//!   replaced mid-generation.
//! - This module: [`SplitEngine`], the head's model behind the ordinary [`Engine`] trait, so
//!   `mesh infer`, `any` and the OpenAI gateway use a split model unchanged; [`Mesh`], the
//!   network handle it is given once the node runs; [`discover`], the stage hosts of some
//!   weights.
//!
//! The stages' side is `crate::serve`'s (`/mesh/stage/1` sessions, admitted and authorized as
//! calls are).

pub mod link;
mod pipeline;
pub mod plan;

use std::collections::HashSet;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use libp2p::PeerId;
use mesh_protocol::{ErrorCode, HiddenFormat, InferRequest, ModelCard, StageUse, WireError};
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

use crate::call::Calls;
use crate::engine::gguf::GgufEngine;
use crate::engine::{Completion, Engine, Sink};
use crate::network::Client;
use link::{SessionSpec, StageLink};
use pipeline::{receipt_digest, stage_use, HopState, Pipeline};
use plan::{Need, StageHost};

/// How long the stage hosts found for the head's weights are reused without asking again.
pub const HOSTS_TTL: Duration = Duration::from_secs(10);
/// Longest search for stage hosts when a call starts.
pub const DISCOVERY_TIMEOUT: Duration = Duration::from_secs(10);

/// The network, for engines built before the node runs: attached once it does.
#[derive(Clone, Default)]
pub struct Mesh {
    inner: Arc<OnceLock<(Client, Handle)>>,
}

impl Mesh {
    pub fn new() -> Mesh {
        Mesh::default()
    }

    /// Gives the engines the running node's network. Call from within the runtime.
    pub fn attach(&self, client: Client) {
        let _ = self.inner.set((client, Handle::current()));
    }

    fn get(&self) -> Result<&(Client, Handle), WireError> {
        self.inner.get().ok_or_else(|| {
            WireError::new(ErrorCode::Internal, "the split model has no network yet")
        })
    }

    fn client(&self) -> Result<Client, WireError> {
        Ok(self.get()?.0.clone())
    }

    fn handle(&self) -> Result<Handle, WireError> {
        Ok(self.get()?.1.clone())
    }
}

/// How a head plans and carries its calls.
#[derive(Debug, Clone)]
pub struct SplitOptions {
    /// Use stages reached only through a relay.
    pub allow_relayed: bool,
    /// How hidden states travel between the head and its stages.
    pub hidden: HiddenFormat,
    /// A capability token the head shows stages whose policy asks for one (issued to the
    /// head's peer id by the stages' owner).
    pub token: Option<Vec<u8>>,
}

impl Default for SplitOptions {
    fn default() -> Self {
        SplitOptions {
            allow_relayed: false,
            hidden: HiddenFormat::F32,
            token: None,
        }
    }
}

/// The nodes that run layers of the weights whose sha256 is `weights_sha256`, with their
/// verified cards, load, path and round trip. Never this node.
pub async fn discover(client: &Client, weights_sha256: &str) -> Vec<StageHost> {
    let peers = client
        .find_stage_hosts(weights_sha256)
        .await
        .unwrap_or_default();
    let catalogs = peers
        .iter()
        .map(|peer| async move { (*peer, client.catalog(*peer).await) });
    let catalogs = futures::future::join_all(catalogs).await;
    let summaries = client.peers().await.unwrap_or_default();
    let mut hosts = Vec::new();
    for (peer, result) in catalogs {
        let Ok((cards, load)) = result else {
            tracing::info!(%peer, "stage host left out: its catalog did not come");
            continue;
        };
        let summary = summaries.iter().find(|s| s.peer_id == peer);
        for card in cards.into_iter().filter(|c| c.layers.is_some()) {
            hosts.push(StageHost {
                peer,
                card,
                load,
                path: summary.map(|s| s.path),
                rtt_ms: summary.and_then(|s| s.rtt_ms),
            });
        }
    }
    hosts
}

/// A model served by a head: the head's part of the model, with the rest run by stages.
pub struct SplitEngine {
    head: GgufEngine,
    mesh: Mesh,
    options: SplitOptions,
    /// The hosts last found, and when.
    hosts: Mutex<Option<(Instant, Vec<StageHost>)>>,
}

impl SplitEngine {
    /// `head` holds the model's first layers and its ends (see
    /// [`GgufEngine::load_layers`]).
    pub fn new(head: GgufEngine, mesh: Mesh, options: SplitOptions) -> Result<SplitEngine, String> {
        let model = head
            .llama()
            .ok_or("only llama models can be split by layers")?;
        if model.layers().start != 0 {
            return Err("a head holds the model's first layers".into());
        }
        Ok(SplitEngine {
            head,
            mesh,
            options,
            hosts: Mutex::new(None),
        })
    }

    /// The layers the head runs itself.
    pub fn head_layers(&self) -> std::ops::Range<usize> {
        self.head.llama().expect("checked at new").layers()
    }

    async fn hosts(&self, client: &Client, fresh: bool) -> Vec<StageHost> {
        if !fresh {
            let cached = self.hosts.lock().unwrap_or_else(|p| p.into_inner()).clone();
            if let Some((at, hosts)) = cached.filter(|(at, _)| at.elapsed() < HOSTS_TTL) {
                let _ = at;
                return hosts;
            }
        }
        let search = discover(client, &self.head.card().sha256);
        let hosts = tokio::time::timeout(DISCOVERY_TIMEOUT, search)
            .await
            .unwrap_or_default();
        *self.hosts.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((Instant::now(), hosts.clone()));
        hosts
    }

    /// Plans the call and opens a session on every hop (asking the DHT again once if the
    /// remembered hosts do not do).
    async fn open_hops(
        &self,
        client: &Client,
        spec: &SessionSpec,
    ) -> Result<(Vec<HopState>, HashSet<PeerId>), WireError> {
        let total = self.head.llama().expect("checked at new").config().layers as u32;
        let need = Need {
            weights_sha256: self.head.card().sha256.clone(),
            total,
            from: self.head_layers().end as u32,
            allow_relayed: self.options.allow_relayed,
        };
        let mut failed = HashSet::new();
        let mut last_error = None;
        for fresh in [false, true] {
            let hosts: Vec<StageHost> = self
                .hosts(client, fresh)
                .await
                .into_iter()
                .filter(|h| !failed.contains(&h.peer))
                .collect();
            let plan = match plan::plan(&hosts, &need) {
                Ok(plan) => plan,
                Err(e) => {
                    last_error = Some(e.to_string());
                    continue;
                }
            };
            for (peer, why) in &plan.excluded {
                tracing::info!(%peer, "stage host left out: {why}");
            }
            let opening = plan
                .hops
                .iter()
                .map(|hop| StageLink::open(client, hop.peer, hop.layers, spec));
            let links = futures::future::join_all(opening).await;
            let mut hops = Vec::new();
            for (hop, link) in plan.hops.iter().zip(links) {
                match link {
                    Ok(link) => hops.push(HopState::new(link, hop.spares.clone())),
                    Err(e) => {
                        tracing::warn!("{e}");
                        failed.insert(e.peer);
                        last_error = Some(match &e.refused {
                            Some(r) if r.code == ErrorCode::Unauthorized => {
                                format!("stage {} refused the head: {}", e.peer, r.message)
                            }
                            _ => e.to_string(),
                        });
                    }
                }
            }
            if hops.len() == plan.hops.len() {
                return Ok((hops, failed));
            }
            for hop in hops {
                hop.link.close().await;
            }
        }
        Err(WireError::new(
            ErrorCode::Overloaded,
            format!(
                "model {} is split and its other layers cannot run now: {}",
                self.head.card().name,
                last_error.unwrap_or_default()
            ),
        ))
    }
}

impl Engine for SplitEngine {
    fn card(&self) -> &ModelCard {
        self.head.card()
    }

    fn blobs(&self) -> Vec<crate::blobs::Blob> {
        self.head.blobs()
    }

    fn validate(&self, request: &InferRequest) -> Result<(), WireError> {
        self.head.validate(request)
    }

    fn resumes(&self) -> bool {
        true
    }

    fn run(
        &self,
        request: &InferRequest,
        sink: &mut Sink<'_>,
        cancel: &CancellationToken,
    ) -> Result<Completion, WireError> {
        let (client, handle) = (self.mesh.client()?, self.mesh.handle()?);
        let prompt = self.head.encode_prompt(&request.input)?;
        let context = self.head.card().context_length as usize;
        let capacity = (prompt.len() + request.params.max_tokens as usize).min(context);
        let spec = SessionSpec {
            model: self.head.card().name.clone(),
            weights_sha256: self.head.card().sha256.clone(),
            max_positions: capacity as u32,
            format: self.options.hidden,
            token: self.options.token.clone(),
        };
        let (hops, failed) = handle.block_on(self.open_hops(&client, &spec))?;
        let head = self.head.llama().expect("checked at new");
        let mut pipeline = Pipeline {
            head,
            cache: head.new_cache(head.layers(), capacity),
            hops,
            mesh: &self.mesh,
            spec,
            failed,
        };
        let mut seen = prompt.clone();
        let result =
            self.head
                .generate(request, &prompt, 0, &mut pipeline, &mut seen, sink, cancel);
        // Close every session, whatever happened, and collect the stages' receipts.
        let me = client.local_peer_id();
        let mut stages: Vec<StageUse> = Vec::new();
        for hop in pipeline.hops {
            stages.extend(hop.retired.iter().cloned());
            let replacement = !hop.retired.is_empty();
            let (peer, link) = (hop.link.peer, hop.link);
            let mut used = stage_use(&link, replacement);
            if let Some(receipt) = handle.block_on(link.close()) {
                match crate::auth::receipt::verify_stage(&receipt, &peer, &me) {
                    Ok(_) => used.receipt_sha256 = Some(receipt_digest(&receipt)),
                    Err(e) => tracing::warn!(%peer, "stage receipt refused: {e}"),
                }
            }
            stages.push(used);
        }
        let mut done = result?;
        done.stages = stages;
        Ok(done)
    }
}
