//! Asking the mesh: pick the node (a given peer, or any provider of the model), build the
//! request to fit the model's task, call it, and report every step as an [`AskEvent`].
//!
//! `mesh infer` and the HTTP API both use this, so they behave the same.

use std::time::{Duration, Instant};

use libp2p::PeerId;
use mesh_protocol::{
    ChatMessage, ErrorCode, FinishReason, InferRequest, InferResponse, Input, ModelCard, Role,
    SamplingParams, Task, Usage, WireError,
};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use std::collections::HashMap;
use std::sync::Arc;

use tokio_util::compat::TokioAsyncReadCompatExt;

use crate::call::{Call, CallError};
use crate::network::{Client, Path};
use crate::serve::Server;

/// A call's byte stream: a libp2p stream, or an in-memory pipe to this node's own server.
pub trait CallStream: futures::AsyncRead + futures::AsyncWrite + Unpin + Send {}
impl<T: futures::AsyncRead + futures::AsyncWrite + Unpin + Send> CallStream for T {}
type BoxedStream = Box<dyn CallStream>;

/// What to ask, before knowing which node will answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Ask {
    /// A peer id, or `any`.
    pub target: String,
    pub model: String,
    /// The prompt for a generation model; the texts to embed for an embedding model.
    #[serde(default)]
    pub prompts: Vec<String>,
    #[serde(default)]
    pub system: Option<String>,
    /// A whole conversation for a generation model (used instead of `system` + `prompts`).
    #[serde(default)]
    pub messages: Vec<ChatMessage>,
    /// The kind of model the asker can use; another kind is a bad request.
    #[serde(default)]
    pub expect: Option<Task>,
    #[serde(default)]
    pub params: SamplingParams,
    /// Milliseconds for the whole call.
    pub deadline_ms: u64,
    /// A capability token in its text form (`mtk1.…`), for nodes whose policy asks for one.
    #[serde(default)]
    pub token: Option<String>,
}

/// One step of a call, as `mesh infer --json` prints it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum AskEvent {
    Connected {
        peer: String,
        path: Path,
        connect_ms: u64,
    },
    Started {
        queue_ms: u64,
    },
    Delta {
        text: String,
    },
    Embeddings {
        vectors: Vec<Vec<f32>>,
    },
    Done {
        peer: String,
        path: Path,
        finish_reason: FinishReason,
        usage: Usage,
        connect_ms: u64,
        time_to_first_byte_ms: u64,
        total_ms: u64,
        /// The serving node's signed receipt, in its text form (`mrc1.…`).
        #[serde(default)]
        receipt: Option<String>,
        /// True when the receipt's signature is by the node called and it covers this request.
        #[serde(default)]
        receipt_verified: bool,
        /// Why the receipt did not verify (or that there was none).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        receipt_error: Option<String>,
    },
    Error {
        code: ErrorCode,
        message: String,
        /// True when the failure was on the network, not an answer from a node.
        network: bool,
    },
}

impl AskEvent {
    pub fn from_call_error(e: &CallError) -> AskEvent {
        match e {
            CallError::Remote(w) => AskEvent::Error {
                code: w.code,
                message: w.message.clone(),
                network: false,
            },
            CallError::Timeout(_) => AskEvent::Error {
                code: ErrorCode::DeadlineExceeded,
                message: e.to_string(),
                network: true,
            },
            other => AskEvent::Error {
                code: ErrorCode::Internal,
                message: other.to_string(),
                network: true,
            },
        }
    }
}

/// What a node can reach: the mesh through its client, and its own models.
#[derive(Clone)]
pub struct Mesh {
    pub client: Client,
    pub local: Option<Arc<Server>>,
    /// Recently found providers, shared by the calls of one node (the API's).
    pub cache: Option<Arc<ProviderCache>>,
}

/// How long a model's providers found through the DHT are reused without asking again.
pub const PROVIDER_CACHE_TTL: Duration = Duration::from_secs(10);
/// Most models whose providers are cached at once.
const PROVIDER_CACHE_MODELS: usize = 1024;

