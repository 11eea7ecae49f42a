//! The serving side: answers `/mesh/infer/1` and `/mesh/catalog/1` streams.
//!
//! Each hosted model has a bounded admission count (running + waiting). A request beyond it
//! is answered `overloaded` at once. Compute runs on a blocking thread; its output flows
//! through a small bounded channel to the stream. The call is cancelled when the caller goes
//! away or the deadline passes, and the engine stops at its next step.
//!
//! Before any of that, the caller's Noise-authenticated peer id and token are checked against
//! the access policy ([`crate::auth`]); a refused call gets `unauthorized` and computes
//! nothing. Every answered call ends with a `done` frame carrying a receipt signed by the node.
//!
//! Layout:
//!
//! - this module: [`Server`] (the hosted models, their signed cards, load), [`ServeConfig`],
//!   and the two entry points [`Server::serve_infer`] and [`Server::serve_catalog`].
//! - `accept`: [`accept()`], inbound streams to their handler, with the node-wide stream bound.
//! - `hosted`: [`HostedModel`] and its lock-free admission count.
//! - `session`: `InferSession`, one inference stream, phase by phase.
//! - `frames`: frame coalescing, write bounds, error frames.
//! - `compute`: the engine on a blocking thread, and the channel back to the stream.

mod accept;
mod blob;
mod compute;
mod frames;
mod hosted;
mod session;
mod stage;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite};
use libp2p::PeerId;
use mesh_protocol::frame::{encode_body, DEFAULT_MAX_FRAME_LEN};
use mesh_protocol::{
    CatalogRequest, CatalogResponse, ErrorCode, InferRequest, Input, ModelCard, SignedModelCard,
    Task, WireError,
};

use crate::auth::{AccessConfig, AccessSetupError, Authorizer, PolicySummary};
use crate::engine::SharedEngine;
use crate::identity::NodeIdentity;
use crate::wire::{read_frame_paced, write_frame, REQUEST_PACE};

pub use accept::{accept, Protocol, StreamLimits, REFUSAL_HEADROOM, REFUSAL_TIMEOUT};
pub use hosted::HostedModel;
pub use stage::{
    HostedStage, StageStatus, DEFAULT_MAX_STAGE_SESSIONS, MAX_STAGE_SESSION, STAGE_IDLE_TIMEOUT,
};

use frames::WRITE_TIMEOUT;
use session::InferSession;

/// How long a caller has to send its request frame, by default.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Deadline of a call that names none, by default.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(120);

/// Longest deadline a caller may ask for, by default.
pub const DEFAULT_MAX_DEADLINE: Duration = Duration::from_secs(600);

/// Requests that may wait per model while all its slots are busy, by default.
pub const DEFAULT_MAX_QUEUE: usize = 16;

