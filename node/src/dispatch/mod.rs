//! Dispatching a call on the mesh: pick the node (a given peer, or any provider of the model),
//! build the request to fit the model's task, call it, fail over, and report every step as a
//! [`CallEvent`].
//!
//! `mesh infer`, the node's `/v1/mesh/infer` and the OpenAI gateway all go through
//! [`Dispatcher::dispatch`], so they behave the same.
//!
//! - `spec`: what is asked ([`InferSpec`], [`Target`]), what is heard ([`CallEvent`]) and
//!   the request built for a model ([`build_request`]).
//! - `candidates`: who can answer ([`candidates()`]), in which order ([`route`]).
//! - `provider_cache`: recent providers and the calls running on each ([`ProviderCache`]).
//! - `failure`: why a call failed, and what a front end makes of it ([`CallFailure`]).
//! - `relay`: the frames of one call as events, its receipt checked.
//! - This module: the failover loop. The transport of a call (in-memory to this node's own
//!   server, or a libp2p stream) is [`crate::call`]'s.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use libp2p::PeerId;
use mesh_protocol::{ErrorCode, WireError};
use tokio::sync::mpsc;

mod candidates;
mod failure;
mod provider_cache;
mod relay;
mod spec;

pub use candidates::{candidates, route, Candidate};
pub use failure::{CallFailure, FailureClass, Origin};
pub use provider_cache::{ProviderCache, PROVIDER_CACHE_TTL};
pub use spec::{build_request, BadTarget, CallEvent, InferSpec, Target};

use crate::call::{Call, CallError};
use crate::network::Client;
use crate::serve::Server;
use relay::{relay, Attempt, Failed};

/// What a node can reach: the mesh through its client, and its own models.
#[derive(Clone)]
pub struct Dispatcher {
    pub client: Client,
    pub local: Option<Arc<Server>>,
    /// Recently found providers, shared by the calls of one node (the API's).
    pub cache: Option<Arc<ProviderCache>>,
}

/// Events a dispatched call queues for its consumer before it waits for them.
const EVENT_QUEUE: usize = 64;

impl Dispatcher {
    /// Starts `spec` on the mesh: every step arrives on the receiver, the last being `done` or
    /// `error`. Dropping the receiver cancels the call, on the serving node too.
    pub fn dispatch(&self, spec: InferSpec) -> mpsc::Receiver<CallEvent> {
        let (tx, rx) = mpsc::channel(EVENT_QUEUE);
        let dispatcher = self.clone();
        tokio::spawn(async move {
            // A consumer that hangs up ends the call at once, even while it waits for a
            // node's next frame (dropping the call resets its stream: the node cancels).
            tokio::select! {
                last = run(&dispatcher, &spec, &tx) => {
                    if let Ok(last) = last {
                        let _ = tx.send(last).await;
                    }
                }
                () = tx.closed() => {}
            }
        });
        rx
    }

    /// This node as a candidate for `model`, if it serves it.
    fn local_candidate(&self, model: &str) -> Option<Candidate> {
        let server = self.local.as_ref()?;
        let card = server.cards().find(|c| c.name == model)?.clone();
        Some(Candidate {
            peer: self.client.local_peer_id(),
            card,
            load: server.load(),
        })
    }
}

/// The asker dropped the events' receiver: the call is dropped, which cancels it on the node.
#[derive(Debug)]
struct AskerGone;

/// What the failover loop does after an attempt failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct AfterFailure {
    /// Try the next provider: nothing was passed on yet, and another node may well answer.
    try_next: bool,
    /// Drop the model's cached providers: this one may be gone.
    forget_providers: bool,
}

/// The failover policy. Only a failure before any output is retried (the asker must never
/// see two answers), and only when another node may do better: the network failed, the node
/// closed the stream, or it was overloaded. Its other refusals (bad request, unauthorized,
/// unknown model, deadline) would be the same anywhere.
fn after_failure(error: &CallError, after_output: bool) -> AfterFailure {
    let lost = matches!(error, CallError::Network(_) | CallError::Closed);
    let overloaded = matches!(
        error,
        CallError::Remote(WireError {
            code: ErrorCode::Overloaded,
            ..
        })
    );
    AfterFailure {
        try_next: !after_output && (lost || overloaded),
        forget_providers: lost,
    }
}

/// Runs `spec` to the end, sending every step but the last to `events`, and returns the last
/// (`done` or `error`). Tries the next provider when one fails before its first output. When
/// every provider remembered from an earlier lookup has failed that way, asks the DHT once more
/// and tries the providers it had not tried yet.
async fn run(
    dispatcher: &Dispatcher,
    spec: &InferSpec,
    events: &mpsc::Sender<CallEvent>,
) -> Result<CallEvent, AskerGone> {
    let begin = Instant::now();
    let cache = dispatcher
        .cache
        .as_ref()
        .filter(|_| spec.target == Target::Any);
    let mut remembered = cache.and_then(|c| c.get(&spec.model));
    let mut tried = HashSet::new();
    let mut lost = None;
    loop {
        let from_cache = remembered.is_some();
        let found = match remembered.take() {
            Some(found) => found,
            None => match candidates(dispatcher, spec.target, &spec.model).await {
                Ok(found) => {
                    if let Some(cache) = cache {
                        cache.put(&spec.model, &found);
                    }
                    found
                }
                Err(failure) => return Ok(CallEvent::Error(failure)),
            },
        };
        let fresh: Vec<Candidate> = found
            .into_iter()
            .filter(|c| !tried.contains(&c.peer))
            .collect();
        if let (true, Some(last)) = (fresh.is_empty(), lost.take()) {
            // The DHT knows no provider that was not tried: the last failure stands.
            return Ok(last);
        }
        match try_candidates(dispatcher, spec, cache, fresh, begin, events, &mut tried).await? {
            Attempts::Ended(last) => return Ok(last),
            Attempts::AllLost(last) if !from_cache => return Ok(last),
            Attempts::AllLost(last) => {
                tracing::info!(model = %spec.model, "every remembered provider failed; asking the DHT again");
                lost = Some(last);
            }
        }
    }
}