type Candidates = Vec<(PeerId, ModelCard, u32)>;

/// The providers of `any` lookups, by model, for [`PROVIDER_CACHE_TTL`]. An entry is dropped
/// as soon as a call to one of its providers fails on the network.
#[derive(Default)]
pub struct ProviderCache {
    entries: std::sync::Mutex<std::collections::HashMap<String, (Instant, Candidates)>>,
    /// Calls this node has running on each provider now, added to the load it advertised.
    in_flight: std::sync::Mutex<std::collections::HashMap<PeerId, u32>>,
}

/// Counts a call on `peer` in its provider's in-flight total while it lives.
struct InFlight<'a> {
    cache: &'a ProviderCache,
    peer: PeerId,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut counts = self
            .cache
            .in_flight
            .lock()
            .expect("never poisoned: no panics while held");
        if let Some(n) = counts.get_mut(&self.peer) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.remove(&self.peer);
            }
        }
    }
}

impl ProviderCache {
    fn get(&self, model: &str) -> Option<Candidates> {
        let entries = self
            .entries
            .lock()
            .expect("never poisoned: no panics while held");
        entries
            .get(model)
            .filter(|(at, _)| at.elapsed() < PROVIDER_CACHE_TTL)
            .map(|(_, c)| c.clone())
    }

    fn put(&self, model: &str, candidates: &Candidates) {
        let mut entries = self
            .entries
            .lock()
            .expect("never poisoned: no panics while held");
        if entries.len() >= PROVIDER_CACHE_MODELS {
            entries.retain(|_, (at, _)| at.elapsed() < PROVIDER_CACHE_TTL);
        }
        if entries.len() < PROVIDER_CACHE_MODELS {
            entries.insert(model.to_string(), (Instant::now(), candidates.clone()));
        }
    }

    fn start_call(&self, peer: PeerId) -> InFlight<'_> {
        *self
            .in_flight
            .lock()
            .expect("never poisoned: no panics while held")
            .entry(peer)
            .or_default() += 1;
        InFlight { cache: self, peer }
    }

    #[cfg(test)]
    fn in_flight(&self) -> std::collections::HashMap<PeerId, u32> {
        self.in_flight
            .lock()
            .expect("never poisoned: no panics while held")
            .clone()
    }

    /// Orders `candidates` with [`route`] and counts a call on the first, in one step, so
    /// concurrent calls spread over the providers instead of all picking the same one.
    fn route_and_claim(
        &self,
        candidates: Candidates,
        me: PeerId,
        rtt_ms: &std::collections::HashMap<PeerId, f64>,
    ) -> (Candidates, Option<InFlight<'_>>) {
        let mut counts = self
            .in_flight
            .lock()
            .expect("never poisoned: no panics while held");
        let ordered = route(candidates, me, rtt_ms, &counts);
        let claim = ordered.first().map(|(peer, _, _)| {
            *counts.entry(*peer).or_default() += 1;
            InFlight {
                cache: self,
                peer: *peer,
            }
        });
        (ordered, claim)
    }

    fn forget(&self, model: &str) {
        self.entries
            .lock()
            .expect("never poisoned: no panics while held")
            .remove(model);
    }
}

impl Mesh {
    fn local_card(&self, model: &str) -> Option<(ModelCard, u32)> {
        let server = self.local.as_ref()?;
        let card = server.cards().find(|c| c.name == model)?.clone();
        Some((card, server.load()))
    }
}

