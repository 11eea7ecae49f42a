//! Which nodes can answer a call, and in what order to try them: [`candidates`] (this node,
//! the model's providers in the DHT, each checked against its signed catalog, the first to
//! answer; when none of them answers, the nodes this node is connected to) and [`route`]
//! (the ordering policy).

use std::collections::{HashMap, HashSet};

use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt};
use libp2p::PeerId;
use mesh_protocol::{ErrorCode, ModelCard};

use super::failure::CallFailure;
use super::liveness;
use super::spec::Target;
use super::trust::{Admission, Excluded};
use super::Dispatcher;
use crate::call::{CallError, Calls};

/// A node that hosts the model, with its signed card and the load it last advertised.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub peer: PeerId,
    pub card: ModelCard,
    /// Calls running or waiting on that node when it answered.
    pub load: u32,
}

/// Round trip assumed for a peer not measured yet, in milliseconds.
const UNMEASURED_RTT_MS: f64 = 1000.0;

/// Once one provider's catalog has answered, how long the others get before the call goes
/// on without them: a frozen or far-away provider does not hold every call up.
pub const CATALOG_GRACE: Duration = Duration::from_millis(250);

/// Nodes that can answer `model`, with its card, least loaded first. This node alone when it
/// is the target, or when the target is `any` and it hosts the model itself. Of the providers
/// the DHT names, those whose catalogs answer first ([`CATALOG_GRACE`]). When none of them
/// hosts it (the DHT's records can all be of nodes that left), up to [`CONNECTED_FALLBACK`] of
/// the nodes this node is connected to are asked too, each within the probe timeout.
///
/// Only providers `admission` admits count (pinned weights, trusted providers): when the DHT
/// names only providers it leaves out, the connected nodes are asked too, and when none is
/// left the failure says why each was left out.
pub async fn candidates(
    dispatcher: &Dispatcher,
    target: Target,
    model: &str,
    admission: &Admission,
) -> Result<Vec<Candidate>, CallFailure> {
    let client = &dispatcher.client;
    let me = client.local_peer_id();
    let local = dispatcher.local_candidate(model);
    let mut excluded = Vec::new();
    let local = match local.map(|l| admission.admits(&l).map(|()| l)) {
        Some(Ok(local)) => Some(local),
        Some(Err(why)) => {
            excluded.push(why);
            None
        }
        None => None,
    };
    let peers = match target {
        Target::Peer(peer) if peer == me => {
            return local
                .map(|l| vec![l])
                .ok_or_else(|| match excluded.is_empty() {
                    true => CallFailure::local(
                        ErrorCode::UnknownModel,
                        format!("this node does not host model {model:?}"),
                    ),
                    false => refusal(admission, model, &excluded),
                })
        }
        Target::Peer(peer) => vec![peer],
        Target::Any => {
            if let Some(local) = local {
                return Ok(vec![local]);
            }
            match find_providers_hedged(dispatcher, model, admission).await {
                Hedged::Walk(found) => found.map_err(|e| {
                    CallFailure::network(ErrorCode::Internal, format!("network failure: {e}"))
                })?,
                // The walk was slow and a connected node hosts the model.
                Hedged::Connected(mut found) => {
                    found.sort_by_key(|c| c.load);
                    return Ok(found);
                }
            }
        }
    };
    // An empty answer from the walk is not the end: the connected nodes are asked below.
    let (found, last_error) = ask_catalogs(dispatcher, model, &peers, Asked::Named).await;
    let (mut found, left_out) = admission.filter(found);
    excluded.extend(left_out);
    if found.is_empty() && target == Target::Any {
        // No provider the DHT named answered: its records may all be of nodes that left. The
        // nodes this node is connected to are alive; ask those not asked yet.
        let asked: HashSet<PeerId> = peers.iter().copied().collect();
        let connected = client.peers().await.unwrap_or_default();
        let others = not_asked(connected.iter().map(|p| p.peer_id), &asked);
        if !others.is_empty() {
            tracing::info!(
                model,
                named = peers.len(),
                connected = others.len(),
                "no provider the DHT named answered; asking the connected nodes"
            );
            // When they do not host it either, the DHT's answer is the one to report.
            let more = ask_catalogs(dispatcher, model, &others, Asked::Connected).await;
            let (more, left_out) = admission.filter(more.0);
            found = more;
            excluded.extend(left_out);
        }
    }
    found.sort_by_key(|c| c.load);
    match (found.is_empty(), last_error) {
        (true, _) if !excluded.is_empty() => Err(refusal(admission, model, &excluded)),
        (true, Some(e)) => Err(e),
        (true, None) => Err(CallFailure::local(
            ErrorCode::UnknownModel,
            format!("no node on the mesh announces model {model:?}"),
        )),
        _ => Ok(found),
    }
}

