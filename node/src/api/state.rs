//! What every handler of the node's HTTP API shares: the network client, this node's server
//! and the provider cache, and the [`Dispatcher`] they make for a call.
//!
//! Its own module so that the API's routes ([`crate::api`]) and the OpenAI gateway
//! ([`crate::openai`]) both depend on it without depending on each other.

use std::sync::Arc;

use tokio::sync::mpsc;

use crate::dispatch::{CallEvent, Dispatcher, InferSpec, ProviderCache, ProviderTrust};
use crate::network::Client;
use crate::serve::Server;

#[derive(Clone)]
pub(crate) struct ApiState {
    pub(crate) client: Client,
    pub(crate) server: Arc<Server>,
    pub(crate) providers: Arc<ProviderCache>,
    /// The providers `any` calls through the API are restricted to (`--trust-provider`).
    pub(crate) trust: Arc<ProviderTrust>,
    /// What `GET /metrics` renders; calls made through the API are counted in it.
    pub(crate) telemetry: crate::metrics::Telemetry,
    /// The places of the open `/v1/mesh/events` feeds ([`super::inspect`]).
    pub(crate) event_feeds: Arc<tokio::sync::Semaphore>,
    /// Where `POST /v1/mesh/pull` puts model files (`None`: it cannot).
    pub(crate) models_dir: Option<std::path::PathBuf>,
}

impl ApiState {
    /// Starts `spec` on the mesh as [`Dispatcher::dispatch`] does, the call followed by the
    /// inspector (`/v1/mesh/calls`, `/v1/mesh/events`).
    pub(crate) fn dispatch(&self, spec: InferSpec) -> mpsc::Receiver<CallEvent> {
        self.dispatch_inspected(spec, None).1
    }

    /// [`ApiState::dispatch`], also giving the call's id in the inspector; `replay_of`: the
    /// call it replays.
    pub(crate) fn dispatch_inspected(
        &self,
        spec: InferSpec,
        replay_of: Option<u64>,
    ) -> (u64, mpsc::Receiver<CallEvent>) {
        let events = self.dispatcher().dispatch(spec.clone());
        self.telemetry
            .inspector
            .watch_made(&spec, replay_of, events)
    }

    /// What a call made through the API can reach: the mesh, this node's models, the cache.
    pub(crate) fn dispatcher(&self) -> Dispatcher {
        Dispatcher {
            client: self.client.clone(),
            local: Some(self.server.clone()),
            cache: Some(self.providers.clone()),
            trust: self.trust.clone(),
            metrics: self.telemetry.metrics.clone(),
        }
    }
}

/// The largest request body the API accepts, in bytes (its guard refuses a larger announced
/// length, and the JSON extractors a larger body). A request frame on the wire is at most
/// 1 MiB; JSON escaping can double text, and this leaves headroom on top.
pub const MAX_REQUEST_BODY: usize = 4 * 1024 * 1024;