/// Nodes that can answer `model`, with its card, best first (this node itself first).
pub async fn candidates(
    mesh: &Mesh,
    target: &str,
    model: &str,
) -> Result<Vec<(PeerId, ModelCard, u32)>, CallError> {
    let client = &mesh.client;
    let me = client.local_peer_id();
    let local = mesh.local_card(model).map(|(card, load)| (me, card, load));
    if target == me.to_string() || (target == "any" && local.is_some()) {
        return local.map(|l| vec![l]).ok_or_else(|| {
            CallError::Remote(WireError::new(
                ErrorCode::UnknownModel,
                format!("this node does not host model {model:?}"),
            ))
        });
    }
    let peers = if target == "any" {
        let found = client
            .find_providers(model)
            .await
            .map_err(|e| CallError::Network(e.to_string()))?;
        if found.is_empty() {
            return Err(CallError::Remote(WireError::new(
                ErrorCode::UnknownModel,
                format!("no node on the mesh announces model {model:?}"),
            )));
        }
        found
    } else {
        vec![target.parse::<PeerId>().map_err(|_| {
            CallError::Remote(WireError::bad_request(format!(
                "{target:?} is neither a peer id nor `any`"
            )))
        })?]
    };
    let lookups = peers
        .iter()
        .map(|peer| async move { (*peer, client.catalog(*peer).await) });
    let mut found = Vec::new();
    let mut last_error = None;
    for (peer, result) in futures::future::join_all(lookups).await {
        match result {
            Ok((cards, load)) => match cards.into_iter().find(|c| c.name == model) {
                Some(card) => found.push((peer, card, load)),
                None => {
                    last_error = Some(CallError::Remote(WireError::new(
                        ErrorCode::UnknownModel,
                        format!("node {peer} does not host model {model:?}"),
                    )))
                }
            },
            Err(e) => last_error = Some(e),
        }
    }
    found.sort_by_key(|(_, _, load)| *load);
    match (found.is_empty(), last_error) {
        (true, Some(e)) => Err(e),
        _ => Ok(found),
    }
}

/// Builds the request that fits the model's task.
pub fn build_request(ask: &Ask, card: &ModelCard) -> Result<InferRequest, WireError> {
    if let Some(expected) = ask.expect {
        if expected != card.task {
            let (is, use_) = match card.task {
                Task::Embed => ("an embedding model", "embeddings"),
                Task::Generate => ("a generation model", "chat completions"),
            };
            return Err(WireError::bad_request(format!(
                "model {:?} is {is}; use it for {use_}",
                card.name
            )));
        }
    }
    let input = match card.task {
        Task::Embed => Input::Embed {
            texts: ask.prompts.clone(),
        },
        Task::Generate if !ask.messages.is_empty() => Input::Chat {
            messages: ask.messages.clone(),
        },
        Task::Generate => {
            if ask.prompts.len() != 1 {
                return Err(WireError::bad_request(format!(
                    "a generation model takes one prompt, got {}",
                    ask.prompts.len()
                )));
            }
            let mut messages = Vec::new();
            if let Some(system) = &ask.system {
                messages.push(ChatMessage {
                    role: Role::System,
                    content: system.clone(),
                });
            }
            messages.push(ChatMessage {
                role: Role::User,
                content: ask.prompts[0].clone(),
            });
            Input::Chat { messages }
        }
    };
    let token = match &ask.token {
        Some(text) => Some(
            mesh_protocol::SignedToken::from_text(text)
                .map_err(|e| WireError::bad_request(format!("capability token: {e}")))?
                .to_bytes(),
        ),
        None => None,
    };
    let request = InferRequest {
        model: ask.model.clone(),
        input,
        params: ask.params.clone(),
        deadline_ms: Some(ask.deadline_ms),
        token,
    };
    request.validate()?;
    Ok(request)
}

