//! Which nodes run which layers of a split call: a plain function of what the head knows about
//! the stage hosts, tested without a network.
//!
//! The layers after the head's are covered with as few hops as the hosts allow (at each
//! boundary, the eligible host that reaches furthest; a tie goes to the shorter round trip,
//! then the lighter load). A host is eligible when its card names the head's weights, its
//! path is not a relay alone (unless relayed hops are allowed), and it has room. Every host
//! left out is named with its reason, and every hop keeps the other hosts that could run its
//! layers, to replace it if it fails.

use libp2p::PeerId;
use mesh_protocol::{LayerRange, ModelCard};

use crate::network::Path;

/// What the head knows about one node that runs layers of the model.
#[derive(Debug, Clone)]
pub struct StageHost {
    pub peer: PeerId,
    /// Its signed card (verified): the weights and the layers it holds.
    pub card: ModelCard,
    /// Calls and sessions it reported running.
    pub load: u32,
    /// The path to it, if connected.
    pub path: Option<Path>,
    pub rtt_ms: Option<f64>,
}

/// One hop of a plan: a host and the layers it runs.
#[derive(Debug, Clone, PartialEq)]
pub struct Hop {
    pub peer: PeerId,
    pub layers: LayerRange,
    pub path: Path,
    /// Other hosts that hold these layers, best first, to take over if this one fails.
    pub spares: Vec<PeerId>,
}

/// A plan for the layers `from..total`.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub hops: Vec<Hop>,
    /// Hosts left out, and why.
    pub excluded: Vec<(PeerId, String)>,
}

/// What a plan needs.
#[derive(Debug, Clone)]
pub struct Need {
    /// sha256 of the head's weights file.
    pub weights_sha256: String,
    /// The model's layer count.
    pub total: u32,
    /// The first layer not run by the head.
    pub from: u32,
    /// Use hosts reached only through a relay.
    pub allow_relayed: bool,
}

/// Why no plan covers the layers.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("no node runs layers {at}..{total} of these weights{}", excluded_list(.excluded))]
pub struct NoPlan {
    pub at: u32,
    pub total: u32,
    pub excluded: Vec<(PeerId, String)>,
}

fn excluded_list(excluded: &[(PeerId, String)]) -> String {
    if excluded.is_empty() {
        return String::new();
    }
    let list: Vec<String> = excluded
        .iter()
        .map(|(peer, why)| format!("{peer}: {why}"))
        .collect();
    format!(" (left out: {})", list.join("; "))
}

/// Why `host` cannot run layers for this head, if it cannot.
fn exclusion(host: &StageHost, need: &Need) -> Option<String> {
    let Some(layers) = host.card.layers else {
        return Some("it serves the whole model, not layers".into());
    };
    if host.card.sha256 != need.weights_sha256 {
        return Some(format!(
            "its weights differ ({} against the head's {})",
            host.card.sha256, need.weights_sha256
        ));
    }
    if layers.total != need.total || layers.validate().is_err() {
        return Some(format!(
            "its layers {layers} do not fit a model of {}",
            need.total
        ));
    }
    match host.path {
        None => return Some("not reachable".into()),
        Some(Path::Relayed) if !need.allow_relayed => {
            return Some("reachable only through a relay (--split-allow-relayed allows it)".into())
        }
        _ => {}
    }
    if host.load >= host.card.max_concurrency.max(1) {
        return Some(format!(
            "busy: {} of {} sessions",
            host.load, host.card.max_concurrency
        ));
    }
    None
}