/// How long a DHT walk runs before the connected nodes are asked too. A walk normally answers
/// within its grace after the first provider (200 ms on a LAN); one whose first requests went
/// to nodes that just died waits for their connections to time out (a dead QUIC connection
/// gives no error, only silence, for up to 10 s).
pub const WALK_HEDGE: Duration = Duration::from_millis(500);

/// What a hedged lookup found first.
enum Hedged {
    /// The DHT walk answered (perhaps with nobody).
    Walk(Result<Vec<PeerId>, crate::network::NetworkError>),
    /// The walk was slow, and connected nodes host the model (admitted, with their cards).
    Connected(Vec<Candidate>),
}

/// The DHT's providers of `model`; when the walk takes longer than [`WALK_HEDGE`], the
/// connected nodes' catalogs are asked while it goes on, and what they find is used if it
/// comes first. (As a tail-latency hedge, not a replacement: in a large mesh the connected
/// nodes rarely host the model, and the walk's answer is waited for.)
async fn find_providers_hedged(
    dispatcher: &Dispatcher,
    model: &str,
    admission: &Admission,
) -> Hedged {
    let client = &dispatcher.client;
    let walk = client.find_providers(model);
    tokio::pin!(walk);
    tokio::select! {
        found = &mut walk => return Hedged::Walk(found),
        () = tokio::time::sleep(WALK_HEDGE) => {}
    }
    let connected = client.peers().await.unwrap_or_default();
    let others = not_asked(connected.iter().map(|p| p.peer_id), &HashSet::new());
    if others.is_empty() {
        return Hedged::Walk(walk.await);
    }
    tracing::info!(
        model,
        connected = others.len(),
        "the DHT walk is slow; asking the connected nodes meanwhile"
    );
    let neighbours = ask_catalogs(dispatcher, model, &others, Asked::Connected);
    tokio::pin!(neighbours);
    tokio::select! {
        found = &mut walk => Hedged::Walk(found),
        (found, _) = &mut neighbours => {
            let (found, _) = admission.filter(found);
            if found.is_empty() {
                Hedged::Walk(walk.await)
            } else {
                Hedged::Connected(found)
            }
        }
    }
}

/// The failure of a lookup whose every provider `admission` left out.
fn refusal(admission: &Admission, model: &str, excluded: &[Excluded]) -> CallFailure {
    let why = admission.refusal(model, excluded);
    CallFailure::local(why.code, why.message)
}

/// Most connected nodes asked for their catalogs when no provider the DHT named answered.
pub const CONNECTED_FALLBACK: usize = 32;

/// The connected peers not asked yet: at most [`CONNECTED_FALLBACK`], chosen at random, so
/// that a node with more connections than that reaches all of them over a few lookups.
fn not_asked(connected: impl IntoIterator<Item = PeerId>, asked: &HashSet<PeerId>) -> Vec<PeerId> {
    use rand::seq::SliceRandom;
    let mut seen = HashSet::new();
    let mut others: Vec<PeerId> = connected
        .into_iter()
        .filter(|p| !asked.contains(p) && seen.insert(*p))
        .collect();
    others.shuffle(&mut rand::thread_rng());
    others.truncate(CONNECTED_FALLBACK);
    others
}

/// Whose catalogs are asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Asked {
    /// Providers the DHT named: a connection that does not answer is closed and the catalog
    /// asked again on a fresh one ([`liveness::catalog`]).
    Named,
    /// Nodes this node is connected to for other reasons (relays, the bootstrap node): each
    /// gets the probe's time on the connection it has, which is never closed for being slow.
    Connected,
}

