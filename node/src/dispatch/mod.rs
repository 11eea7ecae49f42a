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
//! - `trust`: which providers a call may use: pinned weights, trusted providers.
//! - `liveness`: giving up on a provider that stopped answering (a frozen process).
//! - `relay`: the frames of one call as events, its receipt checked.
//! - This module: the failover loop. The transport of a call (in-memory to this node's own
//!   server, or a libp2p stream) is [`crate::call`]'s.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use libp2p::PeerId;
use mesh_protocol::{ErrorCode, Resume, WireError};
use tokio::sync::mpsc;

mod candidates;
mod failure;
mod liveness;
mod provider_cache;
mod relay;
mod spec;
pub mod trust;

pub use candidates::{candidates, route, Candidate};
pub use failure::{CallFailure, FailureClass, Origin};
pub use provider_cache::{Misbehaviour, ProviderCache, PROVIDER_CACHE_TTL};
pub use spec::{build_request, BadTarget, CallEvent, InferSpec, ResumedFrom, StageReport, Target};
pub use trust::{Admission, ProviderTrust};

use crate::call::{Call, CallError};
use crate::metrics::Outcome;
use crate::network::Client;
use crate::serve::Server;
use liveness::{unless_unresponsive, Watch};
use relay::{relay, Attempt, Failed, Sampled};

/// What a node can reach: the mesh through its client, and its own models.
#[derive(Clone)]
pub struct Dispatcher {
    pub client: Client,
    pub local: Option<Arc<Server>>,
    /// Recently found providers, shared by the calls of one node (the API's).
    pub cache: Option<Arc<ProviderCache>>,
    /// The providers `any` calls are restricted to, by model name.
    pub trust: Arc<ProviderTrust>,
    /// Where the calls made are counted (`Metrics::default()`: nowhere scraped).
    pub metrics: crate::metrics::Metrics,
}

/// Events a dispatched call queues for its consumer before it waits for them.
const EVENT_QUEUE: usize = 64;

/// How long past its deadline a call is given up on this side. The serving node keeps the
/// same deadline and says so itself, with a better message, unless it is gone or stalling.
const DEADLINE_GRACE: Duration = Duration::from_millis(500);

/// How long an `any` call waits for a provider's first frame (`started`, sent when compute
/// starts) when another provider could take the call: a stalling provider, or one whose queue
/// is long, is left for the next. The last provider gets the rest of the deadline.
pub const FIRST_FRAME_PATIENCE: Duration = Duration::from_secs(5);

