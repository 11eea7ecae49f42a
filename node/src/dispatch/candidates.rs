//! Which nodes can answer a call, and in what order to try them: [`candidates`] (this node,
//! the model's providers in the DHT, each checked against its signed catalog) and [`route`]
//! (the ordering policy).

use std::collections::HashMap;

use libp2p::PeerId;
use mesh_protocol::{ErrorCode, ModelCard};

use super::failure::CallFailure;
use super::spec::Target;
use super::Dispatcher;
use crate::call::Calls;

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

/// Nodes that can answer `model`, with its card, least loaded first. This node alone when it
/// is the target, or when the target is `any` and it hosts the model itself.
pub async fn candidates(
    dispatcher: &Dispatcher,
    target: Target,
    model: &str,
) -> Result<Vec<Candidate>, CallFailure> {
    let client = &dispatcher.client;
    let me = client.local_peer_id();
    let local = dispatcher.local_candidate(model);
    let peers = match target {
        Target::Peer(peer) if peer == me => {
            return local.map(|l| vec![l]).ok_or_else(|| {
                CallFailure::local(
                    ErrorCode::UnknownModel,
                    format!("this node does not host model {model:?}"),
                )
            })
        }
        Target::Peer(peer) => vec![peer],
        Target::Any => {
            if let Some(local) = local {
                return Ok(vec![local]);
            }
            let found = client.find_providers(model).await.map_err(|e| {
                CallFailure::network(ErrorCode::Internal, format!("network failure: {e}"))
            })?;
            if found.is_empty() {
                return Err(CallFailure::local(
                    ErrorCode::UnknownModel,
                    format!("no node on the mesh announces model {model:?}"),
                ));
            }
            found
        }
    };
    let lookups = peers
        .iter()
        .map(|peer| async move { (*peer, client.catalog(*peer).await) });
    let mut found = Vec::new();
    let mut last_error = None;
    for (peer, result) in futures::future::join_all(lookups).await {
        match result {
            // A node that runs only some layers of the model does not answer calls for it.
            Ok((cards, load)) => match cards
                .into_iter()
                .find(|c| c.name == model && c.layers.is_none())
            {
                Some(card) => found.push(Candidate { peer, card, load }),
                None => {
                    last_error = Some(CallFailure::local(
                        ErrorCode::UnknownModel,
                        format!("node {peer} does not host model {model:?}"),
                    ))
                }
            },
            Err(e) => last_error = Some(CallFailure::from(&e)),
        }
    }
    found.sort_by_key(|c| c.load);
    match (found.is_empty(), last_error) {
        (true, Some(e)) => Err(e),
        _ => Ok(found),
    }
}

/// Orders providers best first: least busy (the load a provider advertised in its catalog plus
/// the calls this node has running on it), then the shortest measured round trip (libp2p ping;
/// this node itself counts as 0, a peer not yet measured as 1 s).
pub fn route(
    mut candidates: Vec<Candidate>,
    me: PeerId,
    rtt_ms: &HashMap<PeerId, f64>,
    in_flight: &HashMap<PeerId, u32>,
) -> Vec<Candidate> {
    let rtt = |peer: &PeerId| {
        if *peer == me {
            0.0
        } else {
            rtt_ms.get(peer).copied().unwrap_or(UNMEASURED_RTT_MS)
        }
    };
    let busy = |c: &Candidate| c.load + in_flight.get(&c.peer).copied().unwrap_or(0);
    candidates.sort_by(|a, b| {
        busy(a)
            .cmp(&busy(b))
            .then(rtt(&a.peer).total_cmp(&rtt(&b.peer)))
    });
    candidates
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use mesh_protocol::Task;

    pub(crate) use crate::test_support::random_peer as peer;

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
        let order = peers(route(candidates.clone(), peer(), &rtts, &HashMap::new()));
        assert_eq!(order, vec![near, far, unmeasured, busy]);

        // Calls this node already runs on `near` count against it.
        let in_flight = [(near, 1)].into_iter().collect();
        let order = peers(route(candidates, peer(), &rtts, &in_flight));
        assert_eq!(order, vec![far, unmeasured, near, busy]);
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
        let order = peers(route(candidates, me, &rtts, &HashMap::new()));
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
        ));
        assert_eq!(order, vec![a, b, me], "the sort is stable");
    }
}