async fn ask_one(client: &crate::network::Client, peer: PeerId, asked: Asked) -> Catalog {
    match asked {
        Asked::Named => liveness::catalog(client, peer).await,
        Asked::Connected => {
            let limit = liveness::probe_timeout(client, &peer);
            tokio::time::timeout(limit, client.catalog(peer))
                .await
                .unwrap_or(Err(CallError::Timeout(limit)))
        }
    }
}

type Catalog = Result<(Vec<ModelCard>, u32), CallError>;

/// Asks `peers` for their catalogs at once and keeps those that host `model` whole, with
/// the first to answer and those that answer within [`CATALOG_GRACE`] after it; with the last
/// failure seen.
async fn ask_catalogs(
    dispatcher: &Dispatcher,
    model: &str,
    peers: &[PeerId],
    asked: Asked,
) -> (Vec<Candidate>, Option<CallFailure>) {
    let client = &dispatcher.client;
    // Providers that recently stopped answering a call are not waited for once another has
    // answered (they are asked all the same: they may be back).
    let marked = dispatcher
        .cache
        .as_ref()
        .map(|cache| cache.backed_off())
        .unwrap_or_default();
    let mut pending: HashSet<PeerId> = peers.iter().copied().collect();
    let mut lookups: FuturesUnordered<_> = peers
        .iter()
        .map(|peer| async move { (*peer, ask_one(client, *peer, asked).await) })
        .collect();
    let mut found = Vec::new();
    let mut last_error = None;
    // The providers that answer first: once one has, the others get CATALOG_GRACE more.
    let mut cutoff = None;
    loop {
        let next = match cutoff {
            Some(at) => match tokio::time::timeout_at(at, lookups.next()).await {
                Ok(next) => next,
                Err(_) => {
                    tracing::debug!(
                        model,
                        late = lookups.len(),
                        "providers slower to answer than the first are left out of this call"
                    );
                    break;
                }
            },
            None => lookups.next().await,
        };
        let Some((peer, result)) = next else { break };
        pending.remove(&peer);
        match result {
            // A node that runs only some layers of the model does not answer calls for it.
            Ok((cards, load)) => match cards
                .into_iter()
                .find(|c| c.name == model && c.layers.is_none())
            {
                Some(card) => {
                    found.push(Candidate { peer, card, load });
                    cutoff.get_or_insert_with(|| tokio::time::Instant::now() + CATALOG_GRACE);
                }
                None => {
                    last_error = Some(CallFailure::local(
                        ErrorCode::UnknownModel,
                        format!("node {peer} does not host model {model:?}"),
                    ))
                }
            },
            Err(e) => last_error = Some(CallFailure::from(&e)),
        }
        if cutoff.is_some() && pending.iter().all(|p| marked.contains(p)) {
            break;
        }
    }
    (found, last_error)
}

/// Most load a provider's report counts for: past it, every provider is as busy as another.
pub const MAX_CREDIBLE_LOAD: u32 = 4096;

/// How much slower than the fastest candidate a provider's measured first frame may be before
/// it is tried after every provider that is not: this many times the fastest, plus
/// [`SLOW_MARGIN_MS`].
pub const SLOW_RATIO: f64 = 2.0;
/// The margin added to [`SLOW_RATIO`] times the fastest first frame, in milliseconds: below it,
/// differences are noise, and the load reports decide.
pub const SLOW_MARGIN_MS: f64 = 250.0;