/// Runs `ask` to the end, sending every step but the last to `events`, and returns the last
/// (`done` or `error`). Tries the next provider when one fails before its first output.
/// If `events` is closed (the asker went away), the call is dropped, which cancels it on
/// the serving node.
pub async fn run(mesh: &Mesh, ask: &Ask, events: &mpsc::Sender<AskEvent>) -> AskEvent {
    let begin = Instant::now();
    let cache = mesh.cache.as_ref().filter(|_| ask.target == "any");
    let cached = cache.and_then(|c| c.get(&ask.model));
    let candidates = match cached {
        Some(c) => c,
        None => match candidates(mesh, &ask.target, &ask.model).await {
            Ok(c) => {
                if let Some(cache) = cache {
                    cache.put(&ask.model, &c);
                }
                c
            }
            Err(e) => return AskEvent::from_call_error(&e),
        },
    };
    let (candidates, mut claimed) = if candidates.len() > 1 {
        let rtts = mesh
            .client
            .peers()
            .await
            .map(|peers| {
                peers
                    .into_iter()
                    .filter_map(|p| Some((p.peer_id, p.rtt_ms?)))
                    .collect()
            })
            .unwrap_or_default();
        let me = mesh.client.local_peer_id();
        match cache {
            Some(cache) => cache.route_and_claim(candidates, me, &rtts),
            None => (route(candidates, me, &rtts, &HashMap::new()), None),
        }
    } else {
        let claim = cache.and_then(|c| candidates.first().map(|(p, _, _)| c.start_call(*p)));
        (candidates, claim)
    };
    let mut last = AskEvent::Error {
        code: ErrorCode::UnknownModel,
        message: format!("no node answered for model {:?}", ask.model),
        network: true,
    };
    for (peer, card, _) in candidates {
        // The first candidate was counted when it was chosen; a failover counts here.
        let _counted = claimed.take().or_else(|| cache.map(|c| c.start_call(peer)));
        let request = match build_request(ask, &card) {
            Ok(r) => r,
            Err(e) => return AskEvent::from_call_error(&CallError::Remote(e)),
        };
        match call_one(mesh, peer, &request, begin, events).await {
            Ok(done) => return done,
            Err((e, produced_output)) => {
                last = AskEvent::from_call_error(&e);
                let retryable = !produced_output
                    && matches!(
                        &e,
                        CallError::Network(_)
                            | CallError::Closed
                            | CallError::Remote(WireError {
                                code: ErrorCode::Overloaded,
                                ..
                            })
                    );
                if let (Some(cache), CallError::Network(_) | CallError::Closed) = (cache, &e) {
                    cache.forget(&ask.model);
                }
                if !retryable {
                    return last;
                }
                tracing::info!(%peer, "provider failed before answering ({e}); trying the next");
            }
        }
    }
    last
}

/// Orders providers best first: least busy (the load a provider advertised in its catalog plus
/// the calls this node has running on it), then the shortest measured round trip (libp2p ping;
/// this node itself counts as 0, a peer not yet measured as 1 s).
fn route(
    mut candidates: Candidates,
    me: PeerId,
    rtt_ms: &std::collections::HashMap<PeerId, f64>,
    in_flight: &std::collections::HashMap<PeerId, u32>,
) -> Candidates {
    let rtt = |peer: &PeerId| {
        if *peer == me {
            0.0
        } else {
            rtt_ms.get(peer).copied().unwrap_or(1000.0)
        }
    };
    candidates.sort_by(|(a, _, load_a), (b, _, load_b)| {
        let busy_a = load_a + in_flight.get(a).copied().unwrap_or(0);
        let busy_b = load_b + in_flight.get(b).copied().unwrap_or(0);
        busy_a.cmp(&busy_b).then(rtt(a).total_cmp(&rtt(b)))
    });
    candidates
}