/// The plan for `need`, from `hosts`.
pub fn plan(hosts: &[StageHost], need: &Need) -> Result<Plan, NoPlan> {
    let mut excluded = Vec::new();
    let mut eligible = Vec::new();
    for host in hosts {
        match exclusion(host, need) {
            Some(why) => excluded.push((host.peer, why)),
            None => eligible.push(host),
        }
    }
    let rank = |h: &&StageHost| (h.rtt_ms.unwrap_or(f64::MAX), h.load);
    let mut hops = Vec::new();
    let mut at = need.from;
    while at < need.total {
        let reaching = |h: &&&StageHost| {
            let l = h.card.layers.expect("eligible hosts have layers");
            l.start <= at && at < l.end
        };
        let mut here: Vec<&&StageHost> = eligible.iter().filter(reaching).collect();
        here.sort_by(|a, b| {
            let (ea, eb) = (a.card.layers.unwrap().end, b.card.layers.unwrap().end);
            eb.cmp(&ea).then(rank(a).partial_cmp(&rank(b)).unwrap())
        });
        let Some(best) = here.first() else {
            return Err(NoPlan {
                at,
                total: need.total,
                excluded,
            });
        };
        let end = best.card.layers.unwrap().end;
        let layers = LayerRange {
            start: at,
            end,
            total: need.total,
        };
        let mut spares: Vec<&&StageHost> = here[1..]
            .iter()
            .copied()
            .filter(|h| h.card.layers.unwrap().contains(&layers))
            .collect();
        spares.sort_by(|a, b| rank(a).partial_cmp(&rank(b)).unwrap());
        hops.push(Hop {
            peer: best.peer,
            layers,
            path: best.path.expect("eligible hosts are reachable"),
            spares: spares.iter().map(|h| h.peer).collect(),
        });
        at = end;
    }
    Ok(Plan { hops, excluded })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::random_peer;

    const SHA: &str = "ab";

    fn host(start: u32, end: u32, rtt: f64) -> StageHost {
        let mut card = crate::test_support::card("smol", mesh_protocol::Task::Generate);
        card.sha256 = SHA.into();
        card.max_concurrency = 4;
        card.layers = Some(LayerRange {
            start,
            end,
            total: 30,
        });
        StageHost {
            peer: random_peer(),
            card,
            load: 0,
            path: Some(Path::Direct),
            rtt_ms: Some(rtt),
        }
    }

    fn need(from: u32) -> Need {
        Need {
            weights_sha256: SHA.into(),
            total: 30,
            from,
            allow_relayed: false,
        }
    }

    fn ranges(plan: &Plan) -> Vec<(u32, u32)> {
        plan.hops
            .iter()
            .map(|h| (h.layers.start, h.layers.end))
            .collect()
    }

    #[test]
    fn the_fewest_hops_cover_the_layers_and_the_nearest_wins_a_tie() {
        let (a, b, c, far) = (
            host(10, 20, 1.0),
            host(20, 30, 1.0),
            host(10, 30, 5.0),
            host(10, 30, 50.0),
        );
        let p = plan(&[a.clone(), b.clone(), c.clone(), far.clone()], &need(10)).unwrap();
        assert_eq!(ranges(&p), vec![(10, 30)], "one hop beats two");
        assert_eq!(p.hops[0].peer, c.peer, "the nearer of the two whole ranges");
        assert_eq!(p.hops[0].spares, vec![far.peer]);
        let p = plan(&[a.clone(), b.clone()], &need(10)).unwrap();
        assert_eq!(ranges(&p), vec![(10, 20), (20, 30)]);
        // A host is used for part of its range when the head holds more.
        let p = plan(std::slice::from_ref(&c), &need(15)).unwrap();
        assert_eq!(ranges(&p), vec![(15, 30)]);
    }

    #[test]
    fn hosts_that_cannot_help_are_named_with_their_reason() {
        let mut other = host(10, 30, 1.0);
        other.card.sha256 = "cd".into();
        let mut relayed = host(10, 30, 1.0);
        relayed.path = Some(Path::Relayed);
        let mut busy = host(10, 30, 1.0);
        busy.load = 4;
        let mut gone = host(10, 30, 1.0);
        gone.path = None;
        let hosts = [other.clone(), relayed.clone(), busy.clone(), gone.clone()];
        let e = plan(&hosts, &need(10)).unwrap_err();
        assert_eq!(e.at, 10);
        let why = |peer| {
            e.excluded
                .iter()
                .find(|(p, _)| *p == peer)
                .unwrap()
                .1
                .clone()
        };
        assert!(why(other.peer).contains("weights differ"));
        assert!(why(relayed.peer).contains("relay"));
        assert!(why(busy.peer).contains("busy"));
        assert!(why(gone.peer).contains("not reachable"));
        assert!(e.to_string().contains("no node runs layers 10..30"), "{e}");
        // Allowed, the relayed host is used.
        let mut n = need(10);
        n.allow_relayed = true;
        let p = plan(&hosts, &n).unwrap();
        assert_eq!(p.hops[0].peer, relayed.peer);
        assert_eq!(p.hops[0].path, Path::Relayed);
    }

    #[test]
    fn a_gap_in_the_layers_is_where_the_plan_fails() {
        let e = plan(&[host(10, 18, 1.0), host(20, 30, 1.0)], &need(10)).unwrap_err();
        assert_eq!((e.at, e.total), (18, 30));
        assert!(plan(&[], &need(10)).is_err());
        assert_eq!(
            plan(&[], &need(30)).unwrap().hops,
            vec![],
            "nothing left to run"
        );
    }
}