/// Orders providers best first: those not backed off for misbehaving (`backed_off`: it
/// stopped answering, stalled, refused, or denied the model it announced), then those not
/// measured slow, then the least busy (the load a provider advertised in its catalog, capped
/// at [`MAX_CREDIBLE_LOAD`], plus the calls this node has running on it), then the shortest
/// measured round trip (libp2p ping; this node itself counts as 0, a peer not yet measured as
/// 1 s).
///
/// A provider's load is its own word, so a liar can claim to be idle. It is weighed against
/// what this node measured: `first_frame_ms` holds the time recent calls waited for each
/// provider's first frame (the provider's queue and prompt processing, seen from here). A
/// provider measured more than [`SLOW_RATIO`] times the fastest candidate plus
/// [`SLOW_MARGIN_MS`] is slow: whatever load it claims, it comes after the others. A provider
/// not measured yet counts as fast (it is tried, and so measured), so one slow measurement
/// never hides an untried provider. A provider that stalls or refuses is backed off, and the
/// calls this node has running on a provider count whatever it claims.
pub fn route(
    mut candidates: Vec<Candidate>,
    me: PeerId,
    rtt_ms: &HashMap<PeerId, f64>,
    in_flight: &HashMap<PeerId, u32>,
    backed_off: &HashSet<PeerId>,
    first_frame_ms: &HashMap<PeerId, f64>,
) -> Vec<Candidate> {
    let rtt = |peer: &PeerId| {
        if *peer == me {
            0.0
        } else {
            rtt_ms.get(peer).copied().unwrap_or(UNMEASURED_RTT_MS)
        }
    };
    // `load` is the provider's own word: a hostile figure saturates rather than overflowing
    // (which would panic with the provider cache's lock held, or wrap to look idle).
    let busy = |c: &Candidate| {
        c.load
            .min(MAX_CREDIBLE_LOAD)
            .saturating_add(in_flight.get(&c.peer).copied().unwrap_or(0))
    };
    let first_frame = |c: &Candidate| first_frame_ms.get(&c.peer).copied().unwrap_or(0.0);
    let fastest = candidates
        .iter()
        .map(first_frame)
        .min_by(f64::total_cmp)
        .unwrap_or(0.0);
    let slow = |c: &Candidate| first_frame(c) > SLOW_RATIO * fastest + SLOW_MARGIN_MS;
    candidates.sort_by(|a, b| {
        let marked = |c: &Candidate| backed_off.contains(&c.peer);
        marked(a)
            .cmp(&marked(b))
            .then(slow(a).cmp(&slow(b)))
            .then(busy(a).cmp(&busy(b)))
            .then(rtt(&a.peer).total_cmp(&rtt(&b.peer)))
    });
    candidates
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use mesh_protocol::Task;

    pub(crate) use crate::test_support::random_peer as peer;

    #[test]
    fn the_fallback_asks_each_connected_node_not_asked_yet_once_and_a_bounded_number() {
        let (a, b, c) = (peer(), peer(), peer());
        let asked: HashSet<PeerId> = [a].into_iter().collect();
        // A peer with two connections is listed twice; a peer asked already is skipped.
        let mut chosen = not_asked([a, b, c, b], &asked);
        chosen.sort();
        let mut expected = vec![b, c];
        expected.sort();
        assert_eq!(chosen, expected);
        // Of 100, 32 distinct ones, and not always the same 32.
        let many: Vec<PeerId> = (0..100).map(|_| peer()).collect();
        let first: HashSet<PeerId> = not_asked(many.iter().copied(), &HashSet::new())
            .into_iter()
            .collect();
        assert_eq!(first.len(), CONNECTED_FALLBACK);
        assert!(first.iter().all(|p| many.contains(p)));
        let differs = (0..20).any(|_| {
            let again: HashSet<PeerId> = not_asked(many.iter().copied(), &HashSet::new())
                .into_iter()
                .collect();
            again != first
        });
        assert!(differs, "every lookup asked the same 32 nodes");
    }

    pub(crate) fn candidate(peer: PeerId, load: u32) -> Candidate {
        Candidate {
            peer,
            card: crate::test_support::card("m", Task::Generate),
            load,
        }
    }

    fn peers(candidates: Vec<Candidate>) -> Vec<PeerId> {
        candidates.into_iter().map(|c| c.peer).collect()
    }

    #[test]
    fn routing_prefers_the_least_busy_then_the_nearest() {
        let (near, far, busy, unmeasured) = (peer(), peer(), peer(), peer());
        let rtts = [(near, 0.4), (far, 40.0), (busy, 0.1)]
            .into_iter()
            .collect();
        let candidates = vec![
            candidate(unmeasured, 0),
            candidate(busy, 3),
            candidate(far, 0),
            candidate(near, 0),
        ];
        let order = peers(route(
            candidates.clone(),
            peer(),
            &rtts,
            &HashMap::new(),
            &HashSet::new(),
            &HashMap::new(),
        ));
        assert_eq!(order, vec![near, far, unmeasured, busy]);

        // Calls this node already runs on `near` count against it.
        let in_flight = [(near, 1)].into_iter().collect();
        let order = peers(route(
            candidates,
            peer(),
            &rtts,
            &in_flight,
            &HashSet::new(),
            &HashMap::new(),
        ));
        assert_eq!(order, vec![far, unmeasured, near, busy]);
    }

    #[test]
    fn a_load_of_u32_max_is_the_busiest_not_an_overflow() {
        let (liar, honest) = (peer(), peer());
        let candidates = vec![candidate(liar, u32::MAX), candidate(honest, 5)];
        // This node has a call running on the liar: the sum saturates.
        let in_flight = [(liar, 1)].into_iter().collect();
        let order = peers(route(
            candidates,
            peer(),
            &HashMap::new(),
            &in_flight,
            &HashSet::new(),
            &HashMap::new(),
        ));
        assert_eq!(order, vec![honest, liar]);
    }

    #[test]
    fn this_node_is_nearest_and_an_unmeasured_peer_is_far() {
        let (me, measured, unmeasured) = (peer(), peer(), peer());
        let rtts = [(measured, 999.0), (me, 5000.0)].into_iter().collect();
        let candidates = vec![
            candidate(unmeasured, 0),
            candidate(measured, 0),
            candidate(me, 0),
        ];
        let order = peers(route(
            candidates,
            me,
            &rtts,
            &HashMap::new(),
            &HashSet::new(),
            &HashMap::new(),
        ));
        assert_eq!(order, vec![me, measured, unmeasured]);
    }

    #[test]
    fn load_wins_over_distance_and_ties_keep_their_order() {
        let (me, a, b) = (peer(), peer(), peer());
        let order = peers(route(
            vec![candidate(me, 2), candidate(a, 1), candidate(b, 1)],
            me,
            &HashMap::new(),
            &HashMap::new(),
            &HashSet::new(),
            &HashMap::new(),
        ));
        assert_eq!(order, vec![a, b, me], "the sort is stable");
    }

    #[test]
    fn a_provider_measured_slow_comes_after_the_others_whatever_load_it_claims() {
        let (liar, honest, untried) = (peer(), peer(), peer());
        let route_with = |candidates: Vec<Candidate>, first_frames: &[(PeerId, f64)]| {
            peers(route(
                candidates,
                peer(),
                &HashMap::new(),
                &HashMap::new(),
                &HashSet::new(),
                &first_frames.iter().copied().collect(),
            ))
        };
        // Claims to be idle, answered its last call's first frame after 3 s; the honest
        // provider says it is busy and answered in 40 ms.
        let both = vec![candidate(liar, 0), candidate(honest, 3)];
        assert_eq!(
            route_with(both.clone(), &[(liar, 3000.0), (honest, 40.0)]),
            vec![honest, liar]
        );
        // Not measured yet, the honest one counts as fast: it is tried before the slow one.
        assert_eq!(
            route_with(both.clone(), &[(liar, 3000.0)]),
            vec![honest, liar]
        );
        // Nothing measured: the claims decide.
        assert_eq!(route_with(both, &[]), vec![liar, honest]);
        // Within the margin, differences are noise and load decides.
        let close = vec![
            candidate(honest, 2),
            candidate(untried, 0),
            candidate(liar, 1),
        ];
        assert_eq!(
            route_with(close, &[(honest, 300.0), (liar, 200.0), (untried, 1.0)]),
            vec![untried, liar, honest]
        );
        // Every one slow in absolute terms, none slower than twice the fastest plus the
        // margin: the claims decide.
        let slow_model = vec![candidate(honest, 1), candidate(liar, 0)];
        assert_eq!(
            route_with(slow_model, &[(honest, 2000.0), (liar, 2600.0)]),
            vec![liar, honest]
        );
    }
}