async fn call_one(
    mesh: &Mesh,
    peer: PeerId,
    request: &InferRequest,
    begin: Instant,
    events: &mpsc::Sender<AskEvent>,
) -> Result<AskEvent, (CallError, bool)> {
    let gone = || {
        (
            CallError::Remote(WireError::new(ErrorCode::Internal, "the asker went away")),
            true,
        )
    };
    let client = &mesh.client;
    let deadline = Duration::from_millis(request.deadline_ms.unwrap_or(120_000));
    let (mut call, path): (Call<BoxedStream>, Path) =
        match (&mesh.local, peer == client.local_peer_id()) {
            (Some(server), true) => {
                let (near, far) = tokio::io::duplex(64 * 1024);
                let server = server.clone();
                tokio::spawn(async move { server.serve_infer(peer, far.compat()).await });
                let call = Call::start(Box::new(near.compat()) as BoxedStream, request, deadline)
                    .await
                    .map_err(|e| (e, false))?;
                (call, Path::Local)
            }
            _ => {
                let (call, path) = client
                    .call_with_path(peer, request, deadline)
                    .await
                    .map_err(|e| (e, false))?;
                (call.boxed(), path)
            }
        };
    let connect_ms = begin.elapsed().as_millis() as u64;
    events
        .send(AskEvent::Connected {
            peer: peer.to_string(),
            path,
            connect_ms,
        })
        .await
        .map_err(|_| gone())?;
    let mut first_byte = None;
    loop {
        let frame = match call.next().await {
            Ok(Some(frame)) => frame,
            Ok(None) => return Err((CallError::Closed, first_byte.is_some())),
            Err(e) => return Err((e, first_byte.is_some())),
        };
        let event = match frame {
            InferResponse::Started { queue_ms, .. } => AskEvent::Started { queue_ms },
            InferResponse::Delta { text } => {
                first_byte.get_or_insert_with(|| begin.elapsed());
                AskEvent::Delta { text }
            }
            InferResponse::Embeddings { vectors } => {
                first_byte.get_or_insert_with(|| begin.elapsed());
                AskEvent::Embeddings { vectors }
            }
            InferResponse::Done {
                finish_reason,
                usage,
                receipt,
            } => {
                let (receipt_verified, receipt_error) = match &receipt {
                    Some(r) => match crate::auth::receipt::verify_for_call(r, &peer, request) {
                        Ok(_) => (true, None),
                        Err(e) => {
                            tracing::warn!(%peer, "the node's receipt does not verify: {e}");
                            (false, Some(e.to_string()))
                        }
                    },
                    None => (false, Some("the node sent no receipt".to_string())),
                };
                let total = begin.elapsed();
                return Ok(AskEvent::Done {
                    peer: peer.to_string(),
                    path,
                    finish_reason,
                    usage,
                    connect_ms,
                    time_to_first_byte_ms: first_byte.unwrap_or(total).as_millis() as u64,
                    total_ms: total.as_millis() as u64,
                    receipt: receipt.map(|r| r.to_text()),
                    receipt_verified,
                    receipt_error,
                });
            }
            InferResponse::Error(e) => return Err((CallError::Remote(e), first_byte.is_some())),
        };
        events.send(event).await.map_err(|_| gone())?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer() -> PeerId {
        libp2p::identity::Keypair::generate_ed25519()
            .public()
            .to_peer_id()
    }

    fn card() -> ModelCard {
        ModelCard {
            name: "m".into(),
            task: Task::Generate,
            architecture: "test".into(),
            parameters: 0,
            quantization: "none".into(),
            context_length: 64,
            embedding_dims: None,
            sha256: String::new(),
            license: None,
            max_concurrency: 1,
        }
    }

    #[test]
    fn routing_prefers_the_least_busy_then_the_nearest() {
        let (near, far, busy, unmeasured) = (peer(), peer(), peer(), peer());
        let rtts = [(near, 0.4), (far, 40.0), (busy, 0.1)]
            .into_iter()
            .collect();
        let candidates = vec![
            (unmeasured, card(), 0),
            (busy, card(), 3),
            (far, card(), 0),
            (near, card(), 0),
        ];
        let order: Vec<PeerId> = route(candidates.clone(), peer(), &rtts, &HashMap::new())
            .into_iter()
            .map(|(p, _, _)| p)
            .collect();
        assert_eq!(order, vec![near, far, unmeasured, busy]);

        // Calls this node already runs on `near` count against it.
        let in_flight = [(near, 1)].into_iter().collect();
        let order: Vec<PeerId> = route(candidates, peer(), &rtts, &in_flight)
            .into_iter()
            .map(|(p, _, _)| p)
            .collect();
        assert_eq!(order, vec![far, unmeasured, near, busy]);
    }

    #[test]
    fn in_flight_counts_end_with_the_call() {
        let cache = ProviderCache::default();
        let p = peer();
        let first = cache.start_call(p);
        let second = cache.start_call(p);
        assert_eq!(cache.in_flight().get(&p), Some(&2));
        drop(first);
        assert_eq!(cache.in_flight().get(&p), Some(&1));
        drop(second);
        assert!(cache.in_flight().is_empty());
    }
}