/// How a round of candidates ended.
enum Attempts {
    /// An answer, or a failure another node would not mend.
    Ended(CallEvent),
    /// Every candidate failed before its first output in a way another node might not: the
    /// last failure.
    AllLost(CallEvent),
}

/// Tries `found` in the routing order until one answers; records each peer tried.
async fn try_candidates(
    dispatcher: &Dispatcher,
    spec: &InferSpec,
    cache: Option<&Arc<ProviderCache>>,
    found: Vec<Candidate>,
    begin: Instant,
    events: &mpsc::Sender<CallEvent>,
    tried: &mut HashSet<PeerId>,
) -> Result<Attempts, AskerGone> {
    let me = dispatcher.client.local_peer_id();
    let (ordered, mut claimed) = if found.len() > 1 {
        let rtts = round_trips(&dispatcher.client).await;
        match cache {
            Some(cache) => cache.route_and_claim(found, me, &rtts),
            None => (route(found, me, &rtts, &HashMap::new()), None),
        }
    } else {
        let claim = cache.and_then(|c| found.first().map(|first| c.start_call(first.peer)));
        (found, claim)
    };
    let mut last = CallEvent::Error(CallFailure::local(
        ErrorCode::UnknownModel,
        format!("no node answered for model {:?}", spec.model),
    ));
    for Candidate { peer, card, .. } in ordered {
        tried.insert(peer);
        // The first candidate was counted when it was chosen; a failover counts here.
        let _counted = claimed.take().or_else(|| cache.map(|c| c.start_call(peer)));
        let request = match build_request(spec, &card) {
            Ok(r) => r,
            Err(e) => {
                let failure = CallFailure::local(e.code, e.message);
                return Ok(Attempts::Ended(CallEvent::Error(failure)));
            }
        };
        let idle = Duration::from_millis(spec.deadline_ms);
        let attempt = Attempt { peer, begin };
        let (error, after_output) = match Call::open(
            &dispatcher.client,
            dispatcher.local.as_ref(),
            peer,
            &request,
            idle,
        )
        .await
        {
            Ok((call, path)) => match relay(call, attempt, path, &request, events).await {
                Ok(done) => return Ok(Attempts::Ended(done)),
                Err(Failed::AskerGone) => return Err(AskerGone),
                Err(Failed::Call {
                    error,
                    after_output,
                }) => (error, after_output),
            },
            Err(error) => (error, false),
        };
        last = CallEvent::from_call_error(&error);
        let next = after_failure(&error, after_output);
        if let (Some(cache), true) = (cache, next.forget_providers) {
            cache.forget(&spec.model);
        }
        if !next.try_next {
            return Ok(Attempts::Ended(last));
        }
        tracing::info!(%peer, "provider failed before answering ({error}); trying the next");
    }
    Ok(Attempts::AllLost(last))
}

/// The measured round trip to every connected peer, in milliseconds.
async fn round_trips(client: &Client) -> HashMap<PeerId, f64> {
    let Ok(peers) = client.peers().await else {
        return HashMap::new();
    };
    peers
        .into_iter()
        .filter_map(|p| Some((p.peer_id, p.rtt_ms?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_failures_before_output_that_another_node_may_not_have_fail_over() {
        let remote = |code| CallError::Remote(WireError::new(code, "x"));
        let cases = [
            (CallError::Network("no route".into()), true, true),
            (CallError::Closed, true, true),
            (remote(ErrorCode::Overloaded), true, false),
            (remote(ErrorCode::BadRequest), false, false),
            (remote(ErrorCode::Unauthorized), false, false),
            (remote(ErrorCode::UnknownModel), false, false),
            (remote(ErrorCode::DeadlineExceeded), false, false),
            (remote(ErrorCode::Internal), false, false),
            (CallError::Timeout(Duration::from_secs(1)), false, false),
            (CallError::Protocol("bad frame".into()), false, false),
        ];
        for (error, try_next, forget_providers) in cases {
            let before = after_failure(&error, false);
            assert_eq!(
                before,
                AfterFailure {
                    try_next,
                    forget_providers
                },
                "{error:?} before any output"
            );
            let after = after_failure(&error, true);
            assert_eq!(
                after,
                AfterFailure {
                    try_next: false,
                    forget_providers
                },
                "{error:?} after output is never retried"
            );
        }
    }
}