impl Dispatcher {
    /// Starts `spec` on the mesh: every step arrives on the receiver, the last being `done` or
    /// `error`. Dropping the receiver cancels the call, on the serving node too.
    pub fn dispatch(&self, spec: InferSpec) -> mpsc::Receiver<CallEvent> {
        let (tx, rx) = mpsc::channel(EVENT_QUEUE);
        let dispatcher = self.clone();
        tokio::spawn(async move {
            // A consumer that hangs up ends the call at once, even while it waits for a
            // node's next frame (dropping the call resets its stream: the node cancels).
            // The deadline bounds the whole call: lookups, failovers, every node's answer.
            let deadline = Duration::from_millis(spec.deadline_ms) + DEADLINE_GRACE;
            tokio::select! {
                last = tokio::time::timeout(deadline, run(&dispatcher, &spec, &tx)) => {
                    let last = match last {
                        Ok(Ok(last)) => last,
                        Ok(Err(AskerGone)) => {
                            dispatcher.metrics.made(&spec.model, Outcome::Cancelled, "none");
                            return;
                        }
                        Err(_) => CallEvent::Error(CallFailure::local(
                            ErrorCode::DeadlineExceeded,
                            format!(
                                "the call did not finish within its deadline of {} ms",
                                spec.deadline_ms
                            ),
                        )),
                    };
                    count_made(&dispatcher.metrics, &spec.model, &last);
                    let _ = tx.send(last).await;
                }
                () = tx.closed() => {
                    dispatcher.metrics.made(&spec.model, Outcome::Cancelled, "none");
                }
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

/// Counts a made call of `model` that ended with `last`.
fn count_made(metrics: &crate::metrics::Metrics, model: &str, last: &CallEvent) {
    match last {
        CallEvent::Done { path, .. } => metrics.made(model, Outcome::Answered, path.as_str()),
        CallEvent::Error(failure) => {
            metrics.made(model, Outcome::of_code(failure.code.as_str()), "none")
        }
        _ => {}
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
/// closed the stream, it was overloaded, it stalled before its first frame, or it refused
/// (`unauthorized`, or `unknown_model` for a model it announced: a hostile node can break a
/// name that way, and an honest one may be closed to this caller while another is open). A
/// bad request or a deadline would be the same anywhere.
fn after_failure(error: &CallError, after_output: bool) -> AfterFailure {
    let lost = matches!(error, CallError::Network(_) | CallError::Closed);
    let refused = matches!(error, CallError::Stalled(_))
        || matches!(
            error,
            CallError::Remote(WireError {
                code: ErrorCode::Overloaded | ErrorCode::Unauthorized | ErrorCode::UnknownModel,
                ..
            })
        );
    AfterFailure {
        try_next: !after_output && (lost || refused),
        forget_providers: lost,
    }
}

/// What a failure says of the provider, for backing it off.
fn misbehaviour(error: &CallError) -> Option<Misbehaviour> {
    match error {
        CallError::Stalled(_) => Some(Misbehaviour::Stalled),
        CallError::Remote(WireError { code, .. }) => match code {
            ErrorCode::Unauthorized => Some(Misbehaviour::Refused),
            ErrorCode::UnknownModel => Some(Misbehaviour::DeniedModel),
            _ => None,
        },
        _ => None,
    }
}

/// The call `spec` asks for with its model field split from its pin, the pin checked against
/// `spec.weights`, and what the call accepts of a provider.
fn admitted(
    dispatcher: &Dispatcher,
    spec: &InferSpec,
) -> Result<(InferSpec, Admission), CallFailure> {
    let bad = |e: WireError| CallFailure::local(e.code, e.message);
    let (name, pin) = trust::split_pinned(&spec.model).map_err(bad)?;
    let weights = match &spec.weights {
        Some(hex) => Some(
            trust::parse_sha256(hex)
                .map_err(|why| bad(WireError::bad_request(format!("the pinned weights {why}"))))?,
        ),
        None => None,
    };
    let pin = match (pin, weights) {
        (Some(a), Some(b)) if a != b => {
            return Err(bad(WireError::bad_request(format!(
                "model {:?} pins weights {a}, and the call pins {b}",
                spec.model
            ))))
        }
        (a, b) => a.or(b),
    };
    // A named node is the caller's choice: only the pin applies to it.
    let open = ProviderTrust::default();
    let trust = match spec.target {
        Target::Any => &*dispatcher.trust,
        Target::Peer(_) => &open,
    };
    let me = dispatcher.client.local_peer_id();
    let admission = Admission::new(name, pin.clone(), trust, me);
    let spec = InferSpec {
        model: name.to_string(),
        weights: pin,
        ..spec.clone()
    };
    Ok((spec, admission))
}

/// Runs `spec` to the end, sending every step but the last to `events`, and returns the last
/// (`done` or `error`). Only providers the call admits are used ([`trust`]). Tries the next
/// provider when one fails before its first output. When every provider remembered from an
/// earlier lookup has failed that way, asks the DHT once more and tries the providers it had
/// not tried yet. A generation whose provider fails after it began is resumed on another
/// provider of the same weights, from the tokens it had sampled.
async fn run(
    dispatcher: &Dispatcher,
    spec: &InferSpec,
    events: &mpsc::Sender<CallEvent>,
) -> Result<CallEvent, AskerGone> {
    let begin = Instant::now();
    let (spec, admission) = match admitted(dispatcher, spec) {
        Ok(admitted) => admitted,
        Err(failure) => return Ok(CallEvent::Error(failure)),
    };
    let spec = &spec;
    let cache = dispatcher
        .cache
        .as_ref()
        .filter(|_| spec.target == Target::Any);
    // Remembered providers were found for another call, perhaps with another pin.
    let mut remembered = cache
        .and_then(|c| c.get(&spec.model))
        .map(|found| admission.filter(found).0)
        .filter(|found| !found.is_empty());
    let mut tried = HashSet::new();
    let mut progress = Progress::default();
    let mut lost = None;
    // Lookups after the first: one when remembered providers all failed, one when a resumed
    // call has run out of the providers it knew.
    let mut lookups_left = 2;
    loop {
        let from_cache = remembered.is_some();
        let found = match remembered.take() {
            Some(found) => found,
            None => match candidates(dispatcher, spec.target, &spec.model, &admission).await {
                Ok(found) => {
                    if let Some(cache) = cache {
                        cache.put(&spec.model, &found);
                    }
                    found
                }
                Err(failure) => return Ok(lost.unwrap_or(CallEvent::Error(failure))),
            },
        };
        let fresh: Vec<Candidate> = found
            .into_iter()
            .filter(|c| !tried.contains(&c.peer))
            .filter(|c| {
                progress
                    .weights
                    .as_ref()
                    .is_none_or(|w| *w == c.card.sha256)
            })
            .collect();
        if let (true, Some(last)) = (fresh.is_empty(), lost.take()) {
            // The DHT knows no provider that was not tried: the last failure stands.
            return Ok(last);
        }
        let round = Round {
            dispatcher,
            spec,
            cache,
            begin,
            events,
        };
        match round.attempt(fresh, &mut tried, &mut progress).await? {
            Attempts::Ended(last) => return Ok(last),
            Attempts::AllLost(last) => {
                let resuming = progress.weights.is_some();
                if !(from_cache || resuming) || lookups_left == 0 {
                    return Ok(last);
                }
                lookups_left -= 1;
                tracing::info!(model = %spec.model, resuming, "every provider tried failed; asking the DHT again");
                lost = Some(last);
            }
        }
    }
}

/// What a call has passed on so far: where a resumed call carries on from.
#[derive(Debug, Default)]
struct Progress {
    /// The ids of the tokens passed on, from the nodes' deltas.
    sampled: Vec<u32>,
    /// Text came without the ids of its tokens (an upstream runtime's answer): it cannot be
    /// carried on elsewhere.
    untracked: bool,
    /// The weights the output came from, once there is output.
    weights: Option<String>,
    /// The nodes that failed mid-answer.
    resumed: Vec<ResumedFrom>,
}

/// How a round of candidates ended.
enum Attempts {
    /// An answer, or a failure another node would not mend.
    Ended(CallEvent),
    /// Every candidate failed in a way another node might mend: the last failure.
    AllLost(CallEvent),
}

/// One round of attempts at a call.
struct Round<'a> {
    dispatcher: &'a Dispatcher,
    spec: &'a InferSpec,
    cache: Option<&'a Arc<ProviderCache>>,
    begin: Instant,
    events: &'a mpsc::Sender<CallEvent>,
}

impl Round<'_> {
    /// Tries `found` in the routing order until one answers; records each peer tried.
    async fn attempt(
        &self,
        found: Vec<Candidate>,
        tried: &mut HashSet<PeerId>,
        progress: &mut Progress,
    ) -> Result<Attempts, AskerGone> {
        let (dispatcher, spec, cache) = (self.dispatcher, self.spec, self.cache);
        let me = dispatcher.client.local_peer_id();
        let (ordered, mut claimed) = if found.len() > 1 {
            let rtts = round_trips(&dispatcher.client).await;
            match cache {
                Some(cache) => cache.route_and_claim(&spec.model, found, me, &rtts),
                None => (
                    route(
                        found,
                        me,
                        &rtts,
                        &HashMap::new(),
                        &HashSet::new(),
                        &HashMap::new(),
                    ),
                    None,
                ),
            }
        } else {
            let claim = cache.and_then(|c| found.first().map(|first| c.start_call(first.peer)));
            (found, claim)
        };
        let mut last = CallEvent::Error(CallFailure::local(
            ErrorCode::UnknownModel,
            format!("no node answered for model {:?}", spec.model),
        ));
        let count = ordered.len();
        for (index, Candidate { peer, card, .. }) in ordered.into_iter().enumerate() {
            tried.insert(peer);
            // The first candidate was counted when it was chosen; a failover counts here.
            let _counted = claimed.take().or_else(|| cache.map(|c| c.start_call(peer)));
            let mut request = match build_request(spec, &card) {
                Ok(r) => r,
                Err(e) => {
                    let failure = CallFailure::local(e.code, e.message);
                    return Ok(Attempts::Ended(CallEvent::Error(failure)));
                }
            };
            if let Some(weights) = &progress.weights {
                request.resume = Some(Resume {
                    weights_sha256: weights.clone(),
                    tokens: progress.sampled.clone(),
                });
            }
            let idle = Duration::from_millis(spec.deadline_ms);
            // A call gives up on a node that stops answering: an `any` call marks it and goes
            // to another; a call to a named node drops the connections to it (they may be
            // dead while they look open) and tries once more on a fresh one.
            let named = spec.target != Target::Any;
            let watch = (peer != me).then_some(Watch {
                client: &dispatcher.client,
                peer,
                marks: cache.map(|c| &**c),
                disconnect: named,
            });
            let attempt = Attempt {
                peer,
                begin: self.begin,
                watch,
            };
            let mut sampled = Sampled {
                tokens: std::mem::take(&mut progress.sampled),
                untracked: progress.untracked,
            };
            let open = || {
                Call::open(
                    &dispatcher.client,
                    dispatcher.local.as_ref(),
                    peer,
                    &request,
                    idle,
                )
            };
            // Opening a remote call waits for its first frame. When another provider waits
            // behind this one, a stall passes the call on.
            let patience =
                (spec.target == Target::Any && index + 1 < count).then_some(FIRST_FRAME_PATIENCE);
            let opening = Instant::now();
            let first_try = unless_unresponsive(watch, open());
            let mut opened = match patience {
                Some(patience) => tokio::time::timeout(patience, first_try)
                    .await
                    .unwrap_or(Ok(Err(CallError::Stalled(patience)))),
                None => first_try.await,
            };
            if let (true, Err(gone)) = (named, &opened) {
                tracing::info!(%peer, "{gone}; calling it again on a fresh connection");
                opened = unless_unresponsive(watch, open()).await;
            }
            let outcome = match opened {
                Ok(Ok((call, path))) => {
                    if let Some(cache) = cache {
                        cache.first_frame(peer, &spec.model, opening.elapsed());
                    }
                    dispatcher
                        .metrics
                        .made_first_frame(&spec.model, opening.elapsed());
                    relay(call, attempt, path, &request, self.events, &mut sampled)
                        .await
                        .map_err(|f| match f {
                            Failed::AskerGone => None,
                            Failed::Call {
                                error,
                                after_output,
                            } => Some((error, after_output)),
                        })
                }
                Ok(Err(error)) => Err(Some((error, false))),
                Err(gone) => Err(Some((gone.into(), false))),
            };
            let given = request.resume.as_ref().map_or(0, |r| r.tokens.len()) as u32;
            (progress.sampled, progress.untracked) = (sampled.tokens, sampled.untracked);
            let (error, after_output) = match outcome {
                Ok(done) => {
                    if let Some(cache) = cache {
                        cache.answered(&peer);
                    }
                    return Ok(Attempts::Ended(progress.finish(done, given)));
                }
                Err(None) => return Err(AskerGone),
                Err(Some(failed)) => failed,
            };
            if after_output && progress.weights.is_none() {
                progress.weights = Some(card.sha256.clone());
            }
            last = CallEvent::from_call_error(&error);
            let began = progress.weights.is_some();
            let next = after_failure(&error, began);
            if let (Some(cache), true) = (cache, next.forget_providers) {
                cache.forget(&spec.model);
            }
            if let (Some(cache), Some(why), false) = (cache, misbehaviour(&error), began) {
                tracing::info!(%peer, ?why, "backing the provider off: {error}");
                cache.back_off(peer, why);
            }
            if began {
                if !may_resume(spec.target, &request, &error, progress) {
                    return Ok(Attempts::Ended(last));
                }
                tracing::info!(%peer, tokens = progress.sampled.len(), "provider failed mid-answer ({error}); resuming on another");
                progress.resumed.push(ResumedFrom {
                    peer: peer.to_string(),
                    tokens: progress.sampled.len() as u32,
                    error: error.to_string(),
                });
                last = CallEvent::Error(CallFailure::local(
                    ErrorCode::UnknownModel,
                    format!(
                        "node {peer} failed after {} tokens ({error}), and no other node hosts the same weights of model {:?}",
                        progress.sampled.len(),
                        spec.model
                    ),
                ));
                continue;
            }
            if !next.try_next {
                return Ok(Attempts::Ended(last));
            }
            tracing::info!(%peer, "provider failed before answering ({error}); trying the next");
        }
        Ok(Attempts::AllLost(last))
    }
}

impl Progress {
    /// The `done` of a call, with what earlier nodes passed on counted in: `given` tokens were
    /// handed to the node that finished it.
    fn finish(&mut self, mut done: CallEvent, given: u32) -> CallEvent {
        if let CallEvent::Done { usage, resumed, .. } = &mut done {
            usage.completion_tokens = usage.completion_tokens.saturating_add(given);
            *resumed = std::mem::take(&mut self.resumed);
        }
        done
    }
}

/// Whether a generation that failed after output may go on elsewhere: only an `any` call (a
/// call to a named node stays there), only when the node is lost (a refusal would be the same
/// anywhere), and only when every token passed on is known by id.
fn may_resume(
    target: Target,
    request: &mesh_protocol::InferRequest,
    error: &CallError,
    progress: &Progress,
) -> bool {
    let lost = matches!(
        error,
        CallError::Network(_) | CallError::Closed | CallError::Timeout(_)
    );
    target == Target::Any
        && !matches!(request.input, mesh_protocol::Input::Embed { .. })
        && lost
        && !progress.untracked
        && !progress.sampled.is_empty()
        && progress.sampled.len() < request.params.max_tokens as usize
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
    fn only_failures_before_output_that_another_node_may_mend_fail_over() {
        let remote = |code| CallError::Remote(WireError::new(code, "x"));
        let cases = [
            (CallError::Network("no route".into()), true, true),
            (CallError::Closed, true, true),
            (remote(ErrorCode::Overloaded), true, false),
            (remote(ErrorCode::BadRequest), false, false),
            (remote(ErrorCode::Unauthorized), true, false),
            (remote(ErrorCode::UnknownModel), true, false),
            (CallError::Stalled(Duration::from_secs(5)), true, false),
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

    fn chat_request(max_tokens: u32) -> mesh_protocol::InferRequest {
        mesh_protocol::InferRequest {
            model: "m".into(),
            input: mesh_protocol::Input::Chat {
                messages: vec![mesh_protocol::ChatMessage {
                    role: mesh_protocol::Role::User,
                    content: "hi".into(),
                }],
            },
            params: mesh_protocol::SamplingParams {
                max_tokens,
                ..Default::default()
            },
            deadline_ms: None,
            token: None,
            resume: None,
        }
    }

    #[test]
    fn only_an_any_generation_lost_mid_answer_with_known_tokens_is_resumed() {
        let progress = |sampled: Vec<u32>, untracked| Progress {
            sampled,
            untracked,
            weights: Some("ab".into()),
            resumed: Vec::new(),
        };
        let lost = CallError::Network("reset".into());
        let req = chat_request(10);
        assert!(may_resume(
            Target::Any,
            &req,
            &lost,
            &progress(vec![1, 2], false)
        ));
        assert!(may_resume(
            Target::Any,
            &req,
            &CallError::Timeout(Duration::from_secs(1)),
            &progress(vec![1], false)
        ));
        // A named node stays named; a refusal would be the same anywhere.
        let peer = Target::Peer(crate::test_support::random_peer());
        assert!(!may_resume(peer, &req, &lost, &progress(vec![1], false)));
        let refused = CallError::Remote(WireError::new(ErrorCode::Internal, "x"));
        assert!(!may_resume(
            Target::Any,
            &req,
            &refused,
            &progress(vec![1], false)
        ));
        // Text whose tokens are unknown, no tokens yet, or nothing left to sample.
        assert!(!may_resume(
            Target::Any,
            &req,
            &lost,
            &progress(vec![1], true)
        ));
        assert!(!may_resume(
            Target::Any,
            &req,
            &lost,
            &progress(vec![], false)
        ));
        assert!(!may_resume(
            Target::Any,
            &req,
            &lost,
            &progress(vec![0; 10], false)
        ));
        // Embeddings are never resumed.
        let mut embed = chat_request(10);
        embed.input = mesh_protocol::Input::Embed {
            texts: vec!["a".into()],
        };
        assert!(!may_resume(
            Target::Any,
            &embed,
            &lost,
            &progress(vec![1], false)
        ));
    }

    #[test]
    fn a_resumed_done_counts_every_token_and_names_the_nodes_that_failed() {
        let mut p = Progress {
            resumed: vec![ResumedFrom {
                peer: "12D3KooWx".into(),
                tokens: 5,
                error: "reset".into(),
            }],
            ..Progress::default()
        };
        let usage = mesh_protocol::Usage {
            prompt_tokens: 3,
            completion_tokens: 7,
            ..Default::default()
        };
        let done = crate::test_support::done_with(mesh_protocol::FinishReason::Length, usage, 1, 2);
        let CallEvent::Done { usage, resumed, .. } = p.finish(done, 5) else {
            panic!("done stays done");
        };
        assert_eq!(usage.completion_tokens, 12);
        assert_eq!(resumed.len(), 1);
        assert!(p.resumed.is_empty());
    }
}