#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// How long a caller has to send its request frame after opening a stream.
    pub request_timeout: Duration,
    /// Deadline of a call that names none.
    pub default_deadline: Duration,
    /// Longest deadline a caller may ask for.
    pub max_deadline: Duration,
    /// Requests that may wait per model while all its slots are busy.
    pub max_queue: usize,
    /// Longest frame read or written, in bytes.
    pub max_frame_len: usize,
    /// Who may call which model.
    pub access: AccessConfig,
    /// Serve the weights files of the hosted models to peers (`--no-share-weights`: no).
    pub share_weights: bool,
    /// Models whose files are not served even so (`--no-share-weights=MODEL`).
    pub unshared_models: std::collections::BTreeSet<String>,
    /// Bytes a second of weights sent to peers, over all streams (`--share-rate`).
    pub share_rate: Option<u64>,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            default_deadline: DEFAULT_DEADLINE,
            max_deadline: DEFAULT_MAX_DEADLINE,
            max_queue: DEFAULT_MAX_QUEUE,
            max_frame_len: DEFAULT_MAX_FRAME_LEN,
            access: AccessConfig::default(),
            share_weights: true,
            unshared_models: Default::default(),
            share_rate: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeSetupError {
    #[error("two models are named {0:?}")]
    DuplicateName(String),
    #[error("model name {0:?}: {1}")]
    BadName(String, String),
    #[error("model {0:?} has max_concurrency 0")]
    NoConcurrency(String),
    #[error("--no-share-weights={0}: this node hosts no model of that name")]
    UnknownUnshared(String),
    #[error(transparent)]
    Access(#[from] AccessSetupError),
}

/// Layers of a model this node runs for heads, before they are hosted: the card (whose
/// `layers` names the range) and the loaded layers.
pub struct StageModel {
    pub card: ModelCard,
    pub model: Arc<crate::engine::llama::Llama>,
    /// The weights file, served to peers over `/mesh/blob/1`.
    pub blob: Option<crate::blobs::Blob>,
}

/// Everything a node serves.
pub struct Server {
    models: BTreeMap<String, Arc<HostedModel>>,
    stages: BTreeMap<String, Arc<HostedStage>>,
    config: ServeConfig,
    identity: NodeIdentity,
    auth: Authorizer,
    /// Where served calls are counted (unregistered until [`Server::observe`]).
    metrics: crate::metrics::Metrics,
    /// Where the calls served are told, for the console and `/v1/mesh/events`.
    inspector: crate::inspector::Inspector,
    /// The files served over `/mesh/blob/1`, by root: the hosted models', and those pulled
    /// while the node runs ([`Server::share_pulled`]).
    blobs: parking_lot::RwLock<crate::blobs::BlobStore>,
    /// The upload rate of those files, over all streams.
    share_rate: crate::blobs::rate::RateLimit,
}

impl Server {
    /// The node key this server signs with.
    pub fn identity(&self) -> &NodeIdentity {
        &self.identity
    }

    pub fn new(
        identity: &NodeIdentity,
        engines: Vec<SharedEngine>,
        config: ServeConfig,
    ) -> Result<Server, ServeSetupError> {
        Self::with_stages(identity, engines, Vec::new(), config)
    }

    /// A server for `engines` (whole models, served by `/mesh/infer/1`) and `stages` (ranges
    /// of layers, served by `/mesh/stage/1`).
    pub fn with_stages(
        identity: &NodeIdentity,
        engines: Vec<SharedEngine>,
        stages: Vec<StageModel>,
        config: ServeConfig,
    ) -> Result<Server, ServeSetupError> {
        let mut models = BTreeMap::new();
        let mut blobs = crate::blobs::BlobStore::default();
        for engine in engines {
            let card = engine.card().clone();
            for blob in engine.blobs() {
                blobs.add(&card.name, blob);
            }
            mesh_protocol::ids::validate_model_name(&card.name)
                .map_err(|e| ServeSetupError::BadName(card.name.clone(), e))?;
            if card.max_concurrency == 0 {
                return Err(ServeSetupError::NoConcurrency(card.name));
            }
            let hosted = HostedModel::new(engine, sign_card(identity, &card), config.max_queue);
            if models.insert(card.name.clone(), Arc::new(hosted)).is_some() {
                return Err(ServeSetupError::DuplicateName(card.name));
            }
        }
        let mut hosted_stages = BTreeMap::new();
        for StageModel {
            mut card,
            model,
            blob,
        } in stages
        {
            if let Some(blob) = blob {
                blobs.add(&card.name, blob);
            }
            mesh_protocol::ids::validate_model_name(&card.name)
                .map_err(|e| ServeSetupError::BadName(card.name.clone(), e))?;
            if card.layers.is_none() || models.contains_key(&card.name) {
                return Err(ServeSetupError::DuplicateName(card.name));
            }
            // A stage's card advertises the sessions it takes, which heads plan by.
            card.max_concurrency = card.max_concurrency.max(DEFAULT_MAX_STAGE_SESSIONS as u32);
            let signed = sign_card(identity, &card);
            let sessions = card.max_concurrency as usize;
            let stage = HostedStage::new(model, card.clone(), signed, sessions);
            if hosted_stages
                .insert(card.name.clone(), Arc::new(stage))
                .is_some()
            {
                return Err(ServeSetupError::DuplicateName(card.name));
            }
        }
        let names: Vec<String> = models.keys().chain(hosted_stages.keys()).cloned().collect();
        if let Some(name) = config.unshared_models.iter().find(|n| !names.contains(n)) {
            return Err(ServeSetupError::UnknownUnshared(name.clone()));
        }
        let share_rate = crate::blobs::rate::RateLimit::new(config.share_rate);
        let auth = Authorizer::new(identity.peer_id(), &config.access, &names)?;
        Ok(Server {
            models,
            stages: hosted_stages,
            config,
            identity: identity.clone(),
            auth,
            metrics: Default::default(),
            inspector: Default::default(),
            blobs: parking_lot::RwLock::new(blobs),
            share_rate,
        })
    }

    /// The sha256 of each file this node serves over `/mesh/blob/1` (none with sharing off).
    pub fn shared_files(&self) -> Vec<String> {
        let mut files: Vec<String> = self
            .blobs
            .read()
            .iter()
            .filter(|(_, model)| self.shares(model))
            .map(|(b, _)| b.sha256.clone())
            .collect();
        files.sort();
        files.dedup();
        files
    }

    /// Whether the files of `model` are served to peers.
    pub fn shares(&self, model: &str) -> bool {
        self.config.share_weights && !self.config.unshared_models.contains(model)
    }

    /// Serves `blobs`, the files of `model` pulled while the node runs, from now on (under the
    /// policy a model of that name has here). Returns the sha256 of those now shared, to
    /// announce; none when sharing is off for it. A file served already keeps its model.
    pub fn share_pulled(&self, model: &str, blobs: Vec<crate::blobs::Blob>) -> Vec<String> {
        if !self.shares(model) {
            return Vec::new();
        }
        let mut store = self.blobs.write();
        let mut added = Vec::new();
        for blob in blobs {
            if store.get(&blob.tree.root()).is_none() {
                added.push(blob.sha256.clone());
                store.add(model, blob);
            }
        }
        added
    }

    /// The access policy in effect.
    pub fn policy(&self) -> PolicySummary {
        self.auth.summary()
    }

    /// The cards of the models this node serves whole.
    pub fn cards(&self) -> impl Iterator<Item = &ModelCard> {
        self.models.values().map(|m| m.card())
    }

    /// The cards of the ranges of layers this node runs for heads.
    pub fn stage_cards(&self) -> impl Iterator<Item = &ModelCard> {
        self.stages.values().map(|s| s.card())
    }

    /// Each range of layers hosted, with its sessions open now.
    pub fn stage_statuses(&self) -> Vec<StageStatus> {
        self.stages
            .values()
            .map(|s| StageStatus {
                card: s.card().clone(),
                sessions: s.sessions(),
            })
            .collect()
    }

    /// Stage sessions open now, over all stages.
    pub fn stage_sessions(&self) -> usize {
        self.stages.values().map(|s| s.sessions()).sum()
    }

    pub fn model_names(&self) -> Vec<String> {
        self.models.keys().cloned().collect()
    }

    /// Requests running or waiting, over all models, and stage sessions open.
    pub fn load(&self) -> u32 {
        let calls: u32 = self.models.values().map(|m| m.admitted() as u32).sum();
        calls + self.stage_sessions() as u32
    }

    /// Counts the calls this server serves in `metrics`, and tells `inspector` of each.
    pub fn observe(
        &mut self,
        metrics: crate::metrics::Metrics,
        inspector: crate::inspector::Inspector,
    ) {
        self.metrics = metrics;
        self.inspector = inspector;
    }

    /// Each hosted model's calls waiting for a slot, and its slots computing, now.
    pub fn model_loads(&self) -> Vec<(String, u32, u32)> {
        self.models
            .iter()
            .map(|(name, m)| {
                let busy = m.busy();
                let queued = m.admitted().saturating_sub(busy);
                (name.clone(), queued as u32, busy as u32)
            })
            .collect()
    }

    /// How many times `model`'s engine was started (refused calls never start it).
    pub fn runs(&self, model: &str) -> u64 {
        self.models.get(model).map_or(0, |m| m.runs())
    }

    pub fn config(&self) -> &ServeConfig {
        &self.config
    }

    /// Answers one catalog stream.
    pub async fn serve_catalog<S>(&self, stream: S)
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let (mut rd, mut wr) = stream.split();
        let max = self.config.max_frame_len;
        let pace = REQUEST_PACE.within(self.config.request_timeout);
        match read_frame_paced::<CatalogRequest, _>(&mut rd, max, pace).await {
            Ok(Some(_)) => {
                let response = CatalogResponse {
                    cards: self
                        .models
                        .values()
                        .map(|m| m.signed_card.clone())
                        .chain(self.stages.values().map(|s| s.signed_card().clone()))
                        .collect(),
                    load: self.load(),
                };
                match tokio::time::timeout(WRITE_TIMEOUT, write_frame(&mut wr, &response, max))
                    .await
                {
                    Ok(Ok(())) => self.metrics.catalog_served(),
                    Ok(Err(e)) => tracing::debug!("catalog reply failed: {e}"),
                    Err(_) => tracing::debug!("catalog reply timed out"),
                }
            }
            Ok(None) => {}
            Err(e) => tracing::debug!("bad or late catalog request: {e}"),
        }
        frames::close(&mut wr).await;
    }

    /// Answers one inference stream from `peer`, start to end. Never panics on bad input:
    /// every failure becomes an `error` frame if the stream still works.
    pub async fn serve_infer<S>(&self, peer: PeerId, stream: S)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let (rd, wr) = stream.split();
        InferSession::new(self, peer, rd, wr).run().await
    }

    /// The hosted model `request` names, if it takes the request's kind of input.
    fn hosted_for(&self, request: &InferRequest) -> Result<Arc<HostedModel>, WireError> {
        request.validate()?;
        let hosted = self.models.get(&request.model).ok_or_else(|| {
            WireError::new(
                ErrorCode::UnknownModel,
                format!(
                    "this node does not host {:?}; it hosts: {}",
                    request.model,
                    self.model_names().join(", ")
                ),
            )
        })?;
        let wants = match request.input {
            Input::Embed { .. } => Task::Embed,
            Input::Chat { .. } | Input::Completion { .. } => Task::Generate,
        };
        if hosted.card().task != wants {
            return Err(WireError::bad_request(format!(
                "model {:?} is a {:?} model and cannot take {:?} input",
                request.model,
                hosted.card().task,
                wants
            )));
        }
        if request.resume.is_some() && !hosted.engine.resumes() {
            return Err(WireError::bad_request(format!(
                "model {:?} cannot carry on a call another node began",
                request.model
            )));
        }
        Ok(hosted.clone())
    }
}

/// `card` as sent in catalogs: its canonical encoding, signed by the node.
fn sign_card(identity: &NodeIdentity, card: &ModelCard) -> SignedModelCard {
    let bytes = encode_body(card).expect("a model card always encodes");
    let signature = identity
        .sign(&SignedModelCard::signed_message(&bytes))
        .to_vec();
    SignedModelCard {
        card: bytes,
        signature,
    }
}
